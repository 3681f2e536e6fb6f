"""Shared test set-up: offline hub access and a private norm cache for every test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def private_norm_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test sees an empty on-disk and in-process norm cache of its own."""
    directory = tmp_path_factory.mktemp("norm-cache")
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(directory))
    from fedmerge_plugins.norms.cache import CACHE

    CACHE.clear_memory()
    return directory
