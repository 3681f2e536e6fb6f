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

from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.build import SIZES as BUILD_SIZES
from fedmerge_plugins.demo.build import TASK_MODELS, build_models, cache_key, cached_manifest
from fedmerge_plugins.demo.recipes import MERGE_SETS, METHODS, fill_template, template_fields, template_path
from fedmerge_plugins.demo.report import margin_sentence, ranking, winner
from fedmerge_plugins.demo.run import SIZES, DemoSettings, candidates, normalized, run_demo
from fedmerge_plugins.recipe import check_recipe

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
def test_fedgma_candidates_merge_each_agreement_threshold_once(models) -> None:
    rhos = tuple(round(0.1 * i, 1) for i in range(1, 11))
    settings = replace(SIZES["small"], lambdas=(0.5, 1.0), fedgma_rhos=rhos)
    points = candidates("fedgma", models, {}, settings)
    count = len(models)
    # the smallest agreement count kept at mask 1 is ⌈ρ T⌉ (ρ = 0 would be 0)
    classes: Dict[int, list] = {}
    for rho in rhos:
        classes.setdefault(math.ceil(round(rho * count, 9)), []).append(rho)
    assert len(points) == len(classes) * 2
    firsts = sorted({p.values["rho"] for p in points})
    assert firsts == sorted(group[0] for group in classes.values())
    for point in points:
        group = next(g for g in classes.values() if g[0] == point.values["rho"])
        assert list(point.same_as) == group[1:]


def test_cclip_candidates_span_the_task_vector_norms() -> None:
    settings = replace(SIZES["small"], lambdas=(1.0,), cclip_count=4)
    norms = {"instruction": 6.0, "math": 22.0, "code": 8.0}
    rhos = [p.values["rho"] for p in candidates("cclip", ("instruction", "math"), norms, settings)]
    assert rhos == pytest.approx([6.0, 10.0, 14.0, 18.0])


def test_normalized_accuracy_and_zero_reference() -> None:
    assert normalized({"gsm8k": 0.3, "instruct": 0.5}, {"gsm8k": 0.6, "instruct": 0.5}) == {"gsm8k": 0.5, "instruct": 1.0}
    with pytest.raises(ValueError, match="math model scores 0 on its own gsm8k"):
        normalized({"gsm8k": 0.3}, {"gsm8k": 0.0})


@pytest.mark.parametrize("merge_set", list(MERGE_SETS))
@pytest.mark.parametrize("method", METHODS)
def test_every_template_fills_into_a_valid_recipe(tmp_path: Path, merge_set: str, method: str) -> None:
    path = template_path(merge_set, method)
    text = path.read_text()
    values = {"models": str(tmp_path), "lambda": 0.8, "rho": 0.3 if method == "fedgma" else 7.5}
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


def test_margin_sentence_states_the_winner_and_its_lead() -> None:
    scores = {"task_arithmetic": 0.5, "fednova": 0.4, "fedgma": 0.55, "median": 0.3, "cclip": 0.7}
    ranked = ranking(scores)
    assert [m for m, _ in ranked] == ["cclip", "fedgma", "task_arithmetic", "fednova", "median"]
    assert margin_sentence(ranked) == (
        "CCLIP with 70.0, 15.0 points ahead of FedGMA (55.0) and 20.0 ahead of Task Arithmetic (50.0)"
    )
    tie = ranking({**scores, "task_arithmetic": 0.7})
    assert margin_sentence(tie).startswith("a tie between Task Arithmetic, CCLIP at 70.0")


# ----------------------------------------------------------------------------- end to end

TEST_SETTINGS = DemoSettings(
    build=replace(
        BUILD_SIZES["full"].scaled(pretrain_steps=500, finetune_fraction=1.0, corpus_documents=5000),
        n_validation=8,
        n_test=20,
    ),
    lambdas=(0.6, 1.0),
    fedgma_rhos=(0.1, 1.0),
    cclip_count=1,
    max_gen_toks=32,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dict:
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, "test", settings=TEST_SETTINGS, log=lambda line: None)
    return {"out": out, "result": result, "saved": json.loads((out / "results.json").read_text())}


@pytest.mark.slow
def test_demo_task_models_beat_the_base_on_their_own_task(demo) -> None:
    references = demo["result"].references
    for model, task in TASK_MODELS.items():
        assert references[model][task] > references["base"][task], (model, references)


@pytest.mark.slow
def test_demo_merges_are_mergekit_merges_of_the_chosen_values(demo) -> None:
    result = demo["result"]
    manifest = result.manifest
    for merge_set, methods in result.merges.items():
        for method, entry in methods.items():
            assert entry["max_abs_difference_to_sweep_merge"] < 1e-5, (merge_set, method)
            recipe = yaml.safe_load(Path(entry["recipe"]).read_text())
            assert recipe["merge_method"] == method
            for key, value in entry["parameters"].items():
                assert recipe["parameters"][key] == pytest.approx(value)
            best = max(result.sweep[merge_set][method], key=lambda row: row["average"])
            assert entry["parameters"] == best["parameters"]
            if method == "fednova":
                for model in recipe["models"]:
                    training = manifest["models"][Path(model["model"]).name]["training"]
                    assert model["parameters"] == {"steps": training["steps"], "learning_rate": training["learning_rate"]}
            references = {task: result.references[m][task] for m, task in TASK_MODELS.items()}
            for task, value in entry["test"].items():
                assert entry["normalized"][task] == pytest.approx(value / references[task])
            assert entry["average"] == pytest.approx(sum(entry["normalized"].values()) / len(entry["normalized"]))
    merged_with = [e["merged_with"] for methods in result.merges.values() for e in methods.values()]
    assert merged_with.count("mergekit-yaml (subprocess)") == 1


@pytest.mark.slow
def test_demo_methods_differ_and_the_report_names_the_winner(demo) -> None:
    saved, out = demo["saved"], demo["out"]
    averages = {(s, m): e["average"] for s, methods in saved["merges"].items() for m, e in methods.items()}
    assert len(set(averages.values())) > 1
    best, top, second, runner = winner(saved)
    overall = {m: sum(averages[(s, m)] for s in MERGE_SETS) / len(MERGE_SETS) for m in METHODS}
    assert overall[best] == pytest.approx(max(overall.values())) and top == pytest.approx(overall[best])
    report = (out / "report.md").read_text()
    lead = re.search(r"Overall winner: \*\*(.+?)\*\*, mean average normalized accuracy ([\d.]+) .*?, ([\d.]+) points ahead", report)
    assert lead, report[:2000]
    assert float(lead.group(2)) == pytest.approx(100 * top, abs=0.051)
    assert float(lead.group(3)) == pytest.approx(100 * (top - runner), abs=0.051)
    assert "Task vector norms" in report and (out / "normalized_accuracy.png").stat().st_size > 10_000
    for model in TASK_MODELS:
        norm = saved["manifest"]["models"][model]["task_vector_norm"]
        assert f"{norm:.2f}" in report
    assert saved["manifest"]["models"]["math"]["task_vector_norm"] == max(
        saved["manifest"]["models"][m]["task_vector_norm"] for m in TASK_MODELS
    )


@pytest.mark.slow
def test_demo_reuses_its_build_only_while_it_matches(demo, tmp_path: Path) -> None:
    out, manifest = demo["out"], demo["result"].manifest
    logged = []
    assert build_models(out, TEST_SETTINGS.build, log=logged.append) == manifest
    assert logged == [f"Models: reusing the build in {out / 'models'} (key {manifest['key']}; --rebuild builds them again)"]
    models_dir = out / "models"
    assert cache_key(replace(TEST_SETTINGS.build, seed=1)) != manifest["key"]
    assert cached_manifest(models_dir, cache_key(replace(TEST_SETTINGS.build, seed=1))) is None
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    assert cached_manifest(copy, manifest["key"]) == manifest
    (copy / "code" / "model.safetensors").unlink()
    assert cached_manifest(copy, manifest["key"]) is None
