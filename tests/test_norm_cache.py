"""CCLIP's global norms: streamed once, remembered in the process and on disk, keyed by
the checkpoint files' identity (a same-size rewrite with the mtime put back included);
vocabulary rows beyond the base's are not counted. The cache file is never a reason to
fail: bad files and entries are ignored with one warning, writers lock and lose nothing."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import List

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import save_file

from fedmerge_plugins import store
from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.norms import cache as norm_cache
from fedmerge_plugins.norms import streaming as norms
from fedmerge_plugins.norms.cache import NormCache
from tests.support.synthetic import Family, make_family, task_tensors
from tests.support.writers import write_at_once


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.05), extra_tokens=(1, 0), dtype=torch.bfloat16)


def expected_norm(base_tensors, task: dict) -> float:
    total = 0.0
    for name, base in base_tensors.items():
        model = task[name][: base.shape[0]]  # rows the base shares
        total += float((model.double() - base.double()).pow(2).sum())
    return math.sqrt(total)


class CountingPass:
    """Counts norm passes and the task models each computed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes: List[int] = []
        original = norms.stream_norms

        def stream(base, models, labels, device="cpu"):
            self.passes.append(len(models))
            return original(base, models, labels, device)

        monkeypatch.setattr(norms, "stream_norms", stream)


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
    (norm,) = norms.reference_norms(ModelReference.parse(str(family.base)), [ModelReference.parse(str(family.tasks[task]))])
    return norm


def test_norm_counts_every_weight_and_only_the_shared_vocabulary_rows(family: Family) -> None:
    assert norm_of(family, 0) == pytest.approx(expected_norm(family.base_tensors, family.task_tensors[0]), rel=1e-6)
    assert norm_of(family, 1) == pytest.approx(expected_norm(family.base_tensors, family.task_tensors[1]), rel=1e-6)


def test_a_second_merge_reads_no_checkpoint_for_norms(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_process, private_norm_cache: Path
) -> None:
    counter = CountingPass(monkeypatch)
    cclip_merge(family, tmp_path / "first")
    assert counter.passes == [2]  # one pass for both task models

    new_process()  # only the disk cache remains
    cclip_merge(family, tmp_path / "second")
    assert counter.passes == [2]
    assert len(json.loads((private_norm_cache / "norms.json").read_text())) == 2


def test_sweeping_rho_in_one_process_streams_once(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingPass(monkeypatch)
    values: List[float] = [norm_of(family, 1) for _ in range(3)]
    assert counter.passes == [1] and len(set(values)) == 1


def test_rewriting_a_checkpoint_invalidates_its_norm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = make_family(tmp_path, scales=(0.01,))
    before = norm_of(family, 0)
    counter = CountingPass(monkeypatch)
    weights = family.tasks[0] / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert norm_of(family, 0) == before
    assert counter.passes == [1]


def rewrite_in_place(path: Path, tensors: dict) -> None:
    """Overwrite ``path``'s bytes without replacing the file (same inode), as ``dd
    conv=notrunc`` or ``rsync --inplace`` would."""
    scratch = path.with_suffix(".scratch")
    save_file(tensors, str(scratch), metadata={"format": "pt"})
    data = scratch.read_bytes()
    scratch.unlink()
    assert len(data) == path.stat().st_size  # same architecture and dtype: same size
    with open(path, "r+b") as handle:
        handle.write(data)


def rewrite_as_new_file(path: Path, tensors: dict) -> None:
    """Replace ``path`` by a new file (a new inode, unless the file system reuses it)."""
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("rewrite", [rewrite_in_place, rewrite_as_new_file])
def test_a_same_size_rewrite_with_the_mtime_put_back_is_not_fooled(rewrite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_process) -> None:
    """``cp -p`` / ``rsync -a`` / ``tar x`` keep size and mtime; ctime and inode tell."""
    family = make_family(tmp_path, scales=(0.01,))
    weights = family.tasks[0] / "model.safetensors"
    assert norm_of(family, 0) == pytest.approx(expected_norm(family.base_tensors, family.task_tensors[0]), rel=1e-6)
    before = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    other = task_tensors(family.base_tensors, 0.04, seed=99)
    rewrite(weights, other)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what the old key saw

    new_process()  # with only the cache file
    counter = CountingPass(monkeypatch)
    assert norm_of(family, 0) == pytest.approx(expected_norm(family.base_tensors, other), rel=1e-6)
    assert counter.passes == [1]


def test_cache_key_follows_file_identity(family: Family) -> None:
    base = ShardedTensorIndex.from_disk(str(family.base))
    task = ShardedTensorIndex.from_disk(str(family.tasks[0]))
    assert norm_cache.cache_key(base, task) == norm_cache.cache_key(base, task)
    assert norm_cache.cache_key(base, task) != norm_cache.cache_key(task, base)
    (path, size, mtime, ctime, inode), = norm_cache.checkpoint_identity(task)
    stat = os.stat(path)
    assert path == os.path.realpath(family.tasks[0] / "model.safetensors")
    assert (size, mtime, ctime, inode) == (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def test_incompatible_shapes_are_named() -> None:
    with pytest.raises(FedmergeError, match=r"tensor w: model m has shape \(2, 3\), the base \(3, 2\)"):
        norms.shared_rows("w", torch.zeros(3, 2), torch.zeros(2, 3), "m")


def test_non_finite_checkpoint_is_named() -> None:
    with pytest.raises(FedmergeError, match="model m has NaN or inf values in tensor w"):
        norms.squared_distance("w", torch.zeros(3), torch.tensor([0.0, float("inf"), 1.0]), "m")


# ---- the cache file: bad contents, locks, concurrent writers ----------------------------


def cache_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == norm_cache.__name__ and r.levelno == logging.WARNING]


def stray_files(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_invalid_entries_are_ignored_with_one_warning_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "norms.json"
    bad = {"string": {"norm": "2.5"}, "nan": {"norm": float("nan")}, "negative": {"norm": -1.0}, "inf": {"norm": float("inf")},
           "bool": {"norm": True}, "list": [2.5], "missing": {"base": "x"}, "number": 2.5}  # fmt: skip
    path.write_text(json.dumps({**bad, "good": {"norm": 2.5}, "zero": {"norm": 0}}))  # json writes NaN, Infinity
    cache = NormCache(path)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup([*bad, "good", "zero"]) == {"good": 2.5, "zero": 0.0}
        assert cache.get("nan") is None  # asked again: still invalid, no second warning
        cache.put("nan", 1.25, model="m")
    (warning,) = cache_warnings(caplog)
    assert str(path) in warning and "8 invalid entries" in warning
    assert json.loads(path.read_text()) == {"good": {"norm": 2.5}, "zero": {"norm": 0}, "nan": {"norm": 1.25, "model": "m"}}
    assert stray_files(tmp_path) == []


@pytest.mark.parametrize("data,reason", [(b"[1, 2, 3]", "not a JSON object but a list"), (b'{"a": ', "not valid JSON"),
                                         (b'"norms"', "not a JSON object but a str"), (b"\xff\xfe", "cannot read it")])  # fmt: skip
def test_a_file_of_the_wrong_shape_is_ignored_and_replaced(data: bytes, reason: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "norms.json"
    path.write_bytes(data)
    cache = NormCache(path)
    with caplog.at_level(logging.WARNING):
        assert cache.get("k") is None
        cache.put("k", 3.0)
        cache.put("j", 4.0)
    (warning,) = cache_warnings(caplog)
    assert str(path) in warning and reason in warning
    assert json.loads(path.read_text()) == {"k": {"norm": 3.0}, "j": {"norm": 4.0}}
    assert NormCache(path).lookup(["k", "j"]) == {"k": 3.0, "j": 4.0}
    assert stray_files(tmp_path) == []


def unwritable(tmp_path: Path, kind: str) -> Path:
    """A cache file path that cannot be written, even by root."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    if kind == "directory is a file":
        return blocker / "norms.json"
    if kind == "directory under a file":
        return blocker / "cache" / "norms.json"
    if kind == "norms.json is a directory":
        (tmp_path / "norms.json").mkdir()
        return tmp_path / "norms.json"
    if kind == "lock file is a directory":
        (tmp_path / "norms.json.lock").mkdir()
        return tmp_path / "norms.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["directory is a file", "directory under a file", "norms.json is a directory", "lock file is a directory"])
def test_an_unwritable_cache_warns_once_and_keeps_norms_in_memory(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = unwritable(tmp_path, kind)
    cache = NormCache(path)
    with caplog.at_level(logging.WARNING):
        cache.put("a", 1.0)
        cache.put_many({"b": (2.0, {}), "c": (3.0, {})})
        assert cache.lookup(["a", "b", "c"]) == {"a": 1.0, "b": 2.0, "c": 3.0}
    (warning,) = cache_warnings(caplog)
    assert str(path) in warning
    assert (tmp_path / "blocker").read_text() == "a regular file"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_lock_that_is_not_released_skips_writing(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    path = tmp_path / "norms.json"
    path.write_text(json.dumps({"old": {"norm": 1.0}}))
    cache = NormCache(path)
    with open(tmp_path / "norms.json.lock", "w") as holder, caplog.at_level(logging.WARNING):
        fcntl.flock(holder, fcntl.LOCK_EX)  # another writer that never finishes
        cache.put("new", 2.0)
    (warning,) = cache_warnings(caplog)
    assert str(path) in warning and "stayed locked" in warning
    assert json.loads(path.read_text()) == {"old": {"norm": 1.0}}  # untouched
    assert cache.get("new") == 2.0 and stray_files(tmp_path) == []
    cache.put("newer", 3.0)  # the lock is free again: written (the earlier entry with it)
    assert set(json.loads(path.read_text())) == {"old", "new", "newer"}


WRITER = """
import sys
from pathlib import Path
from fedmerge_plugins.norms.cache import NormCache
cache = NormCache(Path(sys.argv[1]))
for j in range(int(sys.argv[3])):
    cache.put(f"{sys.argv[2]}-{j}", float(j), writer=sys.argv[2])
"""


def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "norms.json"
    write_at_once(WRITER, path, 150)  # no warning: every put got the lock
    entries = json.loads(path.read_text())
    assert len(entries) == 300
    assert entries == {f"{n}-{j}": {"norm": float(j), "writer": n} for n in ("a", "b") for j in range(150)}
    assert stray_files(tmp_path) == []
