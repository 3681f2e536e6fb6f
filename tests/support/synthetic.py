"""Synthetic Llama-architecture checkpoints: a base and task models at known offsets.

Used by the tests, the shape-twin recipe checks and the benchmark, where no hub model can
be downloaded. Task model t is θ_0 + scale_t · N(0, 1) noise (seeded), so task-vector norms
are known in advance; a task model may carry extra vocabulary rows, as WizardMath-13B's
32001 tokens against Llama-2's 32000.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Tensors = Dict[str, torch.Tensor]


def llama_config(
    vocab_size: int = 96,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def parameter_shapes(config: LlamaConfig) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def base_tensors(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    return tensors


def task_tensors(base: Tensors, scale: float, seed: int, extra_tokens: int = 0) -> Tensors:
    """θ_0 + scale · noise; ``extra_tokens`` rows appended to the vocabulary tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=generator) * scale
        task = (tensor.float() + noise).to(tensor.dtype)
        if extra_tokens and name in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.randn((extra_tokens, tensor.shape[1]), generator=generator) * 0.02
            task = torch.cat([task, extra.to(tensor.dtype)])
        tensors[name] = task
    return tensors


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer with ``vocab_size`` tokens (ids 0–2 special, as Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(str(path))


def write_checkpoint(path: Path, config: LlamaConfig, tensors: Tensors, shards: int = 1) -> Path:
    """Save config, tokenizer and weights (safetensors, optionally sharded with an index)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = LlamaConfig.from_dict(
        {**config.to_dict(), "vocab_size": vocab, "architectures": ["LlamaForCausalLM"], "dtype": dtype}
    )
    config.save_pretrained(str(path))
    write_tokenizer(path, vocab)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return path


@dataclass
class Family:
    """A base checkpoint and task checkpoints derived from it, with their tensors."""

    base: Path
    tasks: List[Path]
    base_tensors: Tensors
    task_tensors: List[Tensors]


def make_family(
    root: Path,
    scales: Sequence[float] = (0.01, 0.02, 0.1),
    *,
    config: Optional[LlamaConfig] = None,
    extra_tokens: Sequence[int] = (),
    names: Optional[Sequence[str]] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shards: int = 1,
) -> Family:
    """Write ``root/base`` and one task model per scale (``root/task0`` … or ``names``)."""
    config = config or llama_config()
    names = list(names or [f"task{i}" for i in range(len(scales))])
    base = base_tensors(config, seed, dtype)
    base_path = write_checkpoint(root / "base", config, base, shards)
    tasks, paths = [], []
    for i, (name, scale) in enumerate(zip(names, scales)):
        extra = extra_tokens[i] if i < len(extra_tokens) else 0
        tensors = task_tensors(base, scale, seed + 1 + i, extra)
        paths.append(write_checkpoint(root / name, config, tensors, shards))
        tasks.append(tensors)
    return Family(base_path, paths, base, tasks)
