"""Image datasets for the CLIP tasks, from a local folder per task.

``<data-dir>/<task>/`` is either

- an ImageFolder tree: ``<split>/<class folder>/<image>`` (png, jpg, …), or
- a ``datasets`` ``DatasetDict`` written with ``save_to_disk`` (an image column and an
  integer label column, e.g. the hub's ``tanganke/<task>`` datasets).

Splits are ``train``, ``validation`` (also ``val``/``valid``) and ``test``. Without a
validation split, validation is carved from train as in Ilharco et al.'s protocol, which
the paper follows: a seeded random 10% of train (``val_fraction``), at most 5000 images
(``max_val``), seed 0. A validation split larger than ``max_val`` is cut the same way.

Labels: for the paper's tasks, label c is the c-th shipped class name. Class folders named
0, 1, … give their number; folders named like the shipped class names (case and
``_``/space ignored) give that class; otherwise, as torchvision's ImageFolder, the i-th
folder in sorted order is class i (their count must match). A ``datasets`` label column
is taken as is.

Images are preprocessed once with the base model's CLIP image processor (resize, centre
crop) and kept as uint8 arrays in ``<cache>/pixels/`` (memory-mapped ``.npy``); rescaling
and normalisation, the processor's last steps, are done on the device when evaluating.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fedmerge_plugins.clip.cache import KEY_LENGTH, source_identity
from fedmerge_plugins.clip.tasks import FOLDER_ALIASES, TaskText, shipped, task_text
from fedmerge_plugins.store import digest
from fedmerge_plugins.errors import DataError
from fedmerge_plugins.files import user_path, write_atomic

SPLIT_ALIASES: Dict[str, Tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "val", "valid"),
    "test": ("test",),
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VAL_FRACTION = 0.1
MAX_VAL = 5000
SEED = 0
PIXEL_VERSION = 1


@dataclass
class Split:
    """One split: an image loader by index and the integer labels."""

    load: Callable[[int], Any]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    task: str
    root: Path
    splits: Dict[str, Split]
    text: TaskText
    layout: str

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"task {self.task}: {self.root} has no {name} split (found: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


@dataclass(frozen=True)
class SplitSettings:
    """How validation is chosen (see the module docstring)."""

    val_fraction: float = VAL_FRACTION
    max_val: int = MAX_VAL
    seed: int = SEED

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1); got {self.val_fraction}")
        if self.max_val < 1:
            raise DataError(f"max_val must be >= 1; got {self.max_val}")


def task_root(data_dir: Path, task: str) -> Path:
    for name in (task, *FOLDER_ALIASES.get(task, ())):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DataError(f"task {task}: no data folder {data_dir / task}")


def _find_split(names: Sequence[str], split: str) -> Optional[str]:
    lowered = {name.lower(): name for name in names}
    for alias in SPLIT_ALIASES[split]:
        if alias in lowered:
            return lowered[alias]
    return None


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def folder_labels(task: str, folders: Sequence[str], shipped_names: Optional[Sequence[str]]) -> Dict[str, int]:
    """Label of each class folder (see the module docstring for the rules)."""
    folders = sorted(folders)
    count = len(shipped_names) if shipped_names is not None else None
    if all(name.isdigit() for name in folders):
        labels = {name: int(name) for name in folders}
        if count is not None and max(labels.values()) >= count:
            raise DataError(f"task {task}: class folder {max(folders, key=int)} is not a label of its {count} classes")
        return labels
    if shipped_names is None:
        return {name: index for index, name in enumerate(folders)}
    by_name = {_normal(name): index for index, name in enumerate(shipped_names)}
    if all(_normal(name) in by_name for name in folders):
        return {name: by_name[_normal(name)] for name in folders}
    if len(folders) == count:
        return {name: index for index, name in enumerate(folders)}
    unknown = [name for name in folders if _normal(name) not in by_name]
    raise DataError(
        f"task {task}: {len(folders)} class folders (e.g. {unknown[:3]}) match neither its {count} class names "
        f"nor the labels 0..{count - 1}"
    )


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def open_folder(task: str, root: Path) -> TaskData:
    split_dirs = {}
    for split in SPLIT_ALIASES:
        name = _find_split([p.name for p in root.iterdir() if p.is_dir()], split)
        if name is not None:
            split_dirs[split] = root / name
    if not split_dirs:
        raise DataError(f"task {task}: {root} has no train/validation/test folder and no saved `datasets` dataset")
    folders = sorted({p.name for d in split_dirs.values() for p in d.iterdir() if p.is_dir()})
    if not folders:
        raise DataError(f"task {task}: the split folders of {root} have no class folders")
    text = shipped(task)
    labels_of = folder_labels(task, folders, text.classnames if text else None)
    if text is None:
        names = {label: name for name, label in labels_of.items()}
        text = task_text(task, [names.get(label, str(label)) for label in range(max(labels_of.values()) + 1)])
    splits = {}
    for split, directory in split_dirs.items():
        files: List[Path] = []
        labels: List[int] = []
        for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(images)
            labels.extend([labels_of[class_dir.name]] * len(images))
        if not files:
            raise DataError(f"task {task}: split folder {directory} holds no images")
        splits[split] = Split(load=lambda i, files=files: _open_image(files[i]), labels=labels)
    return TaskData(task, root, splits, text, "folder")


def _columns(task: str, dataset) -> Tuple[str, str, Optional[List[str]]]:
    from datasets import ClassLabel, Image

    features = dataset.features
    image = next((n for n, f in features.items() if isinstance(f, Image)), None)
    image = image or next((n for n in ("image", "img") if n in features), None)
    label = next((n for n in ("label", "labels") if n in features), None)
    label = label or next((n for n, f in features.items() if isinstance(f, ClassLabel)), None)
    if image is None or label is None:
        raise DataError(f"task {task}: dataset columns {list(features)} lack an image or a label column")
    names = features[label].names if isinstance(features[label], ClassLabel) else None
    return image, label, names


def open_saved_dataset(task: str, root: Path) -> TaskData:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(root))
    if not isinstance(dataset, DatasetDict):
        raise DataError(f"task {task}: {root} holds a single `datasets` split; save a DatasetDict with train/test splits")
    splits, class_names = {}, None
    for split in SPLIT_ALIASES:
        name = _find_split(list(dataset), split)
        if name is None:
            continue
        part = dataset[name]
        image_column, label_column, names = _columns(task, part)
        class_names = class_names or names
        labels = [int(v) for v in part[label_column]]
        splits[split] = Split(load=lambda i, part=part, column=image_column: part[i][column], labels=labels)
    if not splits:
        raise DataError(f"task {task}: {root} has none of the splits train/validation/test (found {list(dataset)})")
    text = task_text(task, class_names)
    if class_names is not None and len(class_names) != len(text.classnames):
        raise DataError(f"task {task}: the dataset has {len(class_names)} classes, its class names list {len(text.classnames)}")
    top = max(max(s.labels) for s in splits.values())
    if top >= len(text.classnames) or min(min(s.labels) for s in splits.values()) < 0:
        raise DataError(f"task {task}: label {top} is outside 0..{len(text.classnames) - 1}")
    return TaskData(task, root, splits, text, "datasets")


def open_task(data_dir: Path, task: str) -> TaskData:
    root = task_root(Path(data_dir), task)
    if (root / "dataset_dict.json").exists():
        return open_saved_dataset(task, root)
    return open_folder(task, root)


def split_indices(data: TaskData, split: str, settings: SplitSettings) -> Tuple[str, List[int]]:
    """(source split, indices into it) of ``split``; validation carved or capped as documented."""
    if split not in SPLIT_ALIASES:
        raise DataError(f"unknown split {split!r}; use train, validation or test")
    if split != "validation":
        return split, list(range(len(data.split(split))))
    if "validation" in data.splits:
        source, count = "validation", min(len(data.splits["validation"]), settings.max_val)
    else:
        source = "train"
        total = len(data.split("train"))
        count = min(max(1, round(total * settings.val_fraction)), settings.max_val)
    total = len(data.splits[source])
    if count == total:
        return source, list(range(total))
    generator = torch.Generator().manual_seed(settings.seed)
    return source, sorted(torch.randperm(total, generator=generator)[:count].tolist())


@dataclass
class Pixels:
    """Preprocessed images (uint8 [N, 3, H, W], memory-mapped) and their labels."""

    images: np.ndarray
    labels: torch.Tensor
    key: str = ""
    resident: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _to_uint8(batch: np.ndarray) -> np.ndarray:
    if batch.dtype == np.uint8:
        return batch
    return np.clip(np.rint(batch), 0, 255).astype(np.uint8)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def pixels(
    data: TaskData, split: str, processor, settings: SplitSettings, cache_root: Path, chunk: int = 256, progress: bool = True
) -> Pixels:
    """The split's images, resized and centre-cropped by ``processor``, cached as uint8."""
    from tqdm.auto import tqdm

    source, indices = split_indices(data, split, settings)
    part = data.split(source)
    key = digest(
        "pixels", PIXEL_VERSION, source_identity(str(data.root)), source, digest(indices, length=KEY_LENGTH),
        processor.to_dict(), length=KEY_LENGTH,
    )
    directory = cache_root / "pixels"
    images_path, labels_path = directory / f"{key}.npy", directory / f"{key}.labels.npy"
    if not (images_path.exists() and labels_path.exists()):
        tmp = directory / f"{key}.{os.getpid()}.tmp.npy"
        try:
            with user_path(directory, "write the image cache in"):  # a full or read-only --cache-dir: one line
                directory.mkdir(parents=True, exist_ok=True)
                array = None
                for start in tqdm(range(0, len(indices), chunk), desc=f"preprocess {data.task} {split}", unit="chunk", leave=False, disable=not progress):
                    batch = [part.load(i).convert("RGB") for i in indices[start : start + chunk]]
                    out = processor(images=batch, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
                    out = _to_uint8(np.asarray(out))
                    if array is None:
                        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), *out.shape[1:]))
                        with open(tmp, "r+b") as handle:  # the room now (a sparse memory map on a full disk dies of SIGBUS)
                            os.posix_fallocate(handle.fileno(), 0, os.path.getsize(tmp))
                    array[start : start + len(out)] = out
                assert array is not None
                array.flush()
                del array
                write_atomic(labels_path, _npy(np.asarray([part.labels[i] for i in indices], dtype=np.int64)))
                os.replace(tmp, images_path)
        finally:
            if tmp.exists():
                tmp.unlink()
    images = np.load(images_path, mmap_mode="r")
    labels = torch.from_numpy(np.load(labels_path))
    return Pixels(images, labels, key)
