"""Worker processes of one torch thread each, for the demo's independent training runs.

The order of a float sum, and so the trained weights, depends on how many threads torch
splits it over. Every training run of the demo therefore runs in a process of its own kind
(started by ``spawn``, so no thread pool is inherited) with ``torch.set_num_threads(1)``:
the models are the same bits whether 1, 2 or 16 such processes run side by side, and a busy
core slows one process down instead of making two threads wait for each other.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Optional


def core_count() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_warning(cores: Optional[int] = None) -> Optional[str]:
    """One line when the 1-minute load average exceeds the core count, else None."""
    cores = cores or core_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load <= cores:
        return None
    return (
        f"warning: load average {load:.1f} on {cores} core(s): other processes compete with the demo, "
        "which will run slower (its results do not change)"
    )


def one_thread() -> None:
    """Worker initializer: torch (and the BLAS under it) on one thread; transformers' own
    loading and writing bars off (the demo shows one bar over the runs)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def training_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh one-thread processes (``spawn``)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)
