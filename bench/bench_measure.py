"""bench.py's measurements: whole processes timed (wait4) with their memory sampled, run interleaved; the
interpreter start-up and plugin import probes."""

from __future__ import annotations

import json
import os
import py_compile
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml
from tqdm.auto import tqdm

from bench_inputs import (
    BIN, DROP_CACHES, HERE, LAMBDA, LMEVAL_ITEMS, LMEVAL_LAMBDAS, LMEVAL_TOKENS, MEMORY_INTERVAL_S, REPO, SWEEP_LAMBDAS,
    SWEEP_POINTS, Inputs, Variant,
)


# ---- measured runs ----------------------------------------------------------------------


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    load: float  # 1-minute load average when the run started
    peak_anon_mib: Optional[float] = None  # sampled: the largest RssAnon of /proc/<pid>/status
    peak_file_mib: Optional[float] = None  # sampled: the largest Rss − Anonymous (file-backed pages)
    memory_samples: int = 0
    peak_sampled_rss_mib: Optional[float] = None  # sampled: the largest Rss (ru_maxrss also counts the parent, below)
    point_split_s: Optional[Dict[str, float]] = None  # sweeps: median seconds per point of merge, copy, evaluate


def proc_kib(text: str) -> Dict[str, int]:
    """The kB fields of a ``/proc/<pid>/status`` text (``VmRSS``, ``RssAnon``, ``RssFile``, …)."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


class MemorySampler:
    """Samples a process's anonymous and file-backed resident memory until it exits, from the
    kernel's counters in ``/proc/<pid>/status``. (``smaps_rollup``, read before, walks the
    process's page tables under its memory-map lock, which every mmap and munmap of the process
    also takes: at 50 ms it doubled the wall time of an lm-eval sweep, a 5 GB process that
    allocates and frees large buffers all the time.)"""

    def __init__(self, pid: int, interval: float = MEMORY_INTERVAL_S) -> None:
        import threading

        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak_anon_kib = self.peak_file_kib = self.peak_rss_kib = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            fields = proc_kib(self.path.read_text())
        except OSError:  # not started yet, or gone
            return
        if {"VmRSS", "RssAnon"} <= set(fields):  # a zombie has neither
            self.samples += 1
            self.peak_anon_kib = max(self.peak_anon_kib, fields["RssAnon"])
            self.peak_file_kib = max(self.peak_file_kib, fields["VmRSS"] - fields["RssAnon"])
            self.peak_rss_kib = max(self.peak_rss_kib, fields["VmRSS"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def fill(self, sample: Sample) -> Sample:
        if self.samples:
            sample.peak_anon_mib, sample.peak_file_mib = self.peak_anon_kib / 1024, self.peak_file_kib / 1024
            sample.memory_samples, sample.peak_sampled_rss_mib = self.samples, self.peak_rss_kib / 1024
        return sample


def child_env() -> Dict[str, str]:
    """Offline hub access; byte-code caching on, as for a user (pip installs compile it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_child(argv: List[str], env: Dict[str, str], log: Path, interval: float = MEMORY_INTERVAL_S) -> Sample:
    """Run one process; its own rusage comes from wait4 (not cumulative over children),
    its anonymous / file-backed memory from samples of its /proc/<pid>/status (while it runs,
    until wait4 reaps it: a zombie has no memory fields and is skipped).

    Linux keeps a process's RSS high-water mark across ``exec``, so the child's
    ``ru_maxrss`` is at least this (parent) process's RSS when it was spawned: a floor that
    hides the child's own peak when it is smaller (this script imports torch when it writes
    checkpoints). The sampled peaks have no such floor."""
    load = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        with MemorySampler(child.pid, interval) as sampler:
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{shlex.join(argv)} exited with {child.returncode}:\n{tail}")
    return sampler.fill(Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, load))


class Runner:
    """Runs variants in a scratch folder; outputs are deleted and synced after each run."""

    def __init__(self, inputs: Inputs, work: Path) -> None:
        self.inputs = inputs
        self.work = work
        self.env = child_env()
        self.warm_cache = work / "norms-warm"
        self.runs = 0
        self.interval = MEMORY_INTERVAL_S
        self.drop_caches = False  # empty the page cache before every run: inputs come from disk

    def command(self, variant: Variant, out: Path) -> List[str]:
        if variant.kind == "startup":
            return [str(BIN / "mergekit-yaml"), "--help"]
        if variant.kind == "floor":
            models = [str(p) for p in self.inputs.tasks[: variant.models]]
            return [sys.executable, str(HERE / "floor.py"), str(out), str(self.inputs.base), *models, "--lambda", str(LAMBDA)]
        config = self.work / f"{variant.name}.yml"
        if not config.exists():
            config.write_text(yaml.safe_dump(variant.recipe, sort_keys=False))
        if variant.kind == "sweep":
            evaluator = self.work / "trivial_evaluator.py"
            evaluator.write_text(TRIVIAL_EVALUATOR)
            return [str(BIN / "fedmerge"), "sweep", str(config), "--lambda", SWEEP_LAMBDAS, "--eval",
                    f"python:{evaluator}:score", "--mode", "memory", "--out", str(out)]  # fmt: skip
        lmeval = ["--tasks", "gsm8k", "--data-dir", str(self.lmeval_data()), "--limit", str(LMEVAL_ITEMS),
                  "--max-gen-toks", str(LMEVAL_TOKENS), "--batch-size", str(LMEVAL_ITEMS)]  # fmt: skip
        if variant.kind == "sweep_lmeval":
            return [str(BIN / "fedmerge"), "sweep", str(config), "--lambda", LMEVAL_LAMBDAS, "--rho", "paper", "--eval", "lm-eval",
                    "--split", "test", "--mode", "memory", "--out", str(out), *lmeval]  # fmt: skip
        if variant.kind == "by_hand_lmeval":  # one point by hand: mergekit-yaml, then fedmerge eval
            merge = [str(BIN / "mergekit-yaml"), str(config), str(out / "merged"), "--no-write-model-card"]
            evaluate = [str(BIN / "fedmerge"), "eval", str(out / "merged"), *lmeval]
            return ["sh", "-c", f"{shlex.join(merge)} && {shlex.join(evaluate)}"]
        return [str(BIN / "mergekit-yaml"), str(config), str(out), "--no-write-model-card"]

    def lmeval_data(self) -> Path:
        """A GSM8K file of ``LMEVAL_ITEMS`` items (the synthetic models answer nonsense: only the cost counts)."""
        data = self.work / "lmeval-data"
        data.mkdir(exist_ok=True)
        items = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(1, LMEVAL_ITEMS + 1)]
        (data / "gsm8k.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
        return data

    def run(self, variant: Variant) -> Sample:
        self.runs += 1
        out = self.work / "out"
        env = dict(self.env)
        cache = None
        if variant.norm_cache == "cold":
            cache = self.work / f"norms-cold-{self.runs}"
        elif variant.norm_cache == "warm":
            cache = self.warm_cache
        if cache is not None:
            env["FEDMERGE_CACHE_DIR"] = str(cache)
        before = norm_file_state(cache)
        if self.drop_caches:
            drop_page_cache()
        sample = run_child(self.command(variant, out), env, self.work / f"{variant.name}.log", self.interval)
        if cache is not None:
            check_norm_cache(variant, cache, before)
        if variant.kind in ("sweep", "sweep_lmeval"):
            sample.point_split_s = check_sweep(variant, out)
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # the next run must not pay for this one's write-back
        return sample


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean page cache (needs root; Linux only)."""
    os.sync()
    DROP_CACHES.write_text("1\n")


def norm_file_state(cache: Optional[Path]) -> Optional[int]:
    path = cache / "norms.json" if cache else None
    return path.stat().st_mtime_ns if path and path.exists() else None


def check_norm_cache(variant: Variant, cache: Path, before: Optional[int]) -> None:
    """A cold run must compute and store every norm; a warm one must read them only."""
    after = norm_file_state(cache)
    if variant.norm_cache == "cold" or before is None:
        stored = json.loads((cache / "norms.json").read_text()) if after else {}
        if len(stored) != variant.models:
            raise RuntimeError(f"{variant.name}: expected {variant.models} norms in {cache}, found {len(stored)}")
    elif after != before:
        raise RuntimeError(f"{variant.name}: the warm norm cache {cache} was rewritten: norms were recomputed")


TRIVIAL_EVALUATOR = """
def score(model):
    \"\"\"1 + |one weight| of the loaded model (the point's weights were copied into it): a positive number.\"\"\"
    return 1.0 + float(next(model.parameters()).reshape(-1)[0].float().abs())
"""


def check_sweep(variant: Variant, out: Path) -> Optional[Dict[str, float]]:
    """A sweep run must have merged and scored every point; the median seconds per point of
    its merge (D and λ), copy into the model and evaluation, where the log records them."""
    log = out / "results.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    points = [line for line in lines if line.get("kind", "point") == "point"]
    if len(points) != SWEEP_POINTS or not all(p["scores"] and min(p["scores"].values()) >= 0 for p in points):
        raise RuntimeError(f"{variant.name}: expected {SWEEP_POINTS} scored points in {log}, found {len(points)}")
    timings = [p["details"]["timing"] for p in points if "timing" in p.get("details", {})]
    return {part: statistics.median(t[part] for t in timings) for part in timings[0]} if timings else None


def run_interleaved(runner: Runner, chosen: Sequence[Variant], repeat: int, warmup: int) -> Dict[str, List[Sample]]:
    """Warm-up rounds (untimed; the first cclip_warm run fills the warm cache), then
    ``repeat`` rounds of every variant in the same order."""
    samples: Dict[str, List[Sample]] = {v.name: [] for v in chosen}
    untimed = [v for _ in range(warmup) for v in chosen] or [v for v in chosen if v.norm_cache == "warm"][:1]
    rounds = [(False, v) for v in untimed] + [(True, v) for _ in range(repeat) for v in chosen]
    for timed, variant in tqdm(rounds, desc="merges", unit="run"):
        sample = runner.run(variant)
        if timed:
            samples[variant.name].append(sample)
    return samples


# ---- start-up and plugin import ---------------------------------------------------------


PLUGIN_PROBE = """
import importlib, json, sys, time
hooks = json.loads(sys.argv[1])
result = {}
for module in hooks:
    start = time.perf_counter()
    importlib.import_module(module)
    result["import " + module] = 1e3 * (time.perf_counter() - start)
from mergekit.merge_methods import registry
result["hooked"] = "fednova" in {m.spec.name for m in registry.registered_methods()}
import fedmerge_plugins
for hook in hooks.values():
    start = time.perf_counter()
    getattr(fedmerge_plugins, hook)()
    result[hook] = 1e3 * (time.perf_counter() - start)
print(json.dumps(result))
"""


def autoload_hooks() -> Dict[str, str]:
    """The autoload's table: mergekit module -> fedmerge_plugins function run after its import."""
    import fedmerge_autoload  # already imported at start-up when fedmerge is installed

    return dict(fedmerge_autoload._HOOKS)


def autoload_source() -> Path:
    """The installed autoload files when present, else the repository's copies."""
    installed = Path(sysconfig.get_paths()["purelib"])
    return installed if (installed / "fedmerge_autoload.py").exists() else REPO / "autoload"


def scratch_pythons(root: Path) -> Dict[str, Path]:
    """Two fresh venvs of this interpreter that see this venv's packages through a
    path-only .pth (so none of its .pth files runs); "with" also has the autoload."""
    purelib = sysconfig.get_paths()["purelib"]
    pythons = {}
    for name in ("with", "without"):
        home = root / name
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(home), "platbase": str(home)}))
        (site / "fedmerge_bench_paths.pth").write_text(f"{purelib}\n{REPO}\n")
        if name == "with":
            for file in ("fedmerge_autoload.py", "fedmerge_autoload.pth"):
                shutil.copy(autoload_source() / file, site / file)
            py_compile.compile(str(site / "fedmerge_autoload.py"), doraise=True)  # as pip does on install
        pythons[name] = home / "bin" / "python"
    return pythons


def import_lines(python: Path, code: str) -> Dict[str, Tuple[int, int]]:
    """``-X importtime`` of ``python -c code``: module -> (self µs, cumulative µs)."""
    run = subprocess.run(
        [str(python), "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, env=child_env()
    )
    lines = {}
    for line in run.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            lines[parts[2].strip()] = (int(parts[0].split(":")[-1]), int(parts[1]))
    return lines


def import_time_us(python: Path, module: str) -> Optional[int]:
    """Cumulative ``-X importtime`` of ``module`` at start-up of ``python -c pass``."""
    return import_lines(python, "pass").get(module, (None, None))[1]


def added_import_us(pythons: Dict[str, Path], code: str) -> int:
    """Self import time of the modules that ``code`` imports with the autoload and not
    without it: fedmerge's own modules and whatever only they need."""
    without = import_lines(pythons["without"], code)
    return sum(own for name, (own, _) in import_lines(pythons["with"], code).items() if name not in without)


def wall_ms(argv: List[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    return 1e3 * (time.perf_counter() - start)


def measure_startup(startup_runs: int, plugin_runs: int) -> dict:
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-venvs-") as tmp:
        pythons = scratch_pythons(Path(tmp))
        if startup_runs:
            walls: Dict[str, List[float]] = {name: [] for name in pythons}
            autoload = []
            for _ in tqdm(range(startup_runs), desc="interpreter start-up", unit="pair"):
                for name, python in pythons.items():
                    walls[name].append(wall_ms([str(python), "-c", "pass"]))
                autoload.append(import_time_us(pythons["with"], "fedmerge_autoload"))
            venv_line = import_time_us(Path(sys.executable), "fedmerge_autoload")
            result["startup"] = {
                "runs": startup_runs,
                "python_c_pass_ms": {name: statistics.median(v) for name, v in walls.items()},
                "added_ms": statistics.median(walls["with"]) - statistics.median(walls["without"]),
                "autoload_importtime_us": statistics.median(a for a in autoload if a is not None),
                "this_venv_autoload_importtime_us": venv_line,
                "samples_ms": walls,
            }
        if plugin_runs:
            hooks = autoload_hooks()
            probes: Dict[str, List[dict]] = {name: [] for name in pythons}
            added_us: List[int] = []
            for _ in tqdm(range(plugin_runs), desc="plugin import", unit="pair"):
                for name, python in pythons.items():
                    run = subprocess.run(
                        [str(python), "-c", PLUGIN_PROBE, json.dumps(hooks)],
                        capture_output=True, text=True, check=True, env=child_env(),
                    )
                    probes[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
                added_us.append(added_import_us(pythons, "import " + ", ".join(hooks)))
            if not all(p.pop("hooked") for p in probes["with"]) or any(p.pop("hooked") for p in probes["without"]):
                raise RuntimeError("the scratch venvs do not differ by the autoload as intended")
            result["plugin"] = {
                "runs": plugin_runs,
                "hooks": hooks,
                "added_importtime_us": statistics.median(added_us),
                **{name: {k: statistics.median(p[k] for p in runs) for k in runs[0]} for name, runs in probes.items()},
            }
    return result
