"""Shared test set-up: offline hub access and a private norm cache for every test."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (make test runs one worker per core): one torch thread per worker and per
    # command it starts, so the workers do not oversubscribe the cores (set before torch loads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def private_norm_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test sees an empty on-disk and in-process norm cache of its own: a cache file
    of its own, and the process's cache keeps one memory per file."""
    directory = tmp_path_factory.mktemp("norm-cache")
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """``new_process()``: from then on the process's norm cache knows only what its file
    holds, as the cache a new process makes at import."""
    from fedmerge_plugins.norms import cache

    return lambda: monkeypatch.setattr(cache, "CACHE", cache.NormCache())
