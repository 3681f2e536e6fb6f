"""The one place a ``FedmergeError`` becomes a one-line click error.

Kept apart from ``cli.py`` so the hooks inside mergekit's own ``mergekit-yaml`` use it
without the library importing a CLI module (only ``click`` and ``errors``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import click

from fedmerge_plugins.errors import FedmergeError


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


@contextlib.contextmanager
def one_line_under_click(verbose: bool = False) -> Iterator[None]:
    """``one_line_errors`` inside a click command (``mergekit-yaml``); called from Python
    (no click context), the error itself propagates."""
    if click.get_current_context(silent=True) is None:
        yield
        return
    with one_line_errors(verbose):
        yield
