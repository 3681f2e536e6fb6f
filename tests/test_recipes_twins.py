"""Shape twins: every Llama-2-13B recipe in configs/ runs end to end with its four Hugging Face
ids swapped for tiny local Llama checkpoints of the same roles and quirks, and the written
weights are checked against float64 computations from the twins' tensors.

The twins copy what matters to the recipes: the math model has one extra vocabulary row
and token (WizardMath-13B: 32001 against Llama-2's 32000), the task vectors have the
paper's global norms (142.61, 52.62, 5.05; so each CCLIP ρ clips the same models as on the
real checkpoints), and the code model, like the QLoRA-tuned code-alpaca, changes only the
adapter's projections (q_proj, v_proj), leaving exact zeros in its task vector elsewhere.
The top-level recipes and the fednova template go through the real ``mergekit-yaml``; the
others through ``mergekit.merge.run_merge``, the function ``mergekit-yaml`` calls.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file

from tests.support.synthetic import Tensors, llama_config, make_family, parameter_shapes, write_checkpoint
from tests.conftest import BIN
from tests.test_recipes import BASE, CONFIGS, TASKS, llama_recipes, load_recipe

pytestmark = pytest.mark.slow
ROLES = list(TASKS)  # instruction, math, code
ADAPTER = ("q_proj", "v_proj")  # the only weights the code twin changes
TOLERANCE = dict(rtol=1e-3, atol=1e-6)  # float16 output: half an ulp is 4.9e-4 relative


@dataclass
class Twins:
    paths: Dict[str, Path]  # "base" and each role -> checkpoint directory
    tensors: Dict[str, Tensors]

    def role(self, model: str) -> str:
        """The role of a recipe's model, given as a hub id or as a twin's path."""
        by_reference = {BASE: "base", **{hub: r for r, (hub, _) in TASKS.items()}}
        by_reference.update({str(path): r for r, path in self.paths.items()})
        return by_reference[model]

    def swap(self, text: str) -> str:
        """A recipe's text with each hub id replaced by the twin of the same role."""
        for hub, role in ((BASE, "base"), *((hub, r) for r, (hub, _) in TASKS.items())):
            text = text.replace(hub, str(self.paths[role]))
        return text


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    config = llama_config()
    shapes = parameter_shapes(config)
    everything = math.sqrt(sum(s.numel() for s in shapes.values()))
    adapter = math.sqrt(sum(s.numel() for n, s in shapes.items() if any(a in n for a in ADAPTER)))
    norms = [norm for _, norm in TASKS.values()]
    scales = (norms[0] / everything, norms[1] / everything, norms[2] / adapter)
    root = tmp_path_factory.mktemp("twins")
    family = make_family(root, scales, config=config, names=ROLES, extra_tokens=(0, 1, 0), dtype=torch.float16)
    code = {
        name: tensor if any(a in name for a in ADAPTER) else family.base_tensors[name].clone()
        for name, tensor in family.task_tensors[2].items()
    }
    write_checkpoint(root / "code", config, code)
    tensors = {"base": family.base_tensors, **dict(zip(ROLES, family.task_tensors[:2])), "code": code}
    return Twins({"base": family.base, **dict(zip(ROLES, family.tasks))}, tensors)


def task_vectors(twins: Twins, roles: List[str]) -> Dict[str, torch.Tensor]:
    """Stacked τ_t per tensor in float64, vocabulary rows trimmed to the base's (tokenizer: base)."""
    result = {}
    for name, base in twins.tensors["base"].items():
        rows = base.shape[0]
        result[name] = torch.stack([twins.tensors[r][name][:rows].double() - base.double() for r in roles])
    return result


def expected_merge(recipe: dict, twins: Twins) -> Dict[str, torch.Tensor]:
    """The recipe's merge computed from the paper's formulas, independently of the plugin."""
    method, parameters = recipe["merge_method"], recipe.get("parameters", {})
    lam = parameters.get("lambda", 1.0)
    roles = [twins.role(m["model"]) for m in recipe["models"]]
    settings = [m.get("parameters") or {} for m in recipe["models"]]
    tau = task_vectors(twins, roles)
    base = {name: tensor.double() for name, tensor in twins.tensors["base"].items()}
    if method == "median":
        count = len(roles)
        middle = lambda v: (v[(count - 1) // 2] + v[count // 2]) / 2  # noqa: E731 (even count: mean of two)
        return {n: base[n] + lam * middle(v.sort(0).values) for n, v in tau.items()}
    if method == "fedgma":
        merged = {}
        for name, v in tau.items():
            agreement = torch.sign(v).mean(0).abs()
            mask = torch.where(agreement >= parameters["rho"], torch.ones_like(agreement), agreement)
            merged[name] = base[name] + lam * mask * v.sum(0)
        return merged
    if method == "task_arithmetic":
        coefficients = [s["weight"] for s in settings]
    elif method == "fednova":
        steps = [s["steps"] * s.get("learning_rate", 1.0) for s in settings]
        coefficients = [sum(steps) / len(steps) / a for a in steps]
    elif method == "cclip":
        norms = [math.sqrt(sum(float(v[t].pow(2).sum()) for v in tau.values())) for t in range(len(roles))]
        coefficients = [min(1.0, parameters["rho"] / n) for n in norms]
    else:
        raise AssertionError(f"no reference formula for {method}")
    return {n: base[n] + lam * sum(c * v[t] for t, c in enumerate(coefficients)) for n, v in tau.items()}


def plain_task_arithmetic(recipe: dict, twins: Twins) -> Dict[str, torch.Tensor]:
    models = [{"model": m["model"], "parameters": {"weight": 1.0}} for m in recipe["models"]]
    return expected_merge({**recipe, "merge_method": "task_arithmetic", "models": models}, twins)


def check_output(out: Path, recipe: dict, twins: Twins) -> None:
    """Weights as computed in float64; the base's vocabulary size and tokenizer."""
    merged: Tensors = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    base = twins.tensors["base"]
    assert set(merged) == set(base)
    expected = expected_merge(recipe, twins)
    for name, tensor in merged.items():
        assert tensor.dtype == getattr(torch, recipe["out_dtype"]) and tensor.shape == base[name].shape, name
        torch.testing.assert_close(tensor.double(), expected[name], **TOLERANCE, msg=name)
    vocabulary = lambda path: json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]  # noqa: E731
    assert vocabulary(out) == vocabulary(twins.paths["base"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base["lm_head.weight"].shape[0]


def mergekit_yaml(text: str, workdir: Path, name: str) -> subprocess.CompletedProcess:
    path = workdir / f"{name}.yml"
    path.write_text(text)
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(workdir / name), "--no-write-model-card"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )


def merge_in_process(text: str, out: Path) -> None:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), MergeOptions(write_model_card=False, quiet=True), config_source=text)


def test_twins_have_the_paper_norms_vocabularies_and_zeros(twins: Twins) -> None:
    tau = task_vectors(twins, ROLES)
    for t, (role, (_, paper_norm)) in enumerate(TASKS.items()):
        norm = math.sqrt(sum(float(v[t].pow(2).sum()) for v in tau.values()))
        assert norm == pytest.approx(paper_norm, rel=0.03), role
    rows = {role: twins.tensors[role]["model.embed_tokens.weight"].shape[0] for role in twins.tensors}
    assert rows == {"base": 96, "instruction": 96, "math": 97, "code": 96}
    assert not tau["model.layers.0.mlp.up_proj.weight"][2].any()  # the code twin's untouched weights


RECIPES = [p for p in llama_recipes() if p.name != "fednova.yml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_merges_its_shape_twins(path: Path, twins: Twins, tmp_path: Path) -> None:
    text = twins.swap(path.read_text())
    recipe = yaml.safe_load(text)
    assert {twins.role(m) for m in [recipe["base_model"], *(m["model"] for m in recipe["models"])]} <= set(twins.paths)
    if recipe["merge_method"] != "task_arithmetic":  # the value check tells the rule from plain task arithmetic
        expected, plain = expected_merge(recipe, twins), plain_task_arithmetic(recipe, twins)
        assert max(float((expected[n] - plain[n]).abs().max()) for n in expected) > 1e-2
    if path.parent == CONFIGS:
        run = mergekit_yaml(text, tmp_path, "out")
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        merge_in_process(text, tmp_path / "out")
    check_output(tmp_path / "out", recipe, twins)


def test_fednova_template_fails_clearly_and_a_filled_in_copy_merges(twins: Twins, tmp_path: Path) -> None:
    text = twins.swap((CONFIGS / "fednova.yml").read_text())
    run = mergekit_yaml(text, tmp_path, "template")
    assert run.returncode != 0
    assert f"Error: fednova: model {twins.paths['instruction']}: `steps` = 'FILL_IN_STEPS' is invalid" in run.stderr
    assert "fill in the real value" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "template").exists()

    training = {"instruction": (300, 2e-5), "math": (1200, 2e-5), "code": (300, 2e-4)}
    recipe = yaml.safe_load(text)
    for model in recipe["models"]:
        steps, rate = training[twins.role(model["model"])]
        model["parameters"] = {"steps": steps, "learning_rate": rate}
    merge_in_process(yaml.safe_dump(recipe), tmp_path / "filled")
    check_output(tmp_path / "filled", recipe, twins)
    assert load_recipe(CONFIGS / "fednova.yml")["parameters"] == recipe["parameters"]
