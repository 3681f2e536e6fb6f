"""``fedmerge inspect``: streamed norms, cosines and sign agreement against float64
computations on tiny checkpoints; the norm cache shared with cclip; the section 4.2
quantities and the outlier rule against their formulas; the command's text, JSON and PNG."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.common import ModelReference

from fedmerge_plugins.norms import streaming as norms
from fedmerge_plugins.norms.cache import NormCache
from fedmerge_plugins.diagnostics.cli import inspect_command
from fedmerge_plugins.diagnostics.stats import agreement_effects, chi_square, collect_stats, fednova_weights, flag_outliers
from fedmerge_plugins.search.grids import clip_rho_grid, fedgma_rho_grid
from tests.support.synthetic import Family, llama_config, make_family, write_checkpoint

NAMES = ["instruct", "math", "code"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """instruct, math (one extra vocabulary row), code (10x outlier), and ``peft``, which
    changes only the attention query projections (exact zeros elsewhere, like QLoRA)."""
    root = tmp_path_factory.mktemp("inspect-family")
    family = make_family(root, scales=(0.01, 0.02, 0.2), names=NAMES, extra_tokens=(0, 1, 0), shards=2)
    generator = torch.Generator().manual_seed(7)
    peft = {
        name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) if "q_proj" in name else tensor.clone()
        for name, tensor in family.base_tensors.items()
    }
    family.tasks.append(write_checkpoint(root / "peft", llama_config(), peft))
    family.task_tensors.append(peft)
    return family


def reference(family: Family, count: int) -> Dict[str, object]:
    """float64 task vectors (base rows) -> norms, Gram matrix, zero and agreement counts."""
    base = family.base_tensors
    tau = {name: [tensors[name][: b.shape[0]].double() - b.double() for tensors in family.task_tensors[:count]] for name, b in base.items()}
    gram = torch.zeros(count, count, dtype=torch.float64)
    agreement = torch.zeros(count + 1, dtype=torch.int64)
    zeros = [0] * count
    for vectors in tau.values():
        flat = torch.stack([v.reshape(-1) for v in vectors])
        gram += flat @ flat.T
        agreement += torch.bincount(torch.sign(flat).sum(0).abs().long(), minlength=count + 1)
        zeros = [z + int((row == 0).sum()) for z, row in zip(zeros, flat)]
    return {
        "norms": [math.sqrt(gram[t, t]) for t in range(count)],
        "gram": gram,
        "agreement": agreement.tolist(),
        "zeros": zeros,
        "coordinates": sum(b.numel() for b in base.values()),
        "tau": tau,
    }


def refs(family: Family, count: int) -> List[ModelReference]:
    return [ModelReference.parse(str(p)) for p in family.tasks[:count]]


def test_statistics_match_direct_computation(family: Family) -> None:
    expected = reference(family, 4)
    base = ModelReference.parse(str(family.base))
    stats = collect_stats(base, refs(family, 4), labels=NAMES + ["peft"])
    assert stats.labels == NAMES + ["peft"]
    assert stats.tensors == len(family.base_tensors)
    assert stats.coordinates == expected["coordinates"]
    assert stats.norms == pytest.approx(expected["norms"], rel=1e-6)
    assert stats.zero_counts == expected["zeros"]
    assert stats.zero_counts[3] > 0.5 * stats.coordinates  # peft: most weights untouched
    assert stats.agreement_counts == expected["agreement"]
    assert len(stats.agreement_counts) == 5 and all(c > 0 for c in stats.agreement_counts)  # zeros make odd k possible
    torch.testing.assert_close(torch.tensor(stats.gram, dtype=torch.float64), expected["gram"], rtol=1e-6, atol=1e-9)
    diagonal = expected["gram"].diag().sqrt()
    cosines = expected["gram"] / torch.outer(diagonal, diagonal)
    torch.testing.assert_close(torch.tensor(stats.cosines(), dtype=torch.float64), cosines, rtol=0, atol=1e-6)


def test_norms_are_cclips_numbers_and_shared_through_the_cache(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_process) -> None:
    base = ModelReference.parse(str(family.base))
    models = refs(family, 3)
    independent = NormCache(tmp_path / "independent.json")
    streamed = [norms.reference_norms(base, [m], cache=independent)[0] for m in models]  # one model per pass
    stats = collect_stats(base, models)
    assert stats.norms == streamed  # bit for bit: the same sum in the same order
    assert stats.norms_cached == [False] * 3

    def no_streaming(*args, **kwargs):
        raise AssertionError("norm streamed again although inspect cached it")

    monkeypatch.setattr(norms, "stream_norms", no_streaming)
    assert norms.reference_norms(base, models) == streamed  # what cclip inside mergekit-yaml uses
    new_process()  # only the file under $FEDMERGE_CACHE_DIR
    assert norms.reference_norms(base, models) == streamed
    assert collect_stats(base, models).norms_cached == [True] * 3


def test_outlier_rule_on_the_papers_norms() -> None:
    # section 7: instruction, math, code (QLoRA) task vectors
    assert flag_outliers([142.61, 52.62, 5.05]) == [None, None, "low"]
    # Table 7, DTD EuroSAT GTSRB SUN397 SVHN MNIST Cars RESISC45
    heterogeneous = [2.77, 2.71, 1.92, 2.04, 23.90, 3.03, 2.80, 3.07]
    homogeneous = [2.47, 2.27, 2.35, 2.91, 2.70, 2.45, 2.80, 2.54]
    assert flag_outliers(heterogeneous) == [None] * 4 + ["high"] + [None] * 3
    assert flag_outliers(homogeneous) == [None] * 8
    assert flag_outliers([1.0, 4.0]) == [None, None]  # median 2.5: within 3x
    assert flag_outliers([1.0, 6.0]) == ["low", None]  # median 3.5 > 3 x 1
    assert flag_outliers([3.0]) == [None]


def test_fednova_weights_and_chi_square_follow_section_4_2() -> None:
    a = [300 * 2e-5, 1200 * 2e-5, 300 * 2e-4]
    w = fednova_weights(a)
    assert w == pytest.approx([x / sum(a) for x in a], rel=1e-12)
    assert sum(w) == pytest.approx(1.0, rel=1e-12)
    assert chi_square(w) == pytest.approx(sum((1 / 3 - x) ** 2 / x for x in w), rel=1e-12)
    assert chi_square(fednova_weights([500 * 1e-5] * 4)) == 0.0
    assert chi_square([0.5, 0.5]) == 0.0


def test_agreement_effects_match_fedgmas_mask(family: Family) -> None:
    """The share of coordinates each paper ρ damps equals the share where the fedgma
    reference mask (A ≥ ρ ? 1 : A) is below 1, for T = 4 and for T = 2."""
    for count in (4, 2):
        expected = reference(family, count)
        stats = collect_stats(ModelReference.parse(str(family.base)), refs(family, count))
        effects = agreement_effects(stats.agreement_counts, fedgma_rho_grid())
        assert [e["rho"] for e in effects] == fedgma_rho_grid()
        agreement = torch.cat([torch.sign(torch.stack(v)).mean(0).abs().reshape(-1) for v in expected["tau"].values()])
        for effect in effects:
            damped = float((agreement < effect["rho"]).double().mean())
            assert effect["damped_fraction"] == pytest.approx(damped, abs=1e-12), (count, effect)
        if count == 2:
            # T = 2: A is 0 or 1 except where one task vector is exactly 0 (A = 1/2)
            assert {e["damped_fraction"] for e in effects if e["rho"] <= 0.5} == {stats.agreement_counts[0] / stats.coordinates}


def fednova_recipe(family: Family, tmp_path: Path) -> Path:
    training = [(300, 2e-5), (1200, 2e-5), (300, 2e-4)]
    recipe = {
        "merge_method": "fednova",
        "base_model": str(family.base),
        "models": [
            {"model": str(p), "parameters": {"steps": s, "learning_rate": lr}} for p, (s, lr) in zip(family.tasks, training)
        ],
        "parameters": {"lambda": 0.6},
        "tokenizer": {"source": "base"},
        "dtype": "float32",
    }
    path = tmp_path / "fednova.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_inspect_command_table_json_and_plot(family: Family, tmp_path: Path) -> None:
    from PIL import Image

    recipe = fednova_recipe(family, tmp_path)
    result = CliRunner().invoke(
        inspect_command, [str(recipe), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    expected = reference(family, 3)
    assert [m["label"] for m in report["models"]] == NAMES
    assert [m["norm"] for m in report["models"]] == pytest.approx(expected["norms"], rel=1e-6)
    assert [m["outlier"] for m in report["models"]] == [None, None, "high"]
    a = [300 * 2e-5, 1200 * 2e-5, 300 * 2e-4]
    assert report["fednova"]["effective_steps"] == pytest.approx(a, rel=1e-12)
    assert report["fednova"]["weights"] == pytest.approx([x / sum(a) for x in a], rel=1e-12)
    assert report["fednova"]["chi_square"] == pytest.approx(sum((1 / 3 - x / sum(a)) ** 2 / (x / sum(a)) for x in a), rel=1e-12)
    norms_ = [m["norm"] for m in report["models"]]
    assert report["cclip_rho_grid"] == list(clip_rho_grid(norms_))
    assert len(report["cclip_rho_grid"]) == 5
    assert report["cclip_rho_grid"][0] == min(norms_) and max(report["cclip_rho_grid"]) < max(norms_)
    assert report["sign_agreement"]["counts"] == expected["agreement"]
    assert sum(report["sign_agreement"]["fractions"]) == pytest.approx(1.0)
    for needle in ("χ²(p‖w) = 1.25", "median norm of all task vectors", "CCLIP ρ grid", "code", "high"):
        assert needle in result.output, needle
    with Image.open(tmp_path / "r.png") as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300

    as_json = CliRunner().invoke(inspect_command, [str(recipe), "--json", "-"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["fednova"]["chi_square"] == pytest.approx(1.25)


def test_inspect_rejects_a_recipe_without_base(family: Family, tmp_path: Path) -> None:
    path = tmp_path / "nobase.yml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family.tasks[:2]]}))
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert result.exit_code != 0
    assert "no `base_model:`" in result.output


def test_inspect_prints_each_models_factor_at_the_recipes_values(family: Family, tmp_path: Path) -> None:
    # FedNova: c_t = mean(a) / a_t, with a_t = steps × rate written out here, times λ = 0.6
    result = CliRunner().invoke(inspect_command, [str(fednova_recipe(family, tmp_path)), "--json", str(tmp_path / "n.json")])
    assert result.exit_code == 0, result.output
    a = [300 * 2e-5, 1200 * 2e-5, 300 * 2e-4]
    expected = [sum(a) / 3 / x for x in a]
    factors = json.loads((tmp_path / "n.json").read_text())["factors"]
    assert factors["factors"] == pytest.approx(expected, rel=1e-12) and factors["scaled"] == pytest.approx([0.6 * c for c in expected], rel=1e-12)
    assert "fednova factor on each τ_t at the recipe's λ = 0.6: (1/T Σ_s ‖a_s‖₁) / ‖a_t‖₁" in result.output
    for label, c in zip(NAMES, expected):
        assert re.search(rf"  {label} +{c:.6g}   × λ = {0.6 * c:.6g}", result.output), label

    # CCLIP: min(1, ρ / ‖τ_t‖) with the norms computed directly, ρ between the smallest and the largest
    norms = reference(family, 3)["norms"]
    rho = (min(norms) + max(norms)) / 2
    recipe = {"merge_method": "cclip", "base_model": str(family.base), "models": [{"model": str(p)} for p in family.tasks[:3]],
              "parameters": {"lambda": 1.5, "rho": rho}, "tokenizer": {"source": "base"}, "dtype": "float32"}
    path = tmp_path / "cclip.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(inspect_command, [str(path), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    factors = json.loads((tmp_path / "c.json").read_text())["factors"]
    assert factors["factors"] == pytest.approx([min(1.0, rho / n) for n in norms], rel=1e-6)
    assert factors["factors"][0] == 1.0 and factors["factors"][-1] < 1.0
    assert f"cclip factor on each τ_t at the recipe's λ = 1.5, ρ = {rho:g}: min(1, ρ / ‖τ_t‖)" in result.output
