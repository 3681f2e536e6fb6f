"""The ``fedmerge`` command. Sub-commands live in their own modules and load on demand,
so ``fedmerge --help`` does not import torch, mergekit or lm-eval."""

from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Iterator, List, Optional

import click

from fedmerge_plugins.errors import FedmergeError

# name -> "module:attribute" of a click command or group
COMMANDS: Dict[str, str] = {
    "eval": "fedmerge_plugins.evaluation.cli:eval_command",
    "demo": "fedmerge_plugins.demo.cli:demo_command",
    "clip": "fedmerge_plugins.clip.cli:clip_group",
    "inspect": "fedmerge_plugins.diagnostics.cli:inspect_command",
    "sweep": "fedmerge_plugins.sweep.cli:sweep_command",
}


@contextlib.contextmanager
def one_line_errors(verbose: bool = False) -> Iterator[None]:
    """Turn a ``FedmergeError`` raised inside the block into a one-line click error
    (``verbose`` re-raises it, traceback included)."""
    try:
        yield
    except FedmergeError as error:
        if verbose:
            raise
        raise click.ClickException(str(error)) from None


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
