"""GPU check of issue 30 (one GPU, under 5 minutes; needs ``pip install 'fedmerge[vllm]'``).

1. ``mergekit-yaml --cuda`` of each method (task_arithmetic, fednova, fedgma, median, cclip) on
   small synthetic bf16 checkpoints with a vocabulary-aligned recipe, against the CPU merge:
   bit for bit, or the largest difference.
2. ``fedmerge sweep --eval lm-eval --backend vllm`` on tiny chain models (tests/eval_fixtures.py:
   the base answers GSM8K's prompt "8", the task model "7"), 3 points λ = 0.2, 0.6, 1.0 of a
   median recipe: one engine, each point's weights loaded into it, the prefix cache reset.
   The scores must be 0, 1, 1, and the winner's equal ``fedmerge eval --backend vllm`` of
   ``mergekit-yaml winner.yml`` (the from-disk path).

    .venv/bin/python bench/gpu_check.py [--work DIR] [--skip-vllm]

Prints one line per check and exits 1 if any fails. Record the vLLM version it ran with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

METHODS: Dict[str, tuple] = {
    "task_arithmetic": ({}, lambda i: {"weight": 1.0}),
    "fednova": ({}, lambda i: {"steps": 100 * (i + 1)}),
    "fedgma": ({"rho": 0.5}, lambda i: {}),
    "median": ({}, lambda i: {}),
    "cclip": ({"rho": 0.05}, lambda i: {}),
}


def run(argv: List[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done


def merge_check(work: Path) -> bool:
    import torch
    import yaml
    from safetensors.torch import load_file

    from tests.support.synthetic import llama_config, make_family

    config = llama_config(hidden_size=256, intermediate_size=512, vocab_size=1024, num_hidden_layers=2)
    family = make_family(work / "family", scales=(0.01, 0.02, 0.2), extra_tokens=(0, 1, 0), config=config, dtype=torch.bfloat16)
    ok = True
    for method, (shared, per_model) in METHODS.items():
        recipe = {"merge_method": method, "base_model": str(family.base),
                  "models": [{"model": str(p), "parameters": per_model(i)} for i, p in enumerate(family.tasks)],
                  "parameters": {"lambda": 0.6, **shared}, "tokenizer": {"source": "base"}, "dtype": "bfloat16"}
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(recipe))
        outputs = {}
        for device in ("cpu", "cuda"):
            out = work / f"{method}-{device}"
            run([str(BIN / "mergekit-yaml"), str(path), str(out), "--no-write-model-card", *(["--cuda"] if device == "cuda" else [])])
            outputs[device] = load_file(str(out / "model.safetensors"))
        worst, unequal = 0.0, []
        for name, cpu in outputs["cpu"].items():
            cuda = outputs["cuda"][name]
            if not torch.equal(cpu.view(torch.int16), cuda.view(torch.int16)):
                unequal.append(name)
                worst = max(worst, float((cpu.float() - cuda.float()).abs().max()))
        same = not unequal
        ok = ok and same
        print(f"mergekit-yaml --cuda {method}: " + ("bit for bit as on the CPU" if same else
              f"{len(unequal)} tensors differ, largest difference {worst:.3g} (e.g. {unequal[0]})"))
    return ok


def vllm_check(work: Path) -> bool:
    import vllm

    from tests.test_sweep import chain_world

    recipe, data = chain_world(work / "chain")
    common = ["--tasks", "gsm8k", "--data-dir", str(data), "--backend", "vllm", "--batch-size", "1", "--max-gen-toks", "16",
              "--gpu-memory-utilization", "0.3"]
    out = work / "sweep"
    run([str(BIN / "fedmerge"), "sweep", str(recipe), "--lambda", "0.2:1.0:0.4", "--eval", "lm-eval", "--split", "test",
         "--out", str(out), *common])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scores = {r["parameters"]["lambda"]: r["scores"]["gsm8k"] for r in records}
    in_memory = all("timing" in r.get("details", {}) for r in records)
    run([str(BIN / "mergekit-yaml"), str(out / "winner.yml"), str(work / "winner"), "--no-write-model-card"])
    run([str(BIN / "fedmerge"), "eval", str(work / "winner"), "--output", str(work / "eval"), *common])
    alone = json.loads((work / "eval" / "results.json").read_text())["fedmerge_scores"]["gsm8k"]
    best = max(records, key=lambda r: (r["selection"], -r["index"]))
    ok = scores == {0.2: 0.0, 0.6: 1.0, 1.0: 1.0} and in_memory and alone == best["scores"]["gsm8k"]
    print(f"vllm {vllm.__version__} sweep: scores {scores} (in memory: {in_memory}); winner λ={best['parameters']['lambda']} "
          f"scored {best['scores']['gsm8k']} in the sweep, {alone} by fedmerge eval of its merge: " + ("ok" if ok else "FAILED"))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-vllm", action="store_true", help="only the mergekit-yaml --cuda check")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fedmerge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ok = merge_check(work)
        if not args.skip_vllm:
            ok = vllm_check(work) and ok
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
