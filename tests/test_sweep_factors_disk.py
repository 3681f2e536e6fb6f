"""Disk mode with points merged into a loaded model: each group's θ₀ and D are written once
to ``OUT/merges/.factors-PID-*`` and each point reads those two checkpoints, not the T + 1
inputs; every point is still, bit for bit, what mergekit writes for its recipe; the folder
is gone after the sweep, a killed sweep's is removed by the next; a full disk is one line
naming the folder; the memory plan counts one tensor's factors there, not D."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.evaluators import PythonEvaluator
from fedmerge_plugins.sweep.run import run_sweep
from tests.conftest import BIN
from tests.support.recipes import METHODS, method_recipe, sweep_family
from tests.support.synthetic import Family
from tests.test_sweep import count_reads

EVALUATOR = '''
import glob
import os
import signal
from safetensors.torch import save_file

SAVED = {saved!r}
FACTORS = {factors!r}


def from_model(model):
    os.makedirs(SAVED, exist_ok=True)
    index = len(glob.glob(os.path.join(SAVED, "*.safetensors")))
    if os.environ.get("KILL_AT") and index + 1 == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    state = {{k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
    save_file(state, os.path.join(SAVED, f"{{index:04d}}.safetensors"))
    with open(os.path.join(SAVED, "factor-folders.log"), "a") as log:  # what disk mode holds while scoring
        log.write(f"{{len(glob.glob(FACTORS))}}\\n")
    first = next(iter(sorted(state)))
    return {{"score": float(state[first].double().sum())}}
'''

RHOS = {"fedgma": "0.2,0.6", "cclip": "0.05,0.5"}  # two groups of points: D written twice
LAMBDAS = "0.5,1.0"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return sweep_family(tmp_path_factory.mktemp("disk-factors"))


def write_recipe(family: Family, directory: Path, method: str, dtype: str) -> Path:
    path = directory / "recipe.yml"
    path.write_text(yaml.safe_dump(method_recipe(family, method, dtype, 1.0), sort_keys=False))
    return path


def evaluator(directory: Path, out: Path) -> PythonEvaluator:
    module = directory / "disk_evaluator.py"
    module.write_text(EVALUATOR.format(saved=str(directory / "saved"), factors=str(out / "merges" / ".factors-*")))
    return PythonEvaluator(f"python:{module}:from_model")


def factor_folders(out: Path) -> List[Path]:
    return sorted((out / "merges").glob(".factors-*")) if (out / "merges").is_dir() else []


def same_bits(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[theirs.element_size()]
    return mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine.view(width), theirs.view(width))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_disk_mode_points_equal_mergekit_reading_two_checkpoints_per_point(
        family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, dtype: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from fedmerge_plugins.guards.recipe import recipe_models
    from fedmerge_plugins.sweep.grid import point_config
    from fedmerge_plugins.sweep.merger import disk_norms, merge_options

    recipe = write_recipe(family, tmp_path, method, dtype)
    out = tmp_path / "out"
    rhos = RHOS.get(method)
    data = yaml.safe_load(recipe.read_text())
    base, tasks = recipe_models(MergeConfiguration.model_validate(data))
    if method == "cclip":
        disk_norms(base, tasks)  # the norms cached first: what is counted below is the merges' reads
    tensors, _ = count_reads(monkeypatch)
    lines: List[str] = []
    outcome = run_sweep(recipe, out, evaluator(tmp_path, out), lambdas=LAMBDAS, rhos=rhos, mode="disk", echo=lines.append)
    assert outcome.mode == "disk" and any("θ₀ and D written to" in line for line in lines)
    groups = 2 if rhos else 1
    points = 2 * groups

    inputs = {str(p) for p in (family.base, *family.tasks)}
    input_reads = Counter({key: n for key, n in tensors.items() if key[0] in inputs})
    factor_reads = Counter({key: n for key, n in tensors.items() if ".factors-" in key[0]})
    assert len(input_reads) == 4 * len(family.base_tensors) and set(tensors) == set(input_reads) | set(factor_reads)
    assert set(input_reads.values()) == {groups}  # the T + 1 inputs read once per group ...
    parts: Dict[str, set] = {}
    for path, name in factor_reads:
        parts.setdefault(path, set()).add(name)
    assert len({Path(path).parent for path in parts}) == groups and {Path(path).name for path in parts} == {"base", "delta"}
    assert len(parts) == 2 * groups and len({frozenset(names) for names in parts.values()}) == 1  # θ₀ and D of the same tensors
    assert set(factor_reads.values()) == {points // groups}  # ... and θ₀, D once per point of the group
    assert (tmp_path / "saved" / "factor-folders.log").read_text().split() == ["1"] * points  # one group's folder at a time
    assert factor_folders(out) == []  # removed at the end

    order = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    by_key = {point.key: point for point in outcome.points}
    options = merge_options(base)
    for index, key in enumerate(order):
        merged = tmp_path / f"mergekit-{index}"
        run_merge(point_config(data, by_key[key]), str(merged), options=options)
        written = load_file(str(merged / "model.safetensors"))
        scored = load_file(str(tmp_path / "saved" / f"{index:04d}.safetensors"))
        assert set(written) == set(scored)
        for name, tensor in written.items():
            assert same_bits(scored[name], tensor), (method, dtype, key, name)


def records_without_timing(out: Path) -> List[dict]:
    """The log's records, less timings and the evaluator's fingerprint (its file's path)."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for record in records:
        for varying in ("details", "seconds", "fingerprint"):
            record.pop(varying, None)
    return records


@pytest.mark.slow
def test_killed_disk_sweep_leaves_its_factors_the_next_run_removes_them(family: Family, tmp_path: Path) -> None:
    """``fedmerge sweep --mode disk`` SIGKILLed scoring the first point of its second ρ group
    leaves that group's factor folder; the same sweep again removes it before its own (one
    folder while scoring), leaves none, and its log is the uninterrupted sweep's."""
    recipe = write_recipe(family, tmp_path, "fedgma", "float32")
    whole = tmp_path / "whole"
    (tmp_path / "first").mkdir()
    run_sweep(recipe, whole, evaluator(tmp_path / "first", whole), lambdas=LAMBDAS, rhos="0.2,0.6", mode="disk", echo=lambda line: None)

    out = tmp_path / "out"
    spec = evaluator(tmp_path, out).description
    command = [str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", LAMBDAS, "--rho", "0.2,0.6", "--mode", "disk",
               "--eval", spec, "--out", str(out)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "KILL_AT": "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    left = factor_folders(out)
    assert len(left) == 1 and {p.name for p in left[0].iterdir()} == {"base", "delta"}
    assert len(records_without_timing(out)) == 2

    lines: List[str] = []
    run_sweep(recipe, out, evaluator(tmp_path, out), lambdas=LAMBDAS, rhos="0.2,0.6", mode="disk", echo=lines.append)
    assert any("2 already in" in line for line in lines)
    assert not left[0].exists() and factor_folders(out) == []
    assert (tmp_path / "saved" / "factor-folders.log").read_text().split() == ["1"] * 4  # 2 before the kill, 2 after
    assert records_without_timing(out) == records_without_timing(whole)


def test_full_disk_for_the_factors_is_one_line_naming_their_folder(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.tmpfs import tmpfs

    recipe = write_recipe(family, tmp_path, "median", "float32")
    out = tmp_path / "out"
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("FEDMERGE_SCRATCH_DIR", str(tmp_path / "scratch"))  # the first point's merge: elsewhere
    with tmpfs(out / "merges", "64k") as merges:
        with pytest.raises(SweepError) as raised:
            run_sweep(recipe, out, evaluator(tmp_path, out), lambdas=LAMBDAS, mode="disk", echo=lambda line: None)
        message = str(raised.value)
        assert "\n" not in message and message.startswith("grid point lambda=0.5: cannot write the factors (θ₀ and D) in ")
        assert f"{merges}/.factors-" in message and "No space left on device" in message, message
        assert list(merges.iterdir()) == []  # the partial factors removed
    assert not (tmp_path / "saved").exists()  # nothing scored


def test_memory_plan_in_disk_mode_counts_the_loaded_model_and_one_tensor(family: Family) -> None:
    from fedmerge_plugins.norms.streaming import model_index
    from fedmerge_plugins.sweep.memory import human, plan_memory
    from fedmerge_plugins.sweep.plan import choose_mode

    from mergekit.common import ModelReference

    indices = [model_index(ModelReference.parse(str(p))) for p in (family.base, *family.tasks)]
    largest = max(t.numel() for t in family.base_tensors.values())
    assert largest > 1 << 18
    plan = plan_memory(indices, indices[0], available=1000, factored=True)
    assert plan.tensor == largest * 2 * (4 + 4)  # θ₀ and D (float32) of two tensors at once
    assert plan.disk_needed == plan.merged + plan.tensor < plan.needed  # no D, no inputs
    lines: List[str] = []
    assert choose_mode("auto", plan, lines.append) == "disk"
    assert "writes that group's θ₀ and D to disk" in lines[0] and human(plan.disk_needed) in lines[0]
    unfactored = plan_memory(indices, indices[0], available=1000)
    assert (unfactored.delta, unfactored.tensor, unfactored.disk_needed) == (0, 0, unfactored.merged)


@pytest.mark.slow
def test_disk_mode_on_two_ray_workers_equals_serial_and_leaves_no_factors(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker process writes its own group's factors; the driver removes every worker's
    folder of the sweep at the end (the workers of a Ray session outlive it)."""
    pytest.importorskip("ray")
    from fedmerge_plugins.search.workers import LOOPBACK_ENV, WorkerSettings

    monkeypatch.setenv(LOOPBACK_ENV, os.environ.get(LOOPBACK_ENV, "0"))  # as test_workers: Ray on loopback only
    recipe = write_recipe(family, tmp_path, "cclip", "bfloat16")
    serial = run_sweep(recipe, tmp_path / "serial", evaluator(tmp_path, tmp_path / "serial"), lambdas=LAMBDAS, rhos="0.05,0.5",
                       mode="disk", echo=lambda line: None)
    (tmp_path / "ray").mkdir()
    on_ray = run_sweep(recipe, tmp_path / "ray", evaluator(tmp_path / "ray", tmp_path / "ray"), lambdas=LAMBDAS, rhos="0.05,0.5",
                       mode="disk", workers=WorkerSettings(workers=2, gpus_per_worker=0), echo=lambda line: None)
    assert {k: r["scores"] for k, r in on_ray.records.items()} == {k: r["scores"] for k, r in serial.records.items()}
    held = (tmp_path / "ray" / "saved" / "factor-folders.log").read_text().split()
    assert len(held) == 4 and set(held) <= {"1", "2"}  # on disk, one folder per worker process
    assert factor_folders(tmp_path / "ray") == [] and factor_folders(tmp_path / "serial") == []
