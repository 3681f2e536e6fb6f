"""Independent units of work (grid points, CLIP subsets) in this process or on Ray workers.

``run_units(work, shared, units, settings, on_result)`` calls ``work(shared, unit)`` for every
unit and hands each result to ``on_result(unit, result)`` in the driver, which alone writes
logs, so a resumed search reads one file. Results arrive in completion order; callers that
select a winner do so by grid order, so the outcome does not depend on the number of workers.

With Ray (``--workers N``: a local Ray of N workers on 127.0.0.1; ``--ray-address ADDR``: an
existing cluster), ``shared`` is put into Ray's object store once; every worker of a node
maps the same copy. Tensors travel as numpy arrays (bfloat16 and other dtypes numpy lacks as
same-width integer views) and come back as read-only torch views, never copied. A worker
that dies (killed, out of memory) has its unit run again by Ray (``max_retries``). Ray is an
optional extra: ``pip install 'fedmerge[ray]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, TypeVar

import torch

from fedmerge_plugins.errors import FedmergeError

Unit = TypeVar("Unit")
Result = TypeVar("Result")
Work = Callable[[Any, Unit], Result]

# numpy has no bfloat16 (nor float8): such tensors travel as integers of the same width
_CARRIERS = {torch.bfloat16: torch.int16}


class WorkersError(FedmergeError):
    """Ray is missing, or the worker settings are inconsistent."""


@dataclass(frozen=True)
class WorkerSettings:
    """``workers`` 0 runs in this process; N > 0 starts a local Ray with N workers (one
    CPU each); ``ray_address`` joins a running cluster instead. ``gpus_per_worker``: None is 1
    when this machine has CUDA GPUs, else 0."""

    workers: int = 0
    ray_address: Optional[str] = None
    gpus_per_worker: Optional[float] = None
    max_retries: int = 3

    @property
    def distributed(self) -> bool:
        return self.workers > 0 or self.ray_address is not None

    def gpus(self) -> float:
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if torch.cuda.is_available() else 0.0

    def check(self) -> None:
        """Raise WorkersError before anything starts."""
        if self.workers < 0:
            raise WorkersError(f"--workers must be >= 0, not {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise WorkersError(f"--gpus-per-worker must be >= 0, not {self.gpus_per_worker}")
        if self.distributed and importlib.util.find_spec("ray") is None:
            raise WorkersError("--workers/--ray-address need Ray: pip install 'fedmerge[ray]'")

    def describe(self) -> str:
        if not self.distributed:
            return "in this process"
        where = f"the Ray cluster at {self.ray_address}" if self.ray_address else f"a local Ray of {self.workers} workers"
        return f"on {where} ({self.gpus():g} GPU per worker)"


def pack(value: Any) -> Any:
    """Tensors (at any depth of dicts, lists and tuples) as ``(numpy array, dtype)`` pairs."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        carrier = _CARRIERS.get(tensor.dtype)
        return _Packed((tensor.view(carrier) if carrier else tensor).numpy(), tensor.dtype)
    if isinstance(value, dict):
        return {key: pack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(pack(item) for item in value)
    return value


def unpack(value: Any) -> Any:
    """The inverse of ``pack``; arrays from Ray's object store stay shared (read-only)."""
    if isinstance(value, _Packed):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(value.array)
        return tensor.view(value.dtype) if value.dtype in _CARRIERS else tensor
    if isinstance(value, dict):
        return {key: unpack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unpack(item) for item in value)
    return value


@dataclass(frozen=True)
class _Packed:
    array: Any
    dtype: torch.dtype


def _run_packed(work: Work, shared: Any, unit: Any) -> Any:
    return work(unpack(shared), unit)


def run_units(
    work: Work,
    shared: Any,
    units: Sequence[Unit],
    settings: WorkerSettings,
    on_result: Callable[[Unit, Any], None],
    progress: Optional[Callable[[], None]] = None,
) -> None:
    """Run ``work(shared, unit)`` for each unit (``work`` must be a module-level function, so
    that Ray can ship it), calling ``on_result`` in this process as each finishes."""
    settings.check()
    if not units:
        return
    if not settings.distributed:
        for unit in units:
            on_result(unit, work(shared, unit))
            if progress:
                progress()
        return
    import ray

    with _ray_session(settings):
        remote = ray.remote(num_cpus=1, num_gpus=settings.gpus(), max_retries=settings.max_retries)(_run_packed)
        shared_ref = ray.put(pack(shared))
        pending: Dict[Any, Unit] = {remote.remote(work, shared_ref, unit): unit for unit in units}
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(done)
            on_result(unit, ray.get(done))
            if progress:
                progress()


@contextlib.contextmanager
def _ray_session(settings: WorkerSettings) -> Iterator[None]:
    """``ray.init`` for the settings (local: bound to 127.0.0.1, no dashboard), shut down at
    the end when this call started it; a session the caller started is left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    options: Dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **options)
    else:
        ray.init(
            num_cpus=settings.workers,
            num_gpus=int(torch.cuda.device_count()),
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            **options,
        )
    try:
        yield
    finally:
        ray.shutdown()
