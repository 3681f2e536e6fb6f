"""``OUT/sweep.png``: the selection score over λ (or the first swept parameter), one line per
value of the other swept parameters (ρ, …), the winner marked."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from fedmerge_plugins.search.engine import Point


def lines_of(points: Sequence[Point], records: Dict[str, dict]) -> Tuple[str, Dict[str, List[Tuple[float, float]]]]:
    """(x-axis parameter, {line label: [(x, selection score), ...] in grid order})."""
    names = list(points[0].parameters) if points else []
    x_name = "lambda" if "lambda" in names else names[0]
    lines: Dict[str, List[Tuple[float, float]]] = {}
    for point in points:
        record = records.get(point.key)
        if record is None:
            continue
        label = ", ".join(f"{k}={v:.4g}" for k, v in point.parameters.items() if k != x_name)
        lines.setdefault(label, []).append((point.parameters[x_name], record["selection"]))
    return x_name, {label: sorted(values) for label, values in lines.items()}


def write_picture(path: Path, points: Sequence[Point], records: Dict[str, dict], best_key: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, lines = lines_of(points, records)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    try:
        for label, values in lines.items():
            axes.plot([x for x, _ in values], [y for _, y in values], marker="o", markersize=3, label=label or None)
        best = next(p for p in points if p.key == best_key)
        axes.scatter([best.parameters[x_name]], [records[best_key]["selection"]], s=140, marker="*", color="black", zorder=5,
                     label=f"winner ({best.label()})")
        axes.set_xlabel("λ" if x_name == "lambda" else x_name)
        axes.set_ylabel("selection score")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)
    return path


