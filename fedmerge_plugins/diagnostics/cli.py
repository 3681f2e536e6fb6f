"""``fedmerge inspect RECIPE.yml``: task-vector heterogeneity before any merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click


@click.command("inspect")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also write the report as JSON to this file ('-' for standard output, instead of the table).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: norm bars and a cosine heatmap.")
@click.option("--device", default="cpu", show_default=True, help="Device for the arithmetic (cpu, cuda, ...).")
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of an error.")
def inspect_command(recipe: Path, json_path: Optional[str], plot_path: Optional[Path], device: str, verbose: bool) -> None:
    """Norms, cosines and sign agreement of RECIPE's task vectors, streamed one tensor at a time.

    Also: outliers (norm over 3x or under 1/3 of the median norm), which FedGMA ρ
    values change the mask, the paper's CCLIP ρ grid and, for fednova recipes, the
    weights w_t and χ²(p‖w) of section 4.2. Norms are CCLIP's own, from and into its cache.
    """
    from fedmerge_plugins.cli import one_line_errors
    from fedmerge_plugins.diagnostics.report import build_report, format_report, report_json

    with one_line_errors(verbose):
        report = build_report(recipe, device=device)
    if json_path == "-":
        click.echo(json.dumps(report_json(report), indent=1))
    else:
        click.echo(format_report(report))
        if json_path:
            Path(json_path).write_text(json.dumps(report_json(report), indent=1) + "\n")
            click.echo(f"\nJSON written to {json_path}")
    if plot_path:
        from fedmerge_plugins.diagnostics.plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}", err=json_path == "-")
