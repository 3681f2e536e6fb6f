"""Other libraries' output while fedmerge runs an evaluation: their warnings and bars kept
out of fedmerge's own lines.

``library_noise_off()`` sets lm-eval's loggers to WARNING and those of datasets, transformers,
accelerate and evaluate to ERROR, turns off the progress bars of datasets ("Generating test
split") and transformers ("Loading weights") and lm-eval's per-task context-building bars;
lm-eval's generation bar ("Running generate_until requests") stays, the one bar of an
evaluation. Everything is restored on exit, so fedmerge changes nothing for a caller's own
use of these libraries. ``quiet_git_describe()`` replaces lm-eval's ``get_git_commit_hash``,
whose ``git describe`` prints "fatal: not a git repository" outside a checkout, by the same
call with git's messages dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
from typing import Iterator, Optional

LOGGER_LEVELS = {"lm_eval": logging.WARNING, "lm-eval": logging.WARNING, "datasets": logging.ERROR, "transformers": logging.ERROR,
                 "accelerate": logging.ERROR, "evaluate": logging.ERROR}


@contextlib.contextmanager
def library_noise_off() -> Iterator[None]:
    import datasets
    import lm_eval.api.task as lm_eval_task
    import transformers
    from tqdm import tqdm

    levels = {name: logging.getLogger(name).level for name in LOGGER_LEVELS}
    datasets_bars = datasets.utils.logging.is_progress_bar_enabled()
    transformers_bars = transformers.utils.logging.is_progress_bar_enabled()
    task_tqdm = lm_eval_task.tqdm
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    lm_eval_task.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        lm_eval_task.tqdm = task_tqdm  # type: ignore[assignment]
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
        if datasets_bars:
            datasets.utils.logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def git_describe() -> Optional[str]:
    """``git describe --always`` of the working directory, None outside a checkout (silently)."""
    try:
        completed = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def quiet_git_describe() -> None:
    """lm-eval's evaluator records the git hash through ``git_describe`` (idempotent)."""
    import lm_eval.evaluator as evaluator

    evaluator.get_git_commit_hash = git_describe  # type: ignore[assignment]
