"""``fedmerge clip``: the paper's CLIP experiment on Hugging Face checkpoints.

Sub-commands: ``prepare`` (vision towers ``mergekit-yaml`` can merge), ``heads``
(zero-shot heads), ``eval`` (a merged tower's accuracy and normalised accuracy),
``experiment`` (all subsets × methods × grids, resumable) and ``summary`` (tables and
histograms of a run). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import click

from fedmerge_plugins.cli import ExistingPath, error_boundary, worker_options
from fedmerge_plugins.clip.tasks import DEFAULT_BASE, PAPER_TASKS, canonical, display_name


def _tasks(text: str) -> Tuple[str, ...]:
    tasks = tuple(canonical(t) for t in text.split(",") if t.strip())
    if not tasks:
        raise click.BadParameter("no task given")
    if len(set(tasks)) != len(tasks):
        raise click.BadParameter(f"a task is named twice in {text!r}")
    return tasks


MODEL_OPTIONS = {"models": "--model", "models_dir": "--models-dir"}


def finetuned_sources(tasks: Sequence[str], models: Sequence[str], models_dir: Optional[Path]) -> Dict[str, str]:
    """``sources.finetuned_sources``, its errors naming this command's options."""
    from fedmerge_plugins.clip.sources import SourceError, finetuned_sources as find

    try:
        return find(tasks, models, models_dir)
    except SourceError as error:
        raise click.BadParameter(str(error), param_hint=MODEL_OPTIONS[error.field]) from None


def _grid(text: Optional[str], default: Callable[[], list], option: str) -> Tuple[float, ...]:
    from fedmerge_plugins.search.grids import GridError, parse_grid

    if text is None:
        return tuple(default())
    try:
        return tuple(parse_grid(text))
    except GridError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _device(device: Optional[str]) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


base_option = click.option("--base", default=DEFAULT_BASE, show_default=True, help="Base CLIPModel (hub id or folder): text encoder, projections, processor.")
tasks_option = click.option("--tasks", "tasks_text", default=",".join(PAPER_TASKS), show_default=True, help="Comma-separated tasks.")
model_option = click.option("--model", "models", multiple=True, metavar="TASK=SRC", help="Fine-tuned vision tower of a task (repeatable).")
models_dir_option = click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), help="Folder with one fine-tuned tower per task (<dir>/<task>), e.g. from `fedmerge clip prepare`.")
data_option = click.option("--data-dir", type=ExistingPath(file_okay=False, path_type=Path), required=True, help="Folder with one dataset per task: <dir>/<task>/ (ImageFolder splits or a saved `datasets` DatasetDict).")
cache_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Cache for heads, preprocessed images and fine-tuned accuracies [default: $FEDMERGE_CACHE_DIR/clip].")


def session_options(function):
    for option in reversed([
        base_option, data_option, tasks_option, model_option, models_dir_option,
        click.option("--device", help="torch device [default: cuda if available, else cpu]."),
        click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1)),
        click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Share of train carved as validation when a task has no validation split."),
        click.option("--max-val", default=5000, show_default=True, type=click.IntRange(1), help="At most this many validation images per task."),
        click.option("--seed", default=0, show_default=True, help="Seed of the validation carve-out."),
        cache_option,
    ]):
        function = option(function)
    return function


def _session(base, data_dir, device, batch_size, val_fraction, max_val, seed, cache_dir, progress=True):
    from fedmerge_plugins.clip.data import SplitSettings
    from fedmerge_plugins.clip.evaluate import Session

    return Session(
        base=base, data_dir=data_dir, device=_device(device), batch_size=batch_size,
        settings=SplitSettings(val_fraction, max_val, seed), cache_root=cache_dir, progress=progress,
    )


@click.group("clip")
def clip_group() -> None:
    """The paper's CLIP ViT-B/32 experiment (section 6) on Hugging Face checkpoints."""


@error_boundary
@clip_group.command("prepare")
@base_option
@tasks_option
@model_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("clip-vit-base-patch32"), show_default=True)
def prepare_command(base: str, tasks_text: str, models: Tuple[str, ...], out: Path) -> None:
    """Write OUT/base and OUT/<task> as CLIPVisionModel checkpoints for configs/clip/*.yml.

    mergekit-yaml cannot take the full CLIPModel as base, and on transformers 5 it merges
    nothing from checkpoints saved by transformers 4 (the hub's fine-tuned towers): this
    re-saves the base's vision tower and each fine-tuned tower in the current layout.
    """
    from fedmerge_plugins.clip.models import export_towers

    tasks = _tasks(tasks_text)
    written = export_towers(base, finetuned_sources(tasks, models, None), out)
    for name, path in written.items():
        click.echo(f"{name}: {path}")


@error_boundary
@clip_group.command("heads")
@base_option
@tasks_option
@click.option("--data-dir", type=ExistingPath(file_okay=False, path_type=Path), help="Needed only for tasks other than the paper's eight (class names from the data).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), help="Also save {task: head} with torch.save.")
@cache_option
@click.option("--device", help="torch device [default: cuda if available, else cpu].")
def heads_command(base: str, tasks_text: str, data_dir: Optional[Path], save: Optional[Path], cache_dir: Optional[Path], device: Optional[str]) -> None:
    """Build (and cache) the zero-shot heads of the tasks."""
    from fedmerge_plugins.clip.cache import clip_cache_dir
    from fedmerge_plugins.clip.data import open_task
    from fedmerge_plugins.clip.heads import cached_head
    from fedmerge_plugins.clip.models import load_clip, load_tokenizer
    from fedmerge_plugins.clip.tasks import shipped
    from fedmerge_plugins.files import check_writable, write_output

    tasks = _tasks(tasks_text)
    if save is not None:
        check_writable(save)
    heads = {}
    clip, tokenizer = load_clip(base, _device(device)), load_tokenizer(base)
    for task in tasks:
        text = shipped(task) if data_dir is None else open_task(data_dir, task).text
        if text is None:
            raise click.BadParameter(f"task {task} is not one of the paper's tasks: pass --data-dir", param_hint="--tasks")
        heads[task] = cached_head(clip, tokenizer, base, text, clip_cache_dir(cache_dir)).cpu()
        click.echo(f"{display_name(task)}: {heads[task].shape[0]} classes × {heads[task].shape[1]} dims, {len(text.templates)} templates")
    if save is not None:
        import io

        import torch

        data = io.BytesIO()
        torch.save(heads, data)
        write_output(save, data.getvalue())


@error_boundary
@clip_group.command("eval")
@click.argument("merged")
@session_options
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--accuracy-only", is_flag=True, help="Skip the fine-tuned models (no normalized accuracy).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results as JSON.")
def eval_command(merged: str, base, data_dir, tasks_text, models, models_dir, device, batch_size, val_fraction, max_val, seed, cache_dir, split, accuracy_only, json_path) -> None:
    """Accuracy and normalized accuracy of the vision tower MERGED (folder or hub id)."""
    from fedmerge_plugins.clip.evaluate import evaluate_tower
    from fedmerge_plugins.files import check_writable, write_output

    tasks = _tasks(tasks_text)
    if json_path is not None:
        check_writable(json_path)
    finetuned = None if accuracy_only else finetuned_sources(tasks, models, models_dir)
    session = _session(base, data_dir, device, batch_size, val_fraction, max_val, seed, cache_dir)
    result = evaluate_tower(session, merged, tasks, finetuned, split)
    click.echo(f"{'task':<10} {'accuracy':>9} {'fine-tuned':>10} {'normalized':>10}")
    for task, row in result.items():
        fine = f"{100 * row['finetuned_accuracy']:10.2f}" if "finetuned_accuracy" in row else f"{'-':>10}"
        norm = f"{100 * row['normalized_accuracy']:10.2f}" if "normalized_accuracy" in row else f"{'-':>10}"
        click.echo(f"{display_name(task):<10} {100 * row['accuracy']:9.2f} {fine} {norm}")
    averages = {key: sum(r[key] for r in result.values()) / len(result) for key in ("accuracy", "normalized_accuracy") if all(key in r for r in result.values())}
    click.echo("average    " + "  ".join(f"{key} {100 * value:.2f}" for key, value in averages.items()))
    if json_path is not None:
        write_output(json_path, json.dumps({"merged": merged, "split": split, "tasks": result, "average": averages}, indent=1))


@error_boundary
@clip_group.command("experiment")
@session_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder: run.json, results.jsonl, summaries. Re-run with the same options to resume.")
@click.option("--methods", default="task_arithmetic,fednova,fedgma,median,cclip", show_default=True)
@click.option("--lambdas", help="λ grid, `a,b,c` or `start:stop:step` [default: 0.05:2.0:0.05].")
@click.option("--rhos", help="FedGMA ρ grid [default: 0.1:1.0:0.1].")
@click.option("--cclip-count", default=5, show_default=True, type=click.IntRange(1), help="CCLIP ρ values from min norm (included) to max norm (excluded).")
@click.option("--training", type=ExistingPath(dir_okay=False, path_type=Path), help="YAML `task: {steps, learning_rate}` for FedNova, e.g. configs/clip/training-tanganke.yml.")
@click.option("--min-size", default=2, show_default=True, type=click.IntRange(1), help="Smallest subset merged.")
@click.option("--progress/--no-progress", default=True)
@worker_options
def experiment_command(base, data_dir, tasks_text, models, models_dir, device, batch_size, val_fraction, max_val, seed, cache_dir, out, methods, lambdas, rhos, cclip_count, training, min_size, progress,
                       workers, ray_address, gpus_per_worker) -> None:
    """Every subset × method × grid point: select on validation, score on test.

    With --workers N (or --ray-address) each worker takes whole subset searches; this
    process loads the towers, heads and images once, and writes every record."""
    from fedmerge_plugins.search import grids
    from fedmerge_plugins.cli import worker_settings
    from fedmerge_plugins.clip.experiment import Experiment, ExperimentSpec, read_training
    from fedmerge_plugins.clip.summary import write_summary
    from fedmerge_plugins.files import folder_lock

    tasks = _tasks(tasks_text)
    settings = worker_settings(workers, ray_address, gpus_per_worker)
    settings.check()  # Ray missing: one line, before anything is loaded or written
    spec = ExperimentSpec(
        tasks=tasks,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        lambdas=_grid(lambdas, grids.lambda_grid, "--lambdas"),
        fedgma_rhos=_grid(rhos, grids.fedgma_rho_grid, "--rhos"),
        cclip_count=cclip_count,
        training=read_training(training) if training else None,
        min_size=min_size,
    )
    finetuned = finetuned_sources(tasks, models, models_dir)
    with folder_lock(out, "fedmerge clip experiment"):
        session = _session(base, data_dir, device, batch_size, val_fraction, max_val, seed, cache_dir, progress)
        Experiment(session, spec, finetuned, out, progress=progress).run(settings)
        written = write_summary(out, tasks)
    click.echo(written["markdown"].read_text())
    click.echo("written: " + ", ".join(str(p) for p in written.values()))


@error_boundary
@clip_group.command("summary")
@click.argument("out", type=ExistingPath(file_okay=False, path_type=Path))
def summary_command(out: Path) -> None:
    """Tables 1–2 and the Figure 1 histograms of the run folder OUT."""
    from fedmerge_plugins.clip.summary import write_summary

    written = write_summary(out)
    click.echo(written["markdown"].read_text())
