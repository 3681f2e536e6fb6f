"""``fedmerge inspect RECIPE.yml``: task-vector heterogeneity before any merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from fedmerge_plugins.cli import ExistingPath, error_boundary


@error_boundary
@click.command("inspect")
@click.argument("recipe", type=ExistingPath(dir_okay=False, path_type=Path))
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
    The --json and --plot paths are checked before the pass; their folders are created.
    """
    from fedmerge_plugins.diagnostics.report import build_report, format_report, report_json
    from fedmerge_plugins.files import check_writable, write_output

    for path in (json_path if json_path != "-" else None, plot_path):
        if path:
            check_writable(path)  # read-only or full: refused now, not after the pass
    report = build_report(recipe, device=device)
    if json_path == "-":
        click.echo(json.dumps(report_json(report), indent=1))
    else:
        click.echo(format_report(report))
        if json_path:
            write_output(json_path, json.dumps(report_json(report), indent=1) + "\n")
            click.echo(f"\nJSON written to {json_path}")
    if plot_path:
        from fedmerge_plugins.diagnostics.plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"plot written to {plot_path}", err=json_path == "-")
