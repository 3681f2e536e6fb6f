"""What identifies a sweep's results file, and the table of its results.

The log itself is ``search.ResultLog`` (one JSON line per grid point, a torn last line
dropped on restart). The fingerprint (recipe without the swept values, evaluator,
reference scores) keeps a restart from mixing results of another recipe or evaluator
into the file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from fedmerge_plugins.search.engine import Point
from fedmerge_plugins.store import digest


def fingerprint(recipe: Dict[str, Any], swept: Sequence[str], evaluator: str, reference: Optional[Dict[str, float]]) -> str:
    fixed = dict(recipe)
    fixed["parameters"] = {k: v for k, v in (recipe.get("parameters") or {}).items() if k not in swept}
    return digest(fixed, sorted(swept), evaluator, reference, length=16)


def results_table(points: Sequence[Point], records: Dict[str, dict], best_key: Optional[str] = None) -> str:
    rows: List[str] = []
    names = list(points[0].parameters) if points else []
    score_names = sorted({name for p in points if p.key in records for name in records[p.key]["scores"]})
    header = "  ".join([f"{n:>10}" for n in names] + [f"{s[:12]:>12}" for s in score_names] + [f"{'selection':>10}"])
    rows.append(header)
    for point in points:
        record = records.get(point.key)
        if record is None:
            continue
        cells = [f"{point.parameters[n]:>10.6g}" for n in names]
        cells += [f"{record['scores'].get(s, float('nan')):>12.4f}" for s in score_names]
        cells.append(f"{record['selection']:>10.4f}")
        rows.append("  ".join(cells) + ("  <- winner" if point.key == best_key else ""))
    return "\n".join(rows)
