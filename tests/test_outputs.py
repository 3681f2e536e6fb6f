"""What the ``fedmerge`` commands write, and how they fail (issue 31's application items, issue
32's error boundary), injected through the real commands on tiny checkpoints: two sweeps on
one ``--out`` at once, hand-edited result logs, full and read-only disks (a small tmpfs),
evaluators that raise, odd grids and data files. Each failure is exit 1 and ONE line naming
the path, line or grid point, and the files on disk afterwards are checked."""

from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml
from click.testing import CliRunner, Result

import fedmerge_plugins
from fedmerge_plugins.cli import main
from fedmerge_plugins.errors import FedmergeError, PathError
from fedmerge_plugins.files import LOCK_NAME, write_output
from fedmerge_plugins.search.engine import best_index
from tests.conftest import BIN
from tests.support.synthetic import Family, make_family
from tests.support.tmpfs import fill, read_only, tmpfs

EVALUATOR = '''
import os, time
from safetensors.torch import load_file

def score(model_dir):
    """Sum of the merged weights; counts its calls; waits for GO, raises at RAISE_AT, fills FILL at FILL_AT."""
    with open(os.environ["CALLS"], "a") as handle:
        handle.write("call\\n")
    with open(os.environ["CALLS"]) as handle:
        calls = len(handle.read().split())
    if os.environ.get("GO"):
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.05)
    if os.environ.get("RAISE_AT") == str(calls):
        return {}["no such score"]
    if os.environ.get("FILL_AT") == str(calls):
        from tests.support.tmpfs import fill
        from pathlib import Path
        fill(Path(os.environ["FILL"]))
    merged = load_file(os.path.join(model_dir, "model.safetensors"))
    padding = {f"constant_{i:04d}": 1.0 for i in range(int(os.environ.get("PAD", "0")))}  # a long log line
    return {"sum": float(sum(t.double().sum() for t in merged.values())), **padding}
'''


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("outputs-family"), scales=(0.01, 0.02))


@pytest.fixture
def evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    module = tmp_path / "sum_evaluator.py"
    module.write_text(EVALUATOR)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.log"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("FEDMERGE_SCRATCH_DIR", "OUT")  # grid points staged under OUT/merges
    return f"python:{module}:score"


def write_recipe(family: Family, path: Path, method: str = "median", **parameters) -> Path:
    recipe = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(p)} for p in family.tasks],
        "parameters": {"lambda": 1.0, **parameters},
        "tokenizer": {"source": "base"},
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line(result: Result) -> str:
    """Exit 1, no traceback, and the one 'Error: …' line last (progress bars aside); the
    line without its 'Error: '."""
    assert result.exit_code == 1, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.output).replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
    return errors[0][len("Error: "):]


def sweep(recipe: Path, out: Path, spec: str, *extra: str) -> Result:
    return invoke("sweep", str(recipe), "--eval", spec, "--out", str(out), *extra)


def records(out: Path) -> List[Dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def leftovers(folder: Path) -> List[str]:
    """Hidden temporary or lock files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- item 1: one sweep per --out ------------------------------------------------------


def test_a_second_sweep_on_a_busy_out_is_refused_and_nothing_is_mixed(family: Family, evaluator: str, tmp_path: Path) -> None:
    """Two real ``fedmerge sweep`` processes on one --out, different recipes: the second
    is refused in one line naming the folder and the first's pid; the first's results
    and winner are all its own."""
    out, go = tmp_path / "out", tmp_path / "go"
    first_recipe = write_recipe(family, tmp_path / "median.yml")
    second_recipe = write_recipe(family, tmp_path / "fedgma.yml", "fedgma", rho=0.5)
    command = [str(BIN / "fedmerge"), "sweep", "--eval", evaluator, "--out", str(out)]
    first = subprocess.Popen(command + [str(first_recipe), "--lambda", "0.5,1.0,1.5"], env={**os.environ, "GO": str(go)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(command + [str(second_recipe), "--lambda", "0.5,1.0"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"Error: {out} is in use by another fedmerge sweep (pid {first.pid}); wait for it to end, or use another folder"
        ]
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    written = records(out)
    assert sorted(r["index"] for r in written) == [0, 1, 2]
    assert {r["method"] for r in written} == {"median"} and len({r["fingerprint"] for r in written}) == 1
    best = max(written, key=lambda r: r["selection"])
    winner = yaml.safe_load((out / "winner.yml").read_text())
    assert winner["merge_method"] == "median" and winner["parameters"] == best["parameters"]
    assert leftovers(out) == []  # the lock file went with its holder


# ---- item 4: the results log read strictly --------------------------------------------


def test_result_log_lines_of_the_wrong_shape_are_named(family: Family, evaluator: str, tmp_path: Path) -> None:
    recipe = write_recipe(family, tmp_path / "median.yml")
    out = tmp_path / "out"
    assert sweep(recipe, out, evaluator, "--lambda", "0.5,1.0").exit_code == 0
    good = (out / "results.jsonl").read_text().splitlines()
    path = out / "results.jsonl"
    first = json.loads(good[0])

    def edited(line: str, *, drop: Optional[str] = None, **changes) -> str:
        record = {**json.loads(line), **changes}
        record.pop(drop, None)
        return json.dumps(record)

    cases = [
        ([edited(good[0], selection=float("nan")), good[1]], "line 1: point {key}: `selection` is NaN, not a finite number"),
        ([edited(good[0], selection="0.5"), good[1]], 'line 1: point {key}: `selection` is "0.5", not a finite number'),
        ([edited(good[0], drop="key"), good[1]], "line 1: a point record without a string `key`"),
        ([good[0], "[1, 2]", good[1]], "line 2: a JSON list, not a record (an object)"),
        ([good[0], good[1], edited(good[0], selection=first["selection"] + 1)], "line 3: point {key} is already scored differently on line 1"),
        ([edited(good[0], kind="result")], "line 1: a record of kind 'result', not a point record of this log"),
    ]
    for lines, needle in cases:
        path.write_text("\n".join(lines) + "\n")
        line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0"))
        assert line.startswith(f"{path}, ") and needle.format(key=first["key"]) in line, line
        assert path.read_text() == "\n".join(lines) + "\n"  # refused, not rewritten
    path.write_text("\n".join([good[0], good[1], good[0]]) + "\n")  # the same result twice: harmless
    assert sweep(recipe, out, evaluator, "--lambda", "0.5,1.0").exit_code == 0


def test_a_nan_selection_never_wins() -> None:
    assert best_index([math.nan, 1.0, 2.0]) == 2
    assert best_index([1.0, math.nan, 0.5]) == 0
    assert best_index([3.0, 3.0]) == 0


# ---- items 5 and 9: atomic outputs, full and read-only disks --------------------------


def test_write_output_on_a_full_disk_keeps_the_previous_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "64k") as disk:
        target = disk / "winner.yml"
        write_output(target, "previous\n")
        os.umask(old := os.umask(0o022))
        assert target.stat().st_mode & 0o777 == 0o666 & ~old  # the umask's mode, as mergekit's files
        fill(disk)
        with pytest.raises(PathError, match=f"cannot write {target}: No space left on device"):
            write_output(target, "x" * 100_000)
        assert target.read_text() == "previous\n"
        assert leftovers(disk) == []


def test_sweep_with_a_full_out_keeps_the_points_scored(family: Family, evaluator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator fills --out while scoring the second point: its line (longer than a
    page: it needs room) cannot be written; the first point's is kept, whole; no winner,
    no lock file left; the sweep resumes once there is room."""
    recipe = write_recipe(family, tmp_path / "median.yml")
    monkeypatch.setenv("FEDMERGE_SCRATCH_DIR", str(tmp_path))  # merges elsewhere: only the log fills OUT
    monkeypatch.setenv("PAD", "300")
    with tmpfs(tmp_path / "out", "4m") as out:
        monkeypatch.setenv("FILL_AT", "2")
        monkeypatch.setenv("FILL", str(out))
        line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0,1.5"))
        assert line == f"cannot write {out / 'results.jsonl'}: No space left on device (1 result(s) recorded before are kept)"
        assert [r["index"] for r in records(out)] == [0]
        assert sorted(p.name for p in out.iterdir()) == ["filler", "results.jsonl"]
        (out / "filler").unlink()
        monkeypatch.delenv("FILL_AT")
        assert sweep(recipe, out, evaluator, "--lambda", "0.5,1.0,1.5").exit_code == 0  # resumes
        assert sorted(r["index"] for r in records(out)) == [0, 1, 2]
        assert len((tmp_path / "calls.log").read_text().split()) == 4  # point 0 was not scored again


def test_winner_on_a_full_disk_is_one_line_and_no_empty_file(family: Family, evaluator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the last point is scored: its short line still fits the log's
    last page, winner.yml does not: no winner.yml (never an empty one), every result kept."""
    recipe = write_recipe(family, tmp_path / "median.yml")
    monkeypatch.setenv("FEDMERGE_SCRATCH_DIR", str(tmp_path))
    with tmpfs(tmp_path / "out", "4m") as out:
        monkeypatch.setenv("FILL_AT", "3")
        monkeypatch.setenv("FILL", str(out))
        line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0,1.5"))
        assert line == f"cannot write {out / 'winner.yml'}: No space left on device"
        assert sorted(r["index"] for r in records(out)) == [0, 1, 2]
        assert sorted(p.name for p in out.iterdir()) == ["filler", "results.jsonl"]


def test_sweep_with_a_read_only_or_full_out_is_refused_and_keeps_its_results(family: Family, evaluator: str, tmp_path: Path) -> None:
    recipe = write_recipe(family, tmp_path / "median.yml")
    with tmpfs(tmp_path / "out", "4m") as out:
        assert sweep(recipe, out, evaluator, "--lambda", "0.5").exit_code == 0
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        fill(out)
        line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0"))
        assert line == f"cannot write {out / LOCK_NAME}: No space left on device"
        (out / "filler").unlink()
        read_only(out)
        line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0"))
        assert line == f"cannot write {out / LOCK_NAME}: Read-only file system"
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_sweep_with_a_full_scratch_folder_names_it_and_the_point(family: Family, evaluator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(family, tmp_path / "median.yml")
    with tmpfs(tmp_path / "scratch", "64k") as scratch:
        monkeypatch.setenv("FEDMERGE_SCRATCH_DIR", str(scratch))
        line = one_line(sweep(recipe, tmp_path / "out", evaluator, "--lambda", "0.5,1.0"))
        assert line.startswith("grid point lambda=0.5: cannot write ") and str(scratch) in line and "No space left on device" in line, line
        assert "No space left on device" in line, line
        assert list(scratch.iterdir()) == []  # the partial merge removed
    assert not (tmp_path / "out" / "results.jsonl").exists()


# ---- item 10: inspect --json / --plot checked before the pass -------------------------


def test_inspect_outputs_are_checked_before_the_pass(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmerge_plugins.diagnostics import report

    recipe = write_recipe(family, tmp_path / "median.yml")
    passes: List[int] = []
    real = report.build_report

    def counted(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "build_report", counted)
    created = tmp_path / "new" / "folder" / "report.json"
    assert invoke("inspect", str(recipe), "--json", str(created)).exit_code == 0  # --json makes its folder, as --plot does
    assert json.loads(created.read_text())["merge_method"] == "median" and len(passes) == 1
    with tmpfs(tmp_path / "disk", "256k") as disk:
        (disk / "report.json").write_text("previous\n")
        fill(disk)
        for option in ("--json", "--plot"):
            line = one_line(invoke("inspect", str(recipe), option, str(disk / "report.out")))
            assert line == f"cannot write {disk / 'report.out'}: No space left on device"
        (disk / "filler").unlink()
        read_only(disk)
        line = one_line(invoke("inspect", str(recipe), "--json", str(disk / "report.json")))
        assert line == f"cannot write {disk / 'report.json'}: Read-only file system"
        assert len(passes) == 1  # none of them started the pass
        assert sorted(p.name for p in disk.iterdir()) == ["report.json"]


def test_inspect_json_on_a_disk_that_fills_during_the_pass_keeps_the_previous_file(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmerge_plugins.diagnostics import report

    recipe = write_recipe(family, tmp_path / "median.yml")
    real = report.build_report
    with tmpfs(tmp_path / "disk", "256k") as disk:
        target = disk / "report.json"
        target.write_text("previous\n")

        def filling(*args, **kwargs):
            result = real(*args, **kwargs)
            fill(disk)
            return result

        monkeypatch.setattr(report, "build_report", filling)
        line = one_line(invoke("inspect", str(recipe), "--json", str(target)))
        assert line == f"cannot write {target}: No space left on device"
        assert target.read_text() == "previous\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "report.json"]


# ---- item 12: evaluators that raise ---------------------------------------------------


def test_an_evaluator_that_raises_is_named_with_the_grid_point(family: Family, evaluator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(family, tmp_path / "median.yml")
    module = evaluator.split(":")[1]
    monkeypatch.setenv("RAISE_AT", "2")
    out = tmp_path / "out"
    line = one_line(sweep(recipe, out, evaluator, "--lambda", "0.5,1.0,1.5"))
    assert re.fullmatch(
        rf"grid point lambda=1: evaluator {re.escape(evaluator)} raised KeyError: 'no such score' \({re.escape(module)}, line \d+\)", line
    ), line
    assert [r["index"] for r in records(out)] == [0]  # the earlier point is kept
    monkeypatch.setenv("RAISE_AT", "3")  # the next call
    verbose = sweep(recipe, out, evaluator, "--lambda", "0.5,1.0,1.5", "-v")  # -v: the traceback, down to the evaluator's
    assert isinstance(verbose.exception, FedmergeError) and isinstance(verbose.exception.__cause__.__cause__, KeyError)

    broken = tmp_path / "broken.py"
    for text, needle in (("def score(model_dir)\n    return 1\n", "importing it raised SyntaxError: expected ':' ({path}, line 1)"),
                         ("import os\nraise RuntimeError('no GPU')\n", "importing it raised RuntimeError: no GPU ({path}, line 2)")):
        broken.write_text(text)
        line = one_line(sweep(recipe, tmp_path / "never", f"python:{broken}:score", "--lambda", "0.5"))
        assert line == f"--eval 'python:{broken}:score': " + needle.format(path=broken), line
        assert not (tmp_path / "never").exists()


# ---- item 13: a data file that is not UTF-8 -------------------------------------------


def test_eval_names_a_data_file_that_is_not_utf8(family: Family, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_bytes(b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9?", "answer": "3"}\n')
    line = one_line(invoke("eval", str(family.base), "--tasks", "gsm8k", "--data-dir", str(data), "--limit", "1"))
    assert line == f"{data / 'gsm8k.jsonl'}, line 2: not UTF-8 text (byte 0xe9 at column 18)"


# ---- item 14: clear messages for odd requests -----------------------------------------


def test_odd_grids_and_paths_get_their_own_message(family: Family, evaluator: str, tmp_path: Path) -> None:
    recipe = write_recipe(family, tmp_path / "median.yml")
    cclip = write_recipe(family, tmp_path / "cclip.yml", "cclip", rho=1.0)
    out = tmp_path / "out"
    cases = [
        (recipe, ["--lambda", ""], "--lambda: the grid is empty: give `a,b,c` or `start:stop:step`"),
        (recipe, ["--lambda", "1:0.2:0.2"], "--lambda: grid stop 0.2 is below its start 1.0 (a step goes upwards: START:STOP:STEP)"),
        (recipe, ["--lambda", "0.2:1:0"], "--lambda: grid step must be > 0; got 0.0"),
        (cclip, ["--lambda", "1", "--rho", "1e309"], "--rho: grid value '1e309' is beyond the float range"),
        (recipe, ["--lambda", "0:1:1e-9"], "--lambda: the grid 0.0:1.0:1e-09 has 1,000,000,001 points, more than the limit of 10,000"),
        (cclip, ["--lambda", "0.1:1:0.1", "--rho", "1,2", "--max-points", "15"], "the λ × ρ grid has 20 points, more than the limit of 15"),
    ]
    for path, grid, needle in cases:
        line = one_line(sweep(path, out, evaluator, *grid))
        assert line.startswith(needle), (grid, line)
        assert not out.exists()
    write_recipe(family, tmp_path / "huge.yml", "cclip", rho="1e309")
    line = one_line(sweep(tmp_path / "huge.yml", out, evaluator, "--lambda", "1"))
    assert "`rho`" in line and "beyond the float range" in line, line
    loop = tmp_path / "loop.yml"
    loop.symlink_to(tmp_path / "loop2.yml")
    (tmp_path / "loop2.yml").symlink_to(loop)
    refused = sweep(loop, out, evaluator, "--lambda", "1")
    assert refused.exit_code == 2 and f"'{loop}' is a symbolic link loop" in refused.output


# ---- the error boundary (issue 32) ----------------------------------------------------


def _all_modules() -> None:
    for module in pkgutil.walk_packages(fedmerge_plugins.__path__, "fedmerge_plugins."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional extra (ray, vllm) not installed
            pass


def _subclasses(cls: type) -> List[type]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _subclasses(child)]


def test_every_deliberate_error_is_a_fedmerge_error_and_nothing_else() -> None:
    from fedmerge_plugins.evaluation.loaders import DataUnavailable
    from fedmerge_plugins.evaluation.sandbox import SandboxUnavailable

    _all_modules()
    ours = [cls for cls in _subclasses(FedmergeError) if cls.__module__.startswith("fedmerge_plugins")]
    assert DataUnavailable in ours and SandboxUnavailable in ours and len(ours) > 15
    mixed = [cls.__qualname__ for cls in ours if issubclass(cls, (ValueError, RuntimeError, OSError, KeyError, TypeError))]
    # the one deliberate exception (issue 31, item 16): a missing model stays a FileNotFoundError
    # for Python callers who catch OSError around mergekit's run_merge
    assert mixed == ["ModelNotFoundError"]
    from fedmerge_plugins.guards.sources import ModelNotFoundError

    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_one_line_for_ours_a_traceback_for_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedmerge clip summary`` once printed a genuine KeyError as a tidy line."""
    from fedmerge_plugins.clip import summary

    out = tmp_path / "run"
    out.mkdir()
    line = one_line(invoke("clip", "summary", str(out)))
    assert line == f"cannot read {out / 'run.json'}: No such file or directory"
    (out / "run.json").write_text(json.dumps({"spec": {"tasks": ["mnist", "svhn"]}}))
    (out / "results.jsonl").write_text('{"kind": "result", "method": "median"}\n')
    line = one_line(invoke("clip", "summary", str(out)))
    assert line.startswith(f"{out / 'results.jsonl'}: a result record without its subset or method")
    (out / "results.jsonl").write_text("")

    def broken(*args, **kwargs):
        return {}["a bug"]

    monkeypatch.setattr(summary, "table1", broken)
    result = invoke("clip", "summary", str(out))
    assert isinstance(result.exception, KeyError) and "Error:" not in result.output


# ---- item 9: clip experiment on a full --out or --cache-dir ---------------------------


def test_clip_experiment_on_a_full_out_or_cache_dir_is_one_line(tmp_path: Path) -> None:
    from tests.support.clip_synthetic import build_world
    from tests.test_clip_experiment import experiment_args

    world = build_world(tmp_path / "world")

    def arguments(out: Path, cache: Path) -> List[str]:
        args = experiment_args(world, tmp_path / "run")  # writes its training file beside tmp_path/run
        args[args.index("--out") + 1] = str(out)
        return ["clip", *args, "--cache-dir", str(cache)]

    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        line = one_line(invoke(*arguments(disk / "run", tmp_path / "cache")))
        assert line == f"cannot write {disk / 'run' / LOCK_NAME}: No space left on device"
        assert not (disk / "run").exists()  # the folder it made is removed again
    with tmpfs(tmp_path / "cache", "64k") as cache:
        fill(cache)
        line = one_line(invoke(*arguments(tmp_path / "run", cache)))
        assert re.fullmatch(rf"cannot write the [a-z -]+ cache in {re.escape(str(cache))}/\w+: No space left on device", line), line
        assert [p.name for p in cache.iterdir() if p.is_file()] == ["filler"]  # no partial cache file
