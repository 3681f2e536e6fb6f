"""The real ``mergekit-yaml`` on tiny local Llama checkpoints, for every method, with the
written weights checked against float64 computations; the norm cache across processes;
recipe errors before any output exists."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.support.synthetic import Family, make_family
from tests.conftest import BIN

pytestmark = pytest.mark.slow
NAMES = ["instruct", "math", "code", "extra"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + four task models; ``math`` has one extra vocabulary row (WizardMath's quirk),
    ``code`` is an outlier with a task vector ten times larger than the others."""
    root = tmp_path_factory.mktemp("family")
    return make_family(root, scales=(0.01, 0.02, 0.2, 0.015), names=NAMES, extra_tokens=(0, 1, 0, 0), shards=2)


def recipe(family: Family, method: str, models: List[str], parameters: Dict, per_model: Dict[str, Dict] | None = None) -> Dict:
    per_model = per_model or {}
    paths = dict(zip(NAMES, family.tasks))
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(paths[m]), **({"parameters": per_model[m]} if m in per_model else {})} for m in models],
        "parameters": parameters,
        "tokenizer": {"source": "base"},
        "dtype": "float32",
    }


def mergekit_yaml(config: Dict, workdir: Path, name: str) -> subprocess.CompletedProcess:
    path = workdir / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(workdir / name), "--no-write-model-card"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )


def task_vectors(family: Family, models: List[str]) -> Dict[str, List[torch.Tensor]]:
    """τ_t per tensor in float64, vocabulary rows trimmed to the base's (tokenizer: base)."""
    tensors = dict(zip(NAMES, family.task_tensors))
    result = {}
    for name, base in family.base_tensors.items():
        rows = base.shape[0]
        result[name] = [tensors[m][name][:rows].double() - base.double() for m in models]
    return result


def check_weights(out: Path, family: Family, expected: Dict[str, torch.Tensor]) -> None:
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(family.base_tensors)
    for name, tensor in merged.items():
        assert tensor.shape == family.base_tensors[name].shape, name
        torch.testing.assert_close(tensor.double(), expected[name], rtol=2e-6, atol=2e-6, msg=name)


def global_norms(tau: Dict[str, List[torch.Tensor]], count: int) -> List[float]:
    return [math.sqrt(sum(float(v[t].pow(2).sum()) for v in tau.values())) for t in range(count)]


def test_fednova(family: Family, tmp_path: Path) -> None:
    models = ["instruct", "math", "code"]
    training = {"instruct": (300, 2e-5), "math": (1200, 2e-5), "code": (300, 2e-4)}
    per_model = {m: {"steps": s, "learning_rate": lr} for m, (s, lr) in training.items()}
    run = mergekit_yaml(recipe(family, "fednova", models, {"lambda": 0.6}, per_model), tmp_path, "out")
    assert run.returncode == 0, run.stderr[-3000:]
    a = [s * lr for s, lr in training.values()]
    tau = task_vectors(family, models)
    expected = {
        name: family.base_tensors[name].double() + 0.6 * (sum(a) / 3) * sum(v[t] / a[t] for t in range(3))
        for name, v in tau.items()
    }
    check_weights(tmp_path / "out", family, expected)


def test_fedgma(family: Family, tmp_path: Path) -> None:
    models = ["instruct", "math", "code"]
    run = mergekit_yaml(recipe(family, "fedgma", models, {"lambda": 0.8, "rho": 0.5}), tmp_path, "out")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {}
    for name, v in task_vectors(family, models).items():
        stacked = torch.stack(v)
        agreement = torch.sign(stacked).mean(0).abs()
        mask = torch.where(agreement >= 0.5, torch.ones_like(agreement), agreement)
        expected[name] = family.base_tensors[name].double() + 0.8 * mask * stacked.sum(0)
    check_weights(tmp_path / "out", family, expected)


def test_median_of_an_even_count(family: Family, tmp_path: Path) -> None:
    run = mergekit_yaml(recipe(family, "median", NAMES, {"lambda": 1.5}), tmp_path, "out")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {}
    for name, v in task_vectors(family, NAMES).items():
        ordered = torch.stack(v).sort(0).values
        expected[name] = family.base_tensors[name].double() + 1.5 * (ordered[1] + ordered[2]) / 2
    check_weights(tmp_path / "out", family, expected)


def test_cclip_clips_the_outlier_by_its_global_norm_and_caches_it(family: Family, tmp_path: Path) -> None:
    models = ["instruct", "math", "code"]
    tau = task_vectors(family, models)
    norms = global_norms(tau, 3)
    rho = (sorted(norms)[1] + max(norms)) / 2  # clips only the outlier
    assert [n > rho for n in norms] == [False, False, True]
    config = recipe(family, "cclip", models, {"lambda": 0.9, "rho": rho})
    first = mergekit_yaml(config, tmp_path, "first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "task-vector norm of 3 model(s)" in first.stderr  # progress of the one streaming pass for all three
    expected = {
        name: family.base_tensors[name].double() + 0.9 * sum(t * min(1.0, rho / n) for t, n in zip(v, norms))
        for name, v in tau.items()
    }
    check_weights(tmp_path / "first", family, expected)

    second = mergekit_yaml(config, tmp_path, "second")  # a new process: only the disk cache
    assert second.returncode == 0, second.stderr[-3000:]
    assert "task-vector norm of" not in second.stderr
    first_weights = load_file(str(tmp_path / "first" / "model.safetensors"))
    second_weights = load_file(str(tmp_path / "second" / "model.safetensors"))
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


def test_norm_override_skips_the_streaming_pass(family: Family, tmp_path: Path) -> None:
    models = ["instruct", "code"]
    per_model = {"instruct": {"norm": 1.0}, "code": {"norm": 4.0}}
    run = mergekit_yaml(recipe(family, "cclip", models, {"rho": 2.0}, per_model), tmp_path, "out")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "task-vector norm of" not in run.stderr
    expected = {
        name: family.base_tensors[name].double() + v[0] + v[1] * 0.5 for name, v in task_vectors(family, models).items()
    }
    check_weights(tmp_path / "out", family, expected)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c["models"][0].update(parameters={"steps": 10, "learning_rte": 0.1}), "unknown parameter `learning_rte`"),
        (lambda c: c["models"][1].update(parameters={"steps": "FILL_IN_STEPS"}), "`steps` = 'FILL_IN_STEPS' is invalid"),
        (lambda c: c.pop("tokenizer"), "math: tensor lm_head.weight has shape (97, 32), the base model (96, 32) (different vocabularies"),
        (lambda c: c.pop("base_model"), "the recipe has no `base_model:`"),
        (lambda c: c["models"][1].update(parameters={"training_log": "/no/such/run"}), "math: `training_log`: /no/such/run: no such file or folder"),
        # a hub model that was never downloaded: the recipe is rejected before any fetch
        (lambda c: c["models"][1].update(model="nobody/not-downloaded-13b", parameters={"steps": "FILL_IN"}),
         "model nobody/not-downloaded-13b: `steps` = 'FILL_IN' is invalid"),
    ],
)
def test_bad_recipe_fails_before_any_output(family: Family, tmp_path: Path, mutate, needle: str) -> None:
    config = recipe(family, "fednova", ["instruct", "math"], {"lambda": 1.0}, {"instruct": {"steps": 10}, "math": {"steps": 20}})
    mutate(config)
    run = mergekit_yaml(config, tmp_path, "out")
    assert run.returncode != 0
    assert needle in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
