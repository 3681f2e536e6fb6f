"""``fedmerge demo``: the paper's LLM experiment in miniature, on CPU, offline."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import click

SIZE_HELP = "full: the demo (3 seeds, 200 test items per task); small: 2 seeds and fewer grid points (the end-to-end test; measured times: the README's demo section)"


@click.command("demo")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True, help="Output directory (models, data, merges, report).")
@click.option("--size", type=click.Choice(["full", "small"]), default="full", show_default=True, help=SIZE_HELP)
@click.option("--rebuild", is_flag=True, help="Train the models again even if a matching build is cached.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for evaluation (training and merging run on CPU).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Training processes, one torch thread each (default: one per core); the models do not depend on it.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Torch threads for evaluation and merging (more can change a greedy generation's last bits, and so the numbers).")
@click.option("--search-each-seed", is_flag=True, help="Search λ/ρ on every seed's models (default: on the first seed's; the others reuse its grid positions).")
def demo_command(out: Path, size: str, rebuild: bool, device: str, workers: Optional[int], threads: int, search_each_seed: bool) -> None:
    """Build a tiny base LLM and three task models (instruction, math, code) per seed, trained
    homogeneously and heterogeneously (one at 10x the rate), merge them with task_arithmetic,
    fednova, fedgma, median and cclip through mergekit, pick λ/ρ on validation items, score
    everything with lm-eval, compare with paired-bootstrap intervals, and write OUT/report.md."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(name, "1" if name != "TOKENIZERS_PARALLELISM" else "false")
    import torch

    from fedmerge_plugins.boundary import one_line_errors
    from fedmerge_plugins.demo.run import SIZES, run_demo

    torch.set_num_threads(threads)
    settings = replace(SIZES[size], search_each_seed=True) if search_each_seed else SIZES[size]
    with one_line_errors():
        from fedmerge_plugins.evaluation.sandbox import require_isolation

        click.echo(require_isolation().describe(), err=True)  # the code task runs model-written programs
        run_demo(out, size, rebuild=rebuild, device=device, settings=settings, workers=workers, log=click.echo)
