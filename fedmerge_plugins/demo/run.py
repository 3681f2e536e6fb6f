"""The demo pipeline: build, evaluate the references, pick λ/ρ on validation, merge, score.

1. ``build_models``: tokenizer, base and three task models (cached under ``out/models``).
2. Held-out data: ``out/data/validation/*.jsonl`` and ``out/data/test/*.jsonl``.
3. References: base and task models on the test items; task models on the validation
   items of their own task (the denominators of normalized accuracy).
4. For each merge set (the paper's four) and method (five), the search engine
   (``fedmerge_plugins.search``, as ``fedmerge sweep`` and the CLIP experiment) merges each
   distinct point of the grid in memory with mergekit's ``merge_state_dicts`` (the kernel
   ``mergekit-yaml`` runs; FedGMA's ρ values with the same merge once) and scores it on the
   validation items; the best average normalized accuracy wins (ties: the earlier point).
5. The chosen values fill ``configs/demo/<set>/<method>.yml``; the recipe is merged by
   mergekit (``run_merge`` in this process, one recipe by a ``mergekit-yaml`` subprocess),
   checked against the in-memory merge, and scored on the test items.
6. ``report.write_report``: tables, ``report.md``, ``normalized_accuracy.png``, ``results.json``.

Normalized accuracy of a merge on a task = its accuracy / the task model's accuracy on the
same items; a merge's score is the mean over the tasks it merges.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins import search
from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.build import SIZES as BUILD_SIZES
from fedmerge_plugins.demo.build import TASK_MODELS, BuildConfig, build_models, task_splits
from fedmerge_plugins.demo.recipes import MERGE_SETS, METHODS, recipe_values, write_recipe
from fedmerge_plugins.grids import CCLIP_RHO_COUNT, LLM_LAMBDAS, fedgma_rho_grid, lambda_grid
from fedmerge_plugins.normalized import normalized_accuracy
from fedmerge_plugins.search import Evaluation, Point, method_grid

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Build configuration, search grids and generation settings of one demo size."""

    build: BuildConfig
    lambdas: Tuple[float, ...] = tuple(lambda_grid(*LLM_LAMBDAS))  # the paper's 0.2, 0.4, …, 1.0
    fedgma_rhos: Tuple[float, ...] = tuple(fedgma_rho_grid())  # 0.1, 0.2, …, 1.0
    cclip_count: int = CCLIP_RHO_COUNT  # 5
    batch_size: int = 32
    max_gen_toks: int = 40
    subprocess_recipe: Tuple[str, str] = ("instruction-math-code", "cclip")


SIZES: Dict[str, DemoSettings] = {
    "full": DemoSettings(build=BUILD_SIZES["full"]),
    "small": DemoSettings(build=BUILD_SIZES["small"], lambdas=(0.5, 1.0), fedgma_rhos=(0.1, 0.6), cclip_count=2),
}


@dataclass(frozen=True)
class Candidate:
    """One merge of a method's search grid; ``same_as`` lists the other ρ giving the same merge."""

    method: str
    parameters: Tuple[Tuple[str, float], ...]
    same_as: Tuple[float, ...] = ()

    @property
    def values(self) -> Dict[str, float]:
        return dict(self.parameters)


def grid_points(method: str, models: Sequence[str], norms: Mapping[str, float], settings: DemoSettings) -> List[Point]:
    """The search grid of ``method`` for a merge of ``models`` (paper, appendices B.1 and C.1)."""
    model_norms = [norms[m] for m in models] if method == "cclip" else []
    return method_grid(method, settings.lambdas, settings.fedgma_rhos, model_norms, settings.cclip_count)


def candidates(method: str, models: Sequence[str], norms: Mapping[str, float], settings: DemoSettings) -> List[Candidate]:
    """The distinct merges of the grid (``search.merge_groups``): FedGMA's ρ values with the
    same ``full_agreement_count`` are one merge, listed under the first of them."""
    groups = search.merge_groups(method, grid_points(method, models, norms, settings), len(models))
    return [
        Candidate(method, tuple(same[0].parameters.items()), tuple(p.parameters["rho"] for p in same[1:])) for same in groups
    ]


def merge_parameters(method: str, models: Sequence[str], values: Mapping[str, float], manifest: Mapping) -> Dict:
    """Python-API parameters: the chosen values plus what the recipe states per model."""
    entries = manifest["models"]
    return search.point_parameters(
        method,
        values,
        models,
        norms={m: float(entries[m]["task_vector_norm"]) for m in models},
        training={m: (int(entries[m]["training"]["steps"]), float(entries[m]["training"]["learning_rate"])) for m in models},
    )


def merge_in_memory(states: Mapping[str, Mapping], models: Sequence[str], method: str, values, manifest) -> Dict:
    return search.merge_in_memory(states["base"], {m: states[m] for m in models}, method, merge_parameters(method, models, values, manifest))


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> Dict[str, float]:
    """Accuracy / the task model's accuracy on the same items, per task."""
    return normalized_accuracy(
        scores,
        reference,
        lambda task: f"the {data.TASK_LABELS[task]} model scores 0 on its own {task} items: normalized accuracy "
        "is undefined; build bigger models (more steps) or use more items",
    )


def load_states(models_dir: Path) -> Dict[str, Dict]:
    from safetensors.torch import load_file

    return {name: load_file(str(models_dir / name / "model.safetensors")) for name in ["base", *TASK_MODELS]}


def mergekit_yaml(recipe: Path, out_path: Path) -> None:
    """Run the real ``mergekit-yaml`` console script (the one installed beside this Python)."""
    script = Path(sys.executable).with_name("mergekit-yaml")
    command = [str(script), str(recipe), str(out_path), "--no-write-model-card", "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")


def run_merge_in_process(recipe: Path, out_path: Path) -> None:
    """``mergekit.merge.run_merge`` on the recipe file: what ``mergekit-yaml`` does, in process."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    run_merge(config, str(out_path), MergeOptions(write_model_card=False, quiet=True, device="cpu"))


def max_difference(expected: Mapping, merged_dir: Path) -> float:
    """Largest |Δ| between an in-memory merge and mergekit's output checkpoint."""
    from safetensors.torch import load_file

    merged: Dict = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    missing = set(expected) ^ set(merged)
    if missing:
        raise ValueError(f"{merged_dir}: tensors differ from the in-memory merge: {sorted(missing)[:5]}")
    return max(float((merged[name].float() - expected[name].float()).abs().max()) for name in expected)


@dataclass
class DemoResult:
    """Everything a demo run measured; ``report`` turns it into tables and files."""

    out: str
    size: str
    settings: dict
    manifest: dict
    references: Dict[str, Dict[str, float]]  # test accuracy of base and task models
    validation_references: Dict[str, float]  # task model accuracy on its own validation items
    merges: Dict[str, Dict[str, dict]] = field(default_factory=dict)
    sweep: Dict[str, Dict[str, List[dict]]] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


def settings_dict(settings: DemoSettings) -> dict:
    result = asdict(settings)
    result["build"] = None  # the manifest holds the build configuration
    return {k: v for k, v in result.items() if v is not None}


@dataclass
class DemoPoint:
    """One grid point's unit of work: merge in memory, score on the validation items."""

    states: Mapping[str, Mapping]
    models: Sequence[str]
    method: str
    manifest: Mapping
    scorer: object  # evaluate.StateScorer
    data_dir: Path
    reference: Mapping[str, float]  # task models' validation accuracy

    def __call__(self, point: Point) -> Evaluation:
        merged = merge_in_memory(self.states, self.models, self.method, point.parameters, self.manifest)
        tasks = tuple(TASK_MODELS[m] for m in self.models)
        scores = self.scorer.score(merged, self.data_dir, tasks)  # type: ignore[attr-defined]
        return Evaluation(normalized(scores, self.reference), {"accuracy": scores})


def evaluate_references(scorer, models_dir: Path, validation_dir: Path, test_dir: Path, out: Path) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Test accuracy of the base and task models; each task model's on its own validation items."""
    from tqdm.auto import tqdm

    references: Dict[str, Dict[str, float]] = {}
    validation_references: Dict[str, float] = {}
    names = ["base", *TASK_MODELS]
    with tqdm(total=len(names) + len(TASK_MODELS), desc="evaluate base and task models", unit="eval") as bar:
        for name in names:
            references[name] = scorer.score_directory(models_dir / name, test_dir, data.TASKS, out / "evals" / name)
            bar.update()
        for name, task in TASK_MODELS.items():
            validation_references[task] = scorer.score_directory(models_dir / name, validation_dir, (task,))[task]
            bar.update()
    return references, validation_references


def validation_search(result: DemoResult, states, state_scorer, validation_dir: Path, settings: DemoSettings) -> Dict[Tuple[str, str], dict]:
    """The search engine on every (merge set, method); fills ``result.sweep`` with one row per
    distinct merge and returns the winning row of each."""
    from tqdm.auto import tqdm

    manifest = result.manifest
    norms = {name: float(manifest["models"][name]["task_vector_norm"]) for name in TASK_MODELS}
    chosen: Dict[Tuple[str, str], dict] = {}
    work = [(merge_set, method) for merge_set in MERGE_SETS for method in METHODS]
    for merge_set, method in tqdm(work, desc="validation search (merge in memory, score)", unit="search"):
        models = MERGE_SETS[merge_set]
        points = grid_points(method, models, norms, settings)
        unit = DemoPoint(states, models, method, manifest, state_scorer, validation_dir, result.validation_references)
        outcome = search.run_search(points, unit, search.ResultLog(None), method=method, task_count=len(models), desc=f"{merge_set} {method}")
        rows = [
            {
                "parameters": record["parameters"],
                "same_as": [p.parameters["rho"] for p in same[1:]],
                "scores": record["details"]["accuracy"],
                "normalized": record["scores"],
                "average": record["selection"],
            }
            for same in search.merge_groups(method, points, len(models))
            for record in [outcome.records[same[0].key]]
        ]
        result.sweep.setdefault(merge_set, {})[method] = rows
        chosen[(merge_set, method)] = next(row for row in rows if row["parameters"] == outcome.best["parameters"])
    return chosen


def merge_and_test(result: DemoResult, chosen: Mapping[Tuple[str, str], dict], states, scorer, test_dir: Path, settings: DemoSettings) -> None:
    """Fill each winner into its recipe, merge it with mergekit, score it on the test items."""
    from tqdm.auto import tqdm

    from fedmerge_plugins.demo.evaluate import quiet

    out, manifest = Path(result.out), result.manifest
    models_dir = out / "models"
    test_references = {task: result.references[name][task] for name, task in TASK_MODELS.items()}
    with tqdm(total=len(chosen), desc="merge with mergekit, score on test", unit="merge") as bar:
        for (merge_set, method), best in chosen.items():
            models = MERGE_SETS[merge_set]
            tasks = tuple(TASK_MODELS[m] for m in models)
            bar.set_postfix_str(f"{merge_set} {method}")
            picked = ", ".join(f"{k} = {v:.6g}" for k, v in best["parameters"].items())
            header = (
                f"# Written by `fedmerge demo` from configs/demo/{merge_set}/{method}.yml.\n"
                f"# {picked}: the best average normalized accuracy on the validation items "
                f"({best['average']:.3f}) among {len(result.sweep[merge_set][method])} candidates.\n"
            )
            recipe = write_recipe(out / "recipes", merge_set, method, recipe_values(models_dir, manifest, best["parameters"]), header=header)
            merged_dir = out / "merges" / merge_set / method
            if (merge_set, method) == settings.subprocess_recipe:
                mergekit_yaml(recipe, merged_dir)
                merged_with = "mergekit-yaml (subprocess)"
            else:
                with quiet():
                    run_merge_in_process(recipe, merged_dir)
                merged_with = "mergekit run_merge (in process)"
            expected = merge_in_memory(states, models, method, best["parameters"], manifest)
            scores = scorer.score_directory(merged_dir, test_dir, tasks, out / "evals" / f"{merge_set}-{method}")
            norm = normalized(scores, test_references)
            result.merges.setdefault(merge_set, {})[method] = {
                "parameters": best["parameters"],
                "validation_average": best["average"],
                "recipe": str(recipe),
                "merged_dir": str(merged_dir),
                "merged_with": merged_with,
                "max_abs_difference_to_sweep_merge": max_difference(expected, merged_dir),
                "test": scores,
                "normalized": norm,
                "average": search.mean(norm),
            }
            bar.update()


def run_demo(
    out: Path,
    size: str = "full",
    *,
    rebuild: bool = False,
    device: str = "cpu",
    settings: Optional[DemoSettings] = None,
    log: Log = print,
) -> DemoResult:
    """Run the whole demo into ``out`` and return its results (also written to ``out``)."""
    from fedmerge_plugins.demo.evaluate import Scorer, StateScorer
    from fedmerge_plugins.demo.report import write_report

    settings = settings or SIZES[size]
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDMERGE_CACHE_DIR", str(out / "cache"))
    timings: Dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    manifest = build_models(out, settings.build, rebuild=rebuild, log=log)
    models_dir = out / "models"
    lap("build")

    splits = task_splits(settings.build)
    validation_dir = data.write_eval_data(out / "data" / "validation", splits, "validation")
    test_dir = data.write_eval_data(out / "data" / "test", splits, "test")
    scorer = Scorer(batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks, device=device)
    references, validation_references = evaluate_references(scorer, models_dir, validation_dir, test_dir, out)
    result = DemoResult(str(out), size, settings_dict(settings), manifest, references, validation_references)
    test_references = {task: references[name][task] for name, task in TASK_MODELS.items()}
    normalized(test_references, test_references)  # a task model scoring 0 stops the demo here
    lap("evaluate references")

    states = load_states(models_dir)
    chosen = validation_search(result, states, StateScorer(scorer, models_dir / "base"), validation_dir, settings)
    lap("validation search")
    merge_and_test(result, chosen, states, scorer, test_dir, settings)
    lap("merge and test")
    timings["total"] = round(time.perf_counter() - started, 1)
    result.timings = timings
    write_report(result, out, log=log)
    return result
