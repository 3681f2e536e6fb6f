"""The I/O floor of a merge: θ_0 + λ Σ_t τ_t with nothing but torch and safetensors.

Reads every input tensor once (memory-mapped safetensors, sharded or not), computes in
float32 (float64 for float64 tensors), and streams the result into one safetensors file,
one tensor in memory at a time. No mergekit, no transformers, no planning: whatever a
merge method costs beyond this is the price of its framework and of its rule.

    python bench/floor.py OUT BASE MODEL [MODEL ...] [--lambda 0.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Checkpoint:
    """Tensor name → open safetensors file of one checkpoint directory."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        else:
            single = path / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
            with safe_open(str(single), framework="pt") as handle:
                files = {name: single.name for name in handle.keys()}
        self.path = path
        self._handles = {file: safe_open(str(path / file), framework="pt") for file in set(files.values())}
        self._files = files

    def names(self) -> List[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._files[name]].get_tensor(name)

    def shape_and_dtype(self, name: str) -> Tuple[Tuple[int, ...], str]:
        """Shape and safetensors dtype code ("BF16", …) from the file header, no data read."""
        piece = self._handles[self._files[name]].get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()


def merged_tensor(base: torch.Tensor, models: List[torch.Tensor], lam: float) -> torch.Tensor:
    """θ_0 + λ Σ_t (θ_t − θ_0), accumulated in float32 (float64 for float64), base dtype out."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    base32 = base.to(dtype)
    total = torch.zeros_like(base32)
    for model in models:
        total.add_(model.to(dtype)).sub_(base32)
    return total.mul_(lam).add_(base32).to(base.dtype)


def header(base: Checkpoint, names: List[str]) -> bytes:
    """The safetensors header of the output: the base's names, shapes and dtypes, in order."""
    entries: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape, dtype = base.shape_and_dtype(name)
        size = torch.Size(shape).numel() * torch.finfo(DTYPES[dtype]).bits // 8
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def floor_merge(out: Path, base_path: Path, model_paths: List[Path], lam: float) -> Path:
    """Write ``out/model.safetensors`` (and the base's config.json); return the weights file."""
    base = Checkpoint(base_path)
    models = [Checkpoint(path) for path in model_paths]
    names = base.names()
    for name in names:
        shape, dtype = base.shape_and_dtype(name)
        if dtype not in DTYPES:
            raise ValueError(f"{base_path}: tensor {name} has dtype {dtype}; the floor merges floating tensors only")
        for model in models:
            if name not in model or model.shape_and_dtype(name)[0] != shape:
                raise ValueError(f"{model.path}: no tensor {name} of shape {shape} (the base's)")
    out.mkdir(parents=True, exist_ok=True)
    if (base_path / "config.json").exists():
        shutil.copy(base_path / "config.json", out / "config.json")
    target = out / "model.safetensors"
    raw = header(base, names)
    with open(target, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name in names:
            merged = merged_tensor(base.get(name), [model.get(name) for model in models], lam)
            handle.write(merged.contiguous().view(torch.uint8).numpy().data)
    return target


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("base", type=Path, help="base checkpoint directory")
    parser.add_argument("models", type=Path, nargs="+", help="task checkpoint directories")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scaling coefficient λ")
    args = parser.parse_args(argv)
    floor_merge(args.out, args.base, args.models, args.lam)


if __name__ == "__main__":
    main()
