"""Pre-train the tiny base model and fine-tune the task models (plain torch loop).

Pre-training: next-token loss on every token, linear warm-up then cosine decay.
Fine-tuning: loss on the response tokens only, a *constant* learning rate and AdamW
without weight decay, so that FedNova's ‖a_t‖₁ = Σ_k η_t^(k) is exactly steps × rate.
Everything is seeded; on CPU the same build gives the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

Example = Tuple[List[int], List[int]]  # (input ids, labels with -100 where no loss)
IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 96
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 256


@dataclass(frozen=True)
class TrainSpec:
    """One training run: steps of ``batch_size`` examples at peak ``learning_rate``."""

    steps: int
    learning_rate: float
    batch_size: int = 32
    warmup_fraction: float = 0.0  # > 0: warm-up then cosine decay (pre-training)
    weight_decay: float = 0.0


@dataclass
class TrainRecord:
    """What a training run did, written to the manifest (FedNova reads steps and rate)."""

    steps: int
    learning_rate: float
    batch_size: int
    examples: int
    schedule: str
    final_loss: float
    seconds: float


def llama_config(shape: ModelShape, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def document_examples(tokenizer, texts: Sequence[str], max_length: int) -> List[Example]:
    """Language-model examples: every token of ``text</s>`` is predicted."""
    examples = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        examples.append((ids, list(ids)))
    return examples


def response_examples(tokenizer, pairs: Sequence[Tuple[str, str]], max_length: int) -> List[Example]:
    """Instruction-tuning examples: prompt and response tokenized apart (as lm-eval sees
    the prompt), loss on ``response</s>`` only."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, response in zip(prompts, responses):
        target = response + [tokenizer.eos_token_id]
        ids = prompt + target
        if len(ids) > max_length:
            raise ValueError(f"a training example has {len(ids)} tokens, more than max_length {max_length}")
        examples.append((ids, [IGNORE] * len(prompt) + target))
    return examples


def collate(batch: Sequence[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, target) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def learning_rate_at(spec: TrainSpec, step: int) -> float:
    if spec.warmup_fraction <= 0:
        return spec.learning_rate
    warmup = max(1, int(spec.steps * spec.warmup_fraction))
    if step < warmup:
        return spec.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(examples: Sequence[Example], spec: TrainSpec, seed: int):
    """``spec.steps`` batches drawn epoch by epoch from a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    order: List[int] = []
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        chosen, order = order[: spec.batch_size], order[spec.batch_size :]
        yield [examples[i] for i in chosen]


def train(
    model: torch.nn.Module,
    examples: Sequence[Example],
    spec: TrainSpec,
    *,
    pad_id: int,
    seed: int,
    description: str,
    snapshot_steps: Sequence[int] = (),
    snapshot: Optional[Callable[[TrainRecord], None]] = None,
    progress: bool = True,
) -> TrainRecord:
    """Train ``model`` in place with AdamW; returns what was done. After each step count in
    ``snapshot_steps``, ``snapshot(record so far)`` sees the model as a run of that many steps
    leaves it (the batches and a constant rate do not depend on the total)."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.98)
    )
    started = time.perf_counter()
    smoothed = None
    bar = tqdm(batches(examples, spec, seed), total=spec.steps, desc=description, unit="step", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(spec, step)
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if step % 10 == 0:
            bar.set_postfix(loss=f"{smoothed:.3f}")
        if snapshot is not None and step + 1 in snapshot_steps and step + 1 < spec.steps:
            model.eval()
            snapshot(_record(spec, step + 1, examples, smoothed, started))
            model.train()
    bar.close()
    model.eval()
    return _record(spec, spec.steps, examples, smoothed, started)


def _record(spec: TrainSpec, steps: int, examples: Sequence[Example], loss: Optional[float], started: float) -> TrainRecord:
    return TrainRecord(
        steps=steps,
        learning_rate=spec.learning_rate,
        batch_size=spec.batch_size,
        examples=len(examples),
        schedule="warmup+cosine" if spec.warmup_fraction > 0 else "constant",
        final_loss=float(loss if loss is not None else float("nan")),
        seconds=round(time.perf_counter() - started, 2),
    )


def save_model(model: torch.nn.Module, tokenizer, directory: Path, record: TrainRecord) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "training.json").write_text(json.dumps(asdict(record), indent=1) + "\n")
    return directory
