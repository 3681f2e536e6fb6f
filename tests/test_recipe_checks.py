"""check_recipe: clear errors naming the model and key, before mergekit plans anything."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
from mergekit.config import MergeConfiguration

from fedmerge_plugins.guards.recipe import RecipeError, check_recipe
from tests.support.synthetic import Family, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.02), extra_tokens=(0, 1))


def config(family: Family, method: str, parameters: Dict, per_model=({}, {}), **extra) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(family.base),
            "models": [{"model": str(p), "parameters": m} for p, m in zip(family.tasks, per_model)],
            "parameters": parameters,
            "tokenizer": {"source": "base"},
            **extra,
        }
    )


def test_valid_recipes_pass(family: Family) -> None:
    check_recipe(config(family, "fednova", {"lambda": 0.5}, ({"steps": 10}, {"steps": 20, "learning_rate": 1e-4})))
    check_recipe(config(family, "fednova", {"steps": 10}))  # a top-level default covers every model
    check_recipe(config(family, "cclip", {"rho": 3.0}, ({"norm": 1.5}, {})))
    check_recipe(config(family, "fedgma", {"rho": [0.1, 0.9], "lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}))


def test_other_methods_are_lenient_in_python_and_strict_in_recipe_files(family: Family) -> None:
    """A configuration built in Python keeps mergekit's leniency (mergekit's own tests pass
    keys a method ignores); a recipe file (mergekit-yaml, inspect, sweep) does not."""
    check_recipe(config(family, "task_arithmetic", {"anything": 1}))
    with pytest.raises(RecipeError, match=r"^task_arithmetic: top-level parameters: unknown parameter `anything`; task_arithmetic takes "):
        check_recipe(config(family, "task_arithmetic", {"anything": 1}), from_file=True)
    check_recipe(config(family, "task_arithmetic", {"lambda": 0.5}, ({"weight": 1.0}, {"weight": 0.5})), from_file=True)


@pytest.mark.parametrize("method,parameters", [("fedgma", {}), ("cclip", {}), ("fednova", {})])
def test_python_api_without_the_methods_value_is_task_arithmetic(method: str, parameters: Dict) -> None:
    """mergekit's own test suite runs every method with only `weight`, `t`, `density`: the
    spec's defaults are the values at which each method is task arithmetic (FedGMA ρ = 0,
    CCLIP no clipping, FedNova equal training); a recipe must still give them (below)."""
    import torch
    from mergekit.merge_methods.api import merge_state_dicts

    generator = torch.Generator().manual_seed(3)
    inputs = {name: {"w": torch.randn(7, 5, generator=generator)} for name in ("base", "a", "b")}
    merged = merge_state_dicts(inputs, method, base="base", parameters={"lambda": 0.7, **parameters})["w"]
    reference = merge_state_dicts(inputs, "task_arithmetic", base="base", parameters={"lambda": 0.7, "weight": 1.0})["w"]
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method,parameters,per_model,needle",
    [
        ("fednova", {}, ({"steps": 10}, {}), r"fednova: model .*/task1: missing required parameter `steps`"),
        ("fednova", {"steps": 10}, ({"learning_rte": 0.1}, {}), r"model .*/task0: unknown parameter `learning_rte`"),
        ("fedgma", {"rho": 0.5}, ({"rho": 0.2}, {}), r"model .*/task0: `rho` is shared by all models"),
        ("fedgma", {"rho": [0.1, 1.2]}, ({}, {}), r"top-level parameters: `rho` = 1.2 is invalid: parameter `rho` must be in \[0, 1\]"),
        ("cclip", {"rho": 1.0}, ({"norm": -2.0}, {}), r"model .*/task0: `norm` = -2.0 is invalid: parameter `norm` must be >= 0"),
        ("cclip", {"lambda": 0.5}, ({}, {}), r"cclip: missing required parameter `rho`"),
        ("fedgma", {"lambda": 0.5}, ({}, {}), r"fedgma: missing required parameter `rho`"),
        ("fednova", {"lambda": 0.5}, ({}, {}), r"fednova: model .*/task0: missing required parameter `steps` \(or give `training_log`\)"),
        ("fedgma", {"rho": True}, ({}, {}), r"`rho` = True is invalid: a number, not True"),
        ("median", {"lambda": 0.5}, ({}, {}), None),
        ("median", {"weight": 1.0}, ({}, {}), r"unknown parameter `weight`; median takes `lambda`"),
        ("fednova", {"steps": "<fill in>"}, ({}, {}), r"`steps` = '<fill in>' is invalid: a placeholder"),
        ("fednova", {"steps": 10, "learning_rate": 1e-4}, ({"schedule": "cosine_restarts"}, {}),
         r"task0: `schedule` = 'cosine_restarts' is invalid: parameter `schedule` must be one of constant, linear, cosine,"),
        ("fednova", {"steps": 10, "learning_rate": 1e-4, "schedule": "linear"}, ({"warmup_steps": 2.5}, {}),
         r"`warmup_steps` = 2.5 is invalid: parameter `warmup_steps` must be an integer >= 0, or a ratio in \[0, 1\)"),
        ("fednova", {}, ({"training_log": ["/a", "/b"]}, {"steps": 3}),
         r"task0: `training_log` must be one value for the whole model \(a list or filter is a per-layer setting in mergekit; join several runs' paths with ':'\)"),
        ("fednova", {}, ({"training_log": "/no/such/run"}, {"steps": 3}), r"fednova: model .*/task0: `training_log`: /no/such/run: no such file or folder"),
        ("fednova", {"learning_rate": 1e-4}, ({"steps": 10, "warmup_steps": 3}, {"steps": 3}), r"model .*/task0: `warmup_steps`/`warmup_ratio` need a `schedule`"),
    ],
)
def test_problems_are_named(family: Family, method, parameters, per_model, needle) -> None:
    if needle is None:  # the control: the same form, valid
        check_recipe(config(family, method, parameters, per_model))
        return
    with pytest.raises(RecipeError, match=needle):
        check_recipe(config(family, method, parameters, per_model))


def test_vocabulary_mismatch_needs_a_tokenizer_setting(family: Family) -> None:
    recipe = config(family, "median", {})
    check_recipe(recipe)
    recipe.tokenizer = None
    with pytest.raises(RecipeError, match=r"task1: tensor .* has shape \(97, 32\), the base model \(96, 32\)"):
        check_recipe(recipe)
