"""The demo pipeline: build, evaluate the references, pick λ/ρ on validation, merge, score.

1. ``build_models``: tokenizer, base, and per fine-tuning seed the three task models and the
   heterogeneous model's candidates (cached under ``out/models``).
2. Held-out data: ``out/data/validation/*.jsonl`` and ``out/data/test/*.jsonl``.
3. References, per seed: each task model on the test and validation items of its own task;
   the heterogeneous candidates on their validation items, the best one (ties: fewer steps)
   becomes the heterogeneous setting's model (appendix B.1 picks each configuration on
   validation). A ``Variant`` is one seed in one setting: homogeneous (the three models trained
   alike) or heterogeneous (the same, with the picked candidate in place of its task's model).
4. For each variant, merge set (the paper's four) and method (task arithmetic only for the
   homogeneous setting, all five for the heterogeneous one), the search engine
   (``fedmerge_plugins.search.engine``, as ``fedmerge sweep`` and the CLIP experiment) merges each
   distinct point of the grid in memory with mergekit's ``merge_state_dicts`` and scores it on
   the validation items; the best average normalized accuracy wins (ties: the earlier point).
5. The chosen values fill ``configs/demo/<set>/<method>.yml`` (written to ``out/recipes``). For
   the first seed's heterogeneous variant mergekit merges the recipe files (``run_merge`` in
   process, one recipe by a ``mergekit-yaml`` subprocess), checked against the in-memory merge;
   every winner is scored on the test items with its item scores kept.
6. ``stats``: paired-bootstrap intervals; ``report.write_report``: tables, ``report.md``,
   ``normalized_accuracy.png``, ``results.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.build import SIZES as BUILD_SIZES
from fedmerge_plugins.demo.build import TASK_MODELS, BuildConfig, build_models, candidate_name, task_splits
from fedmerge_plugins.demo.compare import compare
from fedmerge_plugins.demo.recipes import MERGE_SETS, recipe_values, write_recipe
from fedmerge_plugins.demo.report import write_report
from fedmerge_plugins.demo.variants import HETEROGENEOUS, HOMOGENEOUS, DemoResult, Variant
from fedmerge_plugins.search import engine as search
from fedmerge_plugins.search.engine import Evaluation, Point, method_grid
from fedmerge_plugins.search.grids import CCLIP_RHO_COUNT, LLM_LAMBDAS, fedgma_rho_grid, lambda_grid
from fedmerge_plugins.search.normalized import normalized_accuracy

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Build configuration, search grids and generation settings of one demo size."""

    build: BuildConfig
    lambdas: Tuple[float, ...] = tuple(lambda_grid(*LLM_LAMBDAS))  # the paper's 0.2, 0.4, …, 1.0
    fedgma_rhos: Tuple[float, ...] = tuple(fedgma_rho_grid())  # 0.1, 0.2, …, 1.0
    cclip_count: int = CCLIP_RHO_COUNT  # 5
    batch_size: int = 256  # every item of a task in one batch
    max_gen_toks: int = 32
    subprocess_recipe: Tuple[str, str] = ("instruction-math-code", "cclip")
    bootstrap_samples: int = 2000
    search_each_seed: bool = False  # False: the first seed's search picks every seed's grid position


SIZES: Dict[str, DemoSettings] = {
    "full": DemoSettings(build=BUILD_SIZES["full"]),
    "small": DemoSettings(build=BUILD_SIZES["small"], lambdas=(0.6, 1.0), fedgma_rhos=(0.1, 1.0), cclip_count=1, bootstrap_samples=1000),
}


def settings_dict(settings: DemoSettings) -> dict:
    result = asdict(settings)
    result["build"] = None  # the manifest holds the build configuration
    return {k: v for k, v in result.items() if v is not None}


def grid_points(method: str, models: Sequence[str], norms: Mapping[str, float], settings: DemoSettings) -> List[Point]:
    """The search grid of ``method`` for a merge of ``models`` (paper, appendices B.1 and C.1)."""
    model_norms = [norms[m] for m in models] if method == "cclip" else []
    return method_grid(method, settings.lambdas, settings.fedgma_rhos, model_norms, settings.cclip_count)


def merge(states: Mapping[str, Mapping], variant: Variant, models: Sequence[str], method: str, values: Mapping[str, float]) -> Dict:
    """The merge of ``models`` (of ``variant``, weights in ``states``) at ``values``: the search
    engine's ``merge_in_memory`` with its ``point_parameters``."""
    parameters = search.point_parameters(method, values, models, norms=variant.norms, training=variant.training)
    return search.merge_in_memory(states["base"], {m: states[m] for m in models}, method, parameters)


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> Dict[str, float]:
    """Accuracy / the task model's accuracy on the same items, per task."""
    return normalized_accuracy(
        scores,
        reference,
        lambda task: f"the {data.TASK_LABELS[task]} model scores 0 on its own {task} items: normalized accuracy "
        "is undefined; build bigger models (more steps) or use more items",
    )


def load_states(models_dir: Path, paths: Sequence[str]) -> Dict[str, Dict]:
    """Weights of each model directory (relative to ``models_dir``), keyed by that path."""
    from safetensors.torch import load_file

    return {path: load_file(str(models_dir / path / "model.safetensors")) for path in paths}


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
class DemoPoint:
    """One grid point's unit of work: merge in memory, score on the validation items."""

    states: Mapping[str, Mapping]  # "base" and the task model names
    variant: Variant
    models: Sequence[str]
    method: str
    scorer: object  # evaluate.StateScorer
    data_dir: Path
    reference: Mapping[str, float]  # task models' validation accuracy

    def __call__(self, point: Point) -> Evaluation:
        merged = merge(self.states, self.variant, self.models, self.method, point.parameters)
        tasks = tuple(TASK_MODELS[m] for m in self.models)
        scores = self.scorer.score(merged, self.data_dir, tasks).scores  # type: ignore[attr-defined]
        return Evaluation(normalized(scores, self.reference), {"accuracy": scores})


def variant_states(variant: Variant, states: Mapping[str, Mapping]) -> Dict[str, Mapping]:
    """``{"base": …, "instruction": …, "math": …, "code": …}`` of the variant's models."""
    return {"base": states["base"], **{name: states[entry["path"]] for name, entry in variant.models.items()}}


def evaluate_references(scorer, manifest: Mapping, models_dir: Path, validation_dir: Path, test_dir: Path, config: BuildConfig) -> Tuple[Dict[str, float], List[Variant]]:
    """The base's test accuracy; per seed, the two variants with their task models' own-task
    accuracy (validation and test), the heterogeneous model picked among its candidates."""
    from tqdm.auto import tqdm

    seeds = manifest["seeds"]
    special = config.heterogeneous_model
    total = 1 + len(seeds) * (2 * len(TASK_MODELS) + len(config.heterogeneous_steps) + 1)
    variants: List[Variant] = []
    with tqdm(total=total, desc="evaluate base and task models", unit="eval") as bar:
        base = scorer.score_directory(models_dir / "base", test_dir, data.TASKS).scores
        bar.update()
        for seed_text, entries in seeds.items():
            seed = int(seed_text)
            homogeneous = Variant(seed, HOMOGENEOUS, {name: entries[name] for name in TASK_MODELS})
            for name, task in TASK_MODELS.items():
                test = scorer.score_directory(models_dir / entries[name]["path"], test_dir, (task,))
                homogeneous.test_references[task], homogeneous.reference_items[task] = test.scores[task], test.items[task]
                homogeneous.validation_references[task] = scorer.score_directory(models_dir / entries[name]["path"], validation_dir, (task,)).scores[task]
                bar.update(2)
            task = TASK_MODELS[special]
            candidates = []
            for steps in config.heterogeneous_steps:
                name = candidate_name(config, steps)
                accuracy = scorer.score_directory(models_dir / entries[name]["path"], validation_dir, (task,)).scores[task]
                candidates.append({"model": name, "steps": steps, "validation_accuracy": accuracy})
                bar.update()
            picked = max(candidates, key=lambda c: (c["validation_accuracy"], -c["steps"]))
            heterogeneous = Variant(seed, HETEROGENEOUS, {**homogeneous.models, special: entries[picked["model"]]}, candidates=candidates)
            heterogeneous.validation_references = {**homogeneous.validation_references, task: picked["validation_accuracy"]}
            test = scorer.score_directory(models_dir / entries[picked["model"]]["path"], test_dir, (task,))
            heterogeneous.test_references = {**homogeneous.test_references, task: test.scores[task]}
            heterogeneous.reference_items = {**homogeneous.reference_items, task: test.items[task]}
            bar.update()
            variants += [homogeneous, heterogeneous]
    return base, variants


def validation_search(variant: Variant, states, state_scorer, validation_dir: Path, settings: DemoSettings, bar=None) -> Dict[Tuple[str, str], dict]:
    """The search engine on every (merge set, method) of the variant; fills ``variant.sweep``
    with one row per distinct merge and returns the winning row of each, with its
    ``position`` in the grid."""
    norms = variant.norms
    chosen: Dict[Tuple[str, str], dict] = {}
    for merge_set, models in MERGE_SETS.items():
        for method in variant.methods:
            points = grid_points(method, models, norms, settings)
            unit = DemoPoint(states, variant, models, method, state_scorer, validation_dir, variant.validation_references)
            outcome = search.run_search(points, unit, search.ResultLog(None), method=method, task_count=len(models), desc=f"{variant.name} {merge_set} {method}")
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
            variant.sweep.setdefault(merge_set, {})[method] = rows
            best = next(row for row in rows if row["parameters"] == outcome.best["parameters"])
            position = next(i for i, p in enumerate(points) if p.parameters == outcome.best["parameters"])
            chosen[(merge_set, method)] = {**best, "position": position}
            if bar is not None:
                bar.update()
    return chosen


def reused_choices(variant: Variant, searched: Variant, chosen: Mapping[Tuple[str, str], dict], settings: DemoSettings) -> Dict[Tuple[str, str], dict]:
    """``variant``'s grid point at the position ``searched``'s search chose: the same λ and
    FedGMA ρ; for CCLIP the same step of the ρ grid between this variant's own smallest and
    largest task-vector norm."""
    norms = variant.norms
    reused: Dict[Tuple[str, str], dict] = {}
    for (merge_set, method), best in chosen.items():
        points = grid_points(method, MERGE_SETS[merge_set], norms, settings)
        point = points[best["position"]]
        reused[(merge_set, method)] = {"parameters": dict(point.parameters), "position": best["position"], "average": None, "searched_on": searched.name}
    return reused


@dataclass
class TestStage:
    """What scoring the winners on the test items needs, the same for every variant."""

    out: Path
    test_dir: Path
    settings: DemoSettings
    scorer: object  # evaluate.Scorer: model directories (mergekit's merges)
    state_scorer: object  # evaluate.StateScorer: in-memory merges

    def recipe(self, variant: Variant, merge_set: str, method: str, best: Mapping) -> Path:
        """Fill the winner's values into ``configs/demo/<set>/<method>.yml``, with a header saying why."""
        picked = ", ".join(f"{k} = {v:.6g}" for k, v in best["parameters"].items())
        if best["average"] is None:
            why = f"the grid position (#{best['position'] + 1}) the search on {best['searched_on']}'s validation items chose"
        else:
            why = f"the best average normalized accuracy on the validation items ({best['average']:.3f}) among {len(variant.sweep[merge_set][method])} candidates"
        header = (
            f"# Written by `fedmerge demo` from configs/demo/{merge_set}/{method}.yml ({variant.setting} setting, seed {variant.seed}).\n"
            f"# {picked}: {why}.\n"
        )
        paths = {"base": "base", **{name: entry["path"] for name, entry in variant.models.items()}}
        values = recipe_values(self.out / "models", paths, variant.models, best["parameters"])
        return write_recipe(self.out / "recipes" / variant.name, merge_set, method, values, header=header)

    def merged_by_mergekit(self, variant: Variant, merge_set: str, method: str, recipe: Path, expected: Mapping, tasks: Sequence[str]) -> Tuple[dict, object]:
        """mergekit merges the recipe file (one recipe by a ``mergekit-yaml`` subprocess, the
        others by ``run_merge`` in process); checked against the in-memory merge, then scored."""
        from fedmerge_plugins.demo.evaluate import quiet

        merged_dir = self.out / "merges" / variant.name / merge_set / method
        if (merge_set, method) == self.settings.subprocess_recipe:
            mergekit_yaml(recipe, merged_dir)
            how = "mergekit-yaml (subprocess)"
        else:
            with quiet():
                run_merge_in_process(recipe, merged_dir)
            how = "mergekit run_merge (in process)"
        entry = {"merged_with": how, "max_abs_difference_to_sweep_merge": max_difference(expected, merged_dir)}
        return entry, self.scorer.score_directory(merged_dir, self.test_dir, tasks, self.out / "evals" / variant.name / f"{merge_set}-{method}")  # type: ignore[attr-defined]

    def run(self, variant: Variant, states: Mapping[str, Mapping], chosen: Mapping[Tuple[str, str], dict], *, with_mergekit: bool, bar=None) -> None:
        """Each winner: its recipe written, merged (by mergekit from the file when
        ``with_mergekit``, else in memory), scored on the test items into ``variant.merges``."""
        for (merge_set, method), best in chosen.items():
            models = MERGE_SETS[merge_set]
            tasks = tuple(TASK_MODELS[m] for m in models)
            recipe = self.recipe(variant, merge_set, method, best)
            expected = merge(states, variant, models, method, best["parameters"])
            entry = {"parameters": best["parameters"], "grid_position": best["position"], "validation_average": best["average"], "recipe": str(recipe)}
            if best["average"] is None:
                entry["searched_on"] = best["searched_on"]
            if with_mergekit:
                merged, scored = self.merged_by_mergekit(variant, merge_set, method, recipe, expected, tasks)
                entry.update(merged)
            else:
                entry["merged_with"] = "in memory (mergekit merge_state_dicts)"
                scored = self.state_scorer.score(expected, self.test_dir, tasks)  # type: ignore[attr-defined]
            norm = normalized(scored.scores, variant.test_references)  # type: ignore[attr-defined]
            entry.update(test=scored.scores, items=scored.items, normalized=norm, average=search.mean(norm))  # type: ignore[attr-defined]
            variant.merges.setdefault(merge_set, {})[method] = entry
            if bar is not None:
                bar.update()


def check_references(variants: Sequence[Variant]) -> None:
    """Stop (naming the model) when a task model scores 0 on its own test or validation items:
    normalized accuracy would be undefined."""
    for variant in variants:
        normalized(variant.test_references, variant.test_references)
        normalized(variant.validation_references, variant.validation_references)


def search_and_test(variants: Sequence[Variant], states, state_scorer, validation_dir: Path, stage: TestStage, settings: DemoSettings) -> None:
    """The validation search on the searched variants (the first seed's, or every seed's with
    ``search_each_seed``), the other seeds at the grid positions it chose; then every winner
    merged and scored on the test items (through mergekit's recipe files for the first seed's
    heterogeneous variant)."""
    from tqdm.auto import tqdm

    first = variants[0].seed
    searched = [v for v in variants if settings.search_each_seed or v.seed == first]
    work = lambda group: sum(len(MERGE_SETS) * len(v.methods) for v in group)  # noqa: E731
    searches: Dict[str, Tuple[Variant, Dict[Tuple[str, str], dict]]] = {}  # setting -> the searched variant and its choices
    with tqdm(total=work(searched), desc="validation search (merge in memory, score)", unit="search") as search_bar, tqdm(total=work(variants), desc="merge winners, score on test", unit="merge") as test_bar:
        for variant in variants:
            own = variant_states(variant, states)
            if variant.name in {v.name for v in searched}:
                chosen = validation_search(variant, own, state_scorer, validation_dir, settings, search_bar)
                searches[variant.setting] = (variant, chosen)
            else:
                chosen = reused_choices(variant, *searches[variant.setting], settings)
            stage.run(variant, own, chosen, with_mergekit=variant.seed == first and variant.setting == HETEROGENEOUS, bar=test_bar)


class Laps:
    """Seconds per stage of the run, and the total."""

    def __init__(self) -> None:
        self.started = self.clock = time.perf_counter()
        self.timings: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 1)
        self.clock = now

    def total(self) -> Dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self.started, 1)}


def prepare(out: Path, workers: int, log: Log) -> Path:
    """Refuse early where model-written code cannot run sandboxed; the output folder; the
    cache of the norms under it; one line when the machine is busy."""
    from fedmerge_plugins.demo.pool import load_warning
    from fedmerge_plugins.evaluation.sandbox import require_isolation

    require_isolation()  # the code task runs model-written programs: refuse before training, not after
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDMERGE_CACHE_DIR", str(out / "cache"))
    warning = load_warning()
    if warning:
        log(warning)
    return out


def run_demo(
    out: Path,
    size: str = "full",
    *,
    rebuild: bool = False,
    device: str = "cpu",
    settings: Optional[DemoSettings] = None,
    workers: Optional[int] = None,
    log: Log = print,
) -> DemoResult:
    """Run the whole demo into ``out`` and return its results (also written to ``out``).
    ``workers``: training processes of one thread each (default: one per core); evaluation and
    merging run in this process with torch's current thread count."""
    import torch

    from fedmerge_plugins.demo.environment import describe
    from fedmerge_plugins.demo.evaluate import Scorer, StateScorer
    from fedmerge_plugins.demo.pool import core_count
    from fedmerge_plugins.evaluation.code_runner import remembered_runs

    settings = settings or SIZES[size]
    cores = core_count()
    workers = workers or cores
    out = prepare(out, workers, log)
    laps = Laps()
    manifest = build_models(out, settings.build, rebuild=rebuild, workers=workers, log=log)
    models_dir = out / "models"
    laps.lap("build")

    splits = task_splits(settings.build)
    validation_dir = data.write_eval_data(out / "data" / "validation", splits, "validation")
    test_dir = data.write_eval_data(out / "data" / "test", splits, "test")
    scorer = Scorer(batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks, device=device)
    environment = describe(workers=workers, threads=torch.get_num_threads(), cores=cores, build_key=manifest["key"])
    with remembered_runs():  # merges write the same programs again and again: run each once
        base, variants = evaluate_references(scorer, manifest, models_dir, validation_dir, test_dir, settings.build)
        check_references(variants)
        laps.lap("evaluate references")
        states = load_states(models_dir, sorted({"base", *(e["path"] for v in variants for e in v.models.values())}))
        state_scorer = StateScorer(scorer, models_dir / "base")
        stage = TestStage(out, test_dir, settings, scorer, state_scorer)
        search_and_test(variants, states, state_scorer, validation_dir, stage, settings)
        laps.lap("search, merge and test")
    result = DemoResult(str(out), size, settings_dict(settings), manifest, base, variants, environment=environment)
    result.comparisons = compare(result, settings.bootstrap_samples)
    result.timings = laps.total()
    write_report(result, out, log=log)
    return result
