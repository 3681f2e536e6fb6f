"""The one place a ``FedmergeError`` becomes a one-line click error.

Kept apart from ``cli.py`` so the hooks inside mergekit's own ``mergekit-yaml`` use it
without the library importing a CLI module (only ``click`` and ``errors``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import click

from fedmerge_plugins.errors import FedmergeError


_IN_FEDMERGE_COMMAND = contextvars.ContextVar("fedmerge_command", default=False)


@contextlib.contextmanager
def one_line_errors(verbose: bool = False) -> Iterator[None]:
    """Turn a ``FedmergeError`` raised inside the block into a one-line click error
    (``verbose`` re-raises it, traceback included). Inside the block, the hooks in mergekit's
    merge path let fedmerge errors through: this boundary is the one that reports them, so
    a caller in between (the sweep naming its grid point) still sees the error itself."""
    token = _IN_FEDMERGE_COMMAND.set(True)
    try:
        yield
    except FedmergeError as error:
        if verbose:
            raise
        raise click.ClickException(str(error)) from None
    finally:
        _IN_FEDMERGE_COMMAND.reset(token)


@contextlib.contextmanager
def one_line_under_click(verbose: bool = False) -> Iterator[None]:
    """``one_line_errors`` inside mergekit's click command (``mergekit-yaml``); called from
    Python (no click context) or inside a fedmerge command (which has its own boundary), the
    error itself propagates."""
    if click.get_current_context(silent=True) is None or _IN_FEDMERGE_COMMAND.get():
        yield
        return
    with one_line_errors(verbose):
        yield
