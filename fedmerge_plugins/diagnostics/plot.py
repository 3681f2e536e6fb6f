"""PNG of an inspect report: task-vector norm bars (outliers in red) and a cosine heatmap."""

from __future__ import annotations

import io
import math
from pathlib import Path

from fedmerge_plugins.diagnostics.report import InspectReport
from fedmerge_plugins.files import write_output


def plot_report(report: InspectReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report.stats
    labels = stats.labels
    size = max(4.0, 0.7 * len(labels) + 2.0)
    figure, (bars, heat) = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    colors = ["tab:red" if flag else "tab:blue" for flag in report.outliers]
    bars.bar(range(len(labels)), stats.norms, color=colors)
    bars.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    bars.set_ylabel("task-vector L2 norm ‖τ_t‖")
    bars.set_title("norms (red: outlier, >3x or <1/3 of the median norm)", fontsize=9)
    for x, norm in enumerate(stats.norms):
        bars.annotate(f"{norm:.3g}", (x, norm), ha="center", va="bottom", fontsize=8)

    cosines = [[math.nan if c is None else c for c in row] for row in stats.cosines()]
    image = heat.imshow(cosines, cmap="RdBu_r", vmin=-1, vmax=1)
    heat.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    heat.set_yticks(range(len(labels)), labels)
    heat.set_title("cosine similarity of task vectors", fontsize=9)
    for s, row in enumerate(cosines):
        for t, value in enumerate(row):
            if not math.isnan(value):
                color = "white" if abs(value) > 0.6 else "black"
                heat.text(t, s, f"{value:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=8, color=color)
    figure.colorbar(image, ax=heat, shrink=0.8)
    figure.suptitle(f"{report.recipe} ({report.method}, T = {len(labels)})", fontsize=10)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    plt.close(figure)
    write_output(path, png.getvalue())  # whole or not at all; a PathError naming it
    return Path(path)
