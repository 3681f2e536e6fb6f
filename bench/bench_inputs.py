"""bench.py's inputs: the synthetic checkpoints of each size preset, the recipes and the variants timed."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support: the synthetic checkpoints

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
FORMAT_VERSION = 1

# Llama shapes (vocab, hidden, layers, heads, intermediate); heads = key-value heads.
SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "270m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, intermediate_size=2816),
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, intermediate_size=5632),
    "3b": dict(vocab_size=32000, hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, intermediate_size=8640),
}
# Std of task model t's offset θ_t − θ_0 per weight (base weights have std 0.02); the
# fourth model is used by the T = 4 variants only.
SCALES = (0.001, 0.002, 0.01, 0.0015)
LAMBDA = 0.5
STEPS = (1000, 2000, 4000, 3000)  # fednova: unequal training, so every c_t ≠ 1
AGREEMENT_RHO = 0.5  # fedgma
SWEEP_LAMBDAS = "0.05:1.0:0.05"  # 20 points
SWEEP_POINTS = 20
LMEVAL_LAMBDAS = "0.25:1.0:0.25"  # × CCLIP's five ρ (--rho paper): 20 points
LMEVAL_ITEMS = 2  # GSM8K items scored per point
LMEVAL_TOKENS = 2  # tokens generated per answer
MEMORY_INTERVAL_S = 0.05  # /proc/<pid>/status sampling period
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MARKER = "<!-- Notes below this line are kept when bench.py regenerates this file. -->"


# ---- inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    size: str
    root: Path
    base: Path
    tasks: List[Path]
    parameters: int


def parameter_count(size: str) -> int:
    from tests.support.synthetic import llama_config, parameter_shapes

    return sum(math.prod(shape) for shape in parameter_shapes(llama_config(**SIZES[size])).values())


def ensure_checkpoints(cache_dir: Path, size: str) -> Inputs:
    """Base + len(SCALES) bfloat16 task checkpoints under ``cache_dir``, made once and reused."""
    root = cache_dir / f"{size}-bf16"
    spec = {"version": FORMAT_VERSION, "config": SIZES[size], "scales": list(SCALES), "seed": 0, "dtype": "bfloat16"}
    marker = root / "complete.json"
    names = [f"task{i}" for i in range(len(SCALES))]
    count = parameter_count(size)
    inputs = Inputs(size, root, root / "base", [root / n for n in names], count)
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return inputs
    needed = 2 * count * (len(SCALES) + 2)  # five checkpoints and one merged output
    cache_dir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(cache_dir).free < needed * 1.1:
        raise SystemExit(f"{cache_dir}: need about {needed / 2**30:.1f} GiB free for the {size} checkpoints")
    shutil.rmtree(root, ignore_errors=True)

    import torch

    from tests.support.synthetic import base_tensors, llama_config, task_tensors, write_checkpoint

    config = llama_config(**SIZES[size])
    with tqdm(total=len(SCALES) + 1, desc=f"writing {size} checkpoints", unit="model") as progress:
        base = base_tensors(config, seed=0, dtype=torch.bfloat16)
        write_checkpoint(inputs.base, config, base)
        progress.update()
        for i, (path, scale) in enumerate(zip(inputs.tasks, SCALES)):
            # the tensors of synthetic.make_family, but one task model in memory at a time (it keeps them all)
            write_checkpoint(path, config, task_tensors(base, scale, seed=1 + i))
            progress.update()
    marker.write_text(json.dumps({"spec": spec, "parameters": count}, indent=1))
    return inputs


# ---- variants ---------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    models: int  # T
    kind: str  # "mergekit", "sweep", "sweep_lmeval", "by_hand_lmeval", "floor" or "startup"
    recipe: Optional[dict] = None
    norm_cache: Optional[str] = None  # cclip: "cold" or "warm"
    target: Optional[float] = None  # wall-time ratio to task_arithmetic with the same T
    rss_target: Optional[float] = 1.1  # peak-RSS ratio to task_arithmetic (None: not a target)
    reference: Optional[str] = None  # the variant the ratios compare with (default: task_arithmetic, same T)

    @property
    def imports_mergekit(self) -> bool:
        """Runs that pay mergekit's start-up (the `startup` variant's wall time)."""
        return self.kind in ("mergekit", "sweep", "sweep_lmeval", "by_hand_lmeval")


def recipe(inputs: Inputs, method: str, models: int, parameters: dict, per_model: Optional[List[dict]] = None) -> dict:
    entries = []
    for i, path in enumerate(inputs.tasks[:models]):
        entry: dict = {"model": str(path)}
        if per_model:
            entry["parameters"] = per_model[i]
        entries.append(entry)
    return {
        "merge_method": method,
        "base_model": str(inputs.base),
        "models": entries,
        "parameters": parameters,
        "dtype": "bfloat16",
    }


def clip_radius(inputs: Inputs) -> float:
    """ρ between the task-vector norms (≈ scale · √parameters): clips one model of three."""
    return 0.003 * math.sqrt(inputs.parameters)


# Wall-time targets (ratio to task_arithmetic with the same T) and the peak-RSS target. At 270m
# mergekit's import is most of a run; from 1b on the kernels and the reads dominate, and issue 19
# asks for more there: cold cclip within one extra read of the inputs, the rest no slower than
# task_arithmetic.
TARGETS = {
    "small": dict(fednova=1.05, fedgma=1.05, median=1.3, cclip_cold=1.8, cclip_warm=1.05, rss=1.1),
    "large": dict(fednova=1.0, fedgma=1.0, median=1.0, cclip_cold=1.5, cclip_warm=1.0, rss=1.05),
}


def targets_for(size: str) -> Dict[str, float]:
    return TARGETS["large" if size in ("1b", "3b") else "small"]


def variants(inputs: Inputs, size: str = "270m") -> List[Variant]:
    lam = {"lambda": LAMBDA}
    weights = [{"weight": 1.0} for _ in SCALES]
    steps = [{"steps": s} for s in STEPS]
    clip = {"lambda": LAMBDA, "rho": round(clip_radius(inputs), 6)}
    t = targets_for(size)
    rss = t["rss"]
    return [
        Variant("startup", 0, "startup"),
        Variant("task_arithmetic", 3, "mergekit", recipe(inputs, "task_arithmetic", 3, lam, weights)),
        Variant("fednova", 3, "mergekit", recipe(inputs, "fednova", 3, lam, steps), target=t["fednova"], rss_target=rss),
        Variant("fedgma", 3, "mergekit", recipe(inputs, "fedgma", 3, {**lam, "rho": AGREEMENT_RHO}), target=t["fedgma"], rss_target=rss),
        Variant("median", 3, "mergekit", recipe(inputs, "median", 3, lam), target=t["median"], rss_target=rss),
        Variant("cclip_cold", 3, "mergekit", recipe(inputs, "cclip", 3, clip), norm_cache="cold", target=t["cclip_cold"], rss_target=rss),
        Variant("cclip_warm", 3, "mergekit", recipe(inputs, "cclip", 3, clip), norm_cache="warm", target=t["cclip_warm"], rss_target=rss),
        Variant("floor", 3, "floor"),
        Variant("sweep_lambda20", 3, "sweep", recipe(inputs, "task_arithmetic", 3, lam, weights), target=1.5, rss_target=None),
        Variant("by_hand_lmeval", 3, "by_hand_lmeval", recipe(inputs, "cclip", 3, clip), rss_target=None),
        Variant("sweep_cclip_lmeval20", 3, "sweep_lmeval", recipe(inputs, "cclip", 3, clip), target=2.0, rss_target=None,
                reference="by_hand_lmeval"),
        Variant("task_arithmetic_t4", 4, "mergekit", recipe(inputs, "task_arithmetic", 4, lam, weights)),
        Variant("median_t4", 4, "mergekit", recipe(inputs, "median", 4, lam), target=t["median"], rss_target=rss),
        Variant("floor_t4", 4, "floor"),
    ]


def reference_names(variant: Variant) -> tuple:
    """(task_arithmetic, floor) variants with the same number of task models."""
    suffix = "_t4" if variant.models == 4 else ""
    return variant.reference or f"task_arithmetic{suffix}", f"floor{suffix}"
