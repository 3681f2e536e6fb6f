"""Tables, ``report.md`` and the bar chart of a demo run.

Everything here is computed from a ``DemoResult`` turned into a dict (or its ``results.json``):
the printed numbers, intervals and tallies all come from ``result["comparisons"]``
(``compare.compare``) and the variants' measured scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Mapping, Sequence

from fedmerge_plugins.catalogue import LABELS
from fedmerge_plugins.demo.build import TASK_MODELS
from fedmerge_plugins.demo.compare import by_setting, chart_series
from fedmerge_plugins.demo.data import TASK_LABELS, TASKS
from fedmerge_plugins.demo.recipes import MERGE_SETS
from fedmerge_plugins.demo.environment import environment_lines
from fedmerge_plugins.demo.variants import HETEROGENEOUS, HOMOGENEOUS
from fedmerge_plugins.evaluation.report import markdown_table

CHART = "normalized_accuracy.png"
METHOD_LABELS = LABELS


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def interval_text(interval: Mapping) -> str:
    """"+3.1 [−0.4, +6.5]" (points of average normalized accuracy), "≈" marking within noise."""
    mark = " ≈" if interval["verdict"] == "unchanged" else ""
    return f"{signed(interval['estimate'])} [{signed(interval['low'])}, {signed(interval['high'])}]{mark}"


def parameters_text(parameters: Mapping[str, float]) -> str:
    names = {"lambda": "λ", "rho": "ρ"}
    return ", ".join(f"{names.get(k, k)}={v:.3g}" for k, v in sorted(parameters.items()))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def task_model_table(result: Mapping) -> str:
    """Per seed: each task model's test accuracy on its own task (the base's beside it), and the
    heterogeneous candidates' validation accuracy with the one picked."""
    grouped = by_setting(result)
    base = result["base"]
    headers = ["seed", *[f"{TASK_LABELS[t]} ({name})" for name, t in TASK_MODELS.items()], "heterogeneous model: validation accuracy per candidate (steps)", "its test accuracy"]
    rows = [["base", *[percent(base[t]) for t in TASK_MODELS.values()], "", ""]]
    for homogeneous, heterogeneous in zip(grouped[HOMOGENEOUS], grouped[HETEROGENEOUS]):
        special = next(name for name in TASK_MODELS if heterogeneous["models"][name]["path"] != homogeneous["models"][name]["path"])
        picked = heterogeneous["models"][special]["training"]["steps"]
        candidates = ", ".join(
            f"{'**' if c['steps'] == picked else ''}{c['steps']}: {percent(c['validation_accuracy'])}{'**' if c['steps'] == picked else ''}"
            for c in heterogeneous["candidates"]
        )
        rows.append(
            [str(homogeneous["seed"]), *[percent(homogeneous["test_references"][t]) for t in TASK_MODELS.values()], candidates,
             percent(heterogeneous["test_references"][TASK_MODELS[special]])]
        )
    return markdown_table(headers, rows) + "\n\nTest accuracy % on the model's own task (base: of the pre-trained model); bold: the candidate picked on validation."


def settings_table(result: Mapping) -> str:
    """The paper's Tables 3/4: task arithmetic, homogeneous against heterogeneous training."""
    comparisons = result["comparisons"]["settings"]
    headers = ["merge set", "homogeneous", "heterogeneous", "heterogeneous − homogeneous [95 % CI]"]
    rows = [
        [name, percent(entry[HOMOGENEOUS]), percent(entry[HETEROGENEOUS]), interval_text(entry["difference"])]
        for name, entry in comparisons.items()
    ]
    return markdown_table(headers, rows)


def methods_table(result: Mapping) -> str:
    """The paper's Table 2: each method against task arithmetic in the heterogeneous setting."""
    comparisons = result["comparisons"]["methods"]
    headers = ["method", "improved", "unchanged", "degraded", "mean Δ over all [95 % CI]", *MERGE_SETS]
    rows = []
    for method, entry in comparisons.items():
        tally = entry["tally"]
        rows.append(
            [METHOD_LABELS[method], str(tally["improved"]), str(tally["unchanged"]), str(tally["degraded"]), interval_text(entry["overall"]),
             *[interval_text(entry["per_set"][s]) for s in MERGE_SETS]]
        )
    return markdown_table(headers, rows)


def noise_lines(result: Mapping) -> List[str]:
    """Which differences to task arithmetic are within noise (intervals containing 0)."""
    lines = []
    for method, entry in result["comparisons"]["methods"].items():
        overall = entry["overall"]
        label = METHOD_LABELS[method]
        if overall["verdict"] == "unchanged":
            lines.append(f"- {label}: {signed(overall['estimate'])} points on average, within noise (the interval contains 0).")
        else:
            word = "better" if overall["verdict"] == "improved" else "worse"
            lines.append(f"- {label}: {signed(overall['estimate'])} points on average, {word} than task arithmetic beyond noise.")
    setting = result["comparisons"]["settings"]["all"]["difference"]
    lines.append(
        f"- Task arithmetic, heterogeneous against homogeneous training: {signed(setting['estimate'])} points, "
        + ("within noise." if setting["verdict"] == "unchanged" else "beyond noise.")
    )
    return lines


def results_table(result: Mapping) -> str:
    """Mean over the seeds of each merge's normalized test accuracy per task and on average."""
    grouped = by_setting(result)
    headers = ["setting", "merge set", "method", "λ, ρ picked (per seed)", *[TASK_LABELS[t] for t in TASKS], "avg normalized"]
    rows = []
    for setting, variants in grouped.items():
        for merge_set in MERGE_SETS:
            for method in variants[0]["merges"][merge_set]:
                entries = [v["merges"][merge_set][method] for v in variants]
                cells = [percent(mean([e["normalized"][t] for e in entries])) if t in entries[0]["normalized"] else "/" for t in TASKS]
                picked = "; ".join(parameters_text(e["parameters"]) for e in entries)
                rows.append([setting, merge_set, METHOD_LABELS[method], picked, *cells, percent(mean([e["average"] for e in entries]))])
    return markdown_table(headers, rows) + "\n\nNormalized accuracy % on the test items (accuracy / the task model's own accuracy), mean over the seeds. /: task not merged."


def norm_table(result: Mapping) -> str:
    """Task-vector norms (the paper's Table 7), the training behind them, FedNova's weights and χ²(p‖w)."""
    from fedmerge_plugins.diagnostics.stats import chi_square, fednova_weights

    headers = ["setting", "seed", *[f"‖τ‖ {name}" for name in TASK_MODELS], "steps × rate", "FedNova w", "χ²(p‖w)"]
    rows = []
    for variant in result["variants"]:
        models = variant["models"]
        effective = [models[m]["training"]["steps"] * models[m]["training"]["learning_rate"] for m in TASK_MODELS]
        weights = fednova_weights(effective)
        rows.append(
            [variant["setting"], str(variant["seed"]), *[f"{models[m]['task_vector_norm']:.2f}" for m in TASK_MODELS],
             " / ".join(f"{a:.3g}" for a in effective), " / ".join(f"{w:.3f}" for w in weights), f"{chi_square(weights):.3f}"]
        )
    return markdown_table(headers, rows) + "\n\nsteps × rate is FedNova's ‖a_t‖₁ (constant rate); w_t = ‖a_t‖₁ / Σ_s ‖a_s‖₁, χ²(p‖w) with p uniform (0 for equal training)."


def mergekit_table(result: Mapping) -> str:
    headers = ["variant", "merge set", "method", "candidates", "picked", "validation avg normalized", "merged by", "max |Δ| vs in-memory"]
    rows = []
    for variant in result["variants"]:
        for merge_set, methods in variant["merges"].items():
            for method, entry in methods.items():
                if "max_abs_difference_to_sweep_merge" not in entry:
                    continue
                rows.append(
                    [f"seed {variant['seed']} {variant['setting']}", merge_set, METHOD_LABELS[method], str(len(variant["sweep"][merge_set][method])),
                     parameters_text(entry["parameters"]), percent(entry["validation_average"]), entry["merged_with"],
                     f"{entry['max_abs_difference_to_sweep_merge']:.1e}"]
                )
    return markdown_table(headers, rows)


def draw_chart(result: Mapping, path: Path) -> Path:
    """Grouped bars: average normalized test accuracy per merge set (mean over seeds) of
    homogeneous task arithmetic, then every method in the heterogeneous setting, each with its
    95 % bootstrap interval (``comparisons["bars"]``) as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = result["comparisons"]["bars"]
    series = chart_series()
    sets = list(MERGE_SETS)
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(10, 4.8), dpi=120)
    for index, (setting, method) in enumerate(series):
        xs = [i + (index - (len(series) - 1) / 2) * width for i in range(len(sets))]
        intervals = [bars[f"{setting}/{method}"][s] for s in sets]
        values = [100 * i["estimate"] for i in intervals]
        errors = [[100 * (i["estimate"] - i["low"]) for i in intervals], [100 * (i["high"] - i["estimate"]) for i in intervals]]
        drawn = axis.bar(xs, values, width, yerr=errors, capsize=2, error_kw={"elinewidth": 0.8}, label=f"{METHOD_LABELS[method]} ({setting})")
        axis.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
    axis.set_xticks(range(len(sets)), sets)
    axis.set_ylabel("average normalized accuracy (%)")
    axis.set_title("fedmerge demo: merged models on held-out test items (mean over seeds, 95 % bootstrap intervals)")
    axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axis.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def timing_lines(result: Mapping) -> List[str]:
    return [f"- {name}: {seconds:.0f} s" for name, seconds in result["timings"].items()]


def search_scope(result: Mapping) -> str:
    """Which seeds' models the validation search ran on."""
    if result["settings"].get("search_each_seed", True):
        return "for each seed"
    first = result["variants"][0]["seed"]
    return (
        f"on seed {first}'s models (the other seeds merge at the grid position seed {first}'s search chose: the same λ "
        "and FedGMA ρ, CCLIP's ρ at the same step between their own norms; `fedmerge demo --search-each-seed` searches every seed)"
    )


def criterion_line(result: Mapping) -> str:
    criterion = result["comparisons"]["criterion"]
    return (
        f"Homogeneous task arithmetic over all three tasks keeps {percent(criterion['homogeneous_task_arithmetic_all_three'])} % "
        f"average normalized accuracy (mean over the seeds); the demo is built for at least {percent(criterion['threshold'])} % "
        f"({'met' if criterion['met'] else 'NOT met'})."
    )


def report_markdown(result: Mapping) -> str:
    manifest = result["manifest"]
    config = manifest["config"]
    shape = config["shape"]
    settings = result["settings"]
    comparisons = result["comparisons"]
    finetune = config["finetune"]
    cases = len(MERGE_SETS) * len(config["seeds"])
    sections = [
        "# fedmerge demo: the paper's LLM experiment in miniature",
        f"Size `{result['size']}`; output directory `{result['out']}`.",
        "## What ran",
        (
            f"A Llama-architecture model ({shape['num_hidden_layers']} layers, hidden size {shape['hidden_size']}, "
            f"{config['vocab_size']}-token byte-level BPE tokenizer trained here) was pre-trained for "
            f"{config['pretrain']['steps']} steps on a mixed synthetic corpus in which {percent(config['format_share'])} % of the "
            "documents are training items in the tasks' own format, then fine-tuned into three task models "
            f"(instruction, math, code) with {len(config['seeds'])} seeds. Homogeneous setting: all three "
            f"{finetune['steps']} steps at learning rate {finetune['learning_rate']:g}. Heterogeneous setting (the paper's "
            f"§6.1.2): the {config['heterogeneous_model']} model at {config['lr_factor']:g}× that rate, its steps picked on "
            f"validation among {', '.join(map(str, config['heterogeneous_steps']))}; the others as in the homogeneous setting."
        ),
        (
            f"λ and ρ were picked {search_scope(result)}, per setting, merge set and method, on {config['n_validation']} validation items per task "
            f"(λ ∈ {{{', '.join(f'{v:g}' for v in settings['lambdas'])}}}; FedGMA ρ ∈ "
            f"{{{', '.join(f'{v:g}' for v in settings['fedgma_rhos'])}}}, values giving the same merge evaluated once; "
            f"CCLIP ρ: {settings['cclip_count']} values from the smallest task-vector norm of the set (included) to the "
            f"largest (excluded)). Every merge was scored with lm-eval on {config['n_test']} held-out test items per task "
            f"(greedy, at most {settings['max_gen_toks']} new tokens). Intervals: 95 % paired bootstrap over the test items "
            f"({comparisons['samples']} resamples, the task models' reference scores resampled with them); ≈ marks a "
            "difference within noise (its interval contains 0)."
        ),
        criterion_line(result),
        "## Task models",
        task_model_table(result),
        "## Task arithmetic: homogeneous against heterogeneous training (as the paper's Tables 3 and 4)",
        settings_table(result),
        "Average normalized accuracy %, mean over the seeds; the difference in points with its interval.",
        "## Every method against task arithmetic, heterogeneous setting (as the paper's Table 2)",
        methods_table(result),
        (
            f"improved / unchanged / degraded: over the {cases} cases (merge sets × seeds), whether the interval of the "
            "method's difference to task arithmetic lies above 0, contains 0 (within noise) or lies below. Δ: points of "
            "average normalized accuracy, mean over the seeds."
        ),
        "\n".join(noise_lines(result)),
        f"![average normalized accuracy]({CHART})\n\nError bars: 95 % bootstrap intervals of each bar (the test items resampled as above).",
        "## All merges (test items)",
        results_table(result),
        "## Task vector norms and FedNova's χ²(p‖w)",
        norm_table(result),
        "## mergekit from the recipe files",
        (
            f"For seed {result['variants'][0]['seed']}'s heterogeneous setting every winner was written into its recipe "
            f"(`{Path(result['out']) / 'recipes'}`) and merged by mergekit from that file; the other variants' winners were "
            "scored from the in-memory merge (mergekit's `merge_state_dicts`), their recipes written all the same."
        ),
        mergekit_table(result),
        "## Environment",
        "\n".join(environment_lines(result.get("environment") or {})),
        "## Time",
        "\n".join(timing_lines(result)),
        "## Caveats",
        (
            "A few-minute CPU miniature, not the paper's 13B models: the tasks are synthetic and the test sets "
            f"{config['n_test']} items per task (one item is {100 / config['n_test']:.1f} points of a task's accuracy). "
            "The numbers above are what this run measured; nothing was tuned for a method to win."
        ),
    ]
    return "\n\n".join(sections) + "\n"


def write_report(result, out: Path, log: Callable[[str], None] = print) -> Path:
    """Print the main tables, write ``results.json``, ``report.md`` and the chart."""
    from dataclasses import asdict, is_dataclass

    data = asdict(result) if is_dataclass(result) else dict(result)
    (out / "results.json").write_text(json.dumps(data) + "\n")
    draw_chart(data, out / CHART)
    path = out / "report.md"
    path.write_text(report_markdown(data))
    log("")
    log(criterion_line(data))
    log("")
    log(task_model_table(data))
    log("")
    log("Task arithmetic, homogeneous against heterogeneous training:")
    log(settings_table(data))
    log("")
    log("Every method against task arithmetic (heterogeneous):")
    log(methods_table(data))
    for line in noise_lines(data):
        log(line)
    log("")
    log(norm_table(data))
    log("")
    log(f"Report: {path}  (chart: {out / CHART}; recipes: {out / 'recipes'})")
    return path
