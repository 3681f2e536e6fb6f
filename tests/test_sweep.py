"""``fedmerge sweep`` on tiny checkpoints: grid syntax; every input tensor read once;
scores against float64 merges; the disk fallback; a SIGKILLed sweep resumed; the winning
recipe merged again by ``mergekit-yaml`` (fresh norm cache) equal bit for bit."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.sweep.evaluators import LmEvalEvaluator, PythonEvaluator, selection_score
from fedmerge_plugins.sweep.grid import expand, parse_values
from fedmerge_plugins.sweep.run import run_sweep
from tests.support.synthetic import Family, make_family
from tests.conftest import BIN

NAMES = ["instruct", "math", "code"]
LAMBDAS = "0.4:1.2:0.4"

EVALUATOR = '''
import os, signal
from safetensors.torch import load_file

def score(model_dir):
    """-||merged - goal||^2 (float64) and a constant; logs each call; SIGKILLs itself on call KILL_AT."""
    with open({log!r}, "a") as handle:
        handle.write(os.path.basename(model_dir) + "\\n")
    with open({log!r}) as handle:
        calls = len(handle.readlines())
    if os.environ.get("KILL_AT") and calls == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    merged = load_file(os.path.join(model_dir, "model.safetensors"))
    goal = load_file({goal!r})
    distance = sum(float((merged[k].double() - goal[k].double()).pow(2).sum()) for k in merged)
    return {{"closeness": -distance, "constant": 1.0}}
'''


def with_goal(family: Family) -> Family:
    """Save the goal model base + 0.8 (τ_instruct + τ_math + 0.1 τ_code) that the test
    evaluator scores closeness to (optimum: clip the outlier, λ below 1)."""
    goal = {}
    for name, base in family.base_tensors.items():
        tau = [t[name][: base.shape[0]].double() - base.double() for t in family.task_tensors]
        goal[name] = (base.double() + 0.8 * (tau[0] + tau[1] + 0.1 * tau[2])).float().contiguous()
    save_file(goal, str(family.base.parent / "goal.safetensors"))
    return family


def tiny_family(root: Path) -> Family:
    """instruct, math (one extra vocabulary row), code (10x outlier), in two shards each."""
    return with_goal(make_family(root, scales=(0.01, 0.02, 0.2), names=NAMES, extra_tokens=(0, 1, 0), shards=2))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return tiny_family(tmp_path_factory.mktemp("sweep-family"))


def write_recipe(family: Family, directory: Path, method: str = "cclip", parameters: Dict | None = None, per_model: Dict | None = None) -> Path:
    recipe = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(p), **({"parameters": per_model} if per_model else {})} for p in family.tasks],
        "parameters": parameters or {"lambda": 1.0, "rho": 1.0},
        "tokenizer": {"source": "base"},
        "dtype": "float32",
    }
    path = directory / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def evaluator_spec(family: Family, directory: Path) -> Tuple[str, Path]:
    log = directory / "calls.log"
    module = directory / "goal_evaluator.py"
    module.write_text(EVALUATOR.format(log=str(log), goal=str(family.base.parent / "goal.safetensors")))
    return f"python:{module}:score", log


def expected_selections(family: Family, points: List[Tuple[float, float]]) -> Dict[Tuple[float, float], float]:
    """The test evaluator's selection score of each (λ, ρ), from float64 cclip merges."""
    goal = load_file(str(family.base.parent / "goal.safetensors"))
    base = family.base_tensors
    tau = {n: [t[n][: b.shape[0]].double() - b.double() for t in family.task_tensors] for n, b in base.items()}
    norms = [math.sqrt(sum(float(v[t].pow(2).sum()) for v in tau.values())) for t in range(3)]
    result = {}
    for lam, rho in points:
        distance = 0.0
        for name, vectors in tau.items():
            merged = base[name].double() + lam * sum(v * min(1.0, rho / n) for v, n in zip(vectors, norms))
            distance += float((merged - goal[name].double()).pow(2).sum())
        result[(lam, rho)] = (1.0 - distance) / 2
    return result


def grid_of(records) -> List[Tuple[float, float]]:
    return [(r["parameters"]["lambda"], r["parameters"]["rho"]) for r in records]


# ---- grids, points, evaluators -----------------------------------------------------------


def test_grid_syntax() -> None:
    assert parse_values("0.2:1.0:0.2", "--lambda") == [0.2, 0.4, 0.6, 0.8, 1.0]
    clip = parse_values("0.05:2.0:0.05", "--lambda")
    assert len(clip) == 40 and clip[2] == 0.15 and clip[-1] == 2.0
    assert parse_values("0.3, 0.5,1", "--rho") == [0.3, 0.5, 1.0]
    for bad in ("1:0:0.1", "a,b", "0.1:0.5", "0.5,0.5"):
        with pytest.raises(FedmergeError, match="--lambda"):
            parse_values(bad, "--lambda")
    points = expand({"lambda": [0.5, 1.0], "rho": [0.1, 0.2, 0.3]})
    assert [p.parameters for p in points[:4]] == [
        {"lambda": 0.5, "rho": 0.1}, {"lambda": 0.5, "rho": 0.2}, {"lambda": 0.5, "rho": 0.3}, {"lambda": 1.0, "rho": 0.1}
    ]
    assert [p.index for p in points] == list(range(6))
    assert json.loads(points[1].key) == {"lambda": 0.5, "rho": 0.2}


def test_selection_score_is_mean_or_mean_normalized() -> None:
    assert selection_score({"gsm8k": 0.5, "mbpp": 0.25}) == 0.375
    assert selection_score({"gsm8k": 0.5, "mbpp": 0.25}, {"gsm8k": 0.625, "mbpp": 0.5}) == pytest.approx(0.65)
    with pytest.raises(FedmergeError, match="no score for mbpp"):
        selection_score({"gsm8k": 0.5}, {"gsm8k": 0.6, "mbpp": 0.5})


def test_lm_eval_adapter_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fedmerge_plugins.evaluation import api

    calls = []

    def fake_evaluate_model(model_dir, tasks, **options):
        calls.append((model_dir, tasks, options))
        return api.EvalResult(scores={"gsm8k": 0.5, "mbpp": 0.25}, raw={})

    monkeypatch.setattr(api, "evaluate_model", fake_evaluate_model)
    (tmp_path / "gsm8k.jsonl").write_text("{}\n")
    (tmp_path / "mbpp.jsonl").write_text("{}\n")
    evaluator = LmEvalEvaluator(["gsm8k", "mbpp"], data_dir=tmp_path, split="validation", validation_fraction=0.2,
                                limit=3, allow_code_execution=True, device="cpu")
    assert evaluator.evaluate(tmp_path / "m") == {"gsm8k": 0.5, "mbpp": 0.25}
    assert calls[0][1] == ("gsm8k", "mbpp")
    assert calls[0][2]["split"] == "validation" and calls[0][2]["limit"] == 3
    assert "gsm8k,mbpp" in evaluator.description
    with pytest.raises(FedmergeError, match="run model-written code"):
        LmEvalEvaluator(["mbpp"], data_dir=tmp_path)


def test_clip_adapter_scores_normalized_accuracy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fedmerge_plugins.clip import evaluate as clip_evaluate
    from fedmerge_plugins.sweep.evaluators import ClipEvaluator

    sessions, calls = [], []

    class FakeSession:
        def __init__(self, **options):
            sessions.append(options)

    def fake_evaluate_tower(session, merged, tasks, finetuned, split):
        calls.append((merged, tasks, finetuned, split))
        return {t: {"accuracy": 0.5, "finetuned_accuracy": 0.8, "normalized_accuracy": 0.625} for t in tasks}

    monkeypatch.setattr(clip_evaluate, "Session", FakeSession)
    monkeypatch.setattr(clip_evaluate, "evaluate_tower", fake_evaluate_tower)
    for task in ("svhn", "mnist"):
        (tmp_path / "towers" / task).mkdir(parents=True)
    evaluator = ClipEvaluator(["SVHN", "mnist"], data_dir=tmp_path, models_dir=tmp_path / "towers", batch_size=4)
    assert evaluator.evaluate(tmp_path / "m1") == {"svhn": 0.625, "mnist": 0.625}
    evaluator.evaluate(tmp_path / "m2")
    assert len(sessions) == 1 and sessions[0]["batch_size"] == 4  # CLIP and the data loaded once
    assert calls[1] == (str(tmp_path / "m2"), ("svhn", "mnist"), {t: str(tmp_path / "towers" / t) for t in ("svhn", "mnist")}, "validation")
    with pytest.raises(FedmergeError, match="--data-dir"):
        ClipEvaluator(["svhn"], data_dir=None)


def test_bad_requests_fail_before_any_output(family: Family, tmp_path: Path) -> None:
    spec, _ = evaluator_spec(family, tmp_path)
    evaluator = PythonEvaluator(spec)
    cases = [
        ("median", {"lambda": 1.0}, {"rhos": "0.1,0.2"}, "median has no shared parameter `rho`"),
        ("task_arithmetic", {"lambda": 1.0}, {"rhos": "paper"}, "no shared parameter `rho`"),
        ("fedgma", {"lambda": 1.0, "rho": 0.5}, {"rhos": "0.5,1.5"}, "rho=1.5"),
        ("cclip", {"lambda": 1.0, "rho": 1.0}, {}, "nothing to sweep"),
        ("task_arithmetic", {"lambda": 1.0}, {"lambdas": "0.5,1"}, "the recipe sets `lambda` in model"),
    ]
    for method, parameters, grid, needle in cases:
        per_model = {"weight": 1.0, "lambda": 0.5} if method == "task_arithmetic" else None
        recipe = write_recipe(family, tmp_path, method, parameters, per_model)
        with pytest.raises(FedmergeError) as error:
            run_sweep(recipe, tmp_path / "out", evaluator, **grid)
        assert needle in str(error.value), (method, str(error.value))
        assert not (tmp_path / "out").exists()
    with pytest.raises(FedmergeError, match="missing"):
        PythonEvaluator(f"python:{tmp_path / 'goal_evaluator.py'}:missing")


# ---- in-process sweeps -------------------------------------------------------------------


def count_reads(monkeypatch: pytest.MonkeyPatch) -> Tuple[Counter, Counter]:
    """Count tensor reads (LazyTensorLoader.get_tensor, the only path mergekit and
    fedmerge's norms read weights by) and shard-file opens."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.io.loader import TensorLoader

    tensors: Counter = Counter()
    opens: Counter = Counter()
    get_tensor, get_loader = LazyTensorLoader.get_tensor, TensorLoader.get.__func__

    def counting_get_tensor(self, key, *args, **kwargs):
        tensors[(self.index.base_path, key)] += 1
        return get_tensor(self, key, *args, **kwargs)

    def counting_open(cls, path, *args, **kwargs):
        opens[path] += 1
        return get_loader(cls, path, *args, **kwargs)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counting_get_tensor)
    monkeypatch.setattr(TensorLoader, "get", classmethod(counting_open))
    return tensors, opens


def test_in_memory_sweep_reads_every_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    family = tiny_family(tmp_path / "models")  # paths no earlier test has opened
    spec, log = evaluator_spec(family, tmp_path)
    tensors, opens = count_reads(monkeypatch)
    outcome = run_sweep(write_recipe(family, tmp_path), tmp_path / "out", PythonEvaluator(spec),
                        lambdas="0.5,1.0", rhos="paper", echo=lambda line: None)
    assert outcome.mode == "memory"
    assert len(outcome.points) == 10 and len(log.read_text().splitlines()) == 10
    every_tensor = {(str(p), name) for p, t in zip([family.base, *family.tasks], [family.base_tensors, *family.task_tensors]) for name in t}
    assert set(tensors) == every_tensor  # cclip's norms, the ρ grid and 10 merges ...
    assert set(tensors.values()) == {1}  # ... from one read of each tensor
    assert len(opens) == 8 and set(opens.values()) == {1}  # 4 checkpoints x 2 shards, each opened once
    assert not (tmp_path / "out" / "merges").exists() or not any((tmp_path / "out" / "merges").iterdir())


def test_disk_fallback_says_so_and_scores_the_same(family: Family, tmp_path: Path) -> None:
    spec, _ = evaluator_spec(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    lines: List[str] = []
    memory = run_sweep(recipe, tmp_path / "memory", PythonEvaluator(spec), lambdas=LAMBDAS, rhos="paper", echo=lines.append)
    disk = run_sweep(recipe, tmp_path / "disk", PythonEvaluator(spec), lambdas=LAMBDAS, rhos="paper",
                     max_memory=1000, echo=lines.append)
    assert (memory.mode, disk.mode) == ("memory", "disk")
    assert any("too large to hold in memory" in line and "from disk" in line for line in lines)
    assert {k: r["selection"] for k, r in memory.records.items()} == {k: r["selection"] for k, r in disk.records.items()}
    assert len(memory.records) == 15
    expected = expected_selections(family, grid_of(memory.records.values()))
    for key, record in zip(expected, memory.records.values()):
        assert record["selection"] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    best = max(expected, key=expected.get)
    runner_up = sorted(expected.values())[-2]
    assert expected[best] - runner_up > 1e-4  # a clear winner, so the check below means something
    assert (memory.best["parameters"]["lambda"], memory.best["parameters"]["rho"]) == best
    assert 0 < best[1] < max(memory.norms)  # the winner clips the outlier
    winner = yaml.safe_load(memory.winner_recipe.read_text())
    assert winner["parameters"] == {"lambda": best[0], "rho": best[1]}
    assert winner["models"] == yaml.safe_load(recipe.read_text())["models"]


# ---- the command, killed and resumed; the winner through mergekit-yaml -----------------------


@pytest.mark.slow
def test_killed_sweep_resumes_and_winner_reproduces_bit_for_bit(family: Family, tmp_path: Path) -> None:
    """``fedmerge sweep`` SIGKILLed while scoring its 5th point, resumed; then the winning
    recipe through ``mergekit-yaml`` with an empty norm cache, against the kept merge."""
    spec, log = evaluator_spec(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    out = tmp_path / "out"
    command = [str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", LAMBDAS, "--rho", "paper",
               "--eval", spec, "--out", str(out), "--keep-merges"]

    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_AT": "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    results = out / "results.jsonl"
    first = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["index"] for r in first] == [0, 1, 2, 3]
    with open(results, "a") as handle:  # as if the kill had cut a write short
        handle.write('{"key": "{\\"lambda\\": 0.8')

    lines: List[str] = []  # the same sweep again, in this process (the command is checked above)
    run_sweep(recipe, out, PythonEvaluator(spec), lambdas=LAMBDAS, rhos="paper", keep_merges=True, echo=lines.append)
    assert any("4 already in" in line for line in lines)
    calls = log.read_text().split()
    assert calls[:5] == [f"point-{i:04d}" for i in range(5)]
    assert calls[5:] == [f"point-{i:04d}" for i in range(4, 15)]  # the killed point again, then the rest
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["index"] for r in records) == list(range(15))
    expected = expected_selections(family, grid_of(records))
    best = max(records, key=lambda r: r["selection"])
    assert (best["parameters"]["lambda"], best["parameters"]["rho"]) == max(expected, key=expected.get)
    assert yaml.safe_load((out / "winner.yml").read_text())["parameters"] == best["parameters"]

    fresh_cache = {**os.environ, "FEDMERGE_CACHE_DIR": str(tmp_path / "fresh-cache")}  # norms recomputed from disk
    merged = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(out / "winner.yml"), str(tmp_path / "again"), "--no-write-model-card"],
        capture_output=True, text=True, timeout=300, env=fresh_cache,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "task-vector norm of" in merged.stderr  # it did compute the norms itself
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    swept = load_file(str(out / "merges" / f"point-{best['index']:04d}" / "model.safetensors"))
    assert set(again) == set(swept) == set(family.base_tensors)
    for name in again:
        assert again[name].dtype == swept[name].dtype and again[name].shape == swept[name].shape
        assert torch.equal(again[name].view(torch.int32), swept[name].view(torch.int32)), name


# ---- a real lm-eval evaluation --------------------------------------------------------------


def chain_world(tmp_path: Path) -> Tuple[Path, Path]:
    """Chain models (tests/eval_fixtures.py) whose greedy answer to the GSM8K prompt is "8"
    (base) or "7" (task), a one-item GSM8K file and a median recipe: (recipe, data folder)."""
    from tests.eval_fixtures import write_answer_pair, write_jsonl

    base, task = write_answer_pair(tmp_path)
    data = write_jsonl(tmp_path / "data" / "gsm8k.jsonl", [{"question": "What is 3 plus 4?", "answer": "#### 7"}]).parent
    recipe = tmp_path / "median.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "median", "base_model": str(base),
                                      "models": [{"model": str(task)}], "parameters": {"lambda": 1.0}}))
    return recipe, data


@pytest.mark.slow
def test_sweep_selects_lambda_with_lm_eval(tmp_path: Path) -> None:
    """Chain models (tests/eval_fixtures.py) whose greedy answer to the GSM8K prompt is
    "8" (base) or "7" (task): the λ-merge answers 7 once λ > 1/2. lm-eval scores each
    point; ties go to the earlier point, so λ = 0.6 wins over 1.0."""
    recipe, data = chain_world(tmp_path)
    evaluator = LmEvalEvaluator(["gsm8k"], data_dir=data, split="test", batch_size=1, max_gen_toks=16, device="cpu")
    outcome = run_sweep(recipe, tmp_path / "out", evaluator, lambdas="0.2:1.0:0.4", echo=lambda line: None)
    assert [(r["parameters"]["lambda"], r["scores"]) for r in outcome.records.values()] == [
        (0.2, {"gsm8k": 0.0}), (0.6, {"gsm8k": 1.0}), (1.0, {"gsm8k": 1.0})
    ]
    assert outcome.best["parameters"] == {"lambda": 0.6}
