"""Search grids, subsets, experiment settings, the in-memory merge and the result log of the
CLIP adapter, without any model."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.search import grids
from fedmerge_plugins.clip.experiment import ExperimentSpec, Training, read_training, subsets
from fedmerge_plugins.search.engine import ResultLog, best_index, merge_in_memory, point_parameters
from fedmerge_plugins.clip.tasks import PAPER_TASKS, shipped, task_text

PAPER_NORMS = [2.77, 2.71, 1.92, 2.04, 23.90, 3.03, 2.80, 3.07]  # appendix B.1.5, heterogeneous


def test_lambda_grids_have_no_float_drift() -> None:
    clip = grids.lambda_grid()
    assert len(clip) == 40 and clip[0] == 0.05 and clip[-1] == 2.0
    assert clip == [round(0.05 * (i + 1), 2) for i in range(40)]
    assert clip[2] == 0.15 and clip[5] == 0.3  # 0.05 * 3 would be 0.15000000000000002 in floats
    assert grids.lambda_grid(*grids.LLM_LAMBDAS) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert grids.lambda_grid(0.1, 0.35, 0.1) == [0.1, 0.2, 0.3]  # stop not on the grid: not exceeded


def test_fedgma_grid() -> None:
    assert grids.fedgma_rho_grid() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    with pytest.raises(FedmergeError, match=r"\[0, 1\]"):
        grids.fedgma_rho_grid(0.5, 1.5, 0.5)


def test_cclip_grid_min_included_max_excluded() -> None:
    rhos = grids.clip_rho_grid(PAPER_NORMS)
    low, high = 1.92, 23.90
    assert rhos == pytest.approx([low + i * (high - low) / 5 for i in range(5)], abs=1e-12)
    assert rhos[0] == low and max(rhos) < high and len(rhos) == 5
    assert grids.clip_rho_grid([2.5, 2.5, 2.5]) == [2.5]
    assert grids.clip_rho_grid([0.0, 4.0], count=4) == [1.0, 2.0, 3.0]  # ρ = 0 is not a CCLIP radius
    with pytest.raises(FedmergeError, match="every task-vector norm is 0"):
        grids.clip_rho_grid([0.0, 0.0])


def test_parse_grid() -> None:
    assert grids.parse_grid("0.05:0.2:0.05") == [0.05, 0.1, 0.15, 0.2]
    assert grids.parse_grid("1, 0.5") == [1.0, 0.5]
    for bad in ("", "a,b", "1:2", "0.1:1:0"):
        with pytest.raises(FedmergeError):
            grids.parse_grid(bad)


def test_every_subset_of_eight_tasks() -> None:
    found = subsets(PAPER_TASKS)
    assert len(found) == 247 == sum(math.comb(8, t) for t in range(2, 9))
    assert len(set(found)) == 247 and all(len(s) >= 2 for s in found)
    assert found[0] == ("cars", "dtd") and found[-1] == PAPER_TASKS


def test_paper_grid_sizes_per_subset() -> None:
    training = {t: Training(4000, 1e-5) for t in PAPER_TASKS}
    spec = ExperimentSpec(tasks=PAPER_TASKS, training=training)
    norms = dict(zip(("dtd", "eurosat", "gtsrb", "sun397", "svhn", "mnist", "cars", "resisc45"), PAPER_NORMS))
    subset = ("gtsrb", "svhn")
    sizes = {m: len(spec.grid(m, subset, norms)) for m in spec.methods}
    assert sizes == {"task_arithmetic": 40, "fednova": 40, "fedgma": 400, "median": 40, "cclip": 200}
    cclip_rhos = sorted({p["rho"] for p in spec.grid("cclip", subset, norms)})
    assert cclip_rhos == pytest.approx([1.92 + i * (23.90 - 1.92) / 5 for i in range(5)])


def test_spec_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(FedmergeError, match="fednova needs .* steps .* none for"):
        ExperimentSpec(tasks=("cars", "dtd"))
    with pytest.raises(FedmergeError, match="unknown methods"):
        ExperimentSpec(tasks=("cars", "dtd"), methods=("ties",))
    with pytest.raises(FedmergeError, match="at least 2 distinct tasks"):
        ExperimentSpec(tasks=("cars",), methods=("median",))
    bad = tmp_path / "training.yml"
    bad.write_text("cars: {steps: 0}\n")
    with pytest.raises(FedmergeError, match="cars: steps must be an integer > 0"):
        read_training(bad)
    good = tmp_path / "good.yml"
    good.write_text("cars: {steps: 300, learning_rate: 1.0e-4}\ndtd: {steps: 10}\n")
    assert read_training(good) == {"cars": Training(300, 1e-4), "dtd": Training(10, 1.0)}
    shipped_file = Path(__file__).resolve().parents[1] / "configs" / "clip" / "training-tanganke.yml"
    assert read_training(shipped_file) == {t: Training(4000, 1e-5) for t in PAPER_TASKS}


def test_select_best_takes_earliest_of_ties() -> None:
    assert best_index([0.5, 0.7, 0.7, 0.2]) == 1
    assert best_index([0.9, 0.7, 0.7, 0.2]) == 0


def test_shipped_task_text() -> None:
    counts = {t: len(shipped(t).classnames) for t in PAPER_TASKS}
    assert counts == {"cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "sun397": 397, "svhn": 10}
    for task in PAPER_TASKS:
        text = shipped(task)
        assert text.templates and all(t.count("{}") == 1 for t in text.templates)
        assert len(set(text.classnames)) == len(text.classnames)
    assert shipped("stanford_cars") == shipped("cars")
    assert shipped("mnist").prompts("7") == ('a photo of the number: "7".',)
    assert task_text("shapes", ["big_box", "ring"]).prompts("big box") == ("a photo of a big box.",)
    with pytest.raises(FedmergeError, match="not one of the paper's tasks"):
        task_text("shapes", [])


@pytest.mark.parametrize("method", ["task_arithmetic", "fednova", "fedgma", "median", "cclip"])
def test_merge_in_memory_matches_formulas(method: str) -> None:
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 5, generator=generator), "b": torch.randn(7, generator=generator)}
    tasks = ("t1", "t2", "t3", "t4")
    models = {t: {k: v + (0.1 + i) * torch.randn(v.shape, generator=generator) for k, v in base.items()} for i, t in enumerate(tasks)}
    tau = {k: [models[t][k].double() - base[k].double() for t in tasks] for k in base}
    norms = {t: math.sqrt(sum(float(tau[k][i].pow(2).sum()) for k in base)) for i, t in enumerate(tasks)}
    training = {"t1": Training(100, 1e-3), "t2": Training(300, 1e-3), "t3": Training(100, 2e-3), "t4": Training(50, 1e-4)}
    point = {"lambda": 0.7, "rho": 0.5} if method == "fedgma" else {"lambda": 0.7, "rho": 2.0} if method == "cclip" else {"lambda": 0.7}
    merged = merge_in_memory(base, models, method, point_parameters(method, point, tasks, norms=norms, training=training))
    for k, vectors in tau.items():
        stacked = torch.stack(vectors)
        if method == "fednova":
            effective = torch.tensor([training[t].steps * training[t].learning_rate for t in tasks], dtype=torch.float64)
            delta = ((effective.mean() / effective).view(-1, *[1] * vectors[0].ndim) * stacked).sum(0)
        elif method == "fedgma":
            agreement = stacked.sign().mean(0).abs()
            delta = torch.where(agreement >= 0.5, torch.ones_like(agreement), agreement) * stacked.sum(0)
        elif method == "median":
            ordered = stacked.sort(0).values
            delta = (ordered[1] + ordered[2]) / 2
        elif method == "cclip":
            delta = sum(min(1.0, 2.0 / norms[t]) * v for t, v in zip(tasks, vectors))
        else:
            delta = stacked.sum(0)
        torch.testing.assert_close(merged[k].double(), base[k].double() + 0.7 * delta, rtol=1e-6, atol=1e-6)


def test_result_log_drops_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"kind": "grid", "n": 1}) + "\n" + '{"kind": "gr')
    log = ResultLog(path)
    assert log.records == [{"kind": "grid", "n": 1}]
    log.append({"kind": "result", "n": 2})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"kind": "grid", "n": 1}, {"kind": "result", "n": 2}]
    path.write_text('{"kind": "result", "a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(FedmergeError, match="line 2"):
        ResultLog(path)


def test_subset_order_is_task_order() -> None:
    tasks = ("c", "a", "b")
    assert subsets(tasks) == [("c", "a"), ("c", "b"), ("a", "b"), ("c", "a", "b")]
    assert subsets(tasks, 3) == [tuple(tasks)]
    assert len(subsets(list("abcd"))) == sum(1 for r in range(2, 5) for _ in itertools.combinations("abcd", r))


def test_clip_source_identity_sees_same_size_rewrites(tmp_path: Path) -> None:
    """(The CLIP cache's store: tests/test_store.py.)"""
    from fedmerge_plugins.clip.cache import source_identity

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"x" * 64)
    before = source_identity(str(model))
    stat = weights.stat()
    time.sleep(0.05)  # past the kernel's coarse ctime tick
    weights.write_bytes(b"y" * 64)  # same size, mtime put back: only ctime/inode tell
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_identity(str(model)) != before
