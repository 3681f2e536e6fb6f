"""Every recipe under configs/ is a valid mergekit configuration whose method is registered
and whose parameters bind; the Llama-2-13B recipes (paper section 7, Table 5, appendix C)
use the paper's models and take λ and ρ from the paper's search grids, as their header
comments say; the fednova template refuses to merge while its placeholders are left."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import yaml
from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
from mergekit.merge_methods import registry
from mergekit.parameter_resolver import resolve_parameters

import fedmerge_plugins.guards.recipe as recipe_checks
from fedmerge_plugins import METHOD_NAMES
from fedmerge_plugins.guards.recipe import RecipeError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LLAMA = CONFIGS / "llama2-13b"
DEMO_TEMPLATES = CONFIGS / "demo"  # `fedmerge demo` fills their ${...} fields; test_demo.py checks the filled recipes
PLACEHOLDER = "FILL_IN"

# Paper Table 9 and section 7.2: role -> (Hugging Face id, global task-vector L2 norm).
BASE = "meta-llama/Llama-2-13b-hf"
TASKS = {
    "instruction": ("WizardLMTeam/WizardLM-13B-V1.2", 142.61),
    "math": ("vanillaOVO/WizardMath-13B-V1.0", 52.62),
    "code": ("layoric/llama-2-13b-code-alpaca", 5.05),
}
ROLE_OF = {hub_id: role for role, (hub_id, _) in TASKS.items()}
PAIRS = ("math-code", "instruction-math", "instruction-code", "instruction-math-code")  # Table 5
TABLE5_METHODS = ("task_arithmetic", "fedgma", "cclip")
LAMBDA_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)  # appendix C.1
FEDGMA_RHO = 0.1  # appendix C.1
TOP_LEVEL = ("cclip", "fedgma", "median", "task_arithmetic")  # copies of llama2-13b/instruction-math-code/


def cclip_grid(roles: List[str]) -> List[float]:
    """Appendix C.1: five evenly spaced values from the smallest norm (included) to the largest (excluded)."""
    norms = [TASKS[role][1] for role in roles]
    low, high = min(norms), max(norms)
    return [low + k * (high - low) / 5 for k in range(5)]


def recipe_files() -> List[Path]:
    """Every recipe under configs/ except the demo's templates."""
    found = (p for pattern in ("*.yml", "*.yaml") for p in CONFIGS.glob(f"**/{pattern}"))
    return sorted(p for p in found if DEMO_TEMPLATES not in p.parents)


def llama_recipes() -> List[Path]:
    """The Llama-2-13B recipes: configs/*.yml and configs/llama2-13b/**."""
    return sorted(CONFIGS.glob("*.yml")) + sorted(LLAMA.glob("**/*.yml"))


def load_recipe(path: Path) -> Optional[dict]:
    """The parsed YAML if it is a mergekit recipe (a mapping with `merge_method`), else None."""
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) and "merge_method" in data else None


def header(path: Path) -> str:
    """The comment block at the top of a recipe."""
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def output_groups(config: MergeConfiguration) -> Iterator[ConfigReader]:
    """A ConfigReader per output slice, as MergePlanner builds them (models become one slice)."""
    top = ConfigReader(config=config, t=0.0)
    holders = [(top, config)]
    holders += [(top.model_copy(update={"module": module}), module) for module in (config.modules or {}).values()]
    for reader, holder in holders:
        if holder.models:
            sources = [
                InputSliceDefinition(model=m.model, layer_range=(0, 1), parameters=m.parameters) for m in holder.models
            ]
            yield reader.for_out_slice(OutputSliceDefinition(sources=sources))
        for output_slice in holder.slices or []:
            yield reader.for_out_slice(output_slice)


def bind(config: MergeConfiguration, tensor_name: str = "model.layers.0.mlp.down_proj.weight") -> List[tuple]:
    """mergekit's own parameter binding (parameter_resolver) for every output slice."""
    spec = registry.get(config.merge_method).spec
    bound = []
    for reader in output_groups(config):
        inputs = {source.model: tensor_name for source in reader.slice_out.sources}
        if reader.base_model is not None:
            inputs.setdefault(reader.base_model, tensor_name)
        bound.append(
            resolve_parameters(
                spec, tensor_name=tensor_name, inputs=inputs, sources=reader.parameter_sources, base_model=reader.base_model
            )
        )
    return bound


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_is_valid_and_its_parameters_bind(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = load_recipe(path)
    if raw is None:
        pytest.skip(f"{path.name} is not a mergekit recipe")
    config = MergeConfiguration.model_validate(raw)
    assert config.merge_method in {m.spec.name for m in registry.registered_methods()}, config.merge_method
    # check_recipe's last step finds the models and reads their shapes; the shape-twin test runs it.
    monkeypatch.setattr(recipe_checks, "check_inputs", lambda config, **context: None)
    if PLACEHOLDER in path.read_text():
        with pytest.raises(RecipeError, match="placeholder"):
            recipe_checks.check_recipe(config)
        return
    recipe_checks.check_recipe(config)
    bind(config)  # raises for a missing required value or a value its type rejects


@pytest.mark.parametrize("method", ["fednova", "fedgma", "median", "cclip"])
def test_unfilled_demo_template_fails_with_a_clear_message(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who runs a template from configs/demo/ as it is learns that its fields are to be filled."""
    config = MergeConfiguration.model_validate(load_recipe(DEMO_TEMPLATES / "instruction-math-code" / f"{method}.yml"))
    monkeypatch.setattr(recipe_checks, "check_inputs", lambda config, **context: None)
    with pytest.raises(RecipeError, match=r"`lambda` = '\$\{lambda\}' is invalid: a placeholder"):
        recipe_checks.check_recipe(config)


def test_the_binding_check_can_fail() -> None:
    """A task_arithmetic recipe without the required per-model `weight` does not bind."""
    config = MergeConfiguration.model_validate(
        {"merge_method": "task_arithmetic", "base_model": "/b", "models": [{"model": "/a"}]}
    )
    with pytest.raises(RuntimeError, match="Missing required parameter weight for /a"):
        bind(config)


def test_layout_has_every_table5_pairing_and_the_top_level_recipes() -> None:
    expected = {f"{pair}/{method}.yml" for pair in PAIRS for method in TABLE5_METHODS}
    expected.add("instruction-math-code/median.yml")
    assert {str(p.relative_to(LLAMA)) for p in LLAMA.glob("**/*.yml")} == expected
    for method in TOP_LEVEL:
        twin = LLAMA / "instruction-math-code" / f"{method}.yml"
        assert load_recipe(CONFIGS / f"{method}.yml") == load_recipe(twin), method
    assert (CONFIGS / "fednova.yml").is_file()


@pytest.mark.parametrize("path", llama_recipes(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_llama_recipe_follows_the_paper(path: Path) -> None:
    recipe = load_recipe(path)
    method = recipe["merge_method"]
    roles = [ROLE_OF[m["model"]] for m in recipe["models"]]
    pair = path.parent.name if path.parent != CONFIGS else "instruction-math-code"
    assert roles == pair.split("-")
    assert recipe["base_model"] == BASE
    assert recipe["tokenizer"] == {"source": "base"}  # WizardMath: 32001 tokens, the base 32000
    assert recipe["dtype"] == "float32" and recipe["out_dtype"] in ("float16", "bfloat16")
    parameters: Dict[str, float] = recipe["parameters"]
    comment = header(path)
    assert comment and "appendix C.1" in comment
    assert parameters["lambda"] in LAMBDA_GRID
    assert f"lambda = {parameters['lambda']}" in comment
    expected_keys = {"lambda"}
    if method == "fedgma":
        expected_keys.add("rho")
        assert parameters["rho"] == FEDGMA_RHO
    if method == "cclip":
        expected_keys.add("rho")
        grid = cclip_grid(roles)
        assert min(abs(parameters["rho"] - value) for value in grid) < 1e-9, (parameters["rho"], grid)
        assert ", ".join(f"{v:.3f}".rstrip("0").rstrip(".") for v in grid) in comment
    if "rho" in parameters:
        assert f"rho = {parameters['rho']}" in comment
    assert set(parameters) == expected_keys
    per_model = [m.get("parameters") for m in recipe["models"]]
    if method == "task_arithmetic":
        assert per_model == [{"weight": 1.0}] * len(roles)
    elif method == "fednova":
        assert per_model == [{"steps": "FILL_IN_STEPS", "learning_rate": "FILL_IN_LEARNING_RATE"}] * len(roles)
    else:
        assert per_model == [None] * len(roles)
    if method == "median":
        assert len(roles) == 3  # the median of two task vectors is their mean (section 7)


def test_fednova_template_names_the_model_and_the_missing_value() -> None:
    """The shipped template fails in check_recipe before any checkpoint is touched."""
    config = MergeConfiguration.model_validate(load_recipe(CONFIGS / "fednova.yml"))
    with pytest.raises(RecipeError) as error:
        recipe_checks.check_recipe(config)
    message = str(error.value)
    assert f"model {TASKS['instruction'][0]}" in message
    assert re.search(r"`steps` = 'FILL_IN_STEPS' is invalid: .*fill in the real value", message), message
