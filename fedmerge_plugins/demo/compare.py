"""The demo's comparisons, with 95 % paired-bootstrap intervals (``stats``):

- ``settings``: task arithmetic, heterogeneous against homogeneous training (the paper's
  Tables 3 and 4), per merge set and over all, each averaged over the seeds;
- ``methods``: every method against task arithmetic in the heterogeneous setting (the paper's
  Table 2): per case (merge set × seed) improved / unchanged / degraded, by whether the
  interval of the difference lies above 0, contains it (within noise) or lies below; the
  tally of those verdicts; and the mean difference per merge set and over all;
- ``bars``: each bar of the chart (homogeneous task arithmetic, every method in the
  heterogeneous setting; per merge set, mean over the seeds) with its 95 % interval from the
  same bootstrap draws;
- ``criterion``: homogeneous task arithmetic over all three tasks, average normalized
  accuracy against the 60 % the demo is built to reach.

Works on a ``DemoResult`` turned into a dict (``dataclasses.asdict``) or its ``results.json``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Mapping, Sequence, Tuple

from fedmerge_plugins.catalogue import BASELINE
from fedmerge_plugins.demo.recipes import MERGE_SETS, METHODS
from fedmerge_plugins.demo.stats import Interval, Side, draws, level_interval, paired_interval
from fedmerge_plugins.demo.variants import HETEROGENEOUS, HOMOGENEOUS

ALL_THREE = "instruction-math-code"
CRITERION = 0.60  # homogeneous task arithmetic over all three keeps at least this much


def side(variant: Mapping, merge_set: str, method: str) -> Side:
    items = variant["merges"][merge_set][method]["items"]
    return Side(items, {task: variant["reference_items"][task] for task in items})


def interval_dict(interval: Interval) -> dict:
    return {**asdict(interval), "verdict": interval.verdict}


def by_setting(result: Mapping) -> Dict[str, List[Mapping]]:
    """setting -> its variants, in seed order."""
    grouped: Dict[str, List[Mapping]] = {}
    for variant in result["variants"]:
        grouped.setdefault(variant["setting"], []).append(variant)
    return grouped


def chart_series() -> List[Tuple[str, str]]:
    """(setting, method) of the chart's bars: homogeneous task arithmetic, then every method
    in the heterogeneous setting."""
    return [(HOMOGENEOUS, BASELINE), *((HETEROGENEOUS, method) for method in METHODS)]


def compare(result: Mapping, samples: int, seed: int = 0) -> dict:
    if not isinstance(result, Mapping):
        result = asdict(result)
    grouped = by_setting(result)
    homogeneous, heterogeneous = grouped[HOMOGENEOUS], grouped[HETEROGENEOUS]
    counts = {task: len(items) for task, items in homogeneous[0]["reference_items"].items()}
    resampling = draws(counts, samples, seed)
    pairs = lambda sets, a, b, method_a, method_b: [  # noqa: E731
        (side(va, s, method_a), side(vb, s, method_b)) for s in sets for va, vb in zip(a, b)
    ]

    settings: Dict[str, dict] = {}
    for merge_set in [*MERGE_SETS, "all"]:
        sets: Sequence[str] = list(MERGE_SETS) if merge_set == "all" else [merge_set]
        mean = lambda variants: sum(v["merges"][s][BASELINE]["average"] for s in sets for v in variants) / (len(sets) * len(variants))  # noqa: E731
        settings[merge_set] = {
            HOMOGENEOUS: mean(homogeneous),
            HETEROGENEOUS: mean(heterogeneous),
            "difference": interval_dict(paired_interval(pairs(sets, heterogeneous, homogeneous, BASELINE, BASELINE), resampling)),
        }

    methods: Dict[str, dict] = {}
    for method in heterogeneous[0]["merges"][ALL_THREE]:
        if method == BASELINE:
            continue
        cases = []
        for merge_set in MERGE_SETS:
            for variant in heterogeneous:
                interval = paired_interval([(side(variant, merge_set, method), side(variant, merge_set, BASELINE))], resampling)
                cases.append({"merge_set": merge_set, "seed": variant["seed"], **interval_dict(interval)})
        tally = {verdict: sum(c["verdict"] == verdict for c in cases) for verdict in ("improved", "unchanged", "degraded")}
        per_set = {
            merge_set: interval_dict(paired_interval(pairs([merge_set], heterogeneous, heterogeneous, method, BASELINE), resampling))
            for merge_set in MERGE_SETS
        }
        overall = interval_dict(paired_interval(pairs(list(MERGE_SETS), heterogeneous, heterogeneous, method, BASELINE), resampling))
        methods[method] = {"cases": cases, "tally": tally, "per_set": per_set, "overall": overall}

    bars = {
        f"{setting}/{method}": {s: asdict(level_interval([side(v, s, method) for v in grouped[setting]], resampling)) for s in MERGE_SETS}
        for setting, method in chart_series()
    }
    kept = settings[ALL_THREE][HOMOGENEOUS]
    return {
        "samples": samples,
        "level": 0.95,
        "item_counts": counts,
        "settings": settings,
        "methods": methods,
        "bars": bars,
        "criterion": {"homogeneous_task_arithmetic_all_three": kept, "threshold": CRITERION, "met": kept >= CRITERION},
    }
