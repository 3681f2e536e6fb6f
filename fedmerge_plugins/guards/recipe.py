"""Recipe checks, run before mergekit plans a merge.

mergekit ignores keys it does not know (a top-level ``paramters:``, a parameter a method
does not declare), so a typo such as ``lamda`` would silently merge with the default.
For every method, ``check_recipe_text``/``check_keys`` reject a recipe key mergekit's
``MergeConfiguration`` does not have, and ``check_recipe`` an unknown ``merge_method``,
a parameter the method's spec does not declare and a model listed twice, and warns (one
line) about a base model also listed as a task model (mergekit drops it from the tasks).
For fedmerge's methods it rejects too, naming the model and key: shared parameters set
per model, missing values (``rho``; fednova's ``steps`` or ``training_log``, whose logs
are read and checked here), placeholders left in a recipe, values out of range, a
missing base model; ``check_inputs`` adds models that do not exist (``model_sources``)
and weight files or tensor shapes that cannot merge (``shapes``, from the headers).
``fedmerge_plugins.guards.hooks``
runs the recipe-only checks at the start of ``run_merge`` (before any model is resolved or
downloaded) and all of them, shapes included, when ``MergePlanner`` starts (before any
output exists).
"""

from __future__ import annotations

import difflib
import logging
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Set, Tuple, Type

import mergekit.config
from mergekit.common import ModelReference
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import BaseModel, ValidationError

from fedmerge_plugins import METHOD_NAMES
from fedmerge_plugins.errors import RecipeError
from fedmerge_plugins.methods.params import required_in_recipe

if TYPE_CHECKING:
    from fedmerge_plugins.methods.training_record import EffectiveSteps

Block = Tuple[str, Optional[ModelReference], Dict[str, Any]]
LOG = logging.getLogger(__name__)
_WARNED: Set[str] = set()  # warnings already given in this process (a sweep checks each point)


def parameter_blocks(config: MergeConfiguration) -> Iterator[Block]:
    """(where, model or None, parameters) for every parameter block of the recipe."""
    yield "top-level parameters", None, config.parameters or {}
    for model in config.models or []:
        yield f"model {model.model}", model.model, model.parameters or {}
    slices = list(config.slices or [])
    for module_name, module in (config.modules or {}).items():
        yield f"module {module_name}", None, module.parameters or {}
        for model in module.models or []:
            yield f"model {model.model}", model.model, model.parameters or {}
        slices.extend(module.slices or [])
    for index, output_slice in enumerate(slices):
        yield f"slices[{index}]", None, output_slice.parameters or {}
        for source in output_slice.sources:
            yield f"model {source.model}", source.model, source.parameters or {}


def task_models(config: MergeConfiguration) -> List[ModelReference]:
    """The models other than the base, in the order the recipe first names them."""
    found: List[ModelReference] = []
    for _, model, _ in parameter_blocks(config):
        if model is not None and model != config.base_model and model not in found:
            found.append(model)
    return found


def recipe_models(config: MergeConfiguration) -> Tuple[ModelReference, List[ModelReference]]:
    """(base model, task models in recipe order) of a recipe with a ``base_model``."""
    if config.base_model is None:
        raise RecipeError(f"{config.merge_method}: the recipe has no `base_model:`; task vectors need one")
    tasks = task_models(config)
    if not tasks:
        raise RecipeError("the recipe names no task model besides the base model")
    return config.base_model, tasks


def model_value(config: MergeConfiguration, model: ModelReference, key: str, default: Any = None) -> Any:
    """A per-model value as mergekit resolves it: the model's own, else a shared default."""
    blocks = list(parameter_blocks(config))
    found = next((b[key] for _, m, b in blocks if m == model and key in b), None)
    if found is None:
        found = next((b[key] for _, m, b in blocks if m is None and key in b), default)
    return found


def load_recipe(path: Path, *, shapes: bool = True) -> Tuple[Dict[str, Any], MergeConfiguration]:
    """The recipe file as YAML data and as a ``MergeConfiguration`` checked by
    ``check_keys`` and ``check_recipe`` (``shapes=False``: without opening any checkpoint)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: cannot read the recipe: {error}") from None
    check_keys(data, f"{path}: ")
    try:
        config = MergeConfiguration.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        reason = first["msg"].removeprefix("Value error, ")
        raise RecipeError(f"{path}: not a valid mergekit recipe: {where + ': ' if where else ''}{reason}") from None
    except RuntimeError as error:  # mergekit's own validators' way to refuse (e.g. no `models:`)
        raise RecipeError(f"{path}: not a valid mergekit recipe: {error}") from None
    check_recipe(config, shapes=False, from_file=True)
    if shapes:  # whatever the method: inspect reads any recipe's models
        check_inputs(config)
    return data, config


def _section(annotation: Any) -> Optional[Type[BaseModel]]:
    """The ``mergekit.config`` class a list or dict field holds (``models``, ``slices``,
    ``sources``, ``modules``), if any."""
    for argument in typing.get_args(annotation):
        if isinstance(argument, type) and issubclass(argument, BaseModel):
            return argument if argument.__module__ == mergekit.config.__name__ else None
        found = _section(argument)
        if found is not None:
            return found
    return None


def check_keys(data: Any, prefix: str = "", model: Type[BaseModel] = MergeConfiguration, where: str = "") -> None:
    """Raise RecipeError for a key mergekit's recipe classes (``MergeConfiguration`` and the
    sections of ``mergekit.config`` it holds: models, slices, sources, modules) do not
    have; pydantic would drop it without a word. Parameter names: ``check_recipe``."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; mergekit reads {', '.join(f'`{k}`' for k in fields)}"
            raise RecipeError(f"{prefix}unknown recipe key `{key}` {f'in {where}' if where else 'at the top level'}{hint}")
    for name, field in fields.items():
        section, value = _section(field.annotation), data.get(field.alias or name)
        if section is None or name == "parameters":
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for index, item in items:
            check_keys(item, prefix, section, f"{where + '.' if where else ''}{name}[{index}]")


def check_recipe_text(source: Optional[str]) -> bool:
    """``check_keys`` on a recipe's YAML text (what mergekit-yaml passes to ``run_merge``);
    whether there was one (the recipe came from a file)."""
    import yaml

    if not source:
        return False
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError:
        return True  # mergekit read it already
    check_keys(data)
    return True


def _leaves(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can resolve to (gradients, filtered conditionals)."""
    if isinstance(setting, ConditionalParameter):
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def _check_value(method: str, where: str, parameter: ParameterSpec, setting: Any) -> None:
    for value in _leaves(setting):
        try:
            parameter.validate(value)
        except ValidationError as error:
            if isinstance(value, str) and error.errors()[0]["type"].endswith("_parsing"):
                reason = "a placeholder or text, not a number: fill in the real value"
            else:
                reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise RecipeError(f"{method}: {where}: `{parameter.name}` = {value!r} is invalid: {reason}") from None


def check_inputs(config: MergeConfiguration, *, arch_info: Any = None, options: Any = None) -> None:
    """Every model the recipe names exists (``model_sources``), its weight files can be
    read, and its tensors have shapes that merge with the base's (``shapes``)."""
    from fedmerge_plugins.guards.sources import check_sources

    check_sources(config, cache_dir=getattr(options, "transformers_cache", None))
    _check_shapes(config, arch_info, options)


def _check_shapes(config: MergeConfiguration, arch_info: Any, options: Any) -> None:
    from fedmerge_plugins.guards.shapes import check_shapes

    truncate = bool(getattr(options, "unsafe_truncate_embeddings", False))
    check_shapes(config, task_models(config), arch_info=arch_info, truncate_embeddings=truncate)


def check_recipe(
    config: MergeConfiguration, *, shapes: bool = True, arch_info: Any = None, options: Any = None, from_file: bool = False
) -> None:
    """Raise RecipeError for problems in a recipe: for every method an unknown method or a
    model listed twice, and in a recipe file (``from_file``: mergekit-yaml's, inspect's,
    the sweep's) a parameter the method does not declare; for fedmerge's methods all of
    that always, and everything else. A ``MergeConfiguration`` built in Python for one of
    mergekit's methods keeps mergekit's leniency (its own tests rely on it).

    ``shapes=False`` skips ``check_inputs``, the checks that read checkpoint headers (and
    so may have to download them): the rest needs only the recipe. ``arch_info`` and
    ``options``: mergekit's, inside a merge.
    """
    method = config.merge_method
    registered = sorted(m.spec.name for m in registry.registered_methods())
    if method not in registered:
        raise RecipeError(f"unknown merge_method `{method}`; registered: {', '.join(registered)}")
    blocks = list(parameter_blocks(config))
    _check_models(config)
    spec = registry.get(method).spec
    parameters = {p.name: p for p in spec.parameters}
    for where, model, block in blocks if from_file or method in METHOD_NAMES else ():
        for key in block:
            if key not in parameters:
                takes = ", ".join(f"`{name}`" for name in parameters) or "no parameters"
                raise RecipeError(f"{method}: {where}: unknown parameter `{key}`; {method} takes {takes}")
    if method not in METHOD_NAMES:
        return
    if config.base_model is None and not any(s.base_model for s in config.slices or []):
        raise RecipeError(
            f"{method}: the recipe has no `base_model:`; {method} merges task vectors "
            "θ_t − θ_0 and needs the pre-trained model they were fine-tuned from"
        )
    for where, model, block in blocks:
        for key, setting in block.items():
            parameter = parameters[key]
            if model is not None and parameter.scope == ParameterScope.SHARED:
                raise RecipeError(
                    f"{method}: {where}: `{key}` is shared by all models; "
                    "set it under the top-level `parameters:`"
                )
            _check_value(method, where, parameter, setting)
    defaults = {k for where, model, block in blocks if model is None for k in block}
    for parameter in spec.parameters:
        if not required_in_recipe(parameter):
            continue
        if parameter.scope == ParameterScope.SHARED:
            if parameter.name not in defaults:
                raise RecipeError(f"{method}: missing required parameter `{parameter.name}`")
            continue
        for task in task_models(config):
            given = any(model == task and parameter.name in block for _, model, block in blocks)
            if not given and parameter.name not in defaults:
                raise RecipeError(f"{method}: model {task}: missing required parameter `{parameter.name}`")
    if method == "fednova":
        for task in task_models(config):
            training_record(config, task)
    if shapes:
        check_inputs(config, arch_info=arch_info, options=options)


def _check_models(config: MergeConfiguration) -> None:
    """A model listed twice in one list is an error; for fedmerge's methods, the base model
    also listed as a task model is a warning (mergekit merges it as the base only: a median
    "of three" is of two; mergekit's own methods list the base so on purpose, e.g. slerp)."""
    lists = [("`models:`", config.models or [])]
    lists += [(f"module {name}", module.models or []) for name, module in (config.modules or {}).items()]
    lists += [(f"slices[{i}]", s.sources) for i, s in enumerate(config.slices or [])]
    for where, entries in lists:
        seen: List[ModelReference] = []
        for entry in entries:
            if entry.model in seen:
                raise RecipeError(f"{config.merge_method}: model {entry.model} is listed twice in {where}")
            seen.append(entry.model)
        if config.merge_method in METHOD_NAMES and config.base_model is not None and config.base_model in seen:
            _warn(
                f"{config.merge_method}: base model {config.base_model} is also listed in {where}: mergekit "
                f"uses it as the base only, so {len(seen) - 1} task model(s) are merged, not {len(seen)}"
            )


def _warn(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        LOG.warning("%s", message)


def check_recipe_shapes(config: MergeConfiguration, *, arch_info: Any = None, options: Any = None) -> None:
    """The shape part of ``check_recipe`` alone (a recipe whose other checks and sources
    were checked already, inside ``run_merge``)."""
    if config.merge_method in METHOD_NAMES:
        _check_shapes(config, arch_info, options)


def training_record(config: MergeConfiguration, model: ModelReference) -> "EffectiveSteps":
    """FedNova's ‖a_t‖₁ for ``model`` from the recipe's values (its logs read and checked)."""
    from fedmerge_plugins.methods.training_record import RECORD_KEYS, TrainingRecordError, effective_steps

    parameters = {p.name: p for p in registry.get("fednova").spec.parameters}
    values: Dict[str, Any] = {}
    for key in RECORD_KEYS:
        setting = model_value(config, model, key)
        if isinstance(setting, (list, ConditionalParameter)):
            hint = f"; join several runs' paths with {os.pathsep!r}" if key == "training_log" else ""
            raise RecipeError(
                f"fednova: model {model}: `{key}` must be one value for the whole model "
                f"(a list or filter is a per-layer setting in mergekit{hint})"
            )
        values[key] = None if setting is None else parameters[key].validate(setting)
    try:
        return effective_steps(values)
    except TrainingRecordError as error:
        raise RecipeError(f"fednova: model {model}: {error}") from None
