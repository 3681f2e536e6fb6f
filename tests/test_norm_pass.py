"""One norm pass for all task models (issue 19): a cold cclip merge of T = 3 reads the base
once and each task model once for norms, and the norms are bit for bit those of one pass
per model with the original arithmetic; a partly cached set streams only the missing
models; the sweep's in-memory copies give the same numbers through the same pass; each
tensor's pages are faulted in before its arithmetic."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import List

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import save_file

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.norms import streaming as norms
from fedmerge_plugins.norms import cache as norm_cache
from fedmerge_plugins.norms.cache import NormCache, cache_key
from tests.support.synthetic import Family, make_family
from tests.test_norm_cache import cclip_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + three task models, two shards each; task1 has an extra vocabulary row."""
    root = tmp_path_factory.mktemp("norm-pass")
    return make_family(root, scales=(0.01, 0.02, 0.2), extra_tokens=(0, 1, 0), dtype=torch.bfloat16, shards=2)


def refs(family: Family) -> List[ModelReference]:
    return [ModelReference.parse(str(p)) for p in (family.base, *family.tasks)]


class ReadCounter:
    """Counts ``LazyTensorLoader.get_tensor`` calls per (checkpoint, tensor), all of them
    and those made inside the norm pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.all: Counter = Counter()
        self.norm_pass: Counter = Counter()
        self.passes = 0
        self._inside = False
        original_get, original_stream = LazyTensorLoader.get_tensor, norms.stream_norms

        def get_tensor(loader, key, *args, **kwargs):
            where = (os.path.basename(os.path.realpath(loader.index.base_path)), key)
            self.all[where] += 1
            if self._inside:
                self.norm_pass[where] += 1
            return original_get(loader, key, *args, **kwargs)

        def stream_norms(*args, **kwargs):
            self.passes += 1
            self._inside = True
            try:
                return original_stream(*args, **kwargs)
            finally:
                self._inside = False

        monkeypatch.setattr(LazyTensorLoader, "get_tensor", get_tensor)
        monkeypatch.setattr(norms, "stream_norms", stream_norms)

    def per_checkpoint(self, counts: Counter) -> dict:
        """checkpoint -> sorted set of read counts over its tensors."""
        result: dict = {}
        for (checkpoint, _), count in counts.items():
            result.setdefault(checkpoint, set()).add(count)
        return {k: sorted(v) for k, v in result.items()}


def original_squared_distance(base: torch.Tensor, model: torch.Tensor) -> float:
    """The per-tensor term as first written (before issue 19): both converted to float32,
    subtracted into a new tensor, its L2 norm squared; rows trimmed to the base's."""
    rows = min(base.shape[0], model.shape[0])
    delta = torch.sub(model[:rows].to(torch.float32), base[:rows].to(torch.float32))
    assert bool(torch.isfinite(delta).all())
    return float(torch.linalg.vector_norm(delta)) ** 2


def per_model_norms(family: Family) -> List[float]:
    """Norms as computed before the joint pass: base and one model streamed per model,
    the original terms summed in the base's tensor order."""
    base_ref, *task_refs = refs(family)
    result = []
    for task in task_refs:
        base, model = LazyTensorLoader(norms.model_index(base_ref)), LazyTensorLoader(norms.model_index(task))
        total = 0.0
        for name in base.index.tensor_paths:
            if name not in model.index.tensor_paths:
                continue
            base_tensor = base.get_tensor(name)
            if base_tensor.is_floating_point():
                total += original_squared_distance(base_tensor, model.get_tensor(name))
        result.append(math.sqrt(total))
    return result


def float64_norms(family: Family) -> List[float]:
    return [
        math.sqrt(sum(float((t[n][: b.shape[0]].double() - b.double()).pow(2).sum()) for n, b in family.base_tensors.items()))
        for t in family.task_tensors
    ]


def test_a_cold_cclip_merge_reads_the_base_once_and_each_task_model_once_for_norms(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = ReadCounter(monkeypatch)
    cclip_merge(family, tmp_path / "out")
    tensors = len(family.base_tensors)
    assert counter.passes == 1
    assert counter.per_checkpoint(counter.norm_pass) == {"base": [1], "task0": [1], "task1": [1], "task2": [1]}
    assert len(counter.norm_pass) == 4 * tensors  # every tensor of the T + 1 checkpoints, once
    # the whole merge: mergekit's own read plus the norm pass's, for every checkpoint alike
    assert counter.per_checkpoint(counter.all) == {"base": [2], "task0": [2], "task1": [2], "task2": [2]}


def test_joint_norms_are_bit_for_bit_one_pass_per_model(family: Family, tmp_path: Path, new_process) -> None:
    expected = per_model_norms(family)
    assert expected == pytest.approx(float64_norms(family), rel=1e-6)
    base, *tasks = refs(family)
    assert norms.reference_norms(base, tasks) == expected  # from the pass
    new_process()
    assert norms.reference_norms(base, tasks) == expected  # from the cache file
    for i, (task, norm) in enumerate(reversed(list(zip(tasks, expected)))):  # alone, in another order
        alone = NormCache(tmp_path / f"alone-{i}.json")
        assert norms.reference_norms(base, [task], cache=alone) == [norm]


def test_a_partly_cached_set_streams_only_the_missing_models(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    base, *tasks = refs(family)
    (middle,) = norms.reference_norms(base, [tasks[1]])
    counter = ReadCounter(monkeypatch)
    assert norms.reference_norms(base, tasks)[1] == middle
    assert counter.passes == 1
    assert counter.per_checkpoint(counter.norm_pass) == {"base": [1], "task0": [1], "task2": [1]}
    known = norms.reference_norms(base, tasks)
    assert norms.reference_norms(base, [tasks[2], tasks[0], tasks[2]]) == [known[2], known[0], known[2]]
    assert counter.passes == 1  # all cached now


def test_the_sweeps_in_memory_copies_give_the_same_norms_in_one_pass(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmerge_plugins.sweep.merger import inputs_in_memory, memory_norms

    expected = per_model_norms(family)
    models = refs(family)
    options = MergeOptions(write_model_card=False, quiet=True)
    with inputs_in_memory(models, options) as loaders:
        counter = ReadCounter(monkeypatch)
        assert memory_norms(models[0], models[1:], loaders) == expected
    assert counter.passes == 1 and not counter.all  # nothing read from disk
    keys = [cache_key(norms.model_index(models[0]), norms.model_index(m)) for m in models[1:]]
    assert [norm_cache.CACHE.get(k) for k in keys] == expected  # where mergekit-yaml's cclip looks


def test_a_model_sharing_no_float_tensor_is_named(family: Family, tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    save_file({"unrelated.weight": torch.ones(3)}, str(tmp_path / "odd" / "model.safetensors"))
    base = LazyTensorLoader(norms.model_index(ModelReference.parse(str(family.base))))
    good = LazyTensorLoader(norms.model_index(ModelReference.parse(str(family.tasks[0]))))
    odd = LazyTensorLoader(ShardedTensorIndex.from_disk(str(tmp_path / "odd")))
    with pytest.raises(FedmergeError, match="model odd shares no floating-point tensor name with the base model"):
        norms.stream_norms(base, [good, odd], ["good", "odd"])


def test_squared_distance_is_the_original_term_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(257, 33, generator=generator).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        extra_row = torch.randn(1, 33, generator=generator, dtype=torch.float64)  # a vocabulary row the base lacks
        model = torch.cat([base.double() + 0.01 * torch.randn(257, 33, generator=generator, dtype=torch.float64), extra_row])
        model = model.to(dtype)
        assert norms.squared_distance("w", base, model, "m") == original_squared_distance(base, model), dtype
    base64 = base.double()
    model64 = base64 + 1e-3
    expected = float(torch.linalg.vector_norm(model64 - base64)) ** 2  # float64 stays float64
    assert norms.squared_distance("w", base64, model64, "m") == expected
    assert expected == pytest.approx(base.numel() * 1e-6, rel=1e-6)


def test_squares_that_overflow_float32_are_inf_not_an_error() -> None:
    """Finite values whose squares overflow float32: the element-wise check clears them."""
    assert norms.squared_distance("w", torch.zeros(2), torch.tensor([3e38, 1.0]), "m") == math.inf
    with pytest.raises(FedmergeError, match="model m has NaN or inf values in tensor w"):
        norms.squared_distance("w", torch.zeros(2), torch.tensor([float("nan"), 1.0]), "m")


def file_backed_kib() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Rss"].split()[0]) - int(fields["Anonymous"].split()[0])


def test_fault_in_reads_every_page_of_a_mapped_tensor_and_changes_nothing(tmp_path: Path) -> None:
    """safetensors maps the file: get_tensor reads nothing; fault_in maps every page."""
    values = torch.arange(24 << 20, dtype=torch.int32).to(torch.bfloat16).reshape(-1, 1024)  # 48 MiB
    save_file({"w": values}, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        before = file_backed_kib()
        tensor = handle.get_tensor("w")
        assert file_backed_kib() - before < 8 << 10  # mapped, not read
        norms.fault_in(tensor)
        assert file_backed_kib() - before >= (48 << 10) - 64  # every page, the last one included
        assert torch.equal(tensor, values)
    for odd in (torch.zeros(0), torch.ones(3, dtype=torch.bool), torch.ones(4, 6)[:, ::2]):
        norms.fault_in(odd)  # empty, one byte, not contiguous: nothing to do or no error
