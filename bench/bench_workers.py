"""Wall time of a ``fedmerge sweep`` on a local Ray of N workers against the serial sweep.

Small Llama checkpoints (a base and three task models, ``synthetic.make_family``), a CCLIP
recipe, the paper's LLM grid (λ 0.2 … 1.0 × CCLIP's five ρ: 25 points) and an evaluator that
loads each merged model with transformers and scores its loss on fixed tokens. Each mode runs
as a whole ``fedmerge sweep`` process (imports, Ray start, reading the inputs and the norms
included), interleaved over rounds; the two logs must hold the same scores.

Usage: ``python bench/bench_workers.py [--rounds 1] [--workers 2] [--hidden 256]``; prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support: the synthetic checkpoints

EVALUATOR = '''
import torch
from transformers import AutoModelForCausalLM


def score(model_dir):
    """Loss of the merged model on fixed tokens (a stand-in for an evaluation)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (8, 128))
    with torch.no_grad():
        loss = model(input_ids=tokens, labels=tokens).loss
    return {"neg_loss": -float(loss)}
'''


def build(root: Path, hidden: int) -> Path:
    import yaml

    from tests.support.synthetic import llama_config, make_family

    config = llama_config(vocab_size=2048, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=hidden * 11 // 4)
    family = make_family(root / "models", scales=(0.01, 0.02, 0.2), config=config, names=["instruct", "math", "code"])
    recipe = {
        "merge_method": "cclip", "base_model": str(family.base), "models": [{"model": str(p)} for p in family.tasks],
        "parameters": {"lambda": 1.0, "rho": 1.0}, "tokenizer": {"source": "base"}, "dtype": "float32",
    }
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "evaluator.py").write_text(EVALUATOR)
    return root


def sweep(root: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "FEDMERGE_CACHE_DIR": str(out.parent / f"norms-{out.name}")}  # norms computed by every run
    shutil.rmtree(env["FEDMERGE_CACHE_DIR"], ignore_errors=True)
    command = [str(Path(sys.executable).parent / "fedmerge"), "sweep", str(root / "recipe.yml"), "--lambda", "0.2:1.0:0.2",
               "--rho", "paper", "--eval", f"python:{root / 'evaluator.py'}:score", "--out", str(out)]
    if workers:
        command += ["--workers", str(workers), "--gpus-per-worker", "0"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall


def records(out: Path) -> Dict[str, dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in lines}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the checkpoints")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-workers-") as directory:
        root = build(Path(directory), args.hidden)
        walls: Dict[int, List[float]] = {0: [], args.workers: []}
        point_seconds: Dict[int, List[float]] = {0: [], args.workers: []}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for workers in walls:
                out = root / f"out-{workers}"
                walls[workers].append(sweep(root, out, workers))
                point_seconds[workers] += [r["seconds"] for r in records(out).values()]
        serial, distributed = records(root / "out-0"), records(root / f"out-{args.workers}")
        same = {k: (r["scores"], r["selection"]) for k, r in serial.items()} == {k: (r["scores"], r["selection"]) for k, r in distributed.items()}
        if not same:
            raise SystemExit("the serial and the distributed sweep scored differently")
        size = sum(f.stat().st_size for f in (root / "models" / "base").glob("*.safetensors"))
    print(f"{len(serial)} grid points, checkpoints of {size / 2**20:.1f} MiB each, T = 3, {os.cpu_count()} CPUs, "
          f"1-minute load average {load:.2f} at the start; identical scores: {same}\n")
    print("| sweep | wall s (median) | median s per point (in the worker) | speed-up |\n|---|---|---|---|")
    base = statistics.median(walls[0])
    for workers, samples in walls.items():
        name = "serial (in the driver)" if workers == 0 else f"--workers {workers}"
        wall = statistics.median(samples)
        print(f"| {name} | {wall:.1f} | {statistics.median(point_seconds[workers]):.2f} | {base / wall:.2f}× |")


if __name__ == "__main__":
    main()
