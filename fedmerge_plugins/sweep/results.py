"""The resumable results file (one JSON line per evaluated grid point) and the winner.

Each line: ``{"key", "index", "method", "parameters", "scores", "selection", "seconds",
"fingerprint"}``, flushed and fsynced as soon as a point is scored. A restart reads the
file, skips the points already there and ignores a torn last line (a kill mid-write).
The fingerprint (recipe without the swept values, evaluator, reference scores) keeps a
restart from mixing results of another recipe or evaluator into the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click

from fedmerge_plugins.sweep.grid import GridPoint


def fingerprint(recipe: Dict[str, Any], swept: Sequence[str], evaluator: str, reference: Optional[Dict[str, float]]) -> str:
    fixed = dict(recipe)
    fixed["parameters"] = {k: v for k, v in (recipe.get("parameters") or {}).items() if k not in swept}
    payload = json.dumps([fixed, sorted(swept), evaluator, reference], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ResultLog:
    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records: Dict[str, dict] = {}

    def load(self) -> Dict[str, dict]:
        """Records already in the file, by point key; a torn last line is dropped."""
        if not self.path.exists():
            return self.records
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a write cut short by a kill: drop it
                    break
                raise click.ClickException(f"{self.path}:{number} is not a JSON line; fix or remove the file")
            if record.get("fingerprint") != self.fingerprint:
                raise click.ClickException(
                    f"{self.path} holds results of another recipe or evaluator (line {number}); "
                    "use another --out directory or delete the file"
                )
            self.records[record["key"]] = record
            kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines) or (lines and not lines[-1].endswith("\n")):
            self.path.write_text("".join(kept), encoding="utf-8")
        return self.records

    def append(self, point: GridPoint, method: str, scores: Dict[str, float], selection: float, seconds: float) -> dict:
        record = {
            "key": point.key,
            "index": point.index,
            "method": method,
            "parameters": point.parameters,
            "scores": scores,
            "selection": selection,
            "seconds": round(seconds, 3),
            "fingerprint": self.fingerprint,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[point.key] = record
        return record


def winner(points: Sequence[GridPoint], records: Dict[str, dict]) -> dict:
    """The record with the best selection score; ties go to the earlier grid point."""
    best: Optional[dict] = None
    for point in points:
        record = records.get(point.key)
        if record is not None and (best is None or record["selection"] > best["selection"]):
            best = record
    if best is None:
        raise click.ClickException("no grid point has been scored")
    return best


def results_table(points: Sequence[GridPoint], records: Dict[str, dict], best_key: Optional[str] = None) -> str:
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
