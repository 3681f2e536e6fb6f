"""The paper's hyper-parameter search grids (appendix B.1.2–B.1.4, appendix C).

- λ: 0.05, 0.10, …, 2.0 for CLIP; 0.2, 0.4, …, 1.0 for the LLMs.
- FedGMA ρ: 0.1, 0.2, …, 1.0.
- CCLIP ρ: five evenly spaced values from the smallest task-vector norm of the merged
  models (included) to the largest (excluded).

Arithmetic grids are built in decimal arithmetic, so 0.05 · 3 is exactly 0.15 and the
last point is the stop value itself, not 1.9999999999999998.
"""

from __future__ import annotations

from decimal import Decimal
from typing import List, Sequence, Tuple

Range = Tuple[float, float, float]  # start, stop (included), step

CLIP_LAMBDAS: Range = (0.05, 2.0, 0.05)
LLM_LAMBDAS: Range = (0.2, 1.0, 0.2)
FEDGMA_RHOS: Range = (0.1, 1.0, 0.1)
CCLIP_RHO_COUNT = 5


def arange_inclusive(start: float, stop: float, step: float) -> List[float]:
    """start, start + step, …, up to stop (included when the steps land on it)."""
    first, last, increment = (Decimal(repr(float(v))) for v in (start, stop, step))
    if increment <= 0:
        raise ValueError(f"grid step must be > 0; got {step!r}")
    if last < first:
        raise ValueError(f"grid stop {stop!r} is below its start {start!r}")
    count = int((last - first) / increment) + 1
    return [float(first + i * increment) for i in range(count)]


def lambda_grid(start: float = CLIP_LAMBDAS[0], stop: float = CLIP_LAMBDAS[1], step: float = CLIP_LAMBDAS[2]) -> List[float]:
    """Scaling coefficients λ; the default is the paper's CLIP grid 0.05…2.0 (40 values)."""
    return arange_inclusive(start, stop, step)


def fedgma_rho_grid(start: float = FEDGMA_RHOS[0], stop: float = FEDGMA_RHOS[1], step: float = FEDGMA_RHOS[2]) -> List[float]:
    """FedGMA sign-agreement thresholds ρ; the default is the paper's 0.1…1.0 (10 values)."""
    values = arange_inclusive(start, stop, step)
    if values[0] < 0 or values[-1] > 1:
        raise ValueError(f"FedGMA ρ must lie in [0, 1]; got the grid {values}")
    return values


def clip_rho_grid(norms: Sequence[float], count: int = CCLIP_RHO_COUNT) -> List[float]:
    """``count`` evenly spaced ρ from min(norms) (included) to max(norms) (excluded).

    ρ_i = min + i · (max − min) / count, i = 0 … count − 1. Repeated values (all norms
    equal) are given once; non-positive values (a zero task vector) are dropped, since
    CCLIP needs ρ > 0.
    """
    if not norms:
        raise ValueError("clip_rho_grid needs at least one task-vector norm")
    if count < 1:
        raise ValueError(f"clip_rho_grid: count must be >= 1; got {count}")
    low, high = float(min(norms)), float(max(norms))
    values: List[float] = []
    for i in range(count):
        value = low + i * (high - low) / count
        if value > 0 and value not in values:
            values.append(value)
    if not values:
        raise ValueError(f"clip_rho_grid: every task-vector norm is 0 ({list(norms)}); CCLIP needs ρ > 0")
    return values


def parse_grid(text: str) -> List[float]:
    """A grid from the command line: ``0.1,0.5,1`` (a list) or ``0.05:2.0:0.05`` (start:stop:step)."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            return arange_inclusive(*parts)
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"cannot read the grid {text!r}: give `a,b,c` or `start:stop:step`") from None
    if not values:
        raise ValueError(f"the grid {text!r} is empty")
    return values
