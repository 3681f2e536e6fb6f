"""Parameter types shared by the four methods.

Each type carries a pydantic constraint whose message names the parameter, so a bad value
is rejected when mergekit resolves the recipe (before anything is written) and when the
Python API binds it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from mergekit.merge_methods.base import MISSING, ParameterScope, ParameterSpec
from pydantic import AfterValidator
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


Lambda = Annotated[float, _check("lambda", "a finite number", lambda v: True)]
AgreementRho = Annotated[float, _check("rho", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)]
ClipRho = Annotated[float, _check("rho", "> 0", lambda v: v > 0.0)]

# FedNova's training record (fedmerge_plugins.methods.training_record); None: not given
Steps = Optional[Annotated[int, _check("steps", "an integer > 0", lambda v: v > 0)]]
LearningRate = Optional[Annotated[float, _check("learning_rate", "> 0", lambda v: v > 0.0)]]
ScheduleName = Optional[Annotated[str, _choice("schedule", SCHEDULES)]]
WarmupSteps = Optional[
    Annotated[float, _check("warmup_steps", "an integer >= 0, or a ratio in [0, 1)", lambda v: v >= 0 and (v < 1 or v == int(v)))]
]
WarmupRatio = Optional[Annotated[float, _check("warmup_ratio", "in [0, 1)", lambda v: 0.0 <= v < 1.0)]]
TrainingLog = Optional[Annotated[str, _nonempty("training_log")]]
Norm = Optional[Annotated[float, _check("norm", ">= 0", lambda v: v >= 0.0)]]


def shared(name: str, value_type: object, default: object = MISSING, doc: str = "") -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.SHARED, default=default, description=doc)


def per_model(name: str, value_type: object, default: object = MISSING, doc: str = "") -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.NON_BASE, default=default, description=doc)


LAMBDA = shared("lambda", Lambda, 1.0, "scaling coefficient λ applied to the aggregated task vector")
