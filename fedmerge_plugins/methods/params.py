"""Parameter types shared by the four methods.

Each type carries a pydantic constraint whose message names the parameter, so a bad value
is rejected when mergekit resolves the recipe (before anything is written) and when the
Python API binds it.

A recipe must give each method's own value (ρ; FedNova's training record): the recipe
check (``guards.recipe``) refuses one without it. For mergekit's Python API called with no
value (``merge_state_dicts``; mergekit's own test suite runs every registered method with
only ``weight``, ``t`` and ``density``), the spec declares the value at which the method is
task arithmetic instead (``recipe_required``): FedGMA ρ = 0, CCLIP no clipping, FedNova
equal training.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from dataclasses import dataclass

from mergekit.merge_methods.base import MISSING, ParameterScope, ParameterSpec
from pydantic import AfterValidator, BeforeValidator
from typing_extensions import Annotated

from fedmerge_plugins.methods.training_record import SCHEDULES


def _check(name: str, rule: str, ok: Callable[[float], bool]) -> AfterValidator:
    def validate(value: float) -> float:
        if math.isinf(value):  # e.g. 1e309, beyond the float range
            raise ValueError(f"parameter `{name}` must be a finite number ({rule}); got {value!r}: beyond the float range")
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"parameter `{name}` must be {rule}; got {value!r}")
        return value

    return AfterValidator(validate)


def _refuse_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError(f"a number, not {value!r}")
    return value


NUMBER = BeforeValidator(_refuse_bool)


def _choice(name: str, choices: Sequence[str]) -> AfterValidator:
    def validate(value: str) -> str:
        if value not in choices:
            raise ValueError(f"parameter `{name}` must be one of {', '.join(choices)}; got {value!r}")
        return value

    return AfterValidator(validate)


def _nonempty(name: str) -> AfterValidator:
    def validate(value: str) -> str:
        if not value.strip():
            raise ValueError(f"parameter `{name}` must be a path")
        return value

    return AfterValidator(validate)


Lambda = Annotated[float, NUMBER, _check("lambda", "a finite number", lambda v: True)]
AgreementRho = Annotated[float, NUMBER, _check("rho", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)]
ClipRho = Optional[Annotated[float, NUMBER, _check("rho", "> 0", lambda v: v > 0.0)]]  # None: no clipping (API only)

# FedNova's training record (fedmerge_plugins.methods.training_record); None: not given
Steps = Optional[Annotated[int, NUMBER, _check("steps", "an integer > 0", lambda v: v > 0)]]
LearningRate = Optional[Annotated[float, NUMBER, _check("learning_rate", "> 0", lambda v: v > 0.0)]]
ScheduleName = Optional[Annotated[str, _choice("schedule", SCHEDULES)]]
WarmupSteps = Optional[
    Annotated[float, NUMBER, _check("warmup_steps", "an integer >= 0, or a ratio in [0, 1)", lambda v: v >= 0 and (v < 1 or v == int(v)))]
]
WarmupRatio = Optional[Annotated[float, NUMBER, _check("warmup_ratio", "in [0, 1)", lambda v: 0.0 <= v < 1.0)]]
TrainingLog = Optional[Annotated[str, _nonempty("training_log")]]
Norm = Optional[Annotated[float, NUMBER, _check("norm", ">= 0", lambda v: v >= 0.0)]]


@dataclass(frozen=True)
class RecipeRequired(ParameterSpec):
    """A parameter a recipe must give; its ``default`` (task arithmetic) serves mergekit's
    Python API called without it."""


def required_in_recipe(parameter: ParameterSpec) -> bool:
    return parameter.required or isinstance(parameter, RecipeRequired)


def recipe_required(name: str, value_type: object, default: object, doc: str = "") -> ParameterSpec:
    """A shared parameter every recipe gives; ``default`` only outside a recipe."""
    return RecipeRequired(name, value_type, ParameterScope.SHARED, default=default, description=doc)


def shared(name: str, value_type: object, default: object = MISSING, doc: str = "") -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.SHARED, default=default, description=doc)


def per_model(name: str, value_type: object, default: object = MISSING, doc: str = "") -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.NON_BASE, default=default, description=doc)


LAMBDA = shared("lambda", Lambda, 1.0, "scaling coefficient λ applied to the aggregated task vector")
