"""The paper's hyper-parameter search grids (appendix B.1.2–B.1.4, appendix C).

- λ: 0.05, 0.10, …, 2.0 for CLIP; 0.2, 0.4, …, 1.0 for the LLMs.
- FedGMA ρ: 0.1, 0.2, …, 1.0.
- CCLIP ρ: five evenly spaced values from the smallest task-vector norm of the merged
  models (included) to the largest (excluded).

Arithmetic grids are built in decimal arithmetic, so 0.05 · 3 is exactly 0.15 and the
last point is the stop value itself, not 1.9999999999999998.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import List, Optional, Sequence, Tuple

from fedmerge_plugins.errors import FedmergeError

Range = Tuple[float, float, float]  # start, stop (included), step

CLIP_LAMBDAS: Range = (0.05, 2.0, 0.05)
LLM_LAMBDAS: Range = (0.2, 1.0, 0.2)
FEDGMA_RHOS: Range = (0.1, 1.0, 0.1)
CCLIP_RHO_COUNT = 5
MAX_POINTS = 10_000  # a grid larger than this is refused unless a larger limit is given


class GridError(FedmergeError):
    """A grid that cannot be built: a zero or reversed step, values out of range, too many points."""


def check_size(count: int, limit: Optional[int], what: str = "the grid") -> None:
    """Refuse ``count`` points beyond ``limit`` (None: no limit)."""
    if limit is not None and count > limit:
        raise GridError(f"{what} has {count:,} points, more than the limit of {limit:,}; narrow it, or raise the limit (--max-points)")


def arange_inclusive(start: float, stop: float, step: float, limit: Optional[int] = None) -> List[float]:
    """start, start + step, …, up to stop (included when the steps land on it); at most
    ``limit`` values."""
    check_finite((start, stop, step))
    first, last, increment = (Decimal(repr(float(v))) for v in (start, stop, step))
    if increment <= 0:
        raise GridError(f"grid step must be > 0; got {step!r}")
    if last < first:
        raise GridError(f"grid stop {stop!r} is below its start {start!r} (a step goes upwards: START:STOP:STEP)")
    count = int((last - first) / increment) + 1
    check_size(count, limit, f"the grid {start!r}:{stop!r}:{step!r}")
    return [float(first + i * increment) for i in range(count)]


def lambda_grid(start: float = CLIP_LAMBDAS[0], stop: float = CLIP_LAMBDAS[1], step: float = CLIP_LAMBDAS[2]) -> List[float]:
    """Scaling coefficients λ; the default is the paper's CLIP grid 0.05…2.0 (40 values)."""
    return arange_inclusive(start, stop, step)


def fedgma_rho_grid(start: float = FEDGMA_RHOS[0], stop: float = FEDGMA_RHOS[1], step: float = FEDGMA_RHOS[2]) -> List[float]:
    """FedGMA sign-agreement thresholds ρ; the default is the paper's 0.1…1.0 (10 values)."""
    values = arange_inclusive(start, stop, step)
    if values[0] < 0 or values[-1] > 1:
        raise GridError(f"FedGMA ρ must lie in [0, 1]; got the grid {values}")
    return values


def clip_rho_grid(norms: Sequence[float], count: int = CCLIP_RHO_COUNT) -> List[float]:
    """``count`` evenly spaced ρ from min(norms) (included) to max(norms) (excluded).

    ρ_i = min + i · (max − min) / count, i = 0 … count − 1. Repeated values (all norms
    equal) are given once; non-positive values (a zero task vector) are dropped, since
    CCLIP needs ρ > 0.
    """
    if not norms:
        raise GridError("clip_rho_grid needs at least one task-vector norm")
    if count < 1:
        raise GridError(f"clip_rho_grid: count must be >= 1; got {count}")
    low, high = float(min(norms)), float(max(norms))
    values: List[float] = []
    for i in range(count):
        value = low + i * (high - low) / count
        if value > 0 and value not in values:
            values.append(value)
    if not values:
        raise GridError(f"clip_rho_grid: every task-vector norm is 0 ({list(norms)}); CCLIP needs ρ > 0")
    return values


def check_finite(values: Sequence[float], texts: Optional[Sequence[str]] = None) -> None:
    """Refuse an infinite or NaN value (``1e309`` reads as inf), named as written."""
    for value, text in zip(values, texts or [repr(v) for v in values]):
        if math.isinf(value):
            raise GridError(f"grid value {text.strip()!r} is beyond the float range")
        if math.isnan(value):
            raise GridError(f"grid value {text.strip()!r} is not a number")


def parse_grid(text: str, limit: Optional[int] = MAX_POINTS) -> List[float]:
    """A grid from the command line: ``0.1,0.5,1`` (a list) or ``0.05:2.0:0.05``
    (start:stop:step); at most ``limit`` values (None: any number)."""
    text = text.strip()
    if not text:
        raise GridError("the grid is empty: give `a,b,c` or `start:stop:step`")
    parts = text.split(":") if ":" in text else [p for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise GridError(f"cannot read the grid {text!r}: give `a,b,c` or `start:stop:step`") from None
    check_finite(values, parts)
    if ":" in text:
        if len(values) != 3:
            raise GridError(f"cannot read the grid {text!r}: give `start:stop:step`, three numbers")
        return arange_inclusive(*values, limit=limit)
    if not values:
        raise GridError(f"the grid {text!r} is empty")
    check_size(len(values), limit, f"the grid {text!r}")
    return values
