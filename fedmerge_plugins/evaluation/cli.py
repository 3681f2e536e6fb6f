"""``fedmerge eval MODEL_DIR``: the paper's LLM evaluation of a local model through lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import click

from fedmerge_plugins.cli import ExistingPath, error_boundary
from fedmerge_plugins.evaluation.tasks import ALL_TASKS, PAPER_TASKS

_BACKEND_OPTIONS = (
    click.option(
        "--backend",
        type=click.Choice(["hf", "vllm"]),
        default="hf",
        show_default=True,
        help="lm-eval model that generates: hf (transformers) or vllm (pip install 'fedmerge[vllm]', GPUs).",
    ),
    click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True, help="vllm: GPUs per model replica."),
    click.option("--data-parallel-size", type=click.IntRange(min=1), default=1, show_default=True, help="vllm: model replicas (needs ray)."),
    click.option(
        "--gpu-memory-utilization",
        type=click.FloatRange(0, 1, min_open=True),
        help="vllm: fraction of each GPU's memory it may take (vLLM's default 0.9).",
    ),
    click.option("--max-model-len", type=click.IntRange(min=1), help="vllm: context length (default: the model's)."),
)


def backend_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--backend`` option and vLLM's settings, for every command that runs lm-eval."""
    for option in reversed(_BACKEND_OPTIONS):
        command = option(command)
    return command


def backend_from_options(
    backend: str,
    tensor_parallel_size: int,
    data_parallel_size: int,
    gpu_memory_utilization: Optional[float],
    max_model_len: Optional[int],
    **hf: Any,
):
    """A ``Backend`` from the options of ``backend_options`` (``hf``: device, batch_size, dtype)."""
    from fedmerge_plugins.evaluation.backends import Backend

    return Backend(
        name=backend,
        tensor_parallel_size=tensor_parallel_size,
        data_parallel_size=data_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        **hf,
    )


def announce_sandbox(tasks: Any, allow_code_execution: bool) -> None:
    """Say on stderr, in one line, how model-written code will run, when some task runs it
    (or refuse, where it cannot be isolated: ``SandboxUnavailable``)."""
    from fedmerge_plugins.evaluation.tasks import TASKS

    if allow_code_execution and any(TASKS[task].runs_code for task in tasks if task in TASKS):
        from fedmerge_plugins.evaluation.sandbox import require_isolation

        click.echo(require_isolation().describe(), err=True)


@error_boundary
@click.command("eval")
@click.argument("model_dir", type=ExistingPath(file_okay=False, path_type=Path))
@click.option(
    "--tasks",
    default=",".join(PAPER_TASKS),
    show_default=True,
    help=f"Comma-separated tasks: fedmerge's {', '.join(ALL_TASKS)} (instruct needs --data-dir), or any lm-eval task (stock, or from --include-path), scored on its first metric.",
)
@click.option(
    "--include-path",
    "include_path",
    multiple=True,
    type=ExistingPath(file_okay=False, path_type=Path),
    help="A folder of your own lm-eval task YAMLs (repeatable), as lm_eval --include_path.",
)
@click.option(
    "--data-dir",
    type=ExistingPath(file_okay=False, path_type=Path),
    help="Read DIR/<task>.jsonl instead of the public datasets (offline).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N items of each task.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda:0.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts per generate call.")
@click.option("--dtype", help="Model dtype (default: float32 on cpu, the checkpoint's own elsewhere).")
@backend_options
@click.option(
    "--max-gen-toks",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Most tokens generated per answer; 0 keeps each task's own (the paper's: 1024 for GSM8K, 2048 for MATH and code). Lowered, with a note, to what the model's context leaves after the longest prompt.",
)
@click.option(
    "--validation-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Split each task: a seeded fraction (the paper: 0.05) is 'validation', the rest 'test'.",
)
@click.option(
    "--split",
    type=click.Choice(["test", "validation"]),
    default="test",
    show_default=True,
    help="With --validation-fraction: which part to score. Without: every item of the --data-dir files is scored (a folder of validation files is the validation split); public data without a fraction is the test set.",
)
@click.option("--seed", type=int, default=1234, show_default=True, help="Seed of the validation split.")
@click.option(
    "--allow-code-execution",
    is_flag=True,
    help="Run model-written code (needed for humaneval and mbpp; each program runs in a limited subprocess).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write lm-eval's results JSON (results.json) and the generations (samples_<task>.jsonl) here.",
)
@click.option(
    "--reference",
    type=ExistingPath(dir_okay=False, path_type=Path),
    help="JSON {task: score} of the fine-tuned models (or another run's --output results.json): also print normalized accuracy.",
)
@click.option(
    "--alpaca-eval-outputs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the instruct task's answers as alpaca_eval model outputs (JSON) to this file.",
)
def eval_command(
    model_dir: Path,
    tasks: str,
    data_dir: Optional[Path],
    limit: Optional[int],
    device: str,
    batch_size: int,
    dtype: Optional[str],
    backend: str,
    tensor_parallel_size: int,
    data_parallel_size: int,
    gpu_memory_utilization: Optional[float],
    max_model_len: Optional[int],
    max_gen_toks: int,
    validation_fraction: Optional[float],
    split: str,
    seed: int,
    allow_code_execution: bool,
    output: Optional[Path],
    reference: Optional[Path],
    alpaca_eval_outputs: Optional[Path],
    include_path: Tuple[Path, ...] = (),
) -> None:
    """Evaluate the model in MODEL_DIR on GSM8K, MATH, HumanEval and MBPP as in the paper
    (zero-shot, greedy), or on any lm-eval task, and print a table laid out like the paper's
    Table 5, then each score's 95 % interval (and, with --reference, normalized accuracy)."""
    from fedmerge_plugins.errors import DataError
    from fedmerge_plugins.evaluation.api import evaluate_model
    from fedmerge_plugins.evaluation.report import format_table, write_alpaca_eval_outputs
    from fedmerge_plugins.evaluation.intervals import interval_lines, read_reference, score_interval
    from fedmerge_plugins.evaluation.lm_eval_tasks import parse_names

    try:
        names = parse_names(tasks)  # checked against lm-eval's tasks by evaluate_model
    except DataError as error:
        raise click.BadParameter(str(error), param_hint="--tasks") from None
    try:
        reference_scores = read_reference(reference) if reference is not None else None
    except DataError as error:
        raise click.BadParameter(str(error), param_hint="--reference") from None
    if alpaca_eval_outputs is not None and "instruct" not in names:
        raise click.UsageError("--alpaca-eval-outputs writes the instruct task's answers: add instruct to --tasks")
    lm_backend = backend_from_options(
        backend,
        tensor_parallel_size,
        data_parallel_size,
        gpu_memory_utilization,
        max_model_len,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
    )
    from fedmerge_plugins.files import check_writable

    for target in (output / "results.json" if output is not None else None, alpaca_eval_outputs):
        if target is not None:
            check_writable(target)  # a read-only or full place: refused before the evaluation
    announce_sandbox(names, allow_code_execution)
    result = evaluate_model(
        model_dir,
        names,
        data_dir=data_dir,
        limit=limit,
        device=device,
        batch_size=batch_size,
        max_gen_toks=max_gen_toks or None,
        split=split,
        validation_fraction=validation_fraction,
        seed=seed,
        allow_code_execution=allow_code_execution,
        output_dir=output,
        backend=lm_backend,
        include_path=include_path,
        note=lambda line: click.echo(line, err=True),
    )
    click.echo(format_table([((model_dir.name,), result.scores)]))
    click.echo("items: " + ", ".join(f"{short} {count}" for short, count in result.counts.items()))
    for line in interval_lines({name: score_interval(result.item_scores(name)) for name in result.scores}, reference_scores):
        click.echo(line)
    if output is not None:
        click.echo(f"lm-eval results: {output / 'results.json'}")
    if alpaca_eval_outputs is not None:
        path = write_alpaca_eval_outputs(result.raw, alpaca_eval_outputs, generator=model_dir.name)
        click.echo(f"alpaca_eval model outputs: {path}")
