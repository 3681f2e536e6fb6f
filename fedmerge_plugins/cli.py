"""The ``fedmerge`` command. Sub-commands live in their own modules and load on demand,
so ``fedmerge --help`` does not import torch, mergekit or lm-eval."""

from __future__ import annotations

import errno
import functools
import importlib
import os
from typing import Any, Callable, Dict, List, Optional

import click

from fedmerge_plugins.boundary import one_line_errors

# name -> "module:attribute" of a click command or group
COMMANDS: Dict[str, str] = {
    "eval": "fedmerge_plugins.evaluation.cli:eval_command",
    "demo": "fedmerge_plugins.demo.cli:demo_command",
    "clip": "fedmerge_plugins.clip.cli:clip_group",
    "inspect": "fedmerge_plugins.diagnostics.cli:inspect_command",
    "sweep": "fedmerge_plugins.sweep.cli:sweep_command",
}


def error_boundary(command: click.Command) -> click.Command:
    """The one error boundary of a ``fedmerge`` command (used as a decorator on each): a
    ``FedmergeError`` raised while it runs becomes one line (with ``-v``/``--verbose``, where
    the command has it, the traceback); any other exception keeps its traceback."""
    callback = command.callback
    if callback is not None and not getattr(callback, "error_boundary", False):

        @functools.wraps(callback)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            with one_line_errors(bool(kwargs.get("verbose"))):
                return callback(*args, **kwargs)

        bounded.error_boundary = True  # type: ignore[attr-defined]
        command.callback = bounded
    return command


class ExistingPath(click.Path):
    """``click.Path(exists=True)`` that calls a symbolic link loop one (click says "does
    not exist")."""

    def __init__(self, **options: Any) -> None:
        super().__init__(exists=True, **options)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            os.stat(value)
        except OSError as error:
            if error.errno == errno.ELOOP:
                self.fail(f"{os.fsdecode(value)!r} is a symbolic link loop", param, ctx)
        return super().convert(value, param, ctx)


_WORKER_OPTIONS = (
    click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Score on a local Ray of N workers (listening on 127.0.0.1 only); 0: in this process. Needs pip install 'fedmerge[ray]'."),
    click.option("--ray-address", metavar="ADDR", help="Score on the workers of a running Ray cluster (e.g. auto, or HOST:6379) instead."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                 help="GPUs each worker takes [default: 1 when this machine has CUDA GPUs, else 0]."),
)


def worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers``, ``--ray-address`` and ``--gpus-per-worker``, for every command that
    runs a search."""
    for option in reversed(_WORKER_OPTIONS):
        command = option(command)
    return command


def worker_settings(workers: int, ray_address: Optional[str], gpus_per_worker: Optional[float]):
    """A ``workers.WorkerSettings`` from the options of ``worker_options``."""
    from fedmerge_plugins.search.workers import WorkerSettings

    return WorkerSettings(workers=workers, ray_address=ray_address, gpus_per_worker=gpus_per_worker)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup)
@click.version_option(package_name="fedmerge")
def main() -> None:
    """fedmerge: FedNova, FedGMA, median and CCLIP merging for mergekit, with evaluation."""
