"""The search engine (``fedmerge_plugins.search.engine``) and its three entry points.

``fedmerge sweep``, the CLIP experiment and the demo's validation search run the same grid
on the same tiny models with the same scoring function of the merged weights; they must
select the same point with the same scores, and FedGMA's ten ρ values with T = 3 must cost
at most three merges per λ in each of them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fedmerge_plugins.search import engine as search
from tests.support.synthetic import make_family

MODELS = {"instruction": "instruct", "math": "gsm8k", "code": "humaneval"}  # the demo's models and tasks
TASKS = tuple(MODELS.values())
LAMBDAS = (0.5, 1.0)
RHOS = tuple(round(0.1 * i, 1) for i in range(1, 11))

SCORING = '''
import torch
from safetensors.torch import load_file

GOALS = {goals!r}


def closeness(state, task):
    """1 / (1 + ||θ - goal_task||²), float64: a different optimum per task."""
    goal = load_file(GOALS[task])
    return 1.0 / (1.0 + sum(float((state[k].double() - goal[k].double()).pow(2).sum()) for k in goal))


def score(model_dir):
    import os
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    return {{task: closeness(state, task) for task in GOALS}}
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dict:
    root = tmp_path_factory.mktemp("search-world")
    family = make_family(root, scales=(0.02, 0.03, 0.05), names=list(MODELS))
    base = family.base_tensors
    goals = {}
    generator = torch.Generator().manual_seed(7)
    for i, task in enumerate(TASKS):  # the base plus a different mix of the task vectors
        mix = torch.rand(3, generator=generator) * (1.5 if i == 0 else 0.8)
        goal = {k: (b.double() + sum(mix[j] * (family.task_tensors[j][k].double() - b.double()) for j in range(3))).float().contiguous()
                for k, b in base.items()}
        goals[task] = str(root / f"goal-{task}.safetensors")
        save_file(goal, goals[task])
    module = root / "scoring.py"
    module.write_text(SCORING.format(goals=goals))
    sys.path.insert(0, str(root))
    import scoring  # noqa: E402  (the module the python: evaluator loads)

    states = {"base": base, **{name: tensors for name, tensors in zip(MODELS, family.task_tensors)}}
    return {"root": root, "family": family, "module": module, "scoring": scoring, "states": states}


def count_merges(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Every merge made through mergekit: ``run_merge`` (the sweep) and ``merge_state_dicts``
    (the CLIP experiment and the demo)."""
    import mergekit.merge
    from mergekit.merge_methods import api

    calls: List[str] = []
    run_merge, merge_state_dicts = mergekit.merge.run_merge, api.merge_state_dicts

    def counting_run_merge(config, *args, **kwargs):
        calls.append(f"run_merge {config.parameters}")
        return run_merge(config, *args, **kwargs)

    def counting_merge_state_dicts(*args, **kwargs):
        calls.append(f"merge_state_dicts {kwargs.get('parameters', {}).get('lambda')}")
        return merge_state_dicts(*args, **kwargs)

    monkeypatch.setattr(mergekit.merge, "run_merge", counting_run_merge)
    monkeypatch.setattr(api, "merge_state_dicts", counting_merge_state_dicts)
    return calls


def by_point(records) -> Dict[str, tuple]:
    return {json.dumps(r["parameters"], sort_keys=True): (r["scores"], r["selection"]) for r in records}


def sweep_run(world: Dict, out: Path) -> Dict:
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep

    family = world["family"]
    recipe = out.parent / "fedgma.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "fedgma", "base_model": str(family.base), "models": [{"model": str(p)} for p in family.tasks],
        "parameters": {"lambda": 1.0, "rho": 0.5}, "dtype": "float32",
    }))
    outcome = run_sweep(recipe, out, PythonEvaluator(f"python:{world['module']}:score"), lambdas=",".join(map(str, LAMBDAS)),
                        rhos=",".join(map(str, RHOS)), echo=lambda line: None)
    return {"best": outcome.best["parameters"], "records": by_point(outcome.records.values()), "merges": outcome.merges}


@dataclass(frozen=True)
class Settings:
    val_fraction: float = 0.1


class FakeSession:
    """The CLIP ``Session`` surface the experiment uses, scoring a tower by ``closeness``."""

    def __init__(self, world: Dict) -> None:
        self.world, self.base, self.data_dir, self.settings = world, "tiny-base", world["root"], Settings()
        self.base_state = world["states"]["base"]

    def tower(self, source: str, label: str = ""):
        return self.world["states"][Path(source).name]

    def head(self, task: str) -> None:
        pass

    def finetuned_accuracy(self, task, source, split, state=None) -> float:
        return 1.0

    def accuracy_of(self, state, tasks, split) -> Dict[str, float]:
        return {t: self.world["scoring"].closeness(state, t) for t in tasks}


def clip_run(world: Dict, out: Path) -> Dict:
    from fedmerge_plugins.clip.experiment import Experiment, ExperimentSpec

    family = world["family"]
    spec = ExperimentSpec(tasks=TASKS, methods=("fedgma",), lambdas=LAMBDAS, fedgma_rhos=RHOS, min_size=3)
    finetuned = {task: str(path) for task, path in zip(TASKS, family.tasks)}
    session = FakeSession({**world, "states": {"base": world["states"]["base"], **{Path(p).name: t for p, t in zip(family.tasks, family.task_tensors)}}})
    (result,) = Experiment(session, spec, finetuned, out, progress=False).run()  # type: ignore[arg-type]
    points = [r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()) if r["kind"] == "point"]
    return {"best": result["params"], "records": by_point(points), "val_score": result["val_score"]}


class FakeStateScorer:
    def __init__(self, world: Dict) -> None:
        self.world = world

    def score(self, state, data_dir, tasks, name="candidate"):
        from fedmerge_plugins.demo.evaluate import Scored

        return Scored({t: self.world["scoring"].closeness(state, t) for t in tasks}, {})


def demo_run(world: Dict, out: Path) -> Dict:
    from fedmerge_plugins.demo.run import HETEROGENEOUS, SIZES, Variant, validation_search
    from fedmerge_plugins.norms.streaming import state_dict_norms

    states = world["states"]
    norms = state_dict_norms(states["base"], {m: states[m] for m in MODELS})
    models = {m: {"path": m, "training": {"steps": 100, "learning_rate": 1e-3}, "task_vector_norm": float(norms[m])} for m in MODELS}
    variant = Variant(0, HETEROGENEOUS, models, validation_references={task: 1.0 for task in TASKS})
    settings = replace(SIZES["small"], lambdas=LAMBDAS, fedgma_rhos=RHOS, cclip_count=2)
    chosen = validation_search(variant, states, FakeStateScorer(world), out, settings)
    best = chosen[("instruction-math-code", "fedgma")]
    rows = variant.sweep["instruction-math-code"]["fedgma"]
    return {"best": best["parameters"], "rows": rows}


def test_three_entry_points_select_the_same_point_with_the_same_scores(world: Dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_merges(monkeypatch)
    sweep = sweep_run(world, tmp_path / "sweep")
    sweep_merges = len(calls)
    clip = clip_run(world, tmp_path / "clip")
    clip_merges = len(calls) - sweep_merges
    demo = demo_run(world, tmp_path / "demo")

    points = [json.dumps({"lambda": lam, "rho": rho}, sort_keys=True) for lam in LAMBDAS for rho in RHOS]
    assert list(sweep["records"]) == points and list(clip["records"]) == points  # every ρ reported, in grid order
    for key in points:  # the sweep merges on disk, the others in memory: the same numbers up to float32 rounding
        (s_scores, s_selection), (c_scores, c_selection) = sweep["records"][key], clip["records"][key]
        assert c_scores == pytest.approx(s_scores, rel=1e-6) and c_selection == pytest.approx(s_selection, rel=1e-6)
    for row in demo["rows"]:
        key = json.dumps(row["parameters"], sort_keys=True)
        assert row["normalized"] == pytest.approx(clip["records"][key][0], rel=1e-12)
        assert row["average"] == pytest.approx(clip["records"][key][1], rel=1e-12)
    selections = [clip["records"][k][1] for k in points]
    assert len(set(round(v, 9) for v in selections)) > 3  # the grid points really differ
    expected = json.loads(points[max(range(len(points)), key=lambda i: (selections[i], -i))])
    assert sweep["best"] == clip["best"] == demo["best"] == expected
    assert clip["val_score"] == pytest.approx(max(selections), rel=1e-12)

    # FedGMA, T = 3: ρ ≤ 1/3, ≤ 2/3 and above give the three distinct merges per λ
    assert sweep_merges == sweep["merges"] == 3 * len(LAMBDAS)
    assert clip_merges == 3 * len(LAMBDAS) + 1  # + the winner scored on test
    assert len(demo["rows"]) == 3 * len(LAMBDAS)
    assert sorted(len(row["same_as"]) + 1 for row in demo["rows"]) == sorted([3, 3, 4] * len(LAMBDAS))


def test_fedgma_groups_and_merged_as_in_the_log(tmp_path: Path) -> None:
    points = search.method_grid("fedgma", LAMBDAS, RHOS)
    groups = search.merge_groups("fedgma", points, 3)
    assert [[p.parameters["rho"] for p in g] for g in groups[:3]] == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0]]
    assert len(groups) == 6 and len(search.merge_groups("fedgma", points, 2)) == 4  # T = 2: ρ ≤ 1/2 or above
    assert len(search.merge_groups("cclip", points, 3)) == len(points)  # nothing else collapses

    evaluated: List[dict] = []

    def evaluate(point):
        evaluated.append(point.parameters)
        return search.Evaluation({"a": point.parameters["lambda"] + 0.01 * point.index})

    log = search.ResultLog(tmp_path / "log.jsonl")
    outcome = search.run_search(points, evaluate, log, method="fedgma", task_count=3, progress=False)
    assert len(evaluated) == outcome.merges == 6
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["index"] for r in sorted(lines, key=lambda r: r["index"])] == list(range(20))
    member = next(r for r in lines if r["parameters"] == {"lambda": 1.0, "rho": 0.9})
    assert member["merged_as"] == json.dumps({"lambda": 1.0, "rho": 0.7}, sort_keys=True)
    assert outcome.best["parameters"] == {"lambda": 1.0, "rho": 0.7}  # ties within a group: its first point
    again = search.run_search(points, evaluate, search.ResultLog(tmp_path / "log.jsonl"), method="fedgma", task_count=3, progress=False)
    assert again.merges == 0 and again.best == outcome.best  # resumed: nothing merged again


def test_sweep_refuses_a_foreign_out_before_opening_any_checkpoint(world: Dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--out`` holding another sweep's results: one error, and not one checkpoint file opened."""
    import builtins

    from fedmerge_plugins.errors import FedmergeError
    from fedmerge_plugins.sweep.evaluators import PythonEvaluator
    from fedmerge_plugins.sweep.run import run_sweep

    family = world["family"]
    out = tmp_path / "out"
    out.mkdir()
    foreign = '{"key": "{}", "index": 0, "parameters": {}, "scores": {}, "selection": 0, "fingerprint": "0123"}\n'
    (out / "results.jsonl").write_text(foreign)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "median", "base_model": str(family.base),
                                      "models": [{"model": str(p)} for p in family.tasks], "parameters": {"lambda": 1.0}}))
    evaluator = PythonEvaluator(f"python:{world['module']}:score")
    opened: List[str] = []
    real_open = builtins.open

    def watching_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    import safetensors

    real_safe_open = safetensors.safe_open

    def watching_safe_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    monkeypatch.setattr(safetensors, "safe_open", watching_safe_open)
    with pytest.raises(FedmergeError, match="holds results of another recipe or evaluator .* --out"):
        run_sweep(recipe, out, evaluator, lambdas="0.5,1", echo=lambda line: None)
    monkeypatch.undo()
    models = [str(family.base), *map(str, family.tasks)]
    assert not [f for f in opened if any(f.startswith(m) for m in models)], opened
    assert (out / "results.jsonl").read_text() == foreign and sorted(p.name for p in out.iterdir()) == ["results.jsonl"]


def test_registration_in_any_import_order() -> None:
    """Importing a fedmerge module that imports mergekit first (params, a method module,
    the methods package) still leaves all four methods registered for a merge."""
    for first in ("fedmerge_plugins.methods.params", "fedmerge_plugins.methods.cclip", "fedmerge_plugins.methods"):
        code = (f"import {first}; import mergekit.merge; from mergekit.merge_methods import registry; "
                "print(' '.join(registry.get(n).spec.name for n in ('fednova', 'fedgma', 'median', 'cclip')))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.split() == ["fednova", "fedgma", "median", "cclip"], (first, run.stderr[-2000:])
