"""95 % intervals of a task's score from its item scores, and normalized scores.

Items scored 0 or 1 (exact match, pass@1, accuracy): the Wilson score interval of a
proportion. Other item scores: a percentile bootstrap of the mean (2000 resamples, seeded).
A normalized score is score / the reference score (the fine-tuned model's own, paper §6),
its interval the score's interval divided by the same reference (taken as exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

from fedmerge_plugins.errors import DataError, reason

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True)
class ScoreInterval:
    score: float
    low: float
    high: float
    method: str  # "Wilson" or "bootstrap"
    items: int

    def scaled(self, factor: float) -> "ScoreInterval":
        return ScoreInterval(self.score * factor, self.low * factor, self.high * factor, self.method, self.items)


def wilson(successes: float, count: int, z: float = Z95) -> tuple:
    """Wilson score interval of ``successes`` out of ``count``."""
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of the mean of ``values``."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    means = data[np.random.default_rng(seed).integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def score_interval(items: Sequence[float]) -> ScoreInterval:
    """The mean of ``items`` with its 95 % interval (Wilson for 0/1 items, else bootstrap)."""
    count = len(items)
    score = sum(items) / count
    if all(value in (0.0, 1.0) for value in items):
        low, high = wilson(sum(items), count)
        return ScoreInterval(score, low, high, "Wilson", count)
    low, high = bootstrap(items)
    return ScoreInterval(score, low, high, "bootstrap", count)


def interval_lines(intervals: Mapping[str, ScoreInterval], reference: Optional[Mapping[str, float]] = None) -> list:
    """One line per task: score [95 % interval] (method, items); normalized with a reference."""
    lines = []
    for name, interval in intervals.items():
        line = f"{name}: {100 * interval.score:.2f} [{100 * interval.low:.2f}, {100 * interval.high:.2f}] (95 % {interval.method} interval, {interval.items} items)"
        if reference is not None and name in reference:
            normalized = interval.scaled(1 / reference[name])
            line += f"; normalized {normalized.score:.3f} [{normalized.low:.3f}, {normalized.high:.3f}] (reference {100 * reference[name]:.2f})"
        lines.append(line)
    if reference is not None:
        shared = [name for name in intervals if name in reference]
        if shared:
            mean = sum(intervals[n].score / reference[n] for n in shared) / len(shared)
            lines.append(f"average normalized accuracy over {', '.join(shared)}: {mean:.3f}")
    return lines


def read_reference(path) -> Dict[str, float]:
    """Reference scores from JSON: ``{task: score}`` or ``{"scores": {task: score}}`` (what
    ``fedmerge eval --output`` writes as ``fedmerge_scores`` is accepted too); each > 0."""
    import json
    from pathlib import Path

    from fedmerge_plugins.files import user_path

    with user_path(path, "read"):
        text = Path(path).read_bytes()  # decoded by json.loads (a ValueError when not UTF-8)
    try:
        data = json.loads(text)
    except ValueError as error:
        raise DataError(f"{path}: cannot read reference scores: {reason(error)}") from None
    if isinstance(data, Mapping):
        for key in ("scores", "fedmerge_scores"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{path}: expected {{task: score}}")
    scores = {}
    for name, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise DataError(f"{path}: score {name!r} is {value!r}, not a finite number")
        if value <= 0:
            raise DataError(f"{path}: reference score of {name} is {value}; normalized accuracy needs it above 0")
        scores[str(name)] = float(value)
    return scores
