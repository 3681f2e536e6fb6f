"""Independent units of work (grid points, CLIP subsets) in this process or on Ray workers.

``run_units(work, shared, units, settings)`` runs ``work(shared, unit)`` for every unit and
yields ``(unit, result, seconds)`` in this process (the driver) as each finishes; the driver
alone writes logs, so a resumed search reads one file. Results arrive in completion order;
callers that select a winner do so by grid order, so the outcome does not depend on the
number of workers. ``WorkerSettings()`` (the default) runs the units here, one after another.

With Ray (``--workers N``: a local Ray of N workers on 127.0.0.1 (see ``import_ray``); ``--ray-address ADDR``: an
existing cluster), ``shared`` is put into Ray's object store once; every worker of a node
maps the same copy. Tensors travel as numpy arrays (bfloat16 and other dtypes numpy lacks as
same-width integer views) and come back as read-only torch views, never copied; a worker
process unpacks them once for all the units it runs, and keeps ``shared`` (with whatever
its objects load lazily, such as an evaluator's model) until the next run. A worker
that dies (killed, out of memory) has its unit run again by Ray (``max_retries``). Ray is an
optional extra: ``pip install 'fedmerge[ray]'``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from fedmerge_plugins.errors import FedmergeError

Unit = TypeVar("Unit")
Result = TypeVar("Result")
Work = Callable[[Any, Unit], Result]


def _carriers() -> Dict[Any, Any]:
    """numpy has no bfloat16 (nor float8): such tensors travel as integers of the same width."""
    import torch

    return {torch.bfloat16: torch.int16}


# Ray (2.60 here) turns a node address of 127.0.0.1 into the machine's network address and
# listens there; in its single-machine mode (the one it uses on macOS and Windows) it stays on
# loopback. A local Ray started by fedmerge runs in that mode, unless the variable is set.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray(settings: "WorkerSettings") -> Any:
    """``ray``, imported so that a local session listens on 127.0.0.1 only (when this process
    has not imported Ray before: the mode is read once, at import)."""
    if settings.ray_address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    return ray


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
        import torch

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
    """Tensors (at any depth of dicts, lists, tuples and dataclass fields) as numpy arrays
    with their dtype; everything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        carrier = _carriers().get(tensor.dtype)
        return _Packed((tensor.view(carrier) if carrier else tensor).numpy(), tensor.dtype)
    return _map(pack, value)


def unpack(value: Any) -> Any:
    """The inverse of ``pack``; arrays from Ray's object store stay shared (read-only)."""
    if isinstance(value, _Packed):
        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(value.array)
        return tensor.view(value.dtype) if value.dtype in _carriers() else tensor
    return _map(unpack, value)


def _map(function: Callable[[Any], Any], value: Any) -> Any:
    """``function`` applied to the items of a container (a dataclass: a shallow copy with
    its fields mapped); other values unchanged."""
    if isinstance(value, dict):
        return {key: function(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(function(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(function(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        mapped = copy.copy(value)
        for item in dataclasses.fields(value):
            if hasattr(value, item.name):
                object.__setattr__(mapped, item.name, function(getattr(value, item.name)))
        return mapped
    return value


@dataclass(frozen=True)
class _Packed:
    array: Any
    dtype: Any  # torch.dtype


# the shared value of the latest run, unpacked once per worker process (a Ray worker runs
# many units one after another): by object id
_RESOLVED: Dict[str, Any] = {}


def _resolve(boxed: List[Any]) -> Any:
    import ray

    ref = boxed[0]  # boxed in a list, so that Ray hands over the reference, not the value
    key = ref.hex()
    if key not in _RESOLVED:
        _RESOLVED.clear()
        _RESOLVED[key] = unpack(ray.get(ref))
    return _RESOLVED[key]


def call(function: Callable[[Unit], Result], unit: Unit) -> Result:
    """The work of a unit when the shared value is the function itself: ``function(unit)``."""
    return function(unit)


def _timed(work: Work, shared: Any, unit: Any) -> Tuple[Any, float]:
    started = time.perf_counter()
    result = work(shared, unit)
    return result, time.perf_counter() - started


def _run_remote(work: Work, boxed: List[Any], unit: Any) -> Tuple[Any, float]:
    return _timed(work, _resolve(boxed), unit)


def run_units(work: Work, shared: Any, units: Sequence[Unit], settings: WorkerSettings) -> Iterator[Tuple[Unit, Any, float]]:
    """``(unit, work(shared, unit), seconds)`` for each unit, in completion order.

    ``work`` and ``shared`` must be picklable for Ray (``work`` a module-level function or
    a picklable callable); ``shared`` is put into the object store once, and each worker
    process unpacks it once for all the units it runs. An exception raised by ``work`` on
    a worker is raised here as itself."""
    settings.check()
    if not units:
        return
    if not settings.distributed:
        for unit in units:
            yield (unit, *_timed(work, shared, unit))
        return
    ray = import_ray(settings)
    from ray.exceptions import RayTaskError

    with _ray_session(settings):
        # max_calls=0: a worker process is reused, GPU or not (Ray's default for GPU tasks is
        # a new process per task, which would unpack the inputs and load evaluators each time)
        remote = ray.remote(num_cpus=1, num_gpus=settings.gpus(), max_retries=settings.max_retries, max_calls=0)(_run_remote)
        boxed = [ray.put(pack(shared))]
        pending: Dict[Any, Unit] = {remote.remote(work, boxed, unit): unit for unit in units}
        try:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(done)
                try:
                    result, seconds = ray.get(done)
                except RayTaskError as error:
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
                yield unit, result, seconds
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


@contextlib.contextmanager
def _ray_session(settings: WorkerSettings) -> Iterator[None]:
    """``ray.init`` for the settings (local: bound to 127.0.0.1, no dashboard), shut down at
    the end when this call started it; a session the caller started is left running."""
    import ray
    import torch

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
