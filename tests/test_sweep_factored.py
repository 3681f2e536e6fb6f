"""λ computed once: a point's tensors from the captured D (``sweep.factored``) equal, bit for
bit, what mergekit writes for the point's recipe: every method, bf16 and fp32 compute, a
vocabulary-aligned recipe (one task model has an extra token), ``out_dtype`` too."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedmerge_plugins.sweep.factored import capture
from fedmerge_plugins.sweep.merger import merge_options
from tests.support.recipes import METHODS, sweep_family
from tests.support.recipes import method_recipe as recipe
from tests.support.synthetic import Family

@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return sweep_family(tmp_path_factory.mktemp("factored"))


def config_of(data: Dict):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(data)))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype,out_dtype", [("bfloat16", None), ("float32", None), ("float32", "bfloat16")])
def test_point_from_captured_delta_equals_mergekit(family: Family, tmp_path: Path, method: str, dtype: str, out_dtype: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit.merge import run_merge

    from mergekit.common import ModelReference
    from fedmerge_plugins.sweep import factored

    # write() works in blocks; an odd block size splits every weight (whole tensors: tensors())
    monkeypatch.setattr(factored, "WRITE_BLOCK", 40_009)

    options = merge_options(ModelReference.parse(str(family.base)))
    factors = capture(config_of(recipe(family, method, dtype, 0.3, out_dtype)), options)  # D captured at λ = 0.3
    assert factors.captured  # every computed tensor has its D
    for lam in (0.6, 1.0):
        out = tmp_path / f"merged-{lam}"
        run_merge(config_of(recipe(family, method, dtype, lam, out_dtype)), str(out), options=options)
        written = load_file(str(out / "model.safetensors"))
        produced = dict(factors.tensors(lam))
        same = {name: torch.full_like(written[name], 7.0) for name in produced}  # written straight into these
        wider = {name: torch.full_like(written[name], 7.0, dtype=torch.float64) for name in produced}  # cast, then copied
        factors.write(lam, same)
        factors.write(lam, wider)
        for name in produced:
            assert torch.equal(same[name], produced[name]) and torch.equal(wider[name], produced[name].double()), name
        assert set(produced) <= set(written) and len(produced) >= len(written) - 2  # norms may be constant
        for name, tensor in written.items():
            if name not in produced:
                continue
            mine = produced[name]
            assert mine.dtype == tensor.dtype and mine.shape == tensor.shape, name
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()]
            assert torch.equal(mine.contiguous().view(width), tensor.contiguous().view(width)), (method, dtype, lam, name)


@pytest.mark.parametrize("method", ["fedgma", "median", "task_arithmetic"])
def test_capture_without_the_merge_still_names_a_model_with_nan(family: Family, tmp_path: Path, method: str) -> None:
    """A group's D is captured without its merge (nothing keeps it), but a NaN in a task model
    is still named by the kernel's own check (mergekit's task_arithmetic checks nothing: its D
    is recorded as it is)."""
    import shutil

    from mergekit.common import ModelReference
    from safetensors.torch import save_file

    from fedmerge_plugins.errors import NonFiniteError

    spoilt = Path(shutil.copytree(family.tasks[1], tmp_path / "spoilt"))
    tensors = load_file(str(spoilt / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name].view(-1)[300_000] = float("nan")  # past the kernels' first block
    save_file(tensors, str(spoilt / "model.safetensors"), metadata={"format": "pt"})
    data = recipe(family, method, "float32", 0.5)
    data["models"][1]["model"] = str(spoilt)
    options = merge_options(ModelReference.parse(str(family.base)))
    if method == "task_arithmetic":
        factors = capture(config_of(data), options)
        assert bool(torch.isnan(factors.captured[name].delta).any())
        return
    with pytest.raises(NonFiniteError, match=f"{method}: model .*spoilt.* has NaN or inf values in tensor {name}"):
        capture(config_of(data), options)
