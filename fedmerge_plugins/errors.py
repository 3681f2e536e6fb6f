"""fedmerge's own exceptions.

Library modules raise a subclass of ``FedmergeError`` whose message is one line naming the
model, tensor, file or key at fault. Only CLI modules (and the hook that runs inside
mergekit's own ``mergekit-yaml`` command) turn them into click errors, through
``fedmerge_plugins.cli.one_line_errors`` (the hooks in ``mergekit_hooks`` only under a click context).
"""

from __future__ import annotations


class FedmergeError(Exception):
    """Base class of every error fedmerge raises on purpose (bad input, a failed check)."""


class RecipeError(FedmergeError):
    """A recipe problem, named by method, model and key (one line)."""


class InputError(RecipeError):
    """A model the recipe names that is missing, cannot be read, or does not fit the base
    (named by model and file or tensor)."""


class NonFiniteError(FedmergeError, ValueError):
    """NaN or inf in an input tensor or a merged tensor (named by model and tensor)."""


def reason(error: BaseException) -> str:
    """An exception as the reason part of a one-line message: an ``OSError``'s ``strerror``
    (the message names the file already), else its text on one line (at most 200
    characters), else its type's name."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
