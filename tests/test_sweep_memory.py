"""Grid points merged into one loaded model: a Python evaluator taking ``model`` scores every
point exactly as the folder protocol does, D is computed once per ρ, the winner's in-memory
weights equal ``mergekit-yaml`` of ``winner.yml`` bit for bit; lm-eval's scores equal
``fedmerge eval`` of the same merges."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import List

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedmerge_plugins.sweep.evaluators import PythonEvaluator
from fedmerge_plugins.sweep.run import run_sweep
from tests.conftest import BIN
from tests.test_sweep import Family, count_reads, tiny_family, write_recipe

EVALUATORS = '''
import os
import signal
from safetensors.torch import load_file, save_file

GOAL = {goal!r}
SAVED = {saved!r}


def closeness(tensors):
    goal = load_file(GOAL)
    return -sum(float((tensors[k].double() - goal[k].double()).pow(2).sum()) for k in sorted(goal))


def from_folder(model_dir):
    return {{"closeness": closeness(load_file(os.path.join(model_dir, "model.safetensors")))}}


def from_model(model):
    state = {{k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
    os.makedirs(SAVED, exist_ok=True)
    if os.environ.get("KILL_AT") and len(os.listdir(SAVED)) + 1 == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    save_file(state, os.path.join(SAVED, f"{{len(os.listdir(SAVED)):04d}}.safetensors"))
    return {{"closeness": closeness(state)}}
'''


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return tiny_family(tmp_path_factory.mktemp("memory-family"))


def evaluators(family: Family, directory: Path) -> Path:
    module = directory / "evaluators.py"
    module.write_text(EVALUATORS.format(goal=str(family.base.parent / "goal.safetensors"), saved=str(directory / "saved")))
    return module


def test_model_evaluator_scores_as_the_folder_protocol_and_the_winner_reproduces(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmerge_plugins.sweep.factored as factored

    module = evaluators(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    captures: List[str] = []
    capture = factored.capture
    monkeypatch.setattr(factored, "capture", lambda config, options, **kw: captures.append(config.parameters["rho"]) or capture(config, options, **kw))
    lines: List[str] = []
    tensors, _ = count_reads(monkeypatch)
    memory = run_sweep(recipe, tmp_path / "memory", PythonEvaluator(f"python:{module}:from_model"), lambdas="0.4:1.2:0.4",
                       rhos="paper", echo=lines.append)
    assert any("merged into one loaded model" in line for line in lines)
    assert set(tensors.values()) == {1} and len(tensors) == 4 * len(family.base_tensors)  # every input tensor read once
    assert len(captures) == 5 == len(set(captures))  # one D per ρ, 15 points
    assert not any((tmp_path / "memory" / "merges").glob("point-*"))  # nothing written per point
    folder = run_sweep(recipe, tmp_path / "folder", PythonEvaluator(f"python:{module}:from_folder"), lambdas="0.4:1.2:0.4",
                       rhos="paper", echo=lines.append)
    assert {k: r["scores"] for k, r in memory.records.items()} == {k: r["scores"] for k, r in folder.records.items()}
    assert memory.best["key"] == folder.best["key"]
    assert all(set(r["details"]["timing"]) == {"merge", "copy", "evaluate"} for r in memory.records.values())

    # the i-th line of the log is the i-th evaluation: the model the winner was scored with
    order = [json.loads(line)["key"] for line in (tmp_path / "memory" / "results.jsonl").read_text().splitlines()]
    assert [json.loads(k)["rho"] for k in order] != [json.loads(k)["rho"] for k in folder.records]  # ρ-major, not grid order
    scored = load_file(str(tmp_path / "saved" / f"{order.index(memory.best['key']):04d}.safetensors"))
    again = subprocess.run([str(BIN / "mergekit-yaml"), str(memory.winner_recipe), str(tmp_path / "again"), "--no-write-model-card"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "FEDMERGE_CACHE_DIR": str(tmp_path / "fresh")})
    assert again.returncode == 0, again.stderr[-3000:]
    written = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(written) == set(scored)
    for name, tensor in written.items():
        assert tensor.dtype == scored[name].dtype and torch.equal(tensor.view(torch.int32), scored[name].view(torch.int32)), name


def test_old_protocol_still_gets_a_folder_and_keep_merges_keeps_them(family: Family, tmp_path: Path) -> None:
    module = evaluators(family, tmp_path)
    lines: List[str] = []
    outcome = run_sweep(write_recipe(family, tmp_path), tmp_path / "out", PythonEvaluator(f"python:{module}:from_model"),
                        lambdas="0.5,1.0", rhos="0.1", keep_merges=True, echo=lines.append)
    assert not any("merged into one loaded model" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "out" / "merges").iterdir()) == ["point-0000", "point-0001"]
    assert len(list((tmp_path / "saved").iterdir())) == 2  # the model protocol, each point loaded from its folder
    assert all("details" not in r for r in outcome.records.values())


@pytest.mark.slow
def test_lm_eval_in_memory_scores_equal_fedmerge_eval(tmp_path: Path) -> None:
    """The chain models of test_sweep's lm-eval test, 3 items: every point's recorded scores
    in memory equal those of the same sweep scored from folders (``--keep-merges``), and the
    winner's equal ``fedmerge eval`` of ``mergekit-yaml winner.yml``."""
    from fedmerge_plugins.sweep.evaluators import LmEvalEvaluator
    from tests.test_sweep import chain_world

    recipe, data = chain_world(tmp_path)
    make = lambda: LmEvalEvaluator(["gsm8k"], data_dir=data, split="test", batch_size=2, max_gen_toks=8, device="cpu")
    memory = run_sweep(recipe, tmp_path / "memory", make(), lambdas="0.2:1.0:0.2", echo=lambda line: None)
    folder = run_sweep(recipe, tmp_path / "folder", make(), lambdas="0.2:1.0:0.2", keep_merges=True, echo=lambda line: None)
    assert {k: r["scores"] for k, r in memory.records.items()} == {k: r["scores"] for k, r in folder.records.items()}
    assert len({r["scores"]["gsm8k"] for r in memory.records.values()}) > 1  # the points differ
    assert all("timing" in r["details"] for r in memory.records.values())
    merged = subprocess.run([str(BIN / "mergekit-yaml"), str(memory.winner_recipe), str(tmp_path / "winner"), "--no-write-model-card"],
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    evaluated = subprocess.run([str(BIN / "fedmerge"), "eval", str(tmp_path / "winner"), "--tasks", "gsm8k", "--data-dir", str(data),
                                "--batch-size", "2", "--max-gen-toks", "8", "--output", str(tmp_path / "eval")],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["fedmerge_scores"]
    assert scores == memory.best["scores"]


def test_per_model_weight_axis_same_log_resume_winner_and_picture(family: Family, tmp_path: Path) -> None:
    """``--param weight@MODEL=…`` beside λ for task_arithmetic: in memory the same scores as
    from folders; the winner recipe sets that model's weight; a re-run finding every point
    done scores nothing and writes sweep.png again."""
    from fedmerge_plugins.sweep.picture import lines_of

    module = evaluators(family, tmp_path)
    recipe = write_recipe(family, tmp_path, method="task_arithmetic", parameters={"lambda": 1.0}, per_model={"weight": 1.0})
    math_model = str(family.tasks[1])
    axis = [f"weight@{math_model}=0.5,1.5"]
    memory = run_sweep(recipe, tmp_path / "memory", PythonEvaluator(f"python:{module}:from_model"), lambdas="0.5,1.0",
                       params=axis, echo=lambda line: None)
    folder = run_sweep(recipe, tmp_path / "folder", PythonEvaluator(f"python:{module}:from_folder"), lambdas="0.5,1.0",
                       params=axis, echo=lambda line: None)
    key = f"weight@{math_model}"
    assert [p.parameters for p in memory.points] == [{"lambda": lam, key: w} for lam in (0.5, 1.0) for w in (0.5, 1.5)]
    assert {k: r["scores"] for k, r in memory.records.items()} == {k: r["scores"] for k, r in folder.records.items()}
    assert len({r["selection"] for r in memory.records.values()}) == 4  # the weight matters
    winner = yaml.safe_load(memory.winner_recipe.read_text())
    best = memory.best["parameters"]
    assert winner["parameters"] == {"lambda": best["lambda"]}
    assert [m["parameters"]["weight"] for m in winner["models"]] == [1.0, best[key], 1.0]
    picture = tmp_path / "memory" / "sweep.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x_name, lines = lines_of(memory.points, memory.records)
    assert x_name == "lambda" and sorted(lines) == [f"{key}=0.5", f"{key}=1.5"] and all(len(v) == 2 for v in lines.values())
    picture.unlink()
    saved = len(list((tmp_path / "saved").iterdir()))
    lines_out: List[str] = []
    again = run_sweep(recipe, tmp_path / "memory", PythonEvaluator(f"python:{module}:from_model"), lambdas="0.5,1.0",
                      params=axis, echo=lines_out.append)
    assert any("4 already in" in line for line in lines_out) and again.merges == 0
    assert len(list((tmp_path / "saved").iterdir())) == saved and picture.exists()


def test_bad_axes_fail_before_any_output(family: Family, tmp_path: Path) -> None:
    from fedmerge_plugins.errors import FedmergeError

    module = evaluators(family, tmp_path)
    recipe = write_recipe(family, tmp_path, method="task_arithmetic", parameters={"lambda": 1.0}, per_model={"weight": 1.0})
    evaluator = PythonEvaluator(f"python:{module}:from_model")
    cases = {
        "weight@./nowhere=1,2": "is not a model of the recipe",
        f"lambda@{family.tasks[0]}=1,2": "no per-model parameter `lambda`",
        "weight": "expected NAME=GRID",
    }
    for text, message in cases.items():
        with pytest.raises(FedmergeError, match=message):
            run_sweep(recipe, tmp_path / "out", evaluator, params=[text], echo=lambda line: None)
    assert not (tmp_path / "out").exists()


class FakeModel:
    """A vLLM worker's model: ``load_weights`` of (Hugging Face name, tensor) pairs."""

    def __init__(self, events: List[str]) -> None:
        self.weights: dict = {}
        self.events = events

    def load_weights(self, weights) -> None:
        self.events.append(f"load {len(weights)}")
        self.weights.update({name: tensor.clone() for name, tensor in weights})


class FakeLLM:
    """``vllm.LLM``'s two calls the sweep makes: ``collective_rpc(function, args)`` runs
    function(worker, *args) on its (one) worker; ``reset_prefix_cache``."""

    def __init__(self) -> None:
        self.events: List[str] = []
        self.worker = type("Worker", (), {})()
        self.worker.model_runner = type("Runner", (), {})()
        self.worker.model_runner.model = FakeModel(self.events)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> None:
        self.events.append("reset")


class FakeVllmEvaluator:
    """The protocol of the lm-eval evaluator with ``--backend vllm``, on a fake engine that
    starts from the folder's weights and scores closeness to the goal."""

    takes_model = True
    description = "fake vllm"

    def __init__(self, goal: Path) -> None:
        self.goal = goal
        self.engines: List[FakeLLM] = []

    def load(self, model_dir: Path):
        from fedmerge_plugins.sweep.evaluators import Loaded, VllmWeights

        llm = FakeLLM()
        llm.worker.model_runner.model.weights = load_file(str(Path(model_dir) / "model.safetensors"))
        self.engines.append(llm)
        return Loaded(VllmWeights(llm), llm)

    def evaluate_loaded(self, loaded) -> dict:
        goal = load_file(str(self.goal))
        state = loaded.handle.worker.model_runner.model.weights
        return {"closeness": -sum(float((state[k].double() - goal[k].double()).pow(2).sum()) for k in sorted(goal))}

    def evaluate(self, model_dir: Path) -> dict:
        return self.evaluate_loaded(self.load(model_dir))


def test_vllm_path_on_a_fake_engine_loads_each_point_then_resets_the_prefix_cache(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmerge_plugins.sweep.evaluators as evaluators_module

    module = evaluators(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    monkeypatch.setattr(evaluators_module, "VLLM_CHUNK_BYTES", 20_000)  # several collective_rpc calls per point
    fake = FakeVllmEvaluator(family.base.parent / "goal.safetensors")
    outcome = run_sweep(recipe, tmp_path / "vllm", fake, lambdas="0.4,1.2", rhos="0.05,0.5", echo=lambda line: None)
    folder = run_sweep(recipe, tmp_path / "folder", PythonEvaluator(f"python:{module}:from_folder"), lambdas="0.4,1.2",
                       rhos="0.05,0.5", echo=lambda line: None)
    assert {k: r["scores"] for k, r in outcome.records.items()} == {k: r["scores"] for k, r in folder.records.items()}
    (engine,) = fake.engines  # one engine for the whole sweep
    per_point = " ".join(engine.events).split("reset")
    assert len(per_point) == 5 and per_point[-1] == ""  # 4 points, each ended by a reset of the prefix cache
    assert all(part.strip().count("load") >= 2 for part in per_point[:-1])  # in chunks


@pytest.mark.slow
def test_in_memory_sweep_killed_and_resumed(family: Family, tmp_path: Path) -> None:
    """``fedmerge sweep`` with a model-taking evaluator SIGKILLed while scoring its 4th point;
    the same sweep again scores only the rest, and the log has every point once."""
    module = evaluators(family, tmp_path)
    recipe = write_recipe(family, tmp_path)
    out = tmp_path / "out"
    command = [str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", "0.4,0.8", "--rho", "0.05,0.5,5",
               "--eval", f"python:{module}:from_model", "--out", str(out)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "KILL_AT": "4"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    first = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(first) == 3
    lines: List[str] = []
    outcome = run_sweep(recipe, out, PythonEvaluator(f"python:{module}:from_model"), lambdas="0.4,0.8", rhos="0.05,0.5,5",
                        echo=lines.append)
    assert any("3 already in" in line for line in lines) and outcome.merges == 3
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records[:3] == first and sorted(r["index"] for r in records) == list(range(6))
    assert len(list((tmp_path / "saved").iterdir())) == 6  # 3 scored, 3 more after the kill (the killed one saved nothing)
