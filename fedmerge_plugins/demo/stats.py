"""Paired-bootstrap intervals for differences of average normalized accuracy.

A ``Side`` is one model's item scores on each task plus the item scores of the task models
that normalize them (normalized accuracy = accuracy / the task model's accuracy, paper
section 6). Every model of a demo run is scored on the same test items, so two sides are
compared *paired*: one bootstrap draw resamples each task's items once (with replacement) and
applies the same indices to both sides, to their references and to every case (merge set,
seed) averaged together. The interval is the percentile interval of the resampled difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

Draws = Dict[str, np.ndarray]  # task -> (samples, items) indices


@dataclass(frozen=True)
class Side:
    items: Mapping[str, Sequence[float]]  # task -> each item's score (1/0)
    reference: Mapping[str, Sequence[float]]  # task -> the task model's item scores

    def point(self) -> float:
        """Average normalized accuracy over the side's tasks."""
        return float(np.mean([np.mean(self.items[t]) / np.mean(self.reference[t]) for t in self.items]))

    def resampled(self, draws: Draws) -> np.ndarray:
        """The average normalized accuracy under each bootstrap draw (NaN where a reference is 0)."""
        values = []
        for task, scores in self.items.items():
            indices = draws[task]
            accuracy = np.asarray(scores, dtype=np.float64)[indices].mean(axis=1)
            reference = np.asarray(self.reference[task], dtype=np.float64)[indices].mean(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                values.append(np.where(reference > 0, accuracy / reference, np.nan))
        return np.mean(values, axis=0)


@dataclass(frozen=True)
class Interval:
    """A difference A − B with its 95 % (``level``) paired-bootstrap interval."""

    estimate: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """"improved" / "degraded" when the interval excludes 0, else "unchanged" (within noise)."""
        if self.low > 0:
            return "improved"
        if self.high < 0:
            return "degraded"
        return "unchanged"


def draws(item_counts: Mapping[str, int], samples: int, seed: int = 0) -> Draws:
    """``samples`` resamplings of each task's items (task order fixed, so a seed gives one set)."""
    rng = np.random.default_rng(seed)
    return {task: rng.integers(0, count, size=(samples, count)) for task, count in sorted(item_counts.items())}


def paired_interval(pairs: Sequence[Tuple[Side, Side]], draws_: Draws, level: float = 0.95) -> Interval:
    """Mean over ``pairs`` of A − B (average normalized accuracy), and its bootstrap interval."""
    estimate = float(np.mean([a.point() - b.point() for a, b in pairs]))
    resampled = np.mean([a.resampled(draws_) - b.resampled(draws_) for a, b in pairs], axis=0)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def level_interval(sides: Sequence[Side], draws_: Draws, level: float = 0.95) -> Interval:
    """Mean over ``sides`` of the average normalized accuracy, and its bootstrap interval
    (the same resampling as ``paired_interval``; the chart's error bars)."""
    estimate = float(np.mean([side.point() for side in sides]))
    resampled = np.mean([side.resampled(draws_) for side in sides], axis=0)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))
