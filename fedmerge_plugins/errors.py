"""fedmerge's own exceptions.

Library modules raise a subclass of ``FedmergeError`` whose message is one line naming the
model, tensor, file or key at fault; none of them is also a ``ValueError``, ``OSError`` or
``RuntimeError``, so an ``except ValueError`` elsewhere never swallows one, and a genuine
bug (a ``KeyError``, a ``TypeError``) is never taken for one. Each ``fedmerge`` command
turns them into one line in one place, its ``cli.error_boundary`` decorator (``boundary.one_line_errors``); the hook
that runs inside mergekit's own ``mergekit-yaml`` does the same under a click context. Anything
else keeps its traceback. An ``OSError`` on a path the user gave becomes a ``PathError``
naming it where the library meets that path (``files.user_path``).
"""

from __future__ import annotations

import errno


class FedmergeError(Exception):
    """Base class of every error fedmerge raises on purpose (bad input, a failed check)."""


class RecipeError(FedmergeError):
    """A recipe problem, named by method, model and key (one line)."""


class InputError(RecipeError):
    """A model the recipe names that is missing, cannot be read, or does not fit the base
    (named by model and file or tensor)."""


class NonFiniteError(FedmergeError):
    """NaN or inf in an input tensor or a merged tensor (named by model and tensor)."""


class PathError(FedmergeError):
    """A file or folder the user named that cannot be read or written: missing, read-only,
    a full disk, a symbolic link loop (named, with the reason)."""


class DataError(FedmergeError):
    """A data file, task list or split request that cannot be used (named by file and line)."""


def reason(error: BaseException) -> str:
    """An exception as the reason part of a one-line message: an ``OSError``'s ``strerror``
    (the message names the file already), else its text on one line (at most 200
    characters), else its type's name."""
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return "a symbolic link loop"
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
