"""bench.py's report: medians and ratios per variant, the verdicts against the targets, RESULTS.md and results.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from bench_inputs import AGREEMENT_RHO, LAMBDA, LMEVAL_ITEMS, LMEVAL_LAMBDAS, LMEVAL_TOKENS, MARKER, MEMORY_INTERVAL_S, SCALES, SIZES, STEPS, SWEEP_LAMBDAS, SWEEP_POINTS, Variant, reference_names
from bench_measure import Sample


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

    from fedmerge_plugins.demo.environment import cpu_info

    cpu = cpu_info()[0] or platform.processor()
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


def point_splits(samples: Dict[str, List[dict]]) -> List[str]:
    """Per-point cost of each sweep variant: medians over its runs of each run's median point."""
    lines = []
    for name, runs in samples.items():
        splits = [run["point_split_s"] for run in runs if run.get("point_split_s")]
        if splits:
            parts = {part: statistics.median(split[part] for split in splits) for part in splits[0]}
            described = ", ".join(f"{part} {seconds:.3f} s" for part, seconds in parts.items())
            lines.append(f"- {name}, per point (median): {described}")
    title = ("Per-point split of the sweeps (merge: the first point's merge and model load, and D when its group starts;"
             " copy: λ applied and written into the loaded model, in blocks that stay in the cache; evaluate: the evaluator):")
    return [title, "", *lines, ""] if lines else []


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
        " `--mode memory` (inputs read once), a trivial evaluator taking the loaded model (`score(model)`: one"
        " weight): the first point merged by `run_merge` and loaded, D computed once, every point's tensors"
        " copied into the model. Its ratio is to one `mergekit-yaml` merge of the recipe.",
        f"- sweep_cclip_lmeval20: `fedmerge sweep` of the cclip recipe, λ = {LMEVAL_LAMBDAS} × `--rho paper`"
        f" ({SWEEP_POINTS} points), `--eval lm-eval` (hf backend, CPU) on GSM8K, {LMEVAL_ITEMS} items,"
        f" {LMEVAL_TOKENS} generated tokens; its ratios are to by_hand_lmeval: one point by hand, `mergekit-yaml`"
        " of the recipe then `fedmerge eval` of the merge with the same options (one `sh -c`).",
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
        " (VmRSS − RssAnon: mmap'd safetensors and libraries) are the largest values of the counters in"
        f" `/proc/<pid>/status` sampled every {report.get('memory_interval_s', MEMORY_INTERVAL_S) * 1e3:.0f} ms,"
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
    out += point_splits(report.get("samples", {}))
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
