"""Time fedmerge's merge methods against mergekit's task_arithmetic and an I/O floor.

Makes (once, cached) a Llama-architecture bfloat16 base and four task checkpoints of a
chosen size, then runs whole processes, interleaved (A B C … A B C …): ``mergekit-yaml``
for task_arithmetic, fednova, fedgma, median, cclip with a cold and with a warm norm
cache, ``mergekit-yaml --help`` (mergekit's start-up alone), ``bench/floor.py`` (read
every input tensor once, θ_0 + λ Σ τ_t, write) and a 20-point λ sweep in memory
(``fedmerge sweep`` of the task_arithmetic recipe with a trivial evaluator). Each child's
wall time, CPU time (user + system) and peak resident memory come from ``os.wait4``; its
memory is also sampled from ``/proc/<pid>/smaps_rollup`` and split into anonymous memory
(allocations) and file-backed pages (mmap'd safetensors, counted in RSS but not
allocated). Wall times are also reported net of the fixed start-up (wall − the median of
``mergekit-yaml --help``), which at small sizes is most of a run. It also measures what
the autoload adds to interpreter start-up and what the plugin costs once mergekit is
imported, in two scratch virtual environments that differ only by the autoload.

Writes ``RESULTS.md`` and ``results.json`` into ``--output-dir`` (default: this folder),
one section per preset and page-cache setting: a run replaces its own and keeps the others.

    .venv/bin/python bench/bench.py                  # 270M parameters, 3 repetitions
    .venv/bin/python bench/bench.py --size 1b --repeat 5
    .venv/bin/python bench/bench.py --size 3b --drop-caches   # as root: inputs read from disk
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import py_compile
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support: the synthetic checkpoints

import yaml
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
FORMAT_VERSION = 1

# Llama shapes (vocab, hidden, layers, heads, intermediate); heads = key-value heads.
SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "270m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, intermediate_size=2816),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, intermediate_size=5632),
    "3b": dict(vocab_size=32000, hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, intermediate_size=8640),
}
# Std of task model t's offset θ_t − θ_0 per weight (base weights have std 0.02); the
# fourth model is used by the T = 4 variants only.
SCALES = (0.001, 0.002, 0.01, 0.0015)
LAMBDA = 0.5
STEPS = (1000, 2000, 4000, 3000)  # fednova: unequal training, so every c_t ≠ 1
AGREEMENT_RHO = 0.5  # fedgma
SWEEP_LAMBDAS = "0.05:1.0:0.05"  # 20 points
SWEEP_POINTS = 20
MEMORY_INTERVAL_S = 0.05  # smaps_rollup sampling period
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MARKER = "<!-- Notes below this line are kept when bench.py regenerates this file. -->"


# ---- inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    size: str
    root: Path
    base: Path
    tasks: List[Path]
    parameters: int


def parameter_count(size: str) -> int:
    from tests.support.synthetic import llama_config, parameter_shapes

    return sum(math.prod(shape) for shape in parameter_shapes(llama_config(**SIZES[size])).values())


def ensure_checkpoints(cache_dir: Path, size: str) -> Inputs:
    """Base + len(SCALES) bfloat16 task checkpoints under ``cache_dir``, made once and reused."""
    root = cache_dir / f"{size}-bf16"
    spec = {"version": FORMAT_VERSION, "config": SIZES[size], "scales": list(SCALES), "seed": 0, "dtype": "bfloat16"}
    marker = root / "complete.json"
    names = [f"task{i}" for i in range(len(SCALES))]
    count = parameter_count(size)
    inputs = Inputs(size, root, root / "base", [root / n for n in names], count)
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return inputs
    needed = 2 * count * (len(SCALES) + 2)  # five checkpoints and one merged output
    cache_dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(cache_dir).free < needed * 1.1:
        raise SystemExit(f"{cache_dir}: need about {needed / 2**30:.1f} GiB free for the {size} checkpoints")
    shutil.rmtree(root, ignore_errors=True)

    import torch

    from tests.support.synthetic import base_tensors, llama_config, task_tensors, write_checkpoint

    config = llama_config(**SIZES[size])
    with tqdm(total=len(SCALES) + 1, desc=f"writing {size} checkpoints", unit="model") as progress:
        base = base_tensors(config, seed=0, dtype=torch.bfloat16)
        write_checkpoint(inputs.base, config, base)
        progress.update()
        for i, (path, scale) in enumerate(zip(inputs.tasks, SCALES)):
            # the tensors of synthetic.make_family, but one task model in memory at a time (it keeps them all)
            write_checkpoint(path, config, task_tensors(base, scale, seed=1 + i))
            progress.update()
    marker.write_text(json.dumps({"spec": spec, "parameters": count}, indent=1))
    return inputs


# ---- variants ---------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    models: int  # T
    kind: str  # "mergekit", "sweep", "floor" or "startup"
    recipe: Optional[dict] = None
    norm_cache: Optional[str] = None  # cclip: "cold" or "warm"
    target: Optional[float] = None  # wall-time ratio to task_arithmetic with the same T
    rss_target: Optional[float] = 1.1  # peak-RSS ratio to task_arithmetic (None: not a target)

    @property
    def imports_mergekit(self) -> bool:
        """Runs that pay mergekit's start-up (the `startup` variant's wall time)."""
        return self.kind in ("mergekit", "sweep")


def recipe(inputs: Inputs, method: str, models: int, parameters: dict, per_model: Optional[List[dict]] = None) -> dict:
    entries = []
    for i, path in enumerate(inputs.tasks[:models]):
        entry: dict = {"model": str(path)}
        if per_model:
            entry["parameters"] = per_model[i]
        entries.append(entry)
    return {
        "merge_method": method,
        "base_model": str(inputs.base),
        "models": entries,
        "parameters": parameters,
        "dtype": "bfloat16",
    }


def clip_radius(inputs: Inputs) -> float:
    """ρ between the task-vector norms (≈ scale · √parameters): clips one model of three."""
    return 0.003 * math.sqrt(inputs.parameters)


# Wall-time targets (ratio to task_arithmetic with the same T) and the peak-RSS target. At 270m
# mergekit's import is most of a run; from 1b on the kernels and the reads dominate, and issue 19
# asks for more there: cold cclip within one extra read of the inputs, the rest no slower than
# task_arithmetic.
TARGETS = {
    "small": dict(fednova=1.05, fedgma=1.05, median=1.3, cclip_cold=1.8, cclip_warm=1.05, rss=1.1),
    "large": dict(fednova=1.0, fedgma=1.0, median=1.0, cclip_cold=1.5, cclip_warm=1.0, rss=1.05),
}


def targets_for(size: str) -> Dict[str, float]:
    return TARGETS["large" if size in ("1b", "3b") else "small"]


def variants(inputs: Inputs, size: str = "270m") -> List[Variant]:
    lam = {"lambda": LAMBDA}
    weights = [{"weight": 1.0} for _ in SCALES]
    steps = [{"steps": s} for s in STEPS]
    clip = {"lambda": LAMBDA, "rho": round(clip_radius(inputs), 6)}
    t = targets_for(size)
    rss = t["rss"]
    return [
        Variant("startup", 0, "startup"),
        Variant("task_arithmetic", 3, "mergekit", recipe(inputs, "task_arithmetic", 3, lam, weights)),
        Variant("fednova", 3, "mergekit", recipe(inputs, "fednova", 3, lam, steps), target=t["fednova"], rss_target=rss),
        Variant("fedgma", 3, "mergekit", recipe(inputs, "fedgma", 3, {**lam, "rho": AGREEMENT_RHO}), target=t["fedgma"], rss_target=rss),
        Variant("median", 3, "mergekit", recipe(inputs, "median", 3, lam), target=t["median"], rss_target=rss),
        Variant("cclip_cold", 3, "mergekit", recipe(inputs, "cclip", 3, clip), norm_cache="cold", target=t["cclip_cold"], rss_target=rss),
        Variant("cclip_warm", 3, "mergekit", recipe(inputs, "cclip", 3, clip), norm_cache="warm", target=t["cclip_warm"], rss_target=rss),
        Variant("floor", 3, "floor"),
        Variant("sweep_lambda20", 3, "sweep", recipe(inputs, "task_arithmetic", 3, lam, weights), target=3.0, rss_target=None),
        Variant("task_arithmetic_t4", 4, "mergekit", recipe(inputs, "task_arithmetic", 4, lam, weights)),
        Variant("median_t4", 4, "mergekit", recipe(inputs, "median", 4, lam), target=t["median"], rss_target=rss),
        Variant("floor_t4", 4, "floor"),
    ]


def reference_names(variant: Variant) -> tuple:
    """(task_arithmetic, floor) variants with the same number of task models."""
    suffix = "_t4" if variant.models == 4 else ""
    return f"task_arithmetic{suffix}", f"floor{suffix}"


# ---- measured runs ----------------------------------------------------------------------


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    load: float  # 1-minute load average when the run started
    peak_anon_mib: Optional[float] = None  # sampled: the largest Anonymous of smaps_rollup
    peak_file_mib: Optional[float] = None  # sampled: the largest Rss − Anonymous (file-backed pages)
    memory_samples: int = 0
    peak_sampled_rss_mib: Optional[float] = None  # sampled: the largest Rss (ru_maxrss also counts the parent, below)


def smaps_rollup_kib(text: str) -> Dict[str, int]:
    """The kB fields of a ``/proc/<pid>/smaps_rollup`` text (``Rss``, ``Anonymous``, …)."""
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


class MemorySampler:
    """Samples a process's anonymous and file-backed resident memory until it exits."""

    def __init__(self, pid: int, interval: float = MEMORY_INTERVAL_S) -> None:
        import threading

        self.path = Path(f"/proc/{pid}/smaps_rollup")
        self.interval = interval
        self.peak_anon_kib = self.peak_file_kib = self.peak_rss_kib = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            fields = smaps_rollup_kib(self.path.read_text())
        except OSError:  # not started yet, or gone
            return
        if "Rss" in fields and "Anonymous" in fields:
            self.samples += 1
            self.peak_anon_kib = max(self.peak_anon_kib, fields["Anonymous"])
            self.peak_file_kib = max(self.peak_file_kib, fields["Rss"] - fields["Anonymous"])
            self.peak_rss_kib = max(self.peak_rss_kib, fields["Rss"])

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
    its anonymous / file-backed memory from samples of its smaps_rollup (while it runs,
    until wait4 reaps it: a zombie's smaps_rollup is empty and is skipped).

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
        return [str(BIN / "mergekit-yaml"), str(config), str(out), "--no-write-model-card"]

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
        if variant.kind == "sweep":
            check_sweep(variant, out)
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
import os


def score(model_dir):
    \"\"\"The merged weights' size in bytes: reads no tensor, proves the merge was written.\"\"\"
    return float(sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir) if f.endswith(".safetensors")))
"""


def check_sweep(variant: Variant, out: Path) -> None:
    """A sweep run must have merged and scored every point."""
    log = out / "results.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    points = [line for line in lines if line.get("kind", "point") == "point"]
    if len(points) != SWEEP_POINTS or not all(p["scores"] and min(p["scores"].values()) > 0 for p in points):
        raise RuntimeError(f"{variant.name}: expected {SWEEP_POINTS} scored points in {log}, found {len(points)}")


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


# ---- report -----------------------------------------------------------------------------


MEASURES = ("wall_s", "cpu_s", "peak_rss_mib", "peak_sampled_rss_mib", "peak_anon_mib", "peak_file_mib")


def summarize(chosen: Sequence[Variant], samples: Dict[str, List[Sample]]) -> Dict[str, dict]:
    """Medians per variant; ratios of medians to task_arithmetic (and the floor) with the
    same T; wall times net of start-up: median wall − median wall of `startup`."""
    medians = {}
    for name, runs in samples.items():
        if runs:
            values = {key: [getattr(s, key) for s in runs] for key in MEASURES}
            medians[name] = {key: statistics.median(v) for key, v in values.items() if None not in v}
    startup = medians.get("startup", {}).get("wall_s")
    rows = {}
    for variant in chosen:
        row = dict(medians[variant.name], models=variant.models, target=variant.target, rss_target=variant.rss_target)
        ta, floor = reference_names(variant)
        if variant.imports_mergekit and startup is not None:
            row["wall_net_s"] = row["wall_s"] - startup
        if variant.imports_mergekit and ta in medians:
            for key in MEASURES:
                if key in row and key in medians[ta] and medians[ta][key] > 0:
                    row[f"{key}_vs_task_arithmetic"] = row[key] / medians[ta][key]
            if startup is not None and medians[ta]["wall_s"] > startup:
                row["wall_net_vs_task_arithmetic"] = row["wall_net_s"] / (medians[ta]["wall_s"] - startup)
        if variant.imports_mergekit and floor in medians:
            row["wall_s_vs_floor"] = row["wall_s"] / medians[floor]["wall_s"]
        rows[variant.name] = row
    return rows


def machine() -> dict:
    import safetensors
    import torch
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mergekit": version("mergekit"),
        "safetensors": safetensors.__version__,
        "fedmerge": version("fedmerge"),
    }


def iqr(values: Sequence[float]) -> float:
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def verdicts(rows: Dict[str, dict], startup: dict) -> List[str]:
    lines = []
    for name, row in rows.items():
        if row.get("target") is None or "wall_s_vs_task_arithmetic" not in row:
            continue
        wall, rss = row["wall_s_vs_task_arithmetic"], row["peak_rss_mib_vs_task_arithmetic"]
        rss_target = row.get("rss_target", 1.1)
        ok = wall <= row["target"] and (rss_target is None or rss <= rss_target)
        net = row.get("wall_net_vs_task_arithmetic")
        memory = f"peak memory {rss:.3f}×" + (f" (target ≤ {rss_target}×)" if rss_target is not None else " (no target)")
        lines.append(
            f"- {name}: wall {wall:.3f}× (target ≤ {row['target']}×"
            + (f"; net of start-up {net:.3f}×" if net is not None else "")
            + f"), {memory}: "
            + ("met" if ok else "**missed**")
        )
    if "startup" in startup:
        ms = startup["startup"]["autoload_importtime_us"] / 1e3
        lines.append(f"- autoload at start-up: {ms:.2f} ms (target < 20 ms): " + ("met" if ms < 20 else "**missed**"))
    return lines


def markdown_run(report: dict) -> str:
    """One run's section of RESULTS.md."""
    m, inputs, rows = report["machine"], report["inputs"], report["rows"]
    load = report["load"]
    out = [
        f"## {run_label(report)}",
        "",
        "Made with:",
        "",
        f"    {report['command']}",
        "",
        f"on {report['date']}.",
        "",
        "### Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores (torch uses {m['torch_threads']} threads); RAM {m['ram_gib']} GiB; {m['os']}",
        f"- Python {m['python']}, torch {m['torch']}, mergekit {m['mergekit']}, safetensors {m['safetensors']}, fedmerge {m['fedmerge']}",
        f"- 1-minute load average at the start of the runs: median {load['median']:.2f}, range {load['min']:.2f}–{load['max']:.2f}"
        " (other processes shared the machine: compare ratios, not absolute times)",
        "",
        "### Inputs",
        "",
        f"- Size preset `{inputs['size']}`: Llama architecture {inputs['config']}, {inputs['parameters']:,} parameters,"
        f" bfloat16, one safetensors file per checkpoint ({inputs['parameters'] * 2 / 2**20:.0f} MiB each).",
        f"- A base and four task models θ_t = θ_0 + N(0, s_t²), s = {list(SCALES)}; T = 3 uses the first three.",
        f"- Recipes: `dtype: bfloat16`, λ = {LAMBDA}; task_arithmetic with weight 1.0 per model; fednova steps"
        f" {list(STEPS[:3])}; fedgma ρ = {AGREEMENT_RHO}; cclip ρ = {inputs['clip_rho']:.4g} (clips the largest of the"
        " three task vectors). mergekit computes task_arithmetic in the recipe's dtype (bfloat16), fedmerge's"
        " kernels in float32; the floor in float32.",
        "- cclip_cold: a new empty `FEDMERGE_CACHE_DIR` per run, so the run streams every tensor of the base and of"
        " each task model once more to compute the global norms; cclip_warm: a cache filled beforehand (checked:"
        " the warm runs never rewrite it, each cold run stores three norms).",
        f"- sweep_lambda20: `fedmerge sweep` of the task_arithmetic recipe, λ = {SWEEP_LAMBDAS} ({SWEEP_POINTS} points),"
        " `--mode memory` (inputs read once), a trivial evaluator (the merged files' size); each point is a full"
        " `run_merge` written out for the evaluator, as for a real one (to /dev/shm where it has room). Its ratio is to one `mergekit-yaml` merge of the recipe.",
        f"- {report['warmup']} untimed warm-up round(s), then {report['repeat']} timed rounds, interleaved"
        f" (every variant once per round, same order). "
        + ("The page cache is dropped before every run (`--drop-caches`): every input is read from disk."
           if report.get("drop_caches") else
           f"Inputs stay in the page cache ({m['ram_gib']} GiB RAM) unless they exceed it.")
        + " Each output is deleted and `sync`ed after its run, outside the timing.",
        "",
        "### Merges (whole processes; medians)",
        "",
        "Ratios compare with task_arithmetic and the floor over the same T. `startup` is `mergekit-yaml --help`:"
        " mergekit's import time, the fixed part of every mergekit-yaml row; \"net\" is wall − startup, and"
        " its ratio (wall − startup) / (task_arithmetic's wall − startup) compares the merges without it."
        " Peak RSS is `ru_maxrss` (Linux keeps the RSS high-water mark across `exec`, so it is at least the"
        " bench process's own RSS at the spawn); sampled RSS, anonymous (allocations) and file-backed"
        " (Rss − Anonymous: mmap'd safetensors and libraries) are the largest values of"
        f" `/proc/<pid>/smaps_rollup` sampled every {report.get('memory_interval_s', MEMORY_INTERVAL_S) * 1e3:.0f} ms,"
        " each on its own (their peaks need not coincide).",
        "",
        "| variant | T | wall s | net s | CPU s | peak RSS MiB | sampled RSS MiB | anon MiB | file MiB | wall / TA"
        " | net / TA | CPU / TA | RSS / TA | anon / TA | wall / floor | target (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        target = f"≤ {row['target']}×" if row.get("target") else ""
        out.append(
            f"| {name} | {row['models'] or ''} | {fmt(row['wall_s'])} | {fmt(row.get('wall_net_s'))} | {fmt(row['cpu_s'])}"
            f" | {fmt(row['peak_rss_mib'], 0)} | {fmt(row.get('peak_sampled_rss_mib'), 0)} | {fmt(row.get('peak_anon_mib'), 0)}"
            f" | {fmt(row.get('peak_file_mib'), 0)}"
            f" | {fmt(row.get('wall_s_vs_task_arithmetic'), 3)} | {fmt(row.get('wall_net_vs_task_arithmetic'), 3)}"
            f" | {fmt(row.get('cpu_s_vs_task_arithmetic'), 3)} | {fmt(row.get('peak_rss_mib_vs_task_arithmetic'), 3)}"
            f" | {fmt(row.get('peak_anon_mib_vs_task_arithmetic'), 3)} | {fmt(row.get('wall_s_vs_floor'), 2)} | {target} |"
        )
    out += ["", "Targets:", "", *verdicts(rows, report["startup"]), ""]
    startup = report["startup"]
    if startup:
        out += ["### Start-up and plugin import", ""]
    if "startup" in startup:
        s = startup["startup"]
        out += [
            "Two scratch venvs of the same interpreter see this venv's packages through a path-only `.pth`"
            " (so none of its `.pth` files runs); they differ only by `fedmerge_autoload.pth` and"
            f" `fedmerge_autoload.py`. Medians of {s['runs']} interleaved runs:",
            "",
            f"- `-X importtime` of `fedmerge_autoload` (what the `.pth` line executes): {s['autoload_importtime_us'] / 1e3:.3f} ms"
            f" (in this venv: {fmt(s['this_venv_autoload_importtime_us'] and s['this_venv_autoload_importtime_us'] / 1e3, 3)} ms)",
            f"- wall time of `python -c pass`: {s['python_c_pass_ms']['with']:.1f} ms with the autoload,"
            f" {s['python_c_pass_ms']['without']:.1f} ms without (difference {s['added_ms']:+.1f} ms;"
            f" interquartile range of the runs without it: {iqr(s['samples_ms']['without']):.1f} ms)",
            "",
        ]
    if "plugin" in startup:
        p = startup["plugin"]
        imports = [f"import {module}" for module in p["hooks"]]
        with_ms, without_ms = (sum(p[name][key] for key in imports) for name in ("with", "without"))
        out += [
            f"Plugin cost once mergekit is imported (medians of {p['runs']} fresh processes per venv):",
            "",
            f"- importing {', '.join(f'`{m}`' for m in p['hooks'])} (torch and mergekit included; the autoload's"
            f" hooks run after each): {with_ms:.0f} ms with the autoload, {without_ms:.0f} ms without"
            f" (difference {with_ms - without_ms:+.0f} ms; the difference mostly measures the spread of these"
            " multi-second imports)",
            f"- `-X importtime` of the modules those imports load only with the autoload (fedmerge's own and"
            f" what only they need), summed: {p['added_importtime_us'] / 1e3:.1f} ms",
            "- the hooks alone, called after those imports in the venv without the autoload: "
            + ", ".join(f"`{hook}()` {p['without'][hook]:.1f} ms" for hook in p["hooks"].values()),
            "",
        ]
    return "\n".join(out)


def run_label(report: dict) -> str:
    """A run's name in RESULTS.md and results.json: its preset, and how the inputs were read."""
    return report["inputs"]["size"] + (", page cache dropped before every run" if report.get("drop_caches") else "")


def run_order(report: dict) -> tuple:
    sizes = list(SIZES)
    size = report["inputs"]["size"]
    return (sizes.index(size) if size in sizes else len(sizes), bool(report.get("drop_caches")))


def summary_table(runs: Dict[str, dict]) -> List[str]:
    """One line per run: task_arithmetic's wall time and every method's wall-time ratio to it
    (net of start-up in parentheses)."""
    columns = ["fednova", "fedgma", "median", "cclip_warm", "cclip_cold", "sweep_lambda20"]
    out = [
        "| run | start-up s | TA wall s | " + " | ".join(columns) + " | floor s |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for label, report in runs.items():
        rows = report["rows"]
        cells = []
        for name in columns:
            row = rows.get(name, {})
            wall, net = row.get("wall_s_vs_task_arithmetic"), row.get("wall_net_vs_task_arithmetic")
            cells.append("–" if wall is None else f"{wall:.2f}×" + ("" if net is None else f" ({net:.2f}×)"))
        out.append(
            f"| {label} | {fmt(rows.get('startup', {}).get('wall_s'))} | {fmt(rows.get('task_arithmetic', {}).get('wall_s'))}"
            f" | {' | '.join(cells)} | {fmt(rows.get('floor', {}).get('wall_s'))} |"
        )
    return out


def markdown(runs: Dict[str, dict]) -> str:
    """RESULTS.md: a summary of every run kept in results.json, then each run in full."""
    out = [
        "# Benchmark: fedmerge's methods against mergekit's task_arithmetic and an I/O floor",
        "",
        "Generated by `bench/bench.py`; re-run it whenever a method's kernel changes. A run replaces the"
        " section of the same preset and page-cache setting and keeps the others. Ratios are to"
        " mergekit's task_arithmetic (TA) over the same T = 3 in the same run, whole processes;"
        " in parentheses, net of the fixed start-up (wall − `mergekit-yaml --help`).",
        "",
        *summary_table(runs),
        "",
    ]
    for report in runs.values():
        out += [markdown_run(report), ""]
    out += ["Raw samples: `results.json` next to this file.", ""]
    return "\n".join(out)


def load_runs(path: Path) -> Dict[str, dict]:
    """The runs kept in ``results.json`` by label; a file of one run (as written before runs
    were kept side by side) is that run."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return dict(data["runs"]) if "runs" in data else {run_label(data): data}


def write_report(output_dir: Path, report: dict) -> Path:
    """Add ``report`` to ``results.json`` (replacing a run with its label) and regenerate
    ``RESULTS.md`` from every kept run, keeping the notes below ``MARKER``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    raw = output_dir / "results.json"
    runs = load_runs(raw)
    runs[run_label(report)] = report
    runs = dict(sorted(runs.items(), key=lambda item: run_order(item[1])))
    raw.write_text(json.dumps({"runs": runs}, indent=1, default=str))
    target = output_dir / "RESULTS.md"
    kept = ""
    if target.exists() and MARKER in target.read_text():
        kept = target.read_text().split(MARKER, 1)[1]
    target.write_text(markdown(runs) + "\n" + MARKER + (kept or "\n"))
    return target


# ---- command line -----------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="270m", help="checkpoint size preset (default 270m)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--variants", default="all", help="comma-separated subset of the variants (default all)")
    parser.add_argument("--startup-runs", type=int, default=30, help="interpreter start-ups per venv (0 skips)")
    parser.add_argument("--plugin-runs", type=int, default=5, help="plugin import probes per venv (0 skips)")
    parser.add_argument("--memory-interval", type=float, default=MEMORY_INTERVAL_S,
                        help=f"seconds between smaps_rollup samples (default {MEMORY_INTERVAL_S})")  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fedmerge-bench", help="where checkpoints are kept"
    )
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before every run (root): a disk-bound, cold-cache bench")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=HERE, help="where RESULTS.md and results.json go")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.startup_runs < 0 or args.plugin_runs < 0 or args.memory_interval <= 0:
        parser.error("--repeat must be ≥ 1; --warmup, --startup-runs and --plugin-runs ≥ 0; --memory-interval > 0")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    inputs = ensure_checkpoints(args.cache_dir, args.size)
    if args.drop_caches:
        try:
            drop_page_cache()
        except OSError as error:
            raise SystemExit(f"--drop-caches: cannot write {DROP_CACHES} ({error.strerror}): run as root, or without it")
    every = variants(inputs, args.size)
    if args.variants == "all":
        chosen = every
    else:
        wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {v.name for v in every})
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {[v.name for v in every]}")
        chosen = [v for v in every if v.name in wanted]
    print(f"{args.size}: {inputs.parameters:,} parameters per checkpoint, in {inputs.root}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="work-", dir=args.cache_dir) as work:
        runner = Runner(inputs, Path(work))
        runner.interval = args.memory_interval
        runner.drop_caches = args.drop_caches
        samples = run_interleaved(runner, chosen, args.repeat, args.warmup)
    startup = measure_startup(args.startup_runs, args.plugin_runs)
    loads = [s.load for runs in samples.values() for s in runs]
    report = {
        "command": shlex.join([".venv/bin/python", "bench/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "inputs": {
            "size": args.size,
            "config": SIZES[args.size],
            "parameters": inputs.parameters,
            "clip_rho": clip_radius(inputs),
        },
        "repeat": args.repeat,
        "warmup": args.warmup,
        "memory_interval_s": args.memory_interval,
        "drop_caches": args.drop_caches,
        "load": {"median": statistics.median(loads), "min": min(loads), "max": max(loads)},
        "rows": summarize(chosen, samples),
        "startup": startup,
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
        "recipes": {v.name: v.recipe for v in chosen if v.recipe},
    }
    target = write_report(args.output_dir, report)
    print(f"wrote {target}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
