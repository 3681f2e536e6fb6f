"""``fedmerge sweep --eval clip`` on the tiny CLIP world (``tests.support.clip_synthetic``):
grid points merged into the base CLIP's vision tower, loaded once, score exactly (==) what
the same points score from their folders (``--keep-merges``) and what ``fedmerge clip eval``
gives ``mergekit-yaml`` of ``winner.yml``; the fine-tuned towers' reference accuracies are
computed before any point's weights are in the tower."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from click.testing import CliRunner

from fedmerge_plugins.clip.cli import clip_group
from fedmerge_plugins.clip.models import tower_state_dict
from fedmerge_plugins.sweep.evaluators import ClipEvaluator
from fedmerge_plugins.sweep.run import run_sweep
from tests.conftest import BIN
from tests.support.clip_synthetic import World, build_world

pytestmark = pytest.mark.slow
TASKS = ("mnist", "eurosat", "beta")
LAMBDAS = "0.1,0.5,1.5"


def build_prepared_world(root: Path) -> World:
    """The world, its towers also exported as ``CLIPVisionModel`` checkpoints mergekit merges
    (``root/prepared``, as ``fedmerge clip prepare`` writes them)."""
    from fedmerge_plugins.clip.models import export_towers

    world = build_world(root)
    export_towers(str(world.base), {t: str(world.towers[t]) for t in TASKS}, root / "prepared")
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_prepared_world(tmp_path_factory.mktemp("clip-sweep-world"))


def recipe(world: World, directory: Path, method: str, **extra) -> Path:
    prepared = world.base.parent / "prepared"
    data = {"merge_method": method, "base_model": str(prepared / "base"), "parameters": {"lambda": 1.0},
            "dtype": "float32", "models": [{"model": str(prepared / t)} for t in TASKS], **extra}
    data["parameters"].update({"cclip": {"rho": 1.0}, "task_arithmetic": {"weight": 1.0}}.get(method, {}))
    path = directory / f"{method}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def evaluator(world: World) -> ClipEvaluator:
    return ClipEvaluator(list(TASKS), data_dir=world.data, base=str(world.base), models_dir=world.base.parent / "towers", batch_size=8)


def scores(outcome) -> Dict[str, Dict[str, float]]:
    return {key: record["scores"] for key, record in outcome.records.items()}


@pytest.mark.parametrize("method, extra", [("cclip", {}), ("task_arithmetic", {"dtype": "bfloat16"})], ids=["cclip-fp32", "ta-bf16"])
def test_in_memory_scores_equal_the_folders_and_the_winner_reproduces(world: World, tmp_path: Path, method: str, extra: Dict) -> None:
    """cclip in float32 (each point written straight into the tower) and task_arithmetic
    merged in bfloat16 (each point cast to the tower's float32, as loading its folder does).
    The in-memory sweep runs first, on an empty cache: its reference accuracies are computed
    by scoring the fine-tuned towers in the very tower the points are then loaded into."""
    path = recipe(world, tmp_path, method, **extra)
    grid = {"lambdas": LAMBDAS, "rhos": "paper"} if method == "cclip" else {"lambdas": LAMBDAS}
    lines: List[str] = []
    in_memory = evaluator(world)
    memory = run_sweep(path, tmp_path / "memory", in_memory, echo=lines.append, **grid)
    assert any("merged into one loaded model" in line for line in lines)
    assert all(set(r["details"]["timing"]) == {"merge", "copy", "evaluate"} for r in memory.records.values())
    assert not any((tmp_path / "memory" / "merges").glob("point-*"))  # nothing written per point
    folder = run_sweep(path, tmp_path / "folder", evaluator(world), keep_merges=True, echo=lines.append, **grid)
    assert all("details" not in r for r in folder.records.values())  # scored from the kept folders
    assert scores(memory) == scores(folder)  # every point, exactly
    assert len({json.dumps(s, sort_keys=True) for s in scores(memory).values()}) > 1  # the points differ
    assert memory.best["key"] == folder.best["key"]
    # the tower holds the last point scored: bit for bit its folder loaded as fedmerge clip eval loads it
    last = json.loads((tmp_path / "memory" / "results.jsonl").read_text().splitlines()[-1])["index"]
    kept = tower_state_dict(str(tmp_path / "folder" / "merges" / f"point-{last:04d}"))
    held = in_memory.session().clip.vision_model.state_dict()
    assert set(held) == set(kept) and all(torch.equal(held[k], kept[k]) and held[k].dtype == kept[k].dtype for k in kept)

    merged = subprocess.run([str(BIN / "mergekit-yaml"), str(memory.winner_recipe), str(tmp_path / "winner"), "--no-copy-tokenizer",
                             "--no-write-model-card"], capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    args = ["eval", str(tmp_path / "winner"), "--base", str(world.base), "--data-dir", str(world.data), "--tasks", ",".join(TASKS),
            "--models-dir", str(world.base.parent / "towers"), "--split", "validation", "--json", str(tmp_path / "winner.json")]
    result = CliRunner().invoke(clip_group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "winner.json").read_text())["tasks"]
    assert {task: row["normalized_accuracy"] for task, row in rows.items()} == memory.best["scores"]


def test_load_scores_its_own_tower_after_the_references(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load`` on an empty cache scores the fine-tuned towers in the session's tower, then puts
    the point's tower there: scoring it without another copy gives the folder's scores; the
    module's names are the merge's; the evaluator pickles without the session or the tower."""
    from safetensors.torch import load_file

    path = recipe(world, tmp_path, "task_arithmetic")
    run_sweep(path, tmp_path / "out", evaluator(world), lambdas="0.1,1.5", keep_merges=True, echo=lambda line: None)
    folders = sorted((tmp_path / "out" / "merges").iterdir())
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "empty-cache"))  # no reference accuracy cached
    fresh = evaluator(world)
    loaded = fresh.load(folders[1])
    in_memory = fresh.evaluate_loaded(loaded)
    assert in_memory == fresh.evaluate(folders[1]) == evaluator(world).evaluate(folders[1])
    assert in_memory != fresh.evaluate(folders[0])
    written = load_file(str(folders[1] / "model.safetensors"))
    assert set(loaded.module.state_dict()) == set(written)
    copy = pickle.loads(pickle.dumps(fresh))
    assert copy._session is None and copy.description == fresh.description
    assert len(pickle.dumps(fresh)) < 10_000
