"""The dtype fedmerge computes in, shared by the method kernels and the norm pass."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (bf16 and fp16 are widened exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
