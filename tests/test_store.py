"""The one JSON store, file identity and digest (``fedmerge_plugins.store``) as the CLIP cache
and FedNova's training record use them: two processes writing the CLIP cache at once lose no
entry, an unwritable CLIP cache warns once and goes on, a corrupt entry is computed again, and
a same-size rewrite with the mtime put back (``cp -p``) is seen by the training record."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

from fedmerge_plugins.clip.cache import finetuned_store
from fedmerge_plugins.methods import training_record
from fedmerge_plugins.store import digest, file_identity
from tests.support.writers import write_at_once

def temporary_files(directory: Path):
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def test_digest_is_sha256_of_canonical_json() -> None:
    parts = ({"b": 1, "a": [1.5, "x"]}, ("t", 2), Path("/some/path"), None)
    canonical = '[{"a": [1.5, "x"], "b": 1}, ["t", 2], "/some/path", null]'
    assert digest(*parts) == hashlib.sha256(canonical.encode()).hexdigest()
    assert digest(*parts, length=16) == digest(*parts)[:16]
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


def test_file_identity_is_one_stat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    st = os.stat(path)
    assert file_identity(str(path)) == (str(path), 3, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


WRITER = """
import sys
from pathlib import Path
from fedmerge_plugins.clip.cache import finetuned_store
for j in range(int(sys.argv[3])):  # a store a put, as short CLIP runs one after another
    finetuned_store(Path(sys.argv[1])).put(f"{sys.argv[2]}-{j}", {"accuracy": j / 1000, "writer": sys.argv[2]})
"""


def test_two_processes_writing_the_clip_cache_lose_no_entry(tmp_path: Path) -> None:
    write_at_once(WRITER, tmp_path, 150)  # no warning: every put got the lock
    entries = json.loads((tmp_path / "finetuned.json").read_text())
    assert entries == {f"{n}-{j}": {"accuracy": j / 1000, "writer": n} for n in ("a", "b") for j in range(150)}
    assert temporary_files(tmp_path) == []


def test_an_unwritable_clip_cache_warns_once_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = finetuned_store(blocker / "clip")  # a path under a file: unwritable even for root
    with caplog.at_level(logging.WARNING):
        store.put("a", {"accuracy": 0.5})
        store.put("b", {"accuracy": 0.25})
        assert store.lookup(["a", "b"]) == {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}}  # kept in the process
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(blocker / "clip" / "finetuned.json") in warnings[0]
    assert "fedmerge: CLIP cache" in warnings[0] and "not a directory" in warnings[0].lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"


def test_a_clip_cache_entry_that_is_not_an_accuracy_is_computed_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "finetuned.json").write_text(json.dumps({"good": {"accuracy": 0.75}, "list": [1, 2], "big": {"accuracy": 2}}))
    store = finetuned_store(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert store.lookup(["good", "list", "big"]) == {"good": {"accuracy": 0.75}}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 invalid entries" in warning
    store.put("list", {"accuracy": 0.5})
    assert json.loads((tmp_path / "finetuned.json").read_text()) == {"good": {"accuracy": 0.75}, "list": {"accuracy": 0.5}}


def state(rate: float) -> str:
    log = [{"learning_rate": rate, "step": 5}, {"learning_rate": rate, "step": 10}]
    return json.dumps({"log_history": log, "global_step": 10, "max_steps": 10})


def test_a_cp_p_rewrite_of_a_training_log_is_read_again(tmp_path: Path) -> None:
    """A same-size ``trainer_state.json`` with the mtime put back (``cp -p``) is a new run:
    its ctime (and inode) changed, and the training record's key is the file identity."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "trainer_state.json"
    log.write_text(state(0.1))
    assert training_record.effective_steps({"training_log": str(run)}).value == 10 * Fraction(0.1)  # Σ_k η_k
    before = log.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    copy = tmp_path / "copy.json"
    copy.write_text(state(0.3))
    os.replace(copy, log)  # cp -p: new bytes of the same size, the old mtime
    os.utime(log, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = log.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)  # what an (mtime, size) key sees
    assert training_record.effective_steps({"training_log": str(run)}).value == 10 * Fraction(0.3)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_store_file_follows_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    """As every other file fedmerge and mergekit write (a temporary file from mkstemp would be
    0600 whatever the umask: teammates could not read a shared cache)."""
    previous = os.umask(umask)
    try:
        finetuned_store(tmp_path).put("k", {"accuracy": 0.5})
    finally:
        os.umask(previous)
    assert (tmp_path / "finetuned.json").stat().st_mode & 0o777 == mode
