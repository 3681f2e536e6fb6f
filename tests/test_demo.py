"""fedmerge demo: the search grid, the recipes, the report's arithmetic, and the whole
pipeline at a test size (real training, real mergekit, real lm-eval)."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Dict

import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry

import numpy as np

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.search import engine as search
from fedmerge_plugins.demo import data, stats
from fedmerge_plugins.demo.build import TASK_MODELS, build_models, cache_key, cached_manifest, candidate_name
from fedmerge_plugins.demo.recipes import MERGE_SETS, METHODS, fill_template, template_fields, template_path
from fedmerge_plugins.demo.run import SIZES, grid_points, normalized, run_demo
from fedmerge_plugins.guards.recipe import check_recipe

MANIFEST = {
    "models": {
        "base": {"training": {"steps": 10, "learning_rate": 0.01}},
        "instruction": {"training": {"steps": 300, "learning_rate": 3e-4}, "task_vector_norm": 6.5},
        "math": {"training": {"steps": 150, "learning_rate": 3e-3}, "task_vector_norm": 21.0},
        "code": {"training": {"steps": 200, "learning_rate": 3e-4}, "task_vector_norm": 7.0},
    }
}


def test_data_splits_are_disjoint_and_deterministic() -> None:
    for task, key in data.PROMPT_KEYS.items():
        splits = data.task_splits(task, 5, 7, seed=3)
        parts = [{r[key] for r in part} for part in (splits.train, splits.validation, splits.test)]
        assert [len(p) for p in parts[1:]] == [5, 7]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert data.task_splits(task, 5, 7, seed=3) == splits
        assert data.task_splits(task, 5, 7, seed=4).test != splits.test


def test_training_prompts_are_the_evaluation_prompts() -> None:
    from fedmerge_plugins.evaluation import prompts

    record = data.task_splits("humaneval", 1, 1, 0).test[0]
    prompt, response = data.training_pair("humaneval", record)
    assert prompt == prompts.humaneval_prompt(record)
    assert response.startswith("\n" + record["prompt"].splitlines()[0])
    record = data.task_splits("gsm8k", 1, 1, 0).test[0]
    prompt, response = data.training_pair("gsm8k", record)
    assert prompt == prompts.gsm8k_prompt(record)
    assert response.endswith("The answer is: " + record["answer"].split("#### ")[1])


@pytest.mark.parametrize("models", [("math", "code"), ("instruction", "math", "code")])
def test_fedgma_grid_merges_each_agreement_threshold_once(models) -> None:
    rhos = tuple(round(0.1 * i, 1) for i in range(1, 11))
    settings = replace(SIZES["small"], lambdas=(0.5, 1.0), fedgma_rhos=rhos)
    groups = search.merge_groups("fedgma", grid_points("fedgma", models, {}, settings), len(models))
    count = len(models)
    # the smallest agreement count kept at mask 1 is ⌈ρ T⌉ (ρ = 0 would be 0)
    classes: Dict[int, list] = {}
    for rho in rhos:
        classes.setdefault(math.ceil(round(rho * count, 9)), []).append(rho)
    assert len(groups) == len(classes) * 2
    for group in groups:
        assert [p.parameters["rho"] for p in group] in classes.values()


def test_cclip_grid_spans_the_task_vector_norms() -> None:
    settings = replace(SIZES["small"], lambdas=(1.0,), cclip_count=4)
    norms = {"instruction": 6.0, "math": 22.0, "code": 8.0}
    rhos = [p.parameters["rho"] for p in grid_points("cclip", ("instruction", "math"), norms, settings)]
    assert rhos == pytest.approx([6.0, 10.0, 14.0, 18.0])


def test_later_seeds_reuse_the_searched_grid_position() -> None:
    from fedmerge_plugins.demo.run import Variant, reused_choices

    settings = replace(SIZES["small"], lambdas=(0.5, 1.0), cclip_count=5)
    entry = lambda norm: {"path": "p", "task": "t", "training": {"steps": 1, "learning_rate": 1.0}, "task_vector_norm": norm}  # noqa: E731
    first = Variant(0, "heterogeneous", {"instruction": entry(5.0), "math": entry(6.0), "code": entry(25.0)})
    later = Variant(1, "heterogeneous", {"instruction": entry(4.0), "math": entry(7.0), "code": entry(14.0)})
    chosen = {("math-code", "cclip"): {"parameters": {}, "position": 7, "average": 0.5}, ("math-code", "task_arithmetic"): {"parameters": {}, "position": 1, "average": 0.5}}
    reused = reused_choices(later, first, chosen, settings)
    # CCLIP: λ outermost, then ρ = min + k (max - min) / 5 over the later seed's own norms 7 and 14
    assert reused[("math-code", "cclip")]["parameters"] == pytest.approx({"lambda": 1.0, "rho": 7.0 + 2 * 7.0 / 5})
    assert reused[("math-code", "task_arithmetic")]["parameters"] == {"lambda": 1.0}
    assert {r["searched_on"] for r in reused.values()} == {"seed0-heterogeneous"}
    assert all(r["average"] is None for r in reused.values())


def test_normalized_accuracy_and_zero_reference() -> None:
    assert normalized({"gsm8k": 0.3, "instruct": 0.5}, {"gsm8k": 0.6, "instruct": 0.5}) == {"gsm8k": 0.5, "instruct": 1.0}
    with pytest.raises(FedmergeError, match="math model scores 0 on its own gsm8k"):
        normalized({"gsm8k": 0.3}, {"gsm8k": 0.0})


@pytest.mark.parametrize("merge_set", list(MERGE_SETS))
@pytest.mark.parametrize("method", METHODS)
def test_every_template_fills_into_a_valid_recipe(tmp_path: Path, merge_set: str, method: str) -> None:
    path = template_path(merge_set, method)
    text = path.read_text()
    values = {f"path_{name}": str(tmp_path / name) for name in MANIFEST["models"]}
    values.update({"lambda": 0.8, "rho": 0.3 if method == "fedgma" else 7.5})
    for name, entry in MANIFEST["models"].items():
        values[f"steps_{name}"] = entry["training"]["steps"]
        values[f"learning_rate_{name}"] = entry["training"]["learning_rate"]
    recipe = yaml.safe_load(fill_template(text, values, str(path)))
    config = MergeConfiguration.model_validate(recipe)
    assert config.merge_method in {m.spec.name for m in registry.registered_methods()}
    assert [m.model.model.path for m in config.models] == [str(tmp_path / m) for m in MERGE_SETS[merge_set]]
    check_recipe(config, shapes=False)
    assert recipe["parameters"]["lambda"] == 0.8
    if method == "fednova":
        for entry in recipe["models"]:
            name = Path(entry["model"]).name
            assert entry["parameters"] == {
                "steps": MANIFEST["models"][name]["training"]["steps"],
                "learning_rate": MANIFEST["models"][name]["training"]["learning_rate"],
            }
    with pytest.raises(KeyError, match=r"\$\{lambda\}"):
        fill_template(text, {k: v for k, v in values.items() if k != "lambda"}, str(path))
    assert "lambda" in template_fields(text)


def test_paired_bootstrap_against_an_independent_computation() -> None:
    rng = np.random.default_rng(5)
    a = {"instruct": rng.integers(0, 2, 30).astype(float).tolist(), "gsm8k": rng.integers(0, 2, 30).astype(float).tolist()}
    b = {"instruct": rng.integers(0, 2, 30).astype(float).tolist(), "gsm8k": rng.integers(0, 2, 30).astype(float).tolist()}
    ref = {"instruct": [1.0] * 25 + [0.0] * 5, "gsm8k": [1.0] * 20 + [0.0] * 10}
    resampling = stats.draws({"instruct": 30, "gsm8k": 30}, 400, seed=3)
    interval = stats.paired_interval([(stats.Side(a, ref), stats.Side(b, ref))], resampling)
    point = lambda items: (sum(items["instruct"]) / 25 + sum(items["gsm8k"]) / 20) / 2  # noqa: E731
    assert interval.estimate == pytest.approx(point(a) - point(b), abs=1e-12)
    differences = []
    for k in range(400):
        value = 0.0
        for task in ("instruct", "gsm8k"):
            idx = resampling[task][k]
            value += (sum(a[task][i] for i in idx) - sum(b[task][i] for i in idx)) / sum(ref[task][i] for i in idx) / 2
        differences.append(value)
    differences.sort()
    assert interval.low == pytest.approx(float(np.percentile(differences, 2.5)), abs=1e-12)
    assert interval.high == pytest.approx(float(np.percentile(differences, 97.5)), abs=1e-12)
    same = stats.paired_interval([(stats.Side(a, ref), stats.Side(a, ref))], resampling)
    assert (same.estimate, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "unchanged")
    better = {task: [1.0] * 30 for task in a}
    assert stats.paired_interval([(stats.Side(better, ref), stats.Side(b, ref))], resampling).verdict == "improved"
    assert stats.paired_interval([(stats.Side(b, ref), stats.Side(better, ref))], resampling).verdict == "degraded"


# ----------------------------------------------------------------------------- end to end


# The first test to use ``demo`` builds it (pre-training, 2 seeds, search, test: about 10 min on
# 2 quiet cores, more beside another test worker), inside that test's timeout.
END_TO_END_TIMEOUT_S = 2700


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dict:
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, "small", log=lambda line: None)
    return {"out": out, "result": result, "saved": json.loads((out / "results.json").read_text())}


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_task_models_beat_the_base_on_their_own_task(demo) -> None:
    result = demo["result"]
    # a clear margin on the 200 test items: more than 5 points above the base
    for variant in result.variants:
        for model, task in TASK_MODELS.items():
            own, base = variant.test_references[task], result.base[task]
            assert own > base + 0.05, (variant.name, model, variant.test_references, result.base)


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_homogeneous_task_arithmetic_keeps_every_task(demo) -> None:
    for variant in demo["result"].variants:
        if variant.setting == "homogeneous":
            assert list(variant.merges) == list(MERGE_SETS)
            for merge_set, methods in variant.merges.items():
                assert list(methods) == ["task_arithmetic"]
                kept = methods["task_arithmetic"]["normalized"]
                assert set(kept) == {TASK_MODELS[m] for m in MERGE_SETS[merge_set]}
                assert min(kept.values()) > 0, (variant.name, merge_set, kept)


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_heterogeneous_model_is_the_best_candidate_at_ten_times_the_rate(demo) -> None:
    result = demo["result"]
    config = result.manifest["config"]
    special = config["heterogeneous_model"]
    for variant in result.variants:
        special_model = variant.models[special]["training"]
        if variant.setting == "homogeneous":
            assert special_model["learning_rate"] == config["finetune"]["learning_rate"]
            continue
        assert special_model["learning_rate"] == pytest.approx(10 * config["finetune"]["learning_rate"])
        assert [c["steps"] for c in variant.candidates] == list(config["heterogeneous_steps"])
        best = max(c["validation_accuracy"] for c in variant.candidates)
        assert special_model["steps"] == min(c["steps"] for c in variant.candidates if c["validation_accuracy"] == best)
        for name in set(TASK_MODELS) - {special}:
            assert variant.models[name]["training"]["learning_rate"] == config["finetune"]["learning_rate"]


def expected_grid(method: str, norms: Dict[str, float], models) -> list:
    """The small size's grid written out by hand (λ ∈ {0.6, 1.0} outermost; FedGMA ρ ∈ {0.1, 1.0};
    CCLIP: one ρ, the smallest norm of the set), not through the demo's ``grid_points``."""
    lambdas = (0.6, 1.0)
    if method == "fedgma":
        return [{"lambda": lam, "rho": rho} for lam in lambdas for rho in (0.1, 1.0)]
    if method == "cclip":
        return [{"lambda": lam, "rho": min(norms[m] for m in models)} for lam in lambdas]
    return [{"lambda": lam} for lam in lambdas]


def reference_merge(method: str, parameters: Dict, base: Dict, states: list, training: list) -> Dict:
    """float64 merges from the paper's equations (CCLIP's norm over the whole task vector)."""
    import torch

    from tests.test_methods import ref_fedgma, ref_fednova, ref_median

    lam = parameters["lambda"]
    norms = [math.sqrt(sum(float(((s[n].double() - base[n].double()) ** 2).sum()) for n in base)) for s in states]
    merged = {}
    for name, tensor in base.items():
        tensors = [tensor, *(s[name] for s in states)]
        tau = [t.double() - tensor.double() for t in tensors[1:]]
        if method == "task_arithmetic":
            merged[name] = tensor.double() + lam * sum(tau)
        elif method == "fednova":
            merged[name] = ref_fednova(tensors, lam, [t[0] for t in training], [t[1] for t in training])
        elif method == "fedgma":
            merged[name] = ref_fedgma(tensors, lam, parameters["rho"])
        elif method == "median":
            merged[name] = ref_median(tensors, lam)
        else:
            merged[name] = tensor.double() + lam * sum(t * min(1.0, parameters["rho"] / n) for t, n in zip(tau, norms))
        assert merged[name].dtype == torch.float64
    return merged


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_merges_are_mergekit_merges_of_the_chosen_values(demo) -> None:
    from safetensors.torch import load_file

    result = demo["result"]
    models_dir = Path(result.out) / "models"
    by_name = {variant.name: variant for variant in result.variants}
    merged_with, checked = [], 0
    for variant in result.variants:
        for merge_set, methods in variant.merges.items():
            models = MERGE_SETS[merge_set]
            for method, entry in methods.items():
                merged_with.append(entry["merged_with"])
                recipe = yaml.safe_load(Path(entry["recipe"]).read_text())
                assert recipe["merge_method"] == method
                for key, value in entry["parameters"].items():
                    assert recipe["parameters"][key] == pytest.approx(value)
                searched = by_name[entry.get("searched_on", variant.name)]
                best = max(searched.sweep[merge_set][method], key=lambda row: row["average"])
                norms = {name: float(e["task_vector_norm"]) for name, e in variant.models.items()}
                searched_norms = {name: float(e["task_vector_norm"]) for name, e in searched.models.items()}
                grid, searched_grid = expected_grid(method, norms, models), expected_grid(method, searched_norms, models)
                # the searched variant's best point (the first of the best), at the same grid position for a seed that reuses it
                assert searched_grid[entry["grid_position"]] == pytest.approx(best["parameters"])
                assert grid[entry["grid_position"]] == pytest.approx(entry["parameters"])
                assert ("searched_on" in entry) == (variant.seed != result.variants[0].seed)
                paths = [Path(m["model"]) for m in recipe["models"]]
                assert [p.relative_to(models_dir).as_posix() for p in paths] == [variant.models[m]["path"] for m in models]
                if method == "fednova":
                    for model, name in zip(recipe["models"], models):
                        training = variant.models[name]["training"]
                        assert model["parameters"] == {"steps": training["steps"], "learning_rate": training["learning_rate"]}
                if "max_abs_difference_to_sweep_merge" in entry:  # mergekit's checkpoint against the formulas in float64
                    merged_dir = Path(result.out) / "merges" / variant.name / merge_set / method
                    merged = load_file(str(merged_dir / "model.safetensors"))
                    base = load_file(str(models_dir / "base" / "model.safetensors"))
                    states = [load_file(str(models_dir / variant.models[m]["path"] / "model.safetensors")) for m in models]
                    training = [(variant.models[m]["training"]["steps"], variant.models[m]["training"]["learning_rate"]) for m in models]
                    expected = reference_merge(method, entry["parameters"], base, states, training)
                    assert set(merged) == set(expected)
                    difference = max(float((merged[n].double() - expected[n]).abs().max()) for n in expected)
                    assert difference < 1e-5, (merge_set, method, difference)
                    checked += 1
                for task, value in entry["test"].items():
                    assert value == pytest.approx(sum(entry["items"][task]) / len(entry["items"][task]))
                    assert entry["normalized"][task] == pytest.approx(value / variant.test_references[task])
                assert entry["average"] == pytest.approx(sum(entry["normalized"].values()) / len(entry["normalized"]))
    assert checked == len(MERGE_SETS) * len(METHODS)
    assert merged_with.count("mergekit-yaml (subprocess)") == 1
    assert merged_with.count("mergekit run_merge (in process)") == len(MERGE_SETS) * len(METHODS) - 1


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_report_holds_both_settings_intervals_and_tallies(demo) -> None:
    saved, out = demo["saved"], demo["out"]
    comparisons = saved["comparisons"]
    report = (out / "report.md").read_text()
    seeds = saved["manifest"]["config"]["seeds"]
    for merge_set, entry in comparisons["settings"].items():
        sets = list(MERGE_SETS) if merge_set == "all" else [merge_set]
        for setting in ("homogeneous", "heterogeneous"):
            values = [v["merges"][s]["task_arithmetic"]["average"] for v in saved["variants"] if v["setting"] == setting for s in sets]
            assert entry[setting] == pytest.approx(sum(values) / len(values))
        interval = entry["difference"]
        assert interval["low"] <= interval["estimate"] <= interval["high"]
        assert interval["estimate"] == pytest.approx(entry["heterogeneous"] - entry["homogeneous"])
        row = re.search(rf"\| {merge_set} +\| ([\d.]+) +\| ([\d.]+) +\| ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", report)
        assert row, merge_set
        assert [float(g) for g in row.groups()] == pytest.approx(
            [100 * entry["homogeneous"], 100 * entry["heterogeneous"], 100 * interval["estimate"], 100 * interval["low"], 100 * interval["high"]], abs=0.051
        )
    assert set(comparisons["methods"]) == set(METHODS) - {"task_arithmetic"}
    for method, entry in comparisons["methods"].items():
        assert sum(entry["tally"].values()) == len(MERGE_SETS) * len(seeds) == len(entry["cases"])
        for case in entry["cases"]:
            assert case["verdict"] == ("improved" if case["low"] > 0 else "degraded" if case["high"] < 0 else "unchanged")
        tally = entry["tally"]
        label = {"fednova": "FedNova", "fedgma": "FedGMA", "median": "Median", "cclip": "CCLIP"}[method]
        assert re.search(rf"\| {label} +\| {tally['improved']} +\| {tally['unchanged']} +\| {tally['degraded']} +\|", report), label
    assert "χ²(p‖w)" in report and (out / "normalized_accuracy.png").stat().st_size > 10_000
    for variant in saved["variants"]:
        for model in TASK_MODELS:
            assert f"{variant['models'][model]['task_vector_norm']:.2f}" in report
    assert "within noise" in report


@pytest.mark.slow
@pytest.mark.timeout(END_TO_END_TIMEOUT_S)
def test_demo_reuses_its_build_only_while_it_matches(demo, tmp_path: Path) -> None:
    out, manifest = demo["out"], demo["result"].manifest
    config = SIZES["small"].build
    logged = []
    assert build_models(out, config, log=logged.append) == manifest
    assert logged == [f"Models: reusing the build in {out / 'models'} (key {manifest['key']}; --rebuild builds them again)"]
    models_dir = out / "models"
    assert cache_key(replace(config, seed=1)) != manifest["key"]
    assert cached_manifest(models_dir, cache_key(replace(config, seed=1))) is None
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    assert cached_manifest(copy, manifest["key"]) == manifest
    (copy / f"seed{config.seeds[-1]}" / candidate_name(config, config.heterogeneous_steps[0]) / "model.safetensors").unlink()
    assert cached_manifest(copy, manifest["key"]) is None


def test_state_digest_tells_merges_apart_bit_for_bit() -> None:
    import torch

    from fedmerge_plugins.demo.evaluate import state_digest

    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    same = {"b": torch.ones(2), "a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert state_digest(state) == state_digest(same)
    nudged = dict(state, b=torch.nextafter(torch.ones(2), torch.full((2,), 2.0)))
    assert state_digest(nudged) != state_digest(state)
    assert state_digest(dict(state, a=state["a"].reshape(3, 2))) != state_digest(state)
    assert state_digest(dict(state, b=torch.ones(2, dtype=torch.float64))) != state_digest(state)


# ----------------------------------------------------------------------------- build in worker processes


def _model_digests(models_dir: Path) -> Dict[str, str]:
    import hashlib

    return {str(p.relative_to(models_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(models_dir.rglob("model.safetensors"))}


@pytest.mark.slow
def test_build_is_the_same_bits_with_one_and_two_worker_processes(tmp_path: Path) -> None:
    from fedmerge_plugins.demo.build import SIZES as BUILD_SIZES

    config = BUILD_SIZES["tiny"]
    manifests = {workers: build_models(tmp_path / f"w{workers}", config, workers=workers, log=lambda line: None) for workers in (1, 2)}
    one, two = (_model_digests(tmp_path / f"w{w}" / "models") for w in (1, 2))
    # base + per seed the three task models and every heterogeneous candidate
    assert len(one) == 1 + len(config.seeds) * (len(TASK_MODELS) + len(config.heterogeneous_steps))
    assert one == two
    strip = lambda m: {s: {n: e["task_vector_norm"] for n, e in models.items()} for s, models in m["seeds"].items()}  # noqa: E731
    assert strip(manifests[1]) == strip(manifests[2])
    assert manifests[1]["key"] == manifests[2]["key"]


def test_load_warning_names_the_load_and_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from fedmerge_plugins.demo.pool import load_warning

    monkeypatch.setattr(os, "getloadavg", lambda: (5.25, 1.0, 1.0))
    assert load_warning(2) == (
        "warning: load average 5.2 on 2 core(s): other processes compete with the demo, which will run slower (its results do not change)"
    )
    assert load_warning(8) is None


# ----------------------------------------------------------------------------- report of a synthetic run


@pytest.fixture
def synthetic_result() -> Dict:
    """A demo result with random item scores (no models): what ``compare`` and ``report`` read."""
    from dataclasses import asdict

    from fedmerge_plugins.demo.environment import describe
    from fedmerge_plugins.demo.variants import SETTING_METHODS

    rng = np.random.default_rng(7)
    config = asdict(replace(SIZES["small"].build, n_test=20))
    items = lambda p: (rng.random(20) < p).astype(float).tolist()  # noqa: E731
    variants = []
    for seed in config["seeds"]:
        for setting in ("homogeneous", "heterogeneous"):
            models = {
                name: {"path": f"seed{seed}/{name}" + ("-x10-150" if setting == "heterogeneous" and name == "code" else ""), "task": task, "task_vector_norm": 5.0 + rng.random(),
                       "training": {"steps": 150, "learning_rate": 3e-4 * (10 if setting == "heterogeneous" and name == "code" else 1)}}
                for name, task in TASK_MODELS.items()
            }
            reference = {task: items(0.8) for task in TASK_MODELS.values()}
            merges = {}
            for merge_set, names in MERGE_SETS.items():
                merges[merge_set] = {}
                for method in SETTING_METHODS[setting]:
                    scored = {TASK_MODELS[n]: items(0.6) for n in names}
                    norm = {t: np.mean(v) / np.mean(reference[t]) for t, v in scored.items()}
                    merges[merge_set][method] = {"parameters": {"lambda": 1.0}, "items": scored, "test": {t: float(np.mean(v)) for t, v in scored.items()},
                                                 "normalized": norm, "average": float(np.mean(list(norm.values())))}
            variants.append({"seed": seed, "setting": setting, "models": models, "reference_items": reference,
                             "test_references": {t: float(np.mean(v)) for t, v in reference.items()},
                             "candidates": [{"model": "c", "steps": 150, "validation_accuracy": 0.5}] if setting == "heterogeneous" else [],
                             "merges": merges, "sweep": {}})
    settings = {"lambdas": [0.6, 1.0], "fedgma_rhos": [0.1, 1.0], "cclip_count": 1, "max_gen_toks": 32, "search_each_seed": False}
    environment = describe(workers=2, threads=1, cores=2, build_key="0123456789abcdef")
    return {"out": "/tmp/x", "size": "small", "settings": settings, "manifest": {"config": config}, "base": {t: 0.1 for t in TASK_MODELS.values()},
            "variants": variants, "timings": {"total": 1.0}, "environment": environment}


def test_chart_error_bars_are_the_bootstrap_intervals_of_each_bar(synthetic_result, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    from fedmerge_plugins.demo.compare import compare
    from fedmerge_plugins.demo.report import draw_chart

    samples = 300
    result = {**synthetic_result, "comparisons": compare(synthetic_result, samples)}
    drawn = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, height, *a, **k: drawn.append((list(height), k.get("yerr"), k.get("label"))) or original(self, x, height, *a, **k))
    draw_chart(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    assert len(drawn) == 1 + len(METHODS)  # homogeneous task arithmetic, then every method heterogeneous
    # independent bootstrap: the same seeded draws (numpy's generator, tasks in sorted order), percentiles by hand
    rng = np.random.default_rng(0)
    counts = {t: 20 for t in sorted(TASK_MODELS.values())}
    indices = {t: rng.integers(0, n, size=(samples, n)) for t, n in counts.items()}
    series = [("homogeneous", "task_arithmetic"), *(("heterogeneous", m) for m in METHODS)]
    for (heights, errors, label), (setting, method) in zip(drawn, series):
        assert setting in label
        variants = [v for v in synthetic_result["variants"] if v["setting"] == setting]
        for k, merge_set in enumerate(MERGE_SETS):
            per_draw = []
            for d in range(samples):
                values = []
                for v in variants:
                    scored = v["merges"][merge_set][method]["items"]
                    values.append(np.mean([np.mean(np.asarray(scored[t])[indices[t][d]]) / np.mean(np.asarray(v["reference_items"][t])[indices[t][d]]) for t in scored]))
                per_draw.append(np.mean(values))
            low, high = np.nanpercentile(per_draw, [2.5, 97.5])
            mean = np.mean([v["merges"][merge_set][method]["average"] for v in variants])
            assert heights[k] == pytest.approx(100 * mean)
            assert errors[0][k] == pytest.approx(100 * (mean - low)) and errors[1][k] == pytest.approx(100 * (high - mean))


def test_report_records_the_environment(synthetic_result, tmp_path: Path) -> None:
    from fedmerge_plugins.demo.environment import cpu_info
    from fedmerge_plugins.demo.report import write_report

    out = tmp_path / "out"
    out.mkdir()
    from fedmerge_plugins.demo.compare import compare

    write_report({**synthetic_result, "comparisons": compare(synthetic_result, 50)}, out, log=lambda line: None)
    report, saved = (out / "report.md").read_text(), json.loads((out / "results.json").read_text())
    model, flags = cpu_info()
    from importlib.metadata import version

    environment = saved["environment"]
    assert (environment["cpu"], environment["vector_flags"]) == (model, flags)
    assert environment["versions"]["torch"] == version("torch") and environment["versions"]["lm_eval"] == version("lm_eval")
    assert environment["build_key"] == "0123456789abcdef"
    section = report.split("## Environment", 1)[1].split("##", 1)[0]
    for needle in (model, " ".join(flags), f"torch {version('torch')}", f"transformers {version('transformers')}", f"mergekit {version('mergekit')}",
                   f"lm-eval {version('lm_eval')}", "Python 3.", "`0123456789abcdef`", "2 worker process(es), 1 torch thread each", "1 torch thread(s)"):
        assert needle in section, needle


def test_cpu_info_reads_model_and_vector_flags(tmp_path: Path) -> None:
    from fedmerge_plugins.demo.environment import cpu_info

    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f fma pni\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_info(path) == ("Some CPU 9000", ["avx2", "avx512f", "fma", "sse2"])
