"""Zero-shot classification heads from the base CLIP text encoder.

For each class, every template is filled with the class name and encoded (text tower,
then ``text_projection``); the embeddings are L2-normalised, averaged over templates and
normalised again. Row c of the head is class c's unit vector; an image is classified by
the largest cosine between its normalised image embedding and the rows (CLIP's logit
scale multiplies every logit alike and cannot change the argmax, so it is left out).

Heads depend only on the base model and the text, never on the merged tower: they are
computed once per task and kept in ``<cache>/heads/``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

from fedmerge_plugins.clip.cache import KEY_LENGTH, source_identity
from fedmerge_plugins.clip.tasks import TaskText
from fedmerge_plugins.store import digest
from fedmerge_plugins.files import user_path, write_atomic

HEAD_VERSION = 1


@torch.inference_mode()
def encode_texts(clip, tokenizer, texts: List[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm projected text embeddings, one row per text (float32, on the model's device)."""
    device = clip.text_projection.weight.device
    max_length = clip.config.text_config.max_position_embeddings
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        pooled = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        rows.append(F.normalize(clip.text_projection(pooled).float(), dim=-1))
    return torch.cat(rows)


def zero_shot_head(clip, tokenizer, text: TaskText, batch_size: int = 256) -> torch.Tensor:
    """[classes, projection_dim] head: normalise, average over templates, normalise again."""
    prompts = [prompt for name in text.classnames for prompt in text.prompts(name)]
    embeddings = encode_texts(clip, tokenizer, prompts, batch_size)
    per_class = embeddings.view(len(text.classnames), len(text.templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def cached_head(clip, tokenizer, base: str, text: TaskText, cache_root: Path) -> torch.Tensor:
    """``zero_shot_head``, read from ``cache_root/heads`` when this base and text were seen."""
    key = digest("head", HEAD_VERSION, source_identity(base), text.classnames, text.templates, length=KEY_LENGTH)
    path = cache_root / "heads" / f"{key}.pt"
    device = clip.text_projection.weight.device
    if path.exists():
        return torch.load(path, map_location=device)
    head = zero_shot_head(clip, tokenizer, text)
    data = io.BytesIO()
    torch.save(head.cpu(), data)
    with user_path(path.parent, "write the zero-shot head cache in"):  # a full or read-only --cache-dir
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data.getvalue())
    return head
