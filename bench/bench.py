"""Time fedmerge's merge methods against mergekit's task_arithmetic and an I/O floor.

Makes (once, cached) a Llama-architecture bfloat16 base and four task checkpoints of a
chosen size, then runs whole processes, interleaved (A B C … A B C …): ``mergekit-yaml``
for task_arithmetic, fednova, fedgma, median, cclip with a cold and with a warm norm
cache, ``mergekit-yaml --help`` (mergekit's start-up alone), ``bench/floor.py`` (read
every input tensor once, θ_0 + λ Σ τ_t, write), a 20-point λ sweep in memory
(``fedmerge sweep`` of the task_arithmetic recipe with a trivial evaluator taking the loaded
model) and a 20-point cclip sweep with lm-eval against one point by hand (``mergekit-yaml`` +
``fedmerge eval``; ``--variants by_hand_lmeval,sweep_cclip_lmeval20`` runs only those). Each child's
wall time, CPU time (user + system) and peak resident memory come from ``os.wait4``; its
memory is also sampled from ``/proc/<pid>/status`` and split into anonymous memory
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
The work is split by job: ``bench_inputs`` (checkpoints, recipes, variants), ``bench_measure``
(timed processes, start-up probes), ``bench_report`` (summary, verdicts, RESULTS.md).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules beside this file

from bench_inputs import DROP_CACHES, HERE, MEMORY_INTERVAL_S, SIZES, clip_radius, ensure_checkpoints, variants  # noqa: E402
from bench_measure import Runner, drop_page_cache, measure_startup, run_interleaved  # noqa: E402
from bench_report import machine, summarize, write_report  # noqa: E402


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
                        help=f"seconds between /proc/<pid>/status samples (default {MEMORY_INTERVAL_S})")  # fmt: skip
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
