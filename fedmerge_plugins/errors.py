"""fedmerge's own exceptions.

Library modules raise a subclass of ``FedmergeError`` whose message is one line naming the
model, tensor, file or key at fault. Only CLI modules (and the hook that runs inside
mergekit's own ``mergekit-yaml`` command) turn them into click errors, through
``fedmerge_plugins.boundary.one_line_errors`` (the hooks in ``guards.hooks`` only under a click context).
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
