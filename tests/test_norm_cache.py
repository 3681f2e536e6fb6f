"""CCLIP's global norms: streamed once, remembered in the process and on disk, keyed by
the checkpoint files' identity; vocabulary rows beyond the base's are not counted."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from fedmerge_plugins import norms
from fedmerge_plugins.synthetic import Family, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.05), extra_tokens=(1, 0), dtype=torch.bfloat16)


def expected_norm(family: Family, task: int) -> float:
    total = 0.0
    for name, base in family.base_tensors.items():
        model = family.task_tensors[task][name][: base.shape[0]]  # rows the base shares
        total += float((model.double() - base.double()).pow(2).sum())
    return math.sqrt(total)


class CountingStream:
    """Counts streaming passes and the tensors they read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = 0
        self.reads = 0
        original_stream, original_pairs = norms.stream_norm, norms.shared_float_tensors

        def stream(*args, **kwargs):
            self.passes += 1
            return original_stream(*args, **kwargs)

        def pairs(*args, **kwargs):
            for item in original_pairs(*args, **kwargs):
                self.reads += 2
                yield item

        monkeypatch.setattr(norms, "stream_norm", stream)
        monkeypatch.setattr(norms, "shared_float_tensors", pairs)


def cclip_merge(family: Family, out: Path) -> None:
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "cclip",
            "base_model": str(family.base),
            "models": [{"model": str(path)} for path in family.tasks],
            "parameters": {"rho": 1.0, "lambda": 1.0},
            "tokenizer": {"source": "base"},
        }
    )
    run_merge(config, str(out), MergeOptions(write_model_card=False, quiet=True))


def norm_of(family: Family, task: int) -> float:
    return norms.reference_norm(
        ModelReference.parse(str(family.base)), ModelReference.parse(str(family.tasks[task])), torch.device("cpu")
    )


def test_norm_counts_every_weight_and_only_the_shared_vocabulary_rows(family: Family) -> None:
    assert norm_of(family, 0) == pytest.approx(expected_norm(family, 0), rel=1e-6)
    assert norm_of(family, 1) == pytest.approx(expected_norm(family, 1), rel=1e-6)


def test_a_second_merge_reads_no_checkpoint_for_norms(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingStream(monkeypatch)
    cclip_merge(family, tmp_path / "first")
    tensors = len(family.base_tensors)
    assert (counter.passes, counter.reads) == (2, 2 * 2 * tensors)  # two models, base + model each

    norms.CACHE.clear_memory()  # as in a new process: only the disk cache remains
    cclip_merge(family, tmp_path / "second")
    assert (counter.passes, counter.reads) == (2, 2 * 2 * tensors)
    assert len(norms.CACHE._read_disk()) == 2


def test_sweeping_rho_in_one_process_streams_once(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingStream(monkeypatch)
    values: List[float] = [norm_of(family, 1) for _ in range(3)]
    assert counter.passes == 1 and len(set(values)) == 1


def test_rewriting_a_checkpoint_invalidates_its_norm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = make_family(tmp_path, scales=(0.01,))
    before = norm_of(family, 0)
    counter = CountingStream(monkeypatch)
    weights = family.tasks[0] / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert norm_of(family, 0) == before
    assert counter.passes == 1


def test_cache_key_follows_file_identity(family: Family) -> None:
    base = ShardedTensorIndex.from_disk(str(family.base))
    task = ShardedTensorIndex.from_disk(str(family.tasks[0]))
    assert norms.cache_key(base, task) == norms.cache_key(base, task)
    assert norms.cache_key(base, task) != norms.cache_key(task, base)
    (path, size, _), = norms.checkpoint_identity(task)
    assert path == os.path.realpath(family.tasks[0] / "model.safetensors") and size == os.path.getsize(path)


def test_incompatible_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"tensor w: model m has shape \(2, 3\), the base \(3, 2\)"):
        norms.shared_rows("w", torch.zeros(3, 2), torch.zeros(2, 3), "m")


def test_non_finite_checkpoint_is_named() -> None:
    with pytest.raises(ValueError, match="model m has NaN or inf values in tensor w"):
        norms.squared_distance("w", torch.zeros(3), torch.tensor([0.0, float("inf"), 1.0]), "m")
