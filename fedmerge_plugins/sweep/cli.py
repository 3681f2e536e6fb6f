"""``fedmerge sweep RECIPE.yml --lambda 0.2:1.0:0.2 [--rho …]``: search λ and ρ."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click

from fedmerge_plugins.cli import ExistingPath, error_boundary, worker_options
from fedmerge_plugins.evaluation.cli import backend_options


def _size(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    from fedmerge_plugins.sweep.errors import SweepError
    from fedmerge_plugins.sweep.memory import parse_size

    try:
        return parse_size(value)
    except SweepError as error:
        raise click.BadParameter(str(error)) from None


@error_boundary
@click.command("sweep")
@click.argument("recipe", type=ExistingPath(dir_okay=False, path_type=Path))
@click.option("--lambda", "lambdas", metavar="GRID", help="λ values: START:STOP:STEP (stop included) or a comma list, e.g. 0.2:1.0:0.2.")
@click.option("--rho", "rhos", metavar="GRID", help="ρ values, as --lambda; 'paper' for the paper's grid (cclip: 5 values from min to max norm; fedgma: 0.1 … 1.0).")
@click.option("--param", "params", multiple=True, metavar="NAME=GRID",
              help="Any other numeric parameter as an axis (repeatable): a shared one (NAME=GRID) or one model's "
                   "(NAME@MODEL=GRID, MODEL as the recipe's models: entry writes it), e.g. weight@./models/math=0.5:1.5:0.5.")
@click.option("--eval", "eval_spec", required=True, metavar="EVALUATOR",
              help="lm-eval, clip, or python:MODULE:FUNCTION / python:FILE.py:FUNCTION (FUNCTION(model_dir), or FUNCTION(model) for the model loaded once, -> dict of scores or a number).")
@click.option("--tasks", default="", help="Comma-separated tasks of the lm-eval evaluator (fedmerge's five or any lm-eval task) or the CLIP evaluator.")
@click.option("--include-path", "include_path", multiple=True, type=ExistingPath(file_okay=False, path_type=Path),
              help="lm-eval: a folder of your own lm-eval task YAMLs (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Local evaluation data (lm-eval: DATA_DIR/<task>.jsonl).")
@click.option("--split", type=click.Choice(["validation", "test"]), default="validation", show_default=True,
              help="Score on this split; select on validation data, as the paper does. With --validation-fraction: a seeded part of each task; without: every item of the --data-dir files (give it a folder of validation files); other lm-eval tasks: the split their YAML names.")
@click.option("--validation-fraction", type=float, default=None, help="lm-eval: share of each task's items used as validation split.")
@click.option("--limit", type=int, default=None, help="lm-eval: score at most this many items per task.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Evaluation batch size [default: lm-eval 8, CLIP 128].")
@click.option("--allow-code-execution", is_flag=True, help="lm-eval: allow humaneval/mbpp to run model-written code.")
@click.option("--max-gen-toks", type=click.IntRange(min=0), default=None,
              help="lm-eval: most tokens generated per answer [default: 256]; 0 keeps each task's own (the paper's).")
@backend_options
@click.option("--clip-base", default=None, help="CLIP: base CLIPModel (text encoder, heads, processor) [default: openai/clip-vit-base-patch32].")
@click.option("--finetuned", multiple=True, metavar="TASK=SRC", help="CLIP: fine-tuned vision tower of a task, for normalized accuracy (repeatable).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="CLIP: folder with one fine-tuned tower per task (<dir>/<task>).")
@click.option("--reference-scores", type=ExistingPath(dir_okay=False, path_type=Path), default=None,
              help="JSON {task: score} of the fine-tuned models: select by mean normalized score (score / reference).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("sweep-out"), show_default=True,
              help="Directory for results.jsonl, winner.yml and the merges in progress.")
@click.option("--mode", type=click.Choice(["auto", "memory", "disk"]), default="auto", show_default=True,
              help="memory: read the inputs once and keep them; disk: merge each point from disk (points merged into a loaded model: the inputs read and θ₀, D written once per group, those two read per point); auto: memory if it fits.")
@click.option("--max-memory", callback=_size, default=None, metavar="SIZE", help="Memory the sweep may plan with (e.g. 24GB); default: what is available.")
@click.option("--device", default="cpu", show_default=True, help="Device for merging and evaluation (a winner merged on cuda is reproduced by mergekit-yaml --cuda).")
@click.option("--keep-merges", is_flag=True, help="Keep every point's merged model in OUT/merges/.")
@click.option("--max-points", type=click.IntRange(1), default=None, metavar="N",
              help="Refuse a grid of more than N points [default: 10,000].")
@worker_options
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of an error.")
def sweep_command(
    recipe: Path,
    lambdas: Optional[str],
    rhos: Optional[str],
    params: Tuple[str, ...],
    eval_spec: str,
    tasks: str,
    include_path: Tuple[Path, ...],
    data_dir: Optional[Path],
    split: str,
    validation_fraction: Optional[float],
    limit: Optional[int],
    batch_size: Optional[int],
    allow_code_execution: bool,
    max_gen_toks: Optional[int],
    backend: str,
    tensor_parallel_size: int,
    data_parallel_size: int,
    gpu_memory_utilization: Optional[float],
    max_model_len: Optional[int],
    clip_base: Optional[str],
    finetuned: Tuple[str, ...],
    models_dir: Optional[Path],
    reference_scores: Optional[Path],
    out: Path,
    mode: str,
    max_memory: Optional[int],
    device: str,
    keep_merges: bool,
    max_points: Optional[int],
    workers: int,
    ray_address: Optional[str],
    gpus_per_worker: Optional[float],
    verbose: bool,
) -> None:
    """Merge RECIPE at every grid point, score each merge, keep the best.

    Results go to OUT/results.jsonl one line per point, as they come; run the same command
    again to resume. The winner is written as OUT/winner.yml, a recipe mergekit-yaml
    merges to the very same weights. One sweep at a time may use OUT: a second one is
    refused while the first runs.
    """
    from fedmerge_plugins.cli import worker_settings

    settings = worker_settings(workers, ray_address, gpus_per_worker)
    settings.check()  # Ray missing: one line, before torch or mergekit is even imported
    from fedmerge_plugins.clip.sources import SourceError
    from fedmerge_plugins.evaluation.cli import announce_sandbox, backend_from_options
    from fedmerge_plugins.files import folder_lock
    from fedmerge_plugins.sweep.evaluators import load_reference, make_evaluator
    from fedmerge_plugins.sweep.run import run_sweep

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    options = {}
    vllm = dict(tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    if eval_spec == "lm-eval":
        lm_backend = backend_from_options(backend, device=device, batch_size=batch_size or 8, **vllm)
        options = dict(data_dir=data_dir, split=split, validation_fraction=validation_fraction, limit=limit,
                       allow_code_execution=allow_code_execution, device=device, backend=lm_backend)
        if include_path:  # only when given, as below
            options["include_path"] = [str(path.resolve()) for path in include_path]
        if max_gen_toks is not None:  # only when given: the default keeps older logs' fingerprints
            options["max_gen_toks"] = max_gen_toks or None
    elif backend != "hf" or tensor_parallel_size != 1 or data_parallel_size != 1 or gpu_memory_utilization or max_model_len:
        raise click.UsageError("--backend and the vllm settings are for --eval lm-eval only")
    elif eval_spec == "clip":
        options = dict(data_dir=data_dir, base=clip_base, finetuned=finetuned, models_dir=models_dir, split=split, device=device)
    if batch_size is not None and options:
        options["batch_size"] = batch_size
    try:
        evaluator = make_evaluator(eval_spec, tasks=task_list, **options)
    except SourceError as error:
        hint = "--models-dir" if error.field == "models_dir" else "--finetuned"
        raise click.BadParameter(str(error), param_hint=hint) from None
    if eval_spec == "lm-eval":
        announce_sandbox(evaluator.tasks, allow_code_execution)
    with folder_lock(out, "fedmerge sweep"):
        run_sweep(
            recipe,
            out,
            evaluator,
            lambdas=lambdas,
            rhos=rhos,
            params=params,
            reference=load_reference(reference_scores),
            mode=mode,
            max_memory=max_memory,
            device=device,
            keep_merges=keep_merges,
            workers=settings,
            max_points=max_points,
            echo=click.echo,
        )
