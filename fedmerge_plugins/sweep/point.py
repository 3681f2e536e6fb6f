"""One grid point's unit of work: its merge, scored by the evaluator.

Two ways, chosen per sweep:

- **in memory** (an evaluator that ``takes_model``, no ``--keep-merges``): the process's first
  point is merged once by ``run_merge`` into a scratch folder, the evaluator loads the model
  from it (its config and tokenizer are the merge's) and the folder is removed. Every point
  then computes its tensors from the D of its group (``factored``: computed once per group
  of points that differ only in λ, one group held at a time) and copies them into the
  loaded model in place (``param.data.copy_``): no checkpoint is written or read again. In
  disk mode (``factors_on_disk``) the group's D is not held: its θ₀ and D are written to a
  folder ``.factors-PID-*`` under ``out/merges`` as they are computed, each point reads
  those two checkpoints one tensor at a time, and the folder is removed when the group
  changes and, by the driver, at the end (Ray workers' too: ``scratch.remove_factors``; a
  killed sweep's by the next, ``scratch.remove_abandoned``).
- **from a folder**: the point's recipe is merged by ``run_merge`` into a folder of its own
  under ``scratch`` (``scratch.choose_scratch``: /dev/shm or ``out/merges``), scored, and
  removed or, with ``keep_merges``, moved to ``out/merges/point-NNNN``.

In memory mode ``inputs`` holds the input checkpoints that mergekit's loader cache serves;
``norms`` holds CCLIP's norms by norm-cache key. Both are computed once by the driver; on a
Ray worker (which gets this object once, tensors through the object store) the first point
puts them in place, in the driver's working directory, so that recipe paths resolve as they
do for ``mergekit-yaml``. Each worker process holds its own loaded model and D.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from fedmerge_plugins.errors import FedmergeError, reason
from fedmerge_plugins.files import user_path, write_refused
from fedmerge_plugins.search.engine import Evaluation, Point
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.evaluators import Evaluator, Loaded, takes_model
from fedmerge_plugins.sweep.grid import point_config


def copy_into(module: Any, factors: Any, lam: float) -> None:
    """Each computed tensor of the point (``factors`` at ``lam``) into ``module``'s parameter or
    buffer of that name, in place (cast to its dtype, as loading the merge's folder would); a
    target with its own ``load_weights`` (``evaluators.VllmWeights``) loads them itself."""
    import torch

    if hasattr(module, "load_weights") and not isinstance(module, torch.nn.Module):
        module.load_weights(factors.tensors(lam))
        return
    targets = module.state_dict(keep_vars=True)
    for name, shape in factors.shapes.items():
        target = targets.get(name)
        if target is None:
            raise SweepError(f"the loaded model has no tensor {name}; score the points from folders (--keep-merges)")
        if target.shape != shape:
            raise SweepError(f"tensor {name}: the merge has shape {tuple(shape)}, the loaded model {tuple(target.shape)}")
    with torch.no_grad():
        factors.write(lam, targets)


def point_lambda(data: Dict[str, Any], point: Optional[Point]) -> Optional[float]:
    """The point's λ: swept, or the recipe's one number (1 if unset); None for a λ that varies
    by tensor (such a recipe is scored from folders)."""
    if point is not None and "lambda" in point.parameters:
        return point.parameters["lambda"]
    value = (data.get("parameters") or {}).get("lambda", 1.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class _Held:
    """What one process holds across points: the loaded model and one group's D."""

    loaded: Loaded
    key: Optional[str] = None
    factors: Any = None  # factored.Factors of group ``key``


@dataclass
class SweepPoint:
    data: Dict[str, Any]
    out: Path
    options: Any  # mergekit MergeOptions
    evaluator: Evaluator
    keep_merges: bool = False
    inputs: Dict[Any, Any] = field(default_factory=dict)  # ModelReference -> merger.MemoryLoader
    norms: Dict[str, float] = field(default_factory=dict)
    workdir: str = field(default_factory=os.getcwd)
    scratch: Optional[Path] = None  # None: out/merges
    factors_on_disk: bool = False  # disk mode: each group's θ₀ and D written under out/merges, not held
    sweep_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # names the sweep's factor folders
    held: Optional[_Held] = None  # made by the first in-memory point of each process

    @property
    def in_memory(self) -> bool:
        return takes_model(self.evaluator) and not self.keep_merges and point_lambda(self.data, None) is not None

    def __call__(self, point: Point) -> Evaluation:
        from fedmerge_plugins.norms.cache import CACHE
        from fedmerge_plugins.sweep.merger import install

        if os.getcwd() != self.workdir:
            os.chdir(self.workdir)
        install(self.inputs)
        for key, norm in self.norms.items():
            CACHE.remember(key, norm)
        with self._named(point):
            return self._in_memory(point) if self.in_memory else self._from_folder(point)

    def _root(self) -> Path:
        return self.scratch if self.scratch is not None and self.scratch.is_dir() else Path(self.out) / "merges"

    @contextlib.contextmanager
    def _named(self, point: Point) -> Iterator[None]:
        """A point's failure named by the point: a disk refusing its merge (with the folder),
        the evaluator's or a check's error; anything else keeps its traceback."""
        from safetensors import SafetensorError

        try:
            yield
        except (OSError, SafetensorError) as error:
            if not write_refused(error):
                raise
            cause = reason(error) if isinstance(error, OSError) else str(error)  # a full or read-only scratch folder
            raise SweepError(f"grid point {point.label()}: cannot write its merge in {self._root()}: {cause}") from error
        except FedmergeError as error:
            if str(error).startswith("grid point "):
                raise
            raise SweepError(f"grid point {point.label()}: {error}") from error

    def _staging(self, name: str) -> Path:
        from fedmerge_plugins.sweep import scratch

        return scratch.point_folder(self._root(), name)

    def _from_folder(self, point: Point) -> Evaluation:
        from fedmerge_plugins.sweep import scratch
        from fedmerge_plugins.sweep.merger import merge_point

        name = f"point-{point.index:04d}"
        staging = self._staging(name)
        try:
            merged = merge_point(point_config(self.data, point), staging / name, self.options)
            scores = self.evaluator.evaluate(merged)
            if self.keep_merges:
                merges = Path(self.out) / "merges"
                with user_path(merges, f"keep the merge of grid point {point.label()} in"):
                    merges.mkdir(parents=True, exist_ok=True)
                    scratch.keep(merged, merges / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Evaluation(scores)

    def _capture(self, point: Point, write_to: Optional[Path] = None) -> Any:
        """The factors of ``point``'s group (``factored.capture``): in disk mode written to a
        folder of this process's own under out/merges (never /dev/shm: memory is short)."""
        from fedmerge_plugins.sweep import factored, scratch

        on_disk = None
        if self.factors_on_disk:
            merges = Path(self.out) / "merges"
            with user_path(merges, "write the factors (θ₀ and D) of a group of grid points in"):
                on_disk = scratch.factors_folder(merges, self.sweep_id)
        return factored.capture(point_config(self.data, point), self.options, write_to=write_to, on_disk=on_disk)

    def _load(self, point: Point) -> _Held:
        """The evaluator's model, loaded from this point's merge (written once, its D recorded
        meanwhile, then removed)."""
        from fedmerge_plugins.sweep.factored import delta_key

        name = f"point-{point.index:04d}"
        staging = self._staging(name)
        try:
            factors = self._capture(point, write_to=staging / name)
            try:
                return _Held(self.evaluator.load(staging / name), delta_key(point), factors)  # type: ignore[attr-defined]
            except BaseException:
                factors.release()
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def release(self) -> None:
        """Give up the group's factors held (on disk: their folder is removed); the model stays."""
        if self.held is not None and self.held.factors is not None:
            self.held.factors.release()
            self.held.factors = self.held.key = None

    def _in_memory(self, point: Point) -> Evaluation:
        from fedmerge_plugins.sweep.factored import delta_key

        started = time.perf_counter()
        if self.held is None:
            self.held = self._load(point)
        held = self.held
        key = delta_key(point)
        if held.key != key:
            self.release()  # one group's D at a time
            held.factors = self._capture(point)
            held.key = key
        merged = time.perf_counter()
        copy_into(held.loaded.module, held.factors, point_lambda(self.data, point))
        copied = time.perf_counter()
        scores = self.evaluator.evaluate_loaded(held.loaded)  # type: ignore[attr-defined]
        timing = {"merge": merged - started, "copy": copied - merged, "evaluate": time.perf_counter() - copied}
        return Evaluation(scores, {"timing": {k: round(v, 3) for k, v in timing.items()}})
