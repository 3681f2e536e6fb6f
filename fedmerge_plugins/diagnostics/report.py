"""The ``fedmerge inspect`` report: recipe in, statistics and the paper's grids out.

``build_report`` reads a recipe's base and task models (``stats.collect_stats``), adds
the outlier flags, FedGMA's agreement effects for the paper's ρ grid, the paper's CCLIP
ρ grid and, for FedNova recipes, w_t and χ²(p‖w) (section 4.2); ``format_report`` and
``report_json`` render it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple


from fedmerge_plugins.diagnostics.stats import (
    OUTLIER_RULE,
    TaskVectorStats,
    agreement_effects,
    chi_square,
    collect_stats,
    fednova_weights,
    flag_outliers,
)


@dataclass
class FedNovaTraining:
    sources: List[str]  # where ‖a_t‖₁ came from: constant, schedule, log+schedule (exact) or log (estimate)
    details: List[str]  # the schedule, or the logs read
    steps: List[int]  # optimizer steps
    effective_steps: List[float]  # ‖a_t‖₁ = Σ_k η_t^(k)
    bounds: List[float]  # |error| of ‖a_t‖₁ ≤ bound (0: exact)
    weights: List[float]  # w_t
    chi_square: float  # χ²(p‖w)


@dataclass
class InspectReport:
    recipe: str
    method: str
    base: str
    models: List[str]  # model references as the recipe names them
    stats: TaskVectorStats
    outliers: List[Optional[str]]
    agreement: List[dict]  # agreement_effects for the FedGMA ρ grid
    cclip_rho_grid: List[float]
    fednova: Optional[FedNovaTraining]
    factors: Optional[dict] = None  # recipe_factors: each model's factor on τ_t at the recipe's λ (and ρ)


def fednova_training(config: Any, models: Sequence[Any]) -> FedNovaTraining:
    from fedmerge_plugins.guards.recipe import training_record

    records = [training_record(config, m) for m in models]
    weights = fednova_weights([r.value for r in records])
    return FedNovaTraining(
        sources=[r.source for r in records],
        details=[r.detail for r in records],
        steps=[r.steps for r in records],
        effective_steps=[float(r.value) for r in records],
        bounds=[float(r.bound) for r in records],
        weights=weights,
        chi_square=chi_square(weights),
    )


def _shared_value(config: Any, key: str) -> Optional[float]:
    """A top-level scalar parameter of the recipe (None when absent or not one number)."""
    value = (config.parameters or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def recipe_factors(config: Any, norms: Sequence[float], fednova: Optional[FedNovaTraining]) -> Optional[dict]:
    """What the kernel multiplies each τ_t by at the recipe's values: FedNova's
    c_t = (1/T Σ_s ‖a_s‖₁) / ‖a_t‖₁, CCLIP's min(1, ρ/‖τ_t‖) (the kernels' own functions);
    both then times λ. None for other methods, or a CCLIP recipe without one top-level ρ."""
    from fedmerge_plugins.methods.cclip import clip_coefficients
    from fedmerge_plugins.methods.fednova import fednova_coefficients

    lam = _shared_value(config, "lambda")
    if fednova is not None:
        factors, formula, rho = fednova_coefficients(fednova.effective_steps), "(1/T Σ_s ‖a_s‖₁) / ‖a_t‖₁", None
    elif config.merge_method == "cclip" and _shared_value(config, "rho") is not None:
        rho = _shared_value(config, "rho")
        factors, formula = clip_coefficients(rho, norms), "min(1, ρ / ‖τ_t‖)"
    else:
        return None
    return {"lambda": lam, "rho": rho, "formula": formula, "factors": factors, "scaled": None if lam is None else [lam * f for f in factors]}


def short_labels(models: Sequence[Any]) -> List[str]:
    """Last path component of each model when those are unique, else the full reference."""
    full = [str(m) for m in models]
    short = [os.path.basename(s.rstrip("/")) or s for s in full]
    return short if len(set(short)) == len(short) else full


def build_report(recipe: Path, device: str = "cpu") -> InspectReport:
    from fedmerge_plugins.search.grids import clip_rho_grid, fedgma_rho_grid
    from fedmerge_plugins.guards.recipe import load_recipe, recipe_models

    _, config = load_recipe(recipe)
    base, models = recipe_models(config)
    stats = collect_stats(base, models, labels=short_labels(models), device=device)
    fednova = fednova_training(config, models) if config.merge_method == "fednova" else None
    return InspectReport(
        recipe=str(recipe),
        method=config.merge_method,
        base=str(base),
        models=[str(m) for m in models],
        stats=stats,
        outliers=flag_outliers(stats.norms),
        agreement=agreement_effects(stats.agreement_counts, fedgma_rho_grid()),
        cclip_rho_grid=list(clip_rho_grid(stats.norms)),
        fednova=fednova,
        factors=recipe_factors(config, stats.norms, fednova),
    )


def report_json(report: InspectReport) -> Dict[str, Any]:
    stats = report.stats
    total = stats.coordinates or 1
    return {
        "recipe": report.recipe,
        "merge_method": report.method,
        "base_model": report.base,
        "models": [
            {
                "model": model,
                "label": label,
                "norm": norm,
                "norm_cached": cached,
                "zero_fraction": zeros / total,
                "outlier": flag,
            }
            for model, label, norm, cached, zeros, flag in zip(
                report.models, stats.labels, stats.norms, stats.norms_cached, stats.zero_counts, report.outliers
            )
        ],
        "outlier_rule": OUTLIER_RULE,
        "cosine": stats.cosines(),
        "inner_products": stats.gram,
        "shared_tensors": stats.tensors,
        "shared_coordinates": stats.coordinates,
        "sign_agreement": {
            "T": stats.count,
            "counts": stats.agreement_counts,
            "fractions": [c / total for c in stats.agreement_counts],
            "fedgma_rho": report.agreement,
        },
        "cclip_rho_grid": report.cclip_rho_grid,
        "fednova": None
        if report.fednova is None
        else {
            "sources": report.fednova.sources,
            "details": report.fednova.details,
            "steps": report.fednova.steps,
            "effective_steps": report.fednova.effective_steps,
            "bounds": report.fednova.bounds,
            "weights": report.fednova.weights,
            "chi_square": report.fednova.chi_square,
        },
        "factors": report.factors,
    }


def _number(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def _rho_groups(effects: Sequence[dict]) -> List[Tuple[List[float], dict]]:
    """Consecutive ρ values with the same k_min (they give the same merge)."""
    groups: List[Tuple[List[float], dict]] = []
    for effect in effects:
        if groups and groups[-1][1]["k_min"] == effect["k_min"]:
            groups[-1][0].append(effect["rho"])
        else:
            groups.append(([effect["rho"]], effect))
    return groups


def format_report(report: InspectReport) -> str:
    stats = report.stats
    T = stats.count
    total = stats.coordinates or 1
    width = max(12, *(len(label) for label in stats.labels))
    lines = [
        f"Recipe {report.recipe}: merge_method {report.method}, base {report.base}, {T} task models",
        f"{stats.tensors} tensors / {stats.coordinates:,} coordinates shared by all models",
        "",
        f"{'task vector':<{width}}  {'norm':>12}  {'unchanged':>9}  outlier",
    ]
    for label, norm, cached, zeros, flag in zip(stats.labels, stats.norms, stats.norms_cached, stats.zero_counts, report.outliers):
        lines.append(
            f"{label:<{width}}  {norm:>12.6g}  {zeros / total:>8.1%}  {flag or '-'}{'' if not cached else '   (norm from cache)'}"
        )
    lines.append(f"outliers: {OUTLIER_RULE}.")
    if T == 2 and min(stats.norms) > 0:
        lines.append(f"  (T = 2: no majority to compare with; the norms differ {max(stats.norms) / min(stats.norms):.3g}x)")
    lines += ["", "cosine similarity"]
    cosines = stats.cosines()
    lines.append(" " * width + "  " + "  ".join(f"{label[:8]:>8}" for label in stats.labels))
    for label, row in zip(stats.labels, cosines):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{_number(c):>8}" for c in row))
    lines += ["", f"sign agreement A = |1/T Σ_t sign(τ_t)|, T = {T}: share of coordinates"]
    for k, count in enumerate(stats.agreement_counts):
        lines.append(f"  A = {k}/{T}  {count / total:8.2%}")
    lines.append("FedGMA ρ grid (paper): mask M = A < ρ ? A : 1; equal k_min gives the same merge")
    for rhos, effect in _rho_groups(report.agreement):
        span = f"{rhos[0]:g}" if len(rhos) == 1 else f"{rhos[0]:g} … {rhos[-1]:g}"
        lines.append(f"  ρ = {span:<11} keeps A ≥ {effect['k_min']}/{T}, damps {effect['damped_fraction']:.2%} of coordinates")
    if T == 2:
        lines.append("  with T = 2, A is 0 or 1 except where a task vector is exactly 0: ρ in (0, 1] barely matters")
    grid = ", ".join(f"{rho:.6g}" for rho in report.cclip_rho_grid)
    lines += ["", f"CCLIP ρ grid (paper: 5 values from min ‖τ‖ included to max ‖τ‖ excluded): {grid}"]
    if report.fednova is not None:
        nova = report.fednova
        lines += ["", "FedNova training (section 4.2): ‖a_t‖₁ = Σ_k η_t^(k), w_t = ‖a_t‖₁ / Σ_s ‖a_s‖₁"]
        rows = zip(stats.labels, nova.sources, nova.steps, nova.effective_steps, nova.bounds, nova.weights, nova.details)
        for label, source, steps, effective, bound, weight, detail in rows:
            error = f" ± {bound:.3g}" if bound else ""
            lines.append(
                f"  {label:<{width}}  {source:<12}  steps {steps:>8}  ‖a‖₁ {effective:<10.6g}{error:<10}  w {weight:.4f} (1/T = {1 / T:.4f})"
            )
            lines.append(f"  {'':<{width}}    {detail}")
        lines.append(f"  χ²(p‖w) = {nova.chi_square:.6g}  (0 for equal training; task arithmetic's objective drifts as it grows)")
    if report.factors is not None:
        lines += ["", factor_heading(report.method, report.factors)]
        for label, factor, scaled in zip(stats.labels, report.factors["factors"], report.factors["scaled"] or [None] * T):
            lines.append(f"  {label:<{width}}  {factor:.6g}" + ("" if scaled is None else f"   × λ = {scaled:.6g}"))
    return "\n".join(lines)


def factor_heading(method: str, factors: dict) -> str:
    values = [f"λ = {factors['lambda']:g}" if factors["lambda"] is not None else "λ not one top-level number"]
    if factors["rho"] is not None:
        values.append(f"ρ = {factors['rho']:g}")
    return f"{method} factor on each τ_t at the recipe's {', '.join(values)}: {factors['formula']}"
