"""Tables, the winner statement, ``report.md`` and the bar chart of a demo run.

Everything here is computed from a ``DemoResult`` (or its ``results.json``): the printed
numbers, the winner and its margins all come from the same table values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from fedmerge_plugins.catalogue import LABELS
from fedmerge_plugins.demo.build import TASK_MODELS
from fedmerge_plugins.demo.data import TASK_LABELS, TASKS
from fedmerge_plugins.demo.recipes import METHODS
from fedmerge_plugins.evaluation.report import markdown_table

CHART = "normalized_accuracy.png"
METHOD_LABELS = LABELS


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def parameters_text(parameters: Mapping[str, float]) -> str:
    names = {"lambda": "λ", "rho": "ρ"}
    return ", ".join(f"{names.get(k, k)}={v:.3g}" for k, v in sorted(parameters.items()))


def results_table(result: Mapping) -> str:
    """Rows: base, task models, then every (merge set, method); columns: the three tasks
    (accuracy %, with normalized accuracy % for merges) and the average normalized accuracy."""
    headers = ["model", "merge set", "λ, ρ", *[f"{TASK_LABELS[t]} ({t})" for t in TASKS], "avg normalized"]
    rows: List[List[str]] = []
    references = result["references"]
    own = {task: references[name][task] for name, task in TASK_MODELS.items()}
    for name in ["base", *TASK_MODELS]:
        scores = references[name]
        label = "base (pre-trained)" if name == "base" else f"{name} model"
        rows.append([label, "", "", *[percent(scores[t]) for t in TASKS], ""])
    for merge_set, methods in result["merges"].items():
        for method in METHODS:
            entry = methods[method]
            cells = []
            for task in TASKS:
                if task in entry["test"]:
                    cells.append(f"{percent(entry['test'][task])} ({percent(entry['normalized'][task])})")
                else:
                    cells.append("/")
            rows.append(
                [METHOD_LABELS[method], merge_set, parameters_text(entry["parameters"]), *cells, percent(entry["average"])]
            )
    note = (
        "Test accuracy % of each model; for merges, in parentheses, normalized accuracy % (accuracy / "
        f"the task model's own accuracy: {', '.join(f'{TASK_LABELS[t]} {percent(v)}' for t, v in own.items())}). "
        "avg normalized: mean over the merged tasks. /: task not merged."
    )
    return markdown_table(headers, rows) + "\n\n" + note


def norm_table(result: Mapping) -> str:
    """The paper's Table 7 for the demo: task-vector norms and the training that made them."""
    models = result["manifest"]["models"]
    headers = ["", *TASK_MODELS]
    rows = [
        ["task vector norm ‖τ_t‖", *[f"{models[m]['task_vector_norm']:.2f}" for m in TASK_MODELS]],
        ["fine-tuning steps", *[str(models[m]["training"]["steps"]) for m in TASK_MODELS]],
        ["learning rate (constant)", *[f"{models[m]['training']['learning_rate']:g}" for m in TASK_MODELS]],
        [
            "steps × rate (FedNova's ‖a_t‖₁)",
            *[f"{models[m]['training']['steps'] * models[m]['training']['learning_rate']:.3g}" for m in TASK_MODELS],
        ],
        ["batch size", *[str(models[m]["training"]["batch_size"]) for m in TASK_MODELS]],
    ]
    return markdown_table(headers, rows)


def averages(result: Mapping) -> Dict[str, Dict[str, float]]:
    """method -> merge set -> average normalized test accuracy."""
    return {
        method: {merge_set: methods[method]["average"] for merge_set, methods in result["merges"].items()}
        for method in METHODS
    }


def overall_averages(result: Mapping) -> Dict[str, float]:
    """method -> mean over the merge sets of its average normalized test accuracy."""
    return {method: sum(values.values()) / len(values) for method, values in averages(result).items()}


def ranking(scores: Mapping[str, float]) -> List[Tuple[str, float]]:
    """Methods best first (ties keep the order of METHODS)."""
    return sorted(scores.items(), key=lambda item: -item[1])


def margin_sentence(ranked: Sequence[Tuple[str, float]]) -> str:
    """"X with 71.0, 5.0 points ahead of Y (66.0) and 20.0 ahead of Task Arithmetic (51.0)"."""
    (best, top), (second, runner) = ranked[0], ranked[1]
    leaders = [method for method, value in ranked if value == top]
    if len(leaders) > 1:
        text = f"a tie between {', '.join(METHOD_LABELS[m] for m in leaders)} at {percent(top)}"
    else:
        text = (
            f"{METHOD_LABELS[best]} with {percent(top)}, {percent(top - runner)} points ahead of "
            f"{METHOD_LABELS[second]} ({percent(runner)})"
        )
    baseline = dict(ranked)["task_arithmetic"]
    if "task_arithmetic" not in leaders and second != "task_arithmetic":
        text += f" and {percent(top - baseline)} ahead of Task Arithmetic ({percent(baseline)})"
    return text


def winner_lines(result: Mapping) -> List[str]:
    """Per merge set and overall: which method won on the test items, and by how much."""
    table = averages(result)
    lines = []
    for merge_set in result["merges"]:
        ranked = ranking({method: table[method][merge_set] for method in METHODS})
        lines.append(f"- {merge_set}: {margin_sentence(ranked)}.")
    overall = margin_sentence(ranking(overall_averages(result)))
    lines.append(f"- Overall (mean over the {len(result['merges'])} merge sets): {overall}.")
    return lines


def winner(result: Mapping) -> Tuple[str, float, str, float]:
    """(overall winner, its mean, runner-up, the runner-up's mean) of average normalized accuracy."""
    (best, top), (second, runner) = ranking(overall_averages(result))[:2]
    return best, top, second, runner


def search_table(result: Mapping) -> str:
    headers = ["merge set", "method", "candidates", "picked", "validation avg normalized", "merged by", "max |Δ| vs in-memory"]
    rows = []
    for merge_set, methods in result["merges"].items():
        for method in METHODS:
            entry = methods[method]
            rows.append(
                [
                    merge_set,
                    METHOD_LABELS[method],
                    str(len(result["sweep"][merge_set][method])),
                    parameters_text(entry["parameters"]),
                    percent(entry["validation_average"]),
                    entry["merged_with"],
                    f"{entry['max_abs_difference_to_sweep_merge']:.1e}",
                ]
            )
    return markdown_table(headers, rows)


def draw_chart(result: Mapping, path: Path) -> Path:
    """Grouped bars: average normalized test accuracy per merge set and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = averages(result)
    sets = list(result["merges"])
    width = 0.8 / len(METHODS)
    figure, axis = plt.subplots(figsize=(9, 4.5), dpi=120)
    for index, method in enumerate(METHODS):
        xs = [i + (index - (len(METHODS) - 1) / 2) * width for i in range(len(sets))]
        values = [100 * table[method][s] for s in sets]
        bars = axis.bar(xs, values, width, label=METHOD_LABELS[method])
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axis.set_xticks(range(len(sets)), sets)
    axis.set_ylabel("average normalized accuracy (%)")
    axis.set_title("fedmerge demo: merged models on held-out test items")
    axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axis.legend(ncol=len(METHODS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def timing_lines(result: Mapping) -> List[str]:
    return [f"- {name}: {seconds:.0f} s" for name, seconds in result["timings"].items()]


def report_markdown(result: Mapping) -> str:
    manifest = result["manifest"]
    config = manifest["config"]
    shape = config["shape"]
    settings = result["settings"]
    models = manifest["models"]
    outlier = max(TASK_MODELS, key=lambda m: models[m]["task_vector_norm"])
    best, top, second, runner = winner(result)
    sections = [
        "# fedmerge demo: the paper's LLM experiment in miniature",
        f"Size `{result['size']}`; output directory `{result['out']}`.",
        "## What ran",
        (
            f"A Llama-architecture model ({shape['num_hidden_layers']} layers, hidden size {shape['hidden_size']}, "
            f"{config['vocab_size']}-token byte-level BPE tokenizer trained here) was pre-trained for "
            f"{config['pretrain']['steps']} steps on a mixed synthetic corpus, then fine-tuned into three task "
            "models with heterogeneous training (the paper's appendix B.1): "
            + "; ".join(
                f"{m} ({TASK_LABELS[models[m]['task']]} task `{models[m]['task']}`): "
                f"{models[m]['training']['steps']} steps at learning rate {models[m]['training']['learning_rate']:g}"
                for m in TASK_MODELS
            )
            + f". The {outlier} model's task vector is the outlier."
        ),
        (
            "Each merge set (the paper's four) was merged by each method. λ and ρ were picked on "
            f"{config['n_validation']} validation items per task by the highest average normalized accuracy "
            f"(λ ∈ {{{', '.join(f'{v:g}' for v in settings['lambdas'])}}}; FedGMA ρ ∈ "
            f"{{{', '.join(f'{v:g}' for v in settings['fedgma_rhos'])}}}, values giving the same merge evaluated once; "
            f"CCLIP ρ: {settings['cclip_count']} values evenly spaced from the smallest task-vector norm of the set "
            "(included) to the largest (excluded)). The search merged in memory with mergekit's "
            "`merge_state_dicts`; the picked values were written into the recipes under "
            f"`{Path(result['out']) / 'recipes'}` and merged by mergekit from those files. Base, task models and "
            f"every merge were scored with lm-eval on {config['n_test']} held-out test items per task "
            f"(greedy, at most {settings['max_gen_toks']} new tokens)."
        ),
        "## Results (test items)",
        results_table(result),
        "## Which method won",
        (
            f"Overall winner: **{METHOD_LABELS[best]}**, mean average normalized accuracy {percent(top)} over the merge sets, "
            f"{percent(top - runner)} points ahead of {METHOD_LABELS[second]} ({percent(runner)})."
        ),
        "\n".join(winner_lines(result)),
        f"![average normalized accuracy]({CHART})",
        "## Task vector norms (as the paper's Table 7)",
        norm_table(result),
        "## Validation search",
        search_table(result),
        (
            "max |Δ|: the largest difference between the weights mergekit wrote from the recipe and the "
            "in-memory merge the search scored."
        ),
        "## Time",
        "\n".join(timing_lines(result)),
        "## Caveats",
        (
            "A few-minute CPU miniature, not the paper's 13B models: the tasks are synthetic, the test "
            "sets small (one item is "
            f"{100 / config['n_test']:.1f} points of accuracy), and a different seed or size can change the "
            "ranking. The numbers above are what this run measured; nothing was tuned for a method to win."
        ),
    ]
    return "\n\n".join(sections) + "\n"


def write_report(result, out: Path, log: Callable[[str], None] = print) -> Path:
    """Print the tables and winner, write ``results.json``, ``report.md`` and the chart."""
    from dataclasses import asdict, is_dataclass

    data = asdict(result) if is_dataclass(result) else dict(result)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    draw_chart(data, out / CHART)
    path = out / "report.md"
    path.write_text(report_markdown(data))
    log("")
    log(results_table(data))
    log("")
    log(norm_table(data))
    log("")
    log("Which method won (average normalized accuracy on the test items):")
    for line in winner_lines(data):
        log(line)
    log("")
    log(f"Report: {path}  (chart: {out / CHART}; recipes: {out / 'recipes'})")
    return path
