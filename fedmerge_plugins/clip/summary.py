"""Summaries of a CLIP experiment as the paper reports them.

- Table 1: the subset of all tasks, per method: average normalised test accuracy (with
  its change against task arithmetic) and the normalised accuracy of each task, in %.
- Table 2: per method, the share of subsets whose average normalised test accuracy is
  improved, unchanged or degraded against task arithmetic on the same subset.
- Figure 1: per method, a histogram of those changes (percentage points).

Written to ``<out>/summary.md``, ``<out>/summary.json`` and ``<out>/figure1.png``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.catalogue import BASELINE, LABELS
from fedmerge_plugins.search.engine import ResultLog, SearchError
from fedmerge_plugins.clip.tasks import display_name
from fedmerge_plugins.files import user_path, write_output

PRETTY = LABELS
TABLE_ORDER = ("task_arithmetic", "median", "fednova", "fedgma", "cclip")  # the paper's tables
UNCHANGED_TOLERANCE = 1e-9


def results(out_dir: Path) -> Dict[Tuple[Tuple[str, ...], str], Dict[str, Any]]:
    """(subset, method) -> result record of a run directory."""
    log = ResultLog(Path(out_dir) / "results.jsonl")
    found = [r for r in log.records if r.get("kind") == "result"]
    for record in found:
        if not isinstance(record.get("subset"), list) or not isinstance(record.get("method"), str):
            raise SearchError(f"{log.path}: a result record without its subset or method: {json.dumps(record)[:200]}")
    return {(tuple(r["subset"]), r["method"]): r for r in found}


def _methods(found: Mapping[Tuple[Tuple[str, ...], str], Any]) -> List[str]:
    present = {method for _, method in found}
    return [m for m in TABLE_ORDER if m in present] + sorted(present - set(TABLE_ORDER))


def table1(found: Mapping, tasks: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Per method on the subset of all ``tasks``: {"average": %, "delta": %, "tasks": {t: %}}."""
    subset = tuple(tasks)
    rows = {m: found[(subset, m)] for m in _methods(found) if (subset, m) in found}
    if not rows:
        return None
    baseline = rows.get(BASELINE)
    table = {}
    for method, record in rows.items():
        average = 100 * record["score"]
        table[method] = {
            "average": average,
            "delta": None if baseline is None else average - 100 * baseline["score"],
            "tasks": {t: 100 * record["test_normalized"][t] for t in subset},
            "params": record["params"],
        }
    return table


def changes(found: Mapping) -> Dict[str, List[float]]:
    """Per method, the change in average normalised test accuracy against task arithmetic
    (percentage points), one value per subset both have."""
    result: Dict[str, List[float]] = {}
    for method in _methods(found):
        if method == BASELINE:
            continue
        for (subset, other), record in sorted(found.items()):
            baseline = found.get((subset, BASELINE))
            if other == method and baseline is not None:
                result.setdefault(method, []).append(100 * (record["score"] - baseline["score"]))
    return result


def table2(found: Mapping) -> Dict[str, Dict[str, float]]:
    """Per method: % of subsets improved / unchanged / degraded against task arithmetic."""
    table = {}
    for method, deltas in changes(found).items():
        count = len(deltas)
        tolerance = 100 * UNCHANGED_TOLERANCE
        improved = sum(d > tolerance for d in deltas)
        degraded = sum(d < -tolerance for d in deltas)
        table[method] = {
            "improved": 100 * improved / count,
            "unchanged": 100 * (count - improved - degraded) / count,
            "degraded": 100 * degraded / count,
            "subsets": count,
        }
    return table


def markdown(t1: Optional[Mapping], t2: Mapping, tasks: Sequence[str], subsets: int) -> str:
    lines = [f"# CLIP experiment: {subsets} subsets of {len(tasks)} tasks", ""]
    if t1:
        lines += [f"## Table 1: merging all {len(tasks)} task vectors (normalized accuracy, %)", ""]
        header = ["Method", "Average normalized accuracy", *(display_name(t) for t in tasks), "Selected"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, row in t1.items():
            delta = row["delta"]
            average = f"{row['average']:.2f}" + ("" if delta is None or method == BASELINE else f" ({'↑' if delta >= 0 else '↓'} {abs(delta):.2f})")
            params = ", ".join(f"{k}={v:.4g}" for k, v in row["params"].items())
            cells = [PRETTY.get(method, method), average, *(f"{row['tasks'][t]:.2f}" for t in tasks), params]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if t2:
        lines += ["## Table 2: subsets improved, unchanged and degraded against task arithmetic", ""]
        lines += ["| Method | Improved | Unchanged | Degraded | Subsets |", "|---|---|---|---|---|"]
        for method, row in t2.items():
            lines.append(
                f"| {PRETTY.get(method, method)} | {row['improved']:.2f}% | {row['unchanged']:.2f}% | {row['degraded']:.2f}% | {row['subsets']} |"
            )
        lines += ["", "Figure 1: `figure1.png` (histograms of the change in average normalized accuracy)."]
    return "\n".join(lines) + "\n"


def histograms(deltas: Mapping[str, List[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(deltas)
    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for axis, method in zip(axes[0], methods):
        axis.hist(deltas[method], bins=20, color="tab:blue", edgecolor="white")
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_title(PRETTY.get(method, method))
        axis.set_xlabel("change (percentage points)")
        axis.set_ylabel("experiments")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle("Average normalized accuracy against task arithmetic, per subset of tasks")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    plt.close(figure)
    write_output(path, png.getvalue())


def write_summary(out_dir: Path, tasks: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Write summary.md, summary.json and (with a baseline to compare to) figure1.png."""
    out_dir = Path(out_dir)
    if tasks is None:
        path = out_dir / "run.json"
        with user_path(path, "read"):
            text = path.read_text(encoding="utf-8")
        try:
            tasks = json.loads(text)["spec"]["tasks"]
        except (ValueError, KeyError, TypeError):
            raise SearchError(f"{path}: not the run file of a CLIP experiment (no spec.tasks)") from None
    found = results(out_dir)
    t1, t2 = table1(found, tasks), table2(found)
    subsets = len({subset for subset, _ in found})
    written = {"markdown": out_dir / "summary.md", "json": out_dir / "summary.json"}
    write_output(written["markdown"], markdown(t1, t2, tasks, subsets))
    write_output(written["json"], json.dumps({"table1": t1, "table2": t2, "changes": changes(found)}, indent=1))
    deltas = changes(found)
    if deltas:
        written["figure"] = out_dir / "figure1.png"
        histograms(deltas, written["figure"])
    return written
