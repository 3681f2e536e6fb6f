"""The sweep's own exception; ``fedmerge sweep`` prints it as one line."""

from __future__ import annotations

from fedmerge_plugins.errors import FedmergeError


class SweepError(FedmergeError):
    """A sweep request that cannot run: a bad grid, recipe, evaluator or results file."""
