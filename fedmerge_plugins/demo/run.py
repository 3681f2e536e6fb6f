"""The demo pipeline: build, evaluate the references, pick λ/ρ on validation, merge, score.

1. ``build_models``: tokenizer, base and three task models (cached under ``out/models``).
2. Held-out data: ``out/data/validation/*.jsonl`` and ``out/data/test/*.jsonl``.
3. References: base and task models on the test items; task models on the validation
   items of their own task (the denominators of normalized accuracy).
4. For each merge set (the paper's four) and method (five), every candidate of the search
   grid is merged in memory with mergekit's ``merge_state_dicts`` (the registered method,
   the kernel ``mergekit-yaml`` runs) and scored on the validation items; the best average
   normalized accuracy wins (ties: the first candidate in grid order).
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

from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.build import SIZES as BUILD_SIZES
from fedmerge_plugins.demo.build import TASK_MODELS, BuildConfig, build_models, task_splits
from fedmerge_plugins.demo.recipes import MERGE_SETS, METHODS, recipe_values, write_recipe
from fedmerge_plugins.grids import CCLIP_RHO_COUNT, LLM_LAMBDAS, clip_rho_grid, fedgma_rho_grid, lambda_grid
from fedmerge_plugins.normalized import normalized_accuracy

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
    """One point of a method's search grid; ``same_as`` lists grid values giving the same merge."""

    method: str
    parameters: Tuple[Tuple[str, float], ...]
    same_as: Tuple[float, ...] = ()

    @property
    def values(self) -> Dict[str, float]:
        return dict(self.parameters)


def candidates(method: str, models: Sequence[str], norms: Mapping[str, float], settings: DemoSettings) -> List[Candidate]:
    """The search grid of ``method`` for a merge of ``models`` (paper, appendices B.1 and C.1).

    FedGMA's A takes only the values k/T, so ρ matters only through the smallest k with
    k/T ≥ ρ (the kernel's ``full_agreement_count``): grid values with the same k give the
    same merge and are evaluated once, under the first of them.
    """
    from fedmerge_plugins.methods.fedgma import full_agreement_count

    lambdas = settings.lambdas
    if method == "fedgma":
        classes: Dict[int, List[float]] = {}
        for rho in settings.fedgma_rhos:
            classes.setdefault(full_agreement_count(rho, len(models)), []).append(rho)
        return [
            Candidate(method, (("rho", rhos[0]), ("lambda", lam)), tuple(rhos[1:]))
            for rhos in classes.values()
            for lam in lambdas
        ]
    if method == "cclip":
        rhos = clip_rho_grid([norms[m] for m in models], settings.cclip_count)
        return [Candidate(method, (("rho", rho), ("lambda", lam))) for rho in rhos for lam in lambdas]
    return [Candidate(method, (("lambda", lam),)) for lam in lambdas]


def merge_parameters(method: str, models: Sequence[str], values: Mapping[str, float], manifest: Mapping) -> Dict:
    """Python-API parameters: the chosen values plus what the recipe states per model."""
    entries = manifest["models"]
    parameters: Dict[str, object] = dict(values)
    if method == "task_arithmetic":
        parameters["weight"] = {m: 1.0 for m in models}
    elif method == "fednova":
        parameters["steps"] = {m: int(entries[m]["training"]["steps"]) for m in models}
        parameters["learning_rate"] = {m: float(entries[m]["training"]["learning_rate"]) for m in models}
    elif method == "cclip":
        parameters["norm"] = {m: float(entries[m]["task_vector_norm"]) for m in models}
    return parameters


def merge_in_memory(states: Mapping[str, Mapping], models: Sequence[str], method: str, values, manifest) -> Dict:
    import torch
    from mergekit.merge_methods.api import merge_state_dicts

    inputs = {"base": states["base"], **{m: states[m] for m in models}}
    with torch.no_grad():
        return merge_state_dicts(
            inputs, method, base="base", parameters=merge_parameters(method, models, values, manifest)
        )


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> Dict[str, float]:
    """Accuracy / the task model's accuracy on the same items, per task."""
    return normalized_accuracy(
        scores,
        reference,
        lambda task: f"the {data.TASK_LABELS[task]} model scores 0 on its own {task} items: normalized accuracy "
        "is undefined; build bigger models (more steps) or use more items",
    )


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


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
    from tqdm.auto import tqdm

    from fedmerge_plugins.demo.evaluate import Scorer, StateScorer, quiet
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
    result = DemoResult(
        out=str(out),
        size=size,
        settings=settings_dict(settings),
        manifest=manifest,
        references=references,
        validation_references=validation_references,
    )
    test_references = {task: references[name][task] for name, task in TASK_MODELS.items()}
    normalized(test_references, test_references)  # a task model scoring 0 stops the demo here
    lap("evaluate references")

    states = load_states(models_dir)
    norms = {name: float(manifest["models"][name]["task_vector_norm"]) for name in TASK_MODELS}
    state_scorer = StateScorer(scorer, models_dir / "base")
    grid = {
        (merge_set, method): candidates(method, models, norms, settings)
        for merge_set, models in MERGE_SETS.items()
        for method in METHODS
    }
    chosen: Dict[Tuple[str, str], dict] = {}
    with tqdm(total=sum(map(len, grid.values())), desc="validation search (merge in memory, score)", unit="merge") as bar:
        for (merge_set, method), points in grid.items():
            models = MERGE_SETS[merge_set]
            tasks = tuple(TASK_MODELS[m] for m in models)
            rows = []
            for candidate in points:
                bar.set_postfix_str(f"{merge_set} {method}")
                merged = merge_in_memory(states, models, method, candidate.values, manifest)
                scores = state_scorer.score(merged, validation_dir, tasks)
                norm = normalized(scores, validation_references)
                rows.append(
                    {
                        "parameters": candidate.values,
                        "same_as": list(candidate.same_as),
                        "scores": scores,
                        "normalized": norm,
                        "average": mean(list(norm.values())),
                    }
                )
                bar.update()
            result.sweep.setdefault(merge_set, {})[method] = rows
            chosen[(merge_set, method)] = max(rows, key=lambda row: row["average"])  # first best
    lap("validation search")

    recipes_dir = out / "recipes"
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
            recipe = write_recipe(
                recipes_dir,
                merge_set,
                method,
                recipe_values(models_dir, manifest, best["parameters"]),
                header=header,
            )
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
                "average": mean(list(norm.values())),
            }
            bar.update()
    lap("merge and test")
    timings["total"] = round(time.perf_counter() - started, 1)
    result.timings = timings
    write_report(result, out, log=log)
    return result
