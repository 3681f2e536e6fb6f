"""Normalized accuracy (paper section 6): a merged model's accuracy on a task divided by the
accuracy of the model fine-tuned on that task, on the same items."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

from fedmerge_plugins.errors import DataError


def normalized_accuracy(
    scores: Mapping[str, float], reference: Mapping[str, float], undefined: Callable[[str], str]
) -> Dict[str, float]:
    """score / reference for each task of ``scores``; a reference of 0 makes it undefined:
    ``DataError(undefined(task))``."""
    result = {}
    for task, score in scores.items():
        if reference[task] <= 0:
            raise DataError(undefined(task))
        result[task] = score / reference[task]
    return result
