"""Where sweep points are staged (``sweep/scratch.py``): /dev/shm when it has room, else
``OUT/merges``; ``FEDMERGE_SCRATCH_DIR``; nothing left behind after a sweep, a kept merge moved
across file systems intact, and folders of killed sweeps removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from safetensors.torch import load_file

from fedmerge_plugins.sweep import scratch
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.evaluators import PythonEvaluator
from fedmerge_plugins.sweep.run import run_sweep
from tests.support.synthetic import Family
from tests.conftest import BIN
from tests.test_sweep import LAMBDAS, evaluator_spec, tiny_family, write_recipe

WHERE = '''
import os
from safetensors.torch import load_file

def score(model_dir):
    """Logs where the merge was, scores its first tensor's sum."""
    with open({log!r}, "a") as handle:
        handle.write(os.path.abspath(model_dir) + "\\n")
    merged = load_file(os.path.join(model_dir, "model.safetensors"))
    return float(sum(float(t.double().sum()) for t in merged.values()))
'''


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return tiny_family(tmp_path_factory.mktemp("scratch-family"))


def where_evaluator(directory: Path) -> tuple[PythonEvaluator, Path]:
    log = directory / "where.log"
    module = directory / "where_evaluator.py"
    module.write_text(WHERE.format(log=str(log)))
    return PythonEvaluator(f"python:{module}:score"), log


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_choose_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(scratch.ENV, raising=False)
    out, shm, lines = tmp_path / "out", tmp_path / "shm", []  # type: ignore[var-annotated]
    shm.mkdir()
    big = 1 << 40
    assert scratch.choose_scratch(out, 1000, 2, 0, lines.append, shm=shm, available=big) == shm
    assert "staged in" in lines[-1] and str(shm) in lines[-1]
    # no room in memory beside what the sweep holds, none on the file system, no /dev/shm
    assert scratch.choose_scratch(out, 1000, 2, big, lines.append, shm=shm, available=big) == out / "merges"
    assert scratch.choose_scratch(out, big * 10, 1, 0, lines.append, shm=shm, available=big * 100) == out / "merges"
    assert scratch.choose_scratch(out, 1000, 1, 0, lines.append, shm=tmp_path / "none", available=big) == out / "merges"
    monkeypatch.setenv(scratch.ENV, str(tmp_path / "mine"))
    with pytest.raises(SweepError, match="FEDMERGE_SCRATCH_DIR=.*mine: not a writable folder"):
        scratch.choose_scratch(out, 1000, 1, 0, lines.append, shm=shm, available=big)
    (tmp_path / "mine").mkdir()
    assert scratch.choose_scratch(out, big * 10, 1, big, lines.append, shm=shm, available=1) == tmp_path / "mine"
    monkeypatch.setenv(scratch.ENV, scratch.IN_OUT)
    assert scratch.choose_scratch(out, 1000, 1, 0, lines.append, shm=shm, available=big) == out / "merges"


def test_points_staged_in_scratch_score_as_in_out(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every point is merged under the scratch folder, nothing stays there or in OUT/merges,
    and the scores equal a sweep staged in OUT/merges (the same merges, bit for bit)."""
    recipe = write_recipe(family, tmp_path)
    root = tmp_path / "scratch"
    root.mkdir()
    results = {}
    for name, where in (("scratch", str(root)), ("out", scratch.IN_OUT)):
        monkeypatch.setenv(scratch.ENV, where)
        (tmp_path / f"eval-{name}").mkdir()
        evaluator, log = where_evaluator(tmp_path / f"eval-{name}")
        lines: List[str] = []
        outcome = run_sweep(recipe, tmp_path / f"sweep-{name}", evaluator, lambdas=LAMBDAS, rhos="paper", echo=lines.append)
        folders = [Path(line) for line in log.read_text().splitlines()]
        assert len(folders) == len(outcome.points) == 15
        parent = root if name == "scratch" else tmp_path / f"sweep-{name}" / "merges"
        assert all(folder.parent.parent == parent and folder.parent.name.startswith(f".{folder.name}-{os.getpid()}-")
                   for folder in folders)
        assert list(parent.iterdir()) == []
        results[name] = {key: record["scores"] for key, record in outcome.records.items()}
    assert not (tmp_path / "sweep-scratch" / "merges").exists()
    assert results["scratch"] == results["out"]


@pytest.mark.skipif(not scratch._writable_folder(scratch.SHM), reason="no writable /dev/shm")
def test_kept_merges_move_from_dev_shm_intact(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --keep-merges each point's merge moves from /dev/shm (tmpfs: another file system
    than the output's) to OUT/merges/point-NNNN, the same files as merged in OUT."""
    import tempfile

    recipe = write_recipe(family, tmp_path)
    shm = Path(tempfile.mkdtemp(prefix="fedmerge-test-", dir=scratch.SHM))
    try:
        if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm and the test folder are one file system")
        evaluator, _ = where_evaluator(tmp_path)
        for name, where in (("shm", str(shm)), ("out", scratch.IN_OUT)):
            monkeypatch.setenv(scratch.ENV, where)
            run_sweep(recipe, tmp_path / name, evaluator, lambdas="0.5,1.0", keep_merges=True, echo=lambda line: None)
        assert list(shm.iterdir()) == []
        for point in ("point-0000", "point-0001"):
            kept, reference = tmp_path / "shm" / "merges" / point, tmp_path / "out" / "merges" / point
            assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in reference.iterdir())
            assert (kept / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
            assert load_file(str(kept / "model.safetensors")).keys() == family.base_tensors.keys()
        assert sorted(p.name for p in (tmp_path / "shm" / "merges").iterdir()) == ["point-0000", "point-0001"]
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)


def test_killed_sweeps_folders_are_removed_by_the_next(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep SIGKILLed while scoring leaves its point folder in the scratch root; the next
    sweep there removes it (its process is gone) and leaves a live process's folder alone."""
    root = tmp_path / "scratch"
    root.mkdir()
    monkeypatch.setenv(scratch.ENV, str(root))
    recipe = write_recipe(family, tmp_path)
    spec, _ = evaluator_spec(family, tmp_path)
    env = {**os.environ, "KILL_AT": "2"}
    killed = subprocess.run([str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", "0.5,1.0",
                             "--eval", spec, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert killed.returncode != 0
    left = list(root.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".point-0001-")
    assert (left[0] / "point-0001" / "model.safetensors").exists()
    live = root / f".point-0007-{os.getpid()}-x"
    live.mkdir()
    other = root / f".point-0008-{dead_pid()}-y"
    other.mkdir()
    unrelated = root / "notes"
    unrelated.mkdir()
    outcome = run_sweep(recipe, tmp_path / "out", PythonEvaluator(spec), lambdas="0.5,1.0", echo=lambda line: None)
    assert len(outcome.records) == 2
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, unrelated.name])
