"""Units of work on a local Ray of 2 workers (bound to 127.0.0.1) give exactly the serial results.

``run_units`` itself: bit-for-bit results, a dead worker's unit run again, a worker's exception
raised as itself. ``fedmerge sweep`` and the CLIP experiment: the same records and winner as a
serial run; CCLIP's norms come from the driver (a deliberately wrong norm held in the driver's
memory reaches the workers); a worker killed mid-sweep still gives every point once; a driver SIGKILLed
mid-sweep resumes. One Ray session serves the whole file (module fixture), plus the one the
killed ``fedmerge sweep --ray-address`` joins as a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.search.workers import LOOPBACK_ENV, WorkerSettings, WorkersError, pack, run_units, unpack
from tests.conftest import BIN

os.environ.setdefault(LOOPBACK_ENV, "0")  # as workers.import_ray does: this file's Ray on loopback only
ray = pytest.importorskip("ray")

TWO = WorkerSettings(workers=2, gpus_per_worker=0)


def weighted_sum(shared, unit):
    """θ_0 + λ Σ τ_t in float32, a stand-in for merging a grid point."""
    lam, _ = unit
    base = shared["base"].float()
    total = sum(model.float() - base for model in shared["models"])
    return (base + lam * total).to(shared["base"].dtype)


def die_once(shared, unit):
    lam, marker = unit
    marker = Path(marker)
    attempts = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(attempts + 1))
    if lam == 0.5 and attempts == 0:
        os._exit(1)  # the worker process dies, as under SIGKILL or the OOM killer
    return weighted_sum(shared, unit)


def refuse(shared, unit):
    raise WorkersError(f"unit {unit} refused")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    # workers inherit the environment of ray.init: a norm cache of their own, never ~/.cache
    saved = os.environ.get("FEDMERGE_CACHE_DIR")
    os.environ["FEDMERGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("worker-norm-cache"))
    context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()
    if saved is None:
        os.environ.pop("FEDMERGE_CACHE_DIR", None)
    else:
        os.environ["FEDMERGE_CACHE_DIR"] = saved


def inputs():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=generator).bfloat16()
    models = [(base.float() + 0.1 * torch.randn(64, 33, generator=generator)).bfloat16() for _ in range(3)]
    return {"base": base, "models": models}


def collect(work, shared, units, settings) -> Dict:
    results = {}
    for unit, result, seconds in run_units(work, shared, units, settings):
        assert unit not in results and seconds >= 0
        results[unit] = result
    return results


def test_pack_round_trip_shares_memory():
    from fedmerge_plugins.clip.experiment import Training
    from fedmerge_plugins.sweep.merger import MemoryLoader

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64):
        tensor = (torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7).to(dtype)
        back = unpack(pack({"a": [tensor]}))["a"][0]
        assert back.dtype == dtype and torch.equal(back, tensor)
        assert back.data_ptr() == tensor.data_ptr()  # views all the way, no copy
    loader = MemoryLoader(index=None, tensors={"w": torch.ones(3, dtype=torch.bfloat16)})  # type: ignore[arg-type]
    packed = pack({"loader": loader, "training": Training(3, 0.5)})
    assert not isinstance(packed["loader"].tensors["w"], torch.Tensor) and packed["training"] == Training(3, 0.5)
    assert loader.tensors["w"].dtype == torch.bfloat16  # the original is left as it was
    back = unpack(packed)["loader"]
    assert isinstance(back, MemoryLoader) and back.tensors["w"].data_ptr() == loader.tensors["w"].data_ptr()


def test_ray_matches_serial_bit_for_bit(local_ray, tmp_path):
    shared = inputs()
    units = [(lam, str(tmp_path / f"{lam}")) for lam in (0.25, 0.5, 1.0, 1.5, 2.0)]
    serial = collect(weighted_sum, shared, units, WorkerSettings())
    distributed = collect(weighted_sum, shared, units, TWO)
    assert set(serial) == set(distributed) == set(units)
    for unit in units:
        assert torch.equal(serial[unit].view(torch.int16), distributed[unit].view(torch.int16))
    assert ray.is_initialized()  # a session the caller started is left running


def test_dead_worker_unit_runs_again(local_ray, tmp_path):
    units = [(lam, str(tmp_path / f"marker-{lam}")) for lam in (0.25, 0.5, 1.0)]
    results = collect(die_once, inputs(), units, TWO)
    assert sorted(results) == sorted(units)  # every unit reported once
    assert (tmp_path / "marker-0.5").read_text() == "2"  # the killed unit ran again
    assert (tmp_path / "marker-0.25").read_text() == "1"


def test_worker_exception_is_raised_as_itself(local_ray):
    with pytest.raises(WorkersError) as raised:
        list(run_units(refuse, None, [1, 2], TWO))
    assert str(raised.value) in ("unit 1 refused", "unit 2 refused")  # one line, no Ray traceback


def test_settings_checks(monkeypatch):
    with pytest.raises(WorkersError, match="--workers must be >= 0"):
        WorkerSettings(workers=-1).check()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(WorkersError, match=r"pip install 'fedmerge\[ray\]'"):
        WorkerSettings(workers=2).check()
    WorkerSettings().check()  # serial needs no Ray
    assert TWO.describe() == "on a local Ray of 2 workers (0 GPU per worker)"


# ---- fedmerge sweep on workers ---------------------------------------------------------------

from tests.test_sweep import evaluator_spec, tiny_family, write_recipe  # noqa: E402

DEATH = '''
import importlib.util
import os
from pathlib import Path

_spec = importlib.util.spec_from_file_location("goal_evaluator", {goal!r})
_goal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_goal)
closeness = _goal.score


def score(model_dir):
    """The goal evaluator; the worker process dies the first time it scores point 2."""
    marker = Path({markers!r}) / os.path.basename(model_dir)
    attempts = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(attempts + 1))
    if os.path.basename(model_dir) == "point-0002" and attempts == 0:
        os._exit(1)
    return closeness(model_dir)
'''


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("workers-family"))


def log_records(out: Path) -> List[Dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def without(records, *fields: str) -> Dict[str, Dict]:
    """Records by group and point key, without their timing (and ``fields``)."""
    result = {}
    for record in records:
        key = (record.get("group"), record["key"])
        assert key not in result, f"point {key} recorded twice"
        result[key] = {k: v for k, v in record.items() if k not in ("seconds", *fields)}
    return result


GRID = "0.4,0.8"  # × CCLIP's five ρ: 10 points


def put_norms(keys: List[str], norms: List[float]) -> None:
    from fedmerge_plugins.norms.cache import CACHE

    for key, norm in zip(keys, norms):
        CACHE.put(key, norm)


@pytest.fixture(scope="module")
def sweep_world(local_ray, family, tmp_path_factory):
    """The serial sweep, run with norms other than the true ones in its norm cache: the
    outlier's norm halved (a common factor would change nothing: ρ's grid scales with it)."""
    from mergekit.common import ModelReference

    from fedmerge_plugins.norms.cache import cache_key
    from fedmerge_plugins.norms.streaming import model_index, state_dict_norms
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep

    directory = tmp_path_factory.mktemp("serial")
    spec, _ = evaluator_spec(family, directory)
    recipe = write_recipe(family, directory)
    base = ModelReference.parse(str(family.base))
    keys = [cache_key(model_index(base), model_index(ModelReference.parse(str(t)))) for t in family.tasks]
    true = state_dict_norms(family.base_tensors, dict(enumerate(family.task_tensors)))
    norms = [true[0], true[1], true[2] / 2]
    workers_cache = os.environ["FEDMERGE_CACHE_DIR"]  # the workers' (local_ray)
    os.environ["FEDMERGE_CACHE_DIR"] = str(directory / "norm-cache")  # a file of its own: nothing known yet
    try:
        put_norms(keys, norms)
        outcome = run_sweep(recipe, directory / "out", PythonEvaluator(spec), lambdas=GRID, rhos="paper", echo=lambda line: None)
    finally:
        os.environ["FEDMERGE_CACHE_DIR"] = workers_cache
    assert outcome.norms == norms
    return {"dir": directory, "spec": spec, "recipe": recipe, "outcome": outcome, "keys": keys, "norms": norms,
            "workers_cache": Path(workers_cache), "family": family}


@pytest.fixture
def driver_norms(sweep_world) -> List[float]:
    """The serial sweep's norms in this test's (private) norm cache, as the driver's."""
    put_norms(sweep_world["keys"], sweep_world["norms"])
    return sweep_world["norms"]


def scores_of(records) -> Dict:
    return {k: (r["parameters"], r["scores"], r["selection"], r.get("merged_as")) for k, r in without(records).items()}


def test_sweep_on_two_workers_equals_serial_with_the_drivers_norms_a_killed_worker_too(
    sweep_world, driver_norms, tmp_path, monkeypatch
):
    """The points on 2 workers, one of which dies the first time it scores point 2: every
    point scored once more there and logged once, the serial records and winner; the grid and
    the clipping from the driver's norms (the workers never compute one)."""
    import ray as ray_module

    from fedmerge_plugins.search.grids import clip_rho_grid
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep
    from tests.test_sweep import expected_selections

    markers = tmp_path / "markers"
    markers.mkdir()
    dying = tmp_path / "dying_evaluator.py"
    dying.write_text(DEATH.format(markers=str(markers), goal=str(sweep_world["dir"] / "goal_evaluator.py")))
    puts = []
    real_put = ray_module.put
    monkeypatch.setattr(ray_module, "put", lambda value, **kw: puts.append(1) or real_put(value, **kw))
    lines: List[str] = []
    outcome = run_sweep(sweep_world["recipe"], tmp_path / "out", PythonEvaluator(f"python:{dying}:score"), lambdas=GRID,
                        rhos="paper", workers=TWO, echo=lines.append)
    assert len(puts) == 1  # the inputs went into the object store once
    assert any("scored on a local Ray of 2 workers" in line for line in lines)
    assert (markers / "point-0002").read_text() == "2"  # the worker died on it; it ran again
    assert {p.name: p.read_text() for p in markers.iterdir() if p.name != "point-0002"} == {
        f"point-{i:04d}": "1" for i in range(10) if i != 2
    }
    records = log_records(tmp_path / "out")
    assert len(records) == 10
    serial = sweep_world["outcome"]
    assert scores_of(records) == scores_of(serial.records.values())
    assert outcome.best["key"] == serial.best["key"] and outcome.norms == driver_norms
    assert sorted({r["parameters"]["rho"] for r in records}) == clip_rho_grid(driver_norms)
    assert not (sweep_world["workers_cache"] / "norms.json").exists()  # no worker computed a norm
    # and those norms matter: with the true ones (float64, computed here) the scores differ
    true_scores = expected_selections(sweep_world["family"], [(r["parameters"]["lambda"], r["parameters"]["rho"]) for r in records])
    assert any(abs(r["selection"] - true_scores[(r["parameters"]["lambda"], r["parameters"]["rho"])]) > 1e-3 for r in records)


HOLDER = """
import os
from safetensors.torch import load_file


def score(model):
    with open(os.path.join({calls!r}, str(os.getpid())), "a") as handle:  # which model each process scored with
        handle.write(str(id(model)) + "\\n")
    goal = load_file({goal!r})
    state = model.state_dict()
    return {{"closeness": -sum(float((state[k].double() - goal[k].double()).pow(2).sum()) for k in sorted(goal))}}
"""


def test_in_memory_sweep_on_two_workers_equals_serial_each_worker_one_model(family, tmp_path):
    """A model-taking evaluator: the points on 2 workers, each worker process scoring every
    one of its points with the one model it loaded; records and winner as in this process."""
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep

    calls = tmp_path / "calls"
    calls.mkdir()
    module = tmp_path / "holder.py"
    module.write_text(HOLDER.format(calls=str(calls), goal=str(family.base.parent / "goal.safetensors")))
    recipe = write_recipe(family, tmp_path)
    evaluator = PythonEvaluator(f"python:{module}:score")
    serial = run_sweep(recipe, tmp_path / "serial", evaluator, lambdas=GRID, rhos="0.05,0.5", echo=lambda line: None)
    ray_run = run_sweep(recipe, tmp_path / "ray", evaluator, lambdas=GRID, rhos="0.05,0.5", workers=TWO, echo=lambda line: None)
    assert scores_of(log_records(tmp_path / "ray")) == scores_of(serial.records.values())
    assert ray_run.best["key"] == serial.best["key"]
    workers = [p for p in calls.iterdir() if p.name != str(os.getpid())]
    assert 1 <= len(workers) <= 2 and sum(len(p.read_text().split()) for p in workers) == 4
    assert all(len(set(p.read_text().split())) == 1 for p in calls.iterdir())  # one model per process


@pytest.mark.slow
def test_killed_driver_resumes(local_ray, sweep_world, driver_norms, tmp_path):
    """``fedmerge sweep --ray-address`` (this file's Ray, as a cluster) SIGKILLed once 4 points
    are logged; the same sweep run again completes the log, every point once, with the serial
    scores. (Joining the running Ray spares the test a second Ray start.)"""
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep

    out = tmp_path / "out"
    command = [str(BIN / "fedmerge"), "sweep", str(sweep_world["recipe"]), "--lambda", GRID, "--rho", "paper",
               "--eval", sweep_world["spec"], "--out", str(out), "--ray-address", local_ray, "--gpus-per-worker", "0"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while driver.poll() is None and time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 4):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    before = log.read_text()
    assert 4 <= before.count("\n") < 10

    lines: List[str] = []
    run_sweep(sweep_world["recipe"], out, PythonEvaluator(sweep_world["spec"]), lambdas=GRID, rhos="paper",
              workers=TWO, echo=lines.append)
    assert any(f"{before.count(chr(10))} already in" in line for line in lines)
    after = log.read_text()
    assert after.startswith(before)  # nothing logged before the kill was redone or lost
    assert scores_of(log_records(out)) == scores_of(sweep_world["outcome"].records.values())


# ---- the CLIP experiment on workers ----------------------------------------------------------


def test_clip_experiment_on_two_workers_equals_serial(local_ray, tmp_path):
    """The serial experiment through the API, then ``fedmerge clip experiment --workers 2``:
    the same records (the point records in another order), and a rerun adds nothing."""
    from click.testing import CliRunner

    from fedmerge_plugins.clip.cli import clip_group
    from fedmerge_plugins.clip.data import SplitSettings
    from fedmerge_plugins.clip.evaluate import Session
    from fedmerge_plugins.clip.experiment import Experiment, ExperimentSpec, Training
    from tests.support.clip_synthetic import build_world

    world = build_world(tmp_path / "world")
    tasks = ("mnist", "eurosat", "beta")
    methods = ("task_arithmetic", "fednova", "fedgma", "cclip")
    spec = ExperimentSpec(tasks=tasks, methods=methods, lambdas=(0.5, 1.0), fedgma_rhos=(0.5, 1.0), cclip_count=2,
                          training={t: Training(*v) for t, v in world.training.items()})
    finetuned = {t: str(world.towers[t]) for t in tasks}

    def run(out: Path, workers: WorkerSettings) -> List[Dict]:
        session = Session(base=str(world.base), data_dir=world.data, settings=SplitSettings(0.5, 5000, 0),
                          cache_root=tmp_path / "cache", progress=False)
        return Experiment(session, spec, finetuned, out, progress=False).run(workers)

    serial = run(tmp_path / "serial", WorkerSettings())
    training = tmp_path / "training.json"
    training.write_text(json.dumps({t: {"steps": s, "learning_rate": lr} for t, (s, lr) in world.training.items()}))
    args = ["experiment", "--base", str(world.base), "--data-dir", str(world.data), "--tasks", ",".join(tasks),
            *[a for t in tasks for a in ("--model", f"{t}={world.towers[t]}")], "--out", str(tmp_path / "ray"),
            "--training", str(training), "--val-fraction", "0.5", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--methods", ",".join(methods), "--lambdas", "0.5,1.0", "--rhos", "0.5,1.0", "--cclip-count", "2",
            "--workers", "2", "--gpus-per-worker", "0"]
    result = CliRunner().invoke(clip_group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(serial) == 4 * 4  # every subset × method
    assert without(r for r in log_records(tmp_path / "ray") if r["kind"] == "point") == without(
        r for r in log_records(tmp_path / "serial") if r["kind"] == "point"
    )
    results = [r for r in log_records(tmp_path / "ray") if r["kind"] == "result"]
    assert sorted(map(json.dumps, results)) == sorted(map(json.dumps, serial))
    again = run(tmp_path / "ray", TWO)  # resumed: nothing left to do, nothing added; in work order
    assert again == serial and len(log_records(tmp_path / "ray")) == len(log_records(tmp_path / "serial"))


@pytest.mark.slow
def test_clip_sweep_in_memory_on_two_workers_equals_serial(local_ray, tmp_path):
    """``--eval clip`` in memory on 2 workers: each worker pickles the evaluator without a
    session, loads its own (its own empty cache: the reference accuracies computed there,
    before its first point's tower goes in); records and winner as the serial sweep's."""
    from fedmerge_plugins.sweep.run import run_sweep
    from tests.test_clip_sweep import build_prepared_world, evaluator, recipe

    world = build_prepared_world(tmp_path / "world")
    path = recipe(world, tmp_path, "cclip")
    lines: List[str] = []
    serial = run_sweep(path, tmp_path / "serial", evaluator(world), lambdas="0.1,1.5", rhos="paper", echo=lines.append)
    ray_run = run_sweep(path, tmp_path / "ray", evaluator(world), lambdas="0.1,1.5", rhos="paper", workers=TWO, echo=lines.append)
    assert sum("merged into one loaded model" in line for line in lines) == 2
    assert scores_of(log_records(tmp_path / "ray")) == scores_of(serial.records.values())
    assert ray_run.best["key"] == serial.best["key"]


def test_cli_without_ray_is_one_line_before_output(family, tmp_path):
    """With Ray hidden, ``fedmerge sweep --workers 2`` fails in one line and writes nothing."""
    spec, _ = evaluator_spec(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "ray.py").write_text("raise ImportError('hidden')\n")
    (hide / "sitecustomize.py").write_text(
        "import importlib.util, sys\n_real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'ray' else _real(name, *a, **k)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    result = subprocess.run([str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", "0.5", "--eval", spec, "--out", str(out),
                             "--workers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: --workers/--ray-address need Ray: pip install 'fedmerge[ray]'"]
    assert not out.exists()
    assert issubclass(WorkersError, FedmergeError)
