"""The norm cache never fails a merge, through the real ``mergekit-yaml``: an unwritable or
odd cache location, a file of the wrong shape, invalid entries, a lock that cannot be
taken, two merges writing at once. Each merge exits 0 with at most one warning line that
names the cache file, leaves no temporary file, and writes the weights of the float64
formula, bit for bit those of a merge with a healthy cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
import yaml
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from safetensors.torch import load_file

from fedmerge_plugins.norms.cache import cache_key
from tests.support.synthetic import Family, make_family
from tests.conftest import BIN

pytestmark = pytest.mark.slow
LAMBDA = 0.8
WARNING = "fedmerge: norm cache"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("cache-family"), scales=(0.01, 0.02, 0.2))


def true_norms(family: Family) -> List[float]:
    return [
        math.sqrt(sum(float((t[n].double() - b.double()).pow(2).sum()) for n, b in family.base_tensors.items()))
        for t in family.task_tensors
    ]


def rho(family: Family) -> float:
    norms = sorted(true_norms(family))
    return (norms[1] + norms[2]) / 2  # clips only the outlier


def write_recipe(family: Family, workdir: Path, tasks: List[int]) -> Path:
    path = workdir / f"cclip-{'-'.join(map(str, tasks))}.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "cclip",
        "base_model": str(family.base),
        "models": [{"model": str(family.tasks[t])} for t in tasks],
        "parameters": {"lambda": LAMBDA, "rho": rho(family)},
        "dtype": "float32",
    }))  # fmt: skip
    return path


def start(recipe: Path, out: Path, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "FEDMERGE_CACHE_DIR": str(cache_dir)}
    return subprocess.Popen(
        [str(BIN / "mergekit-yaml"), str(recipe), str(out), "--no-write-model-card"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def merge(family: Family, workdir: Path, cache_dir: Path, tasks: List[int] = [0, 1, 2]) -> subprocess.CompletedProcess:
    process = start(write_recipe(family, workdir, tasks), workdir / "out", cache_dir)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def expected_weights(family: Family, tasks: List[int]) -> Dict[str, torch.Tensor]:
    norms, r = true_norms(family), rho(family)
    return {
        name: base.double() + LAMBDA * sum(
            (family.task_tensors[t][name].double() - base.double()) * min(1.0, r / norms[t]) for t in tasks
        )
        for name, base in family.base_tensors.items()
    }  # fmt: skip


def check_weights(out: Path, family: Family, tasks: List[int] = [0, 1, 2]) -> Dict[str, torch.Tensor]:
    merged = load_file(str(out / "model.safetensors"))
    expected = expected_weights(family, tasks)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=2e-6, atol=2e-6, msg=name)
    return merged


@pytest.fixture(scope="module")
def healthy(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, torch.Tensor]:
    """The weights of a merge with a fresh, writable cache (no warning)."""
    workdir = tmp_path_factory.mktemp("healthy")
    run = merge(family, workdir, workdir / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    assert WARNING not in run.stderr
    assert len(json.loads((workdir / "cache" / "norms.json").read_text())) == 3
    return check_weights(workdir / "out", family)


def keys(family: Family) -> List[str]:
    base = ShardedTensorIndex.from_disk(str(family.base))
    return [cache_key(base, ShardedTensorIndex.from_disk(str(t))) for t in family.tasks]


# Each fault: (set-up returning the cache directory to use, whether the merge replaces norms.json by a good one)
def file_as_directory(tmp: Path, family: Family) -> Path:
    (tmp / "blocker").write_text("a regular file")
    return tmp / "blocker"


def under_a_file(tmp: Path, family: Family) -> Path:
    return file_as_directory(tmp, family) / "cache"


def read_only_directory(tmp: Path, family: Family) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a chmod 500 directory; the file-based faults cover this case")
    (tmp / "cache").mkdir()
    (tmp / "cache").chmod(0o500)
    return tmp / "cache"


def norms_json_is_a_directory(tmp: Path, family: Family) -> Path:
    (tmp / "cache" / "norms.json").mkdir(parents=True)
    return tmp / "cache"


def lock_file_is_a_directory(tmp: Path, family: Family) -> Path:
    (tmp / "cache" / "norms.json.lock").mkdir(parents=True)
    return tmp / "cache"


def contents(text: str) -> Callable[[Path, Family], Path]:
    def setup(tmp: Path, family: Family) -> Path:
        (tmp / "cache").mkdir()
        (tmp / "cache" / "norms.json").write_text(text)
        return tmp / "cache"

    return setup


def invalid_entries(tmp: Path, family: Family) -> Path:
    bad = [{"norm": "12.5"}, {"norm": float("nan")}, {"norm": -1.0}]
    return contents(json.dumps(dict(zip(keys(family), bad))))(tmp, family)


FAULTS = {
    "cache dir is a file": (file_as_directory, False),
    "cache dir under a file": (under_a_file, False),
    "cache dir read-only": (read_only_directory, False),
    "norms.json is a directory": (norms_json_is_a_directory, False),
    "lock file is a directory": (lock_file_is_a_directory, False),
    "non-dict JSON": (contents("[1, 2, 3]"), True),
    "not JSON": (contents('{"truncated": {"norm": 1'), True),
    "invalid entries": (invalid_entries, True),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_cache_warns_once_and_merges_the_same_weights(
    fault: str, family: Family, healthy: Dict[str, torch.Tensor], tmp_path: Path
) -> None:
    setup, rewritten = FAULTS[fault]
    cache_dir = setup(tmp_path, family)
    run = merge(family, tmp_path, cache_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.count(WARNING) == 1, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if WARNING in line]
    assert str(cache_dir / "norms.json") in line
    merged = check_weights(tmp_path / "out", family)
    assert all(torch.equal(merged[name], healthy[name]) for name in healthy)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    if rewritten:  # replaced by a valid file holding the three norms
        stored = json.loads((cache_dir / "norms.json").read_text())
        assert set(stored) == set(keys(family))
        assert [stored[k]["norm"] for k in keys(family)] == pytest.approx(true_norms(family), rel=1e-6)
    if (tmp_path / "blocker").exists():
        assert (tmp_path / "blocker").read_text() == "a regular file"


def test_two_merges_writing_the_cache_at_once_keep_every_norm(family: Family, tmp_path: Path) -> None:
    cache_dir = tmp_path / "shared-cache"
    groups = [[0, 1], [2]]
    for i in range(len(groups)):
        (tmp_path / f"run{i}").mkdir()
    runs = [start(write_recipe(family, tmp_path / f"run{i}", g), tmp_path / f"run{i}" / "out", cache_dir)
            for i, g in enumerate(groups)]  # fmt: skip
    results = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err[-2000:] for _, err in results]
    assert not any(WARNING in err for _, err in results)
    stored = json.loads((cache_dir / "norms.json").read_text())
    assert set(stored) == set(keys(family))
    assert [stored[k]["norm"] for k in keys(family)] == pytest.approx(true_norms(family), rel=1e-6)
    for i, g in enumerate(groups):
        check_weights(tmp_path / f"run{i}" / "out", family, g)
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
