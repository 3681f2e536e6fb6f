"""A tiny CLIP world for tests and offline trials: a small ``CLIPModel`` with tokenizer and
image processor, image datasets whose classes differ in colour, and vision towers
fine-tuned on them for a few steps. Nothing is downloaded.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32


def tiny_tokenizer():
    """A character-level CLIP tokenizer covering printable ASCII (no merges)."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab: Dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab[char + suffix] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=128)


def tiny_processor():
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def write_tiny_clip(path: Path, seed: int = 0):
    """Save a small CLIPModel, its tokenizer and image processor to ``path``; return the model."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    tiny_processor().save_pretrained(str(path))
    return model


def write_hub_style_tower(state: Mapping[str, torch.Tensor], vision_config, path: Path) -> None:
    """A ``CLIPVisionModel`` checkpoint whose keys carry ``vision_model.`` as transformers 4
    wrote them (the hub's fine-tuned towers)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    CLIPVisionModel(vision_config).save_pretrained(str(path))
    tensors = {f"vision_model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


PALETTE = np.array(
    [[220, 40, 40], [40, 200, 60], [40, 70, 220], [230, 210, 40], [200, 60, 200], [40, 210, 210]], dtype=np.float64
)


def class_images(label: int, count: int, seed: int) -> List[np.ndarray]:
    """``count`` RGB images of a class: its palette colour, a darker stripe, noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.empty((IMAGE_SIZE + 4, IMAGE_SIZE + 6, 3))
        image[:] = PALETTE[label % len(PALETTE)]
        row = rng.integers(0, IMAGE_SIZE)
        image[row : row + 4] *= 0.5
        image += rng.normal(0, 12, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def write_image_folder(root: Path, folders: Sequence[Tuple[str, int]], counts: Mapping[str, int], seed: int = 0) -> None:
    """``root/<split>/<folder>/<i>.png``; ``folders`` pairs a folder name with its colour."""
    from PIL import Image

    for s, (split, count) in enumerate(counts.items()):
        for folder, colour in folders:
            directory = root / split / folder
            directory.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(class_images(colour, count, seed + 1000 * s + 17 * colour)):
                Image.fromarray(array).save(directory / f"{i}.png")


def write_saved_dataset(root: Path, classnames: Sequence[str], counts: Mapping[str, int], seed: int = 0) -> None:
    """A ``datasets`` DatasetDict (image + ClassLabel columns) saved to ``root``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=list(classnames))})
    parts = {}
    for s, (split, count) in enumerate(counts.items()):
        images, labels = [], []
        for label in range(len(classnames)):
            for array in class_images(label, count, seed + 1000 * s + 17 * label):
                images.append(PILImage.fromarray(array))
                labels.append(label)
        parts[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict(parts).save_to_disk(str(root))


def finetune_tower(clip, head: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Adam on the vision tower only (zero-shot head, logit scale 100), from the base weights;
    returns the fine-tuned tower's state dict and leaves ``clip`` unchanged."""
    import copy

    torch.manual_seed(seed)
    tower = copy.deepcopy(clip.vision_model).train()
    optimizer = torch.optim.Adam(tower.parameters(), lr=lr)
    for _ in range(steps):
        pooled = tower(pixel_values=pixels).pooler_output
        features = F.normalize(F.linear(pooled, clip.visual_projection.weight.detach()), dim=-1)
        loss = F.cross_entropy(100 * features @ head.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in tower.state_dict().items()}


@dataclass
class World:
    """A base CLIP, one dataset and one fine-tuned tower per task, and their training."""

    base: Path
    data: Path
    towers: Dict[str, Path]
    training: Dict[str, Tuple[int, float]]

    @property
    def tasks(self) -> Tuple[str, ...]:
        return tuple(self.towers)


def build_world(root: Path, train: int = 4, test: int = 3, validation: int = 3) -> World:
    """Three tasks in the three data layouts, each with a tower fine-tuned on it:

    - ``mnist``: ImageFolder, class folders 0–2 (of the shipped ten), train and test only;
    - ``eurosat``: ImageFolder, folders named as shipped classes, with a validation split;
    - ``beta``: a saved ``datasets`` DatasetDict with its own class names, train and test.

    ``train``/``test``/``validation``: images per class and split.
    """
    from fedmerge_plugins.clip.data import open_task
    from fedmerge_plugins.clip.heads import zero_shot_head
    from fedmerge_plugins.clip.models import quiet_transformers

    root = Path(root)
    with quiet_transformers():
        clip = write_tiny_clip(root / "base")
    tokenizer, processor = tiny_tokenizer(), tiny_processor()
    data = root / "data"
    write_image_folder(data / "mnist", [("0", 0), ("1", 1), ("2", 2)], {"train": train, "test": test}, seed=1)
    write_image_folder(
        data / "eurosat", [("forest", 3), ("river", 4), ("highway_or_road", 5)],
        {"train": train, "validation": validation, "test": test}, seed=2,
    )
    write_saved_dataset(data / "beta", ["cyan", "magenta", "yellow"], {"train": train, "test": test}, seed=3)
    training = {"mnist": (12, 1e-3), "eurosat": (12, 2e-3), "beta": (24, 1e-3)}
    towers = {}
    for seed, (task, (steps, lr)) in enumerate(training.items()):
        task_data = open_task(data, task)
        split = task_data.split("train")
        images = [split.load(i).convert("RGB") for i in range(len(split))]
        pixels = torch.from_numpy(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))
        head = zero_shot_head(clip, tokenizer, task_data.text)
        state = finetune_tower(clip, head, pixels.float(), torch.tensor(split.labels), steps, lr, seed=seed)
        towers[task] = root / "towers" / task
        with quiet_transformers():
            write_hub_style_tower(state, clip.config.vision_config, towers[task])
    return World(root / "base", data, towers, training)
