"""The CLIP adapter on a tiny CLIP world (``tests.support.clip_synthetic.build_world``):
three tasks in the three data layouts, towers fine-tuned on them. Heads, labels, splits,
accuracy and the experiment runner are checked against computations made here directly
with the model and the processor."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.clip import data as clip_data
from fedmerge_plugins.clip.cli import clip_group
from fedmerge_plugins.clip.evaluate import Session
from fedmerge_plugins.clip.models import load_clip, load_image_processor, load_tokenizer
from tests.support.clip_synthetic import World, build_world, class_images
from fedmerge_plugins.clip.tasks import shipped
from tests.conftest import BIN

TASKS = ("mnist", "eurosat", "beta")
EUROSAT_LABELS = {"forest": 1, "highway_or_road": 3, "river": 8}  # positions in the shipped EuroSAT list
VAL_FRACTION = 0.5
GRID = ["--lambdas", "0.5,1.0", "--rhos", "0.5,1.0", "--cclip-count", "2"]
METHODS = ("task_arithmetic", "fednova", "fedgma", "median", "cclip")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("clip-world"))


@pytest.fixture(scope="module")
def direct(world: World):
    """The base CLIP, tokenizer and processor, loaded here for independent computations."""
    return load_clip(str(world.base)), load_tokenizer(str(world.base)), load_image_processor(str(world.base))


def experiment_args(world: World, out: Path) -> List[str]:
    training = out.parent / f"{out.name}-training.json"
    training.write_text(json.dumps({t: {"steps": s, "learning_rate": lr} for t, (s, lr) in world.training.items()}))
    args = ["experiment", "--base", str(world.base), "--data-dir", str(world.data), "--tasks", ",".join(TASKS)]
    args += [a for t in TASKS for a in ("--model", f"{t}={world.towers[t]}")]
    args += ["--out", str(out), "--training", str(training), "--val-fraction", str(VAL_FRACTION), "--no-progress", *GRID]
    return args


@pytest.fixture(scope="module")
def full_run(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip-run") / "run"
    cache = tmp_path_factory.mktemp("clip-run-cache")
    result = CliRunner().invoke(clip_group, experiment_args(world, out) + ["--cache-dir", str(cache)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def records(out: Path, kind: str) -> List[Dict]:
    """``result`` records, or the search engine's point records seen as ``grid`` records
    (subset, method, params, score = the validation selection score)."""
    lines = list(map(json.loads, (out / "results.jsonl").read_text().splitlines()))
    if kind != "grid":
        return [r for r in lines if r["kind"] == kind]
    return [
        {"kind": "grid", "subset": r["group"].split("/")[0].split("+"), "method": r["method"], "params": r["parameters"], "score": r["selection"]}
        for r in lines if r["kind"] == "point"
    ]


# --- independent computations ---------------------------------------------------------------


def direct_head(clip, tokenizer, task_text) -> torch.Tensor:
    """Each prompt encoded alone (no padding), normalised, averaged over templates, normalised."""
    rows = []
    with torch.no_grad():
        for name in task_text.classnames:
            embeddings = []
            for template in task_text.templates:
                ids = tokenizer(template.replace("{}", name), return_tensors="pt")
                embedding = clip.text_projection(clip.text_model(**ids).pooler_output)[0].double()
                embeddings.append(embedding / embedding.norm())
            mean = torch.stack(embeddings).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def folder_split(root: Path, labels_of) -> Tuple[List[Path], List[int]]:
    """Images of an ImageFolder split in class-folder order, then file-name order."""
    files, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            files.append(file)
            labels.append(labels_of(folder.name))
    return files, labels


def split_images(world: World, task: str, split: str) -> Tuple[List[Image.Image], List[int]]:
    """The split's images and labels, read here; validation carved as documented when absent."""
    source = split
    if task == "mnist":
        if split == "validation":
            source = "train"
        files, labels = folder_split(world.data / task / source, int)
        images = [Image.open(f).convert("RGB") for f in files]
    elif task == "eurosat":
        files, labels = folder_split(world.data / task / split, EUROSAT_LABELS.__getitem__)
        images = [Image.open(f).convert("RGB") for f in files]
    else:
        from datasets import load_from_disk

        if split == "validation":
            source = "train"
        part = load_from_disk(str(world.data / task))[source]
        images, labels = [row["image"].convert("RGB") for row in part], list(part["label"])
    if split == "validation" and source == "train":
        count = round(len(labels) * VAL_FRACTION)
        keep = sorted(torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count].tolist())
        images, labels = [images[i] for i in keep], [labels[i] for i in keep]
    return images, labels


def direct_accuracy(direct, tower: Dict[str, torch.Tensor], images, labels, head: torch.Tensor) -> float:
    """Accuracy of ``tower`` through the processor's full pipeline; ``images``: PIL images or
    their processed pixel values."""
    clip, _, processor = direct
    vision = copy.deepcopy(clip.vision_model)
    vision.load_state_dict({k: v.float() for k, v in tower.items()})
    with torch.no_grad():
        pixels = images if torch.is_tensor(images) else processor(images=images, return_tensors="pt")["pixel_values"]
        features = clip.visual_projection(vision(pixel_values=pixels).pooler_output).double()
    predictions = (features / features.norm(dim=-1, keepdim=True) @ head.T).argmax(-1)
    return float((predictions == torch.tensor(labels)).double().mean())


def hub_tower(path: Path) -> Dict[str, torch.Tensor]:
    return {k.removeprefix("vision_model."): v for k, v in load_file(str(path / "model.safetensors")).items()}


# --- heads, data, accuracy -------------------------------------------------------------------


def test_heads_shape_normalization_and_values(world: World, direct, tmp_path: Path) -> None:
    clip, tokenizer, _ = direct
    session = Session(base=str(world.base), data_dir=world.data, cache_root=tmp_path, progress=False)
    expected_classes = {"mnist": 10, "eurosat": 10, "beta": 3}
    for task in TASKS:
        head = session.head(task)
        assert head.shape == (expected_classes[task], clip.config.projection_dim)
        torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(head)), rtol=0, atol=1e-6)
        reference = direct_head(clip, tokenizer, session.task(task).text)
        torch.testing.assert_close(head.double(), reference, rtol=0, atol=2e-6)
    assert len(list((tmp_path / "heads").glob("*.pt"))) == 3
    again = Session(base=str(world.base), data_dir=world.data, cache_root=tmp_path, progress=False)
    again._tokenizer = "no tokenizer: heads must come from the cache"
    assert torch.equal(again.head("eurosat"), session.head("eurosat"))


def test_labels_in_the_three_layouts(world: World) -> None:
    mnist = clip_data.open_task(world.data, "mnist")
    assert mnist.layout == "folder" and mnist.text == shipped("mnist") and set(mnist.splits) == {"train", "test"}
    assert mnist.split("train").labels == [0] * 4 + [1] * 4 + [2] * 4
    eurosat = clip_data.open_task(world.data, "eurosat")
    assert sorted(set(eurosat.split("validation").labels)) == sorted(EUROSAT_LABELS.values())
    assert eurosat.split("test").labels == [1] * 3 + [3] * 3 + [8] * 3  # forest, highway_or_road, river
    beta = clip_data.open_task(world.data, "beta")
    assert beta.layout == "datasets" and beta.text.classnames == ("cyan", "magenta", "yellow")
    assert beta.text.templates == ("a photo of a {}.",) and beta.split("test").labels == [0] * 3 + [1] * 3 + [2] * 3


def test_folder_label_rules() -> None:
    names = shipped("eurosat").classnames
    assert clip_data.folder_labels("eurosat", ["River", "lake_or_sea"], names) == {"River": 8, "lake_or_sea": 9}
    sorted_folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                      "PermanentCrop", "Residential", "River", "SeaLake"]
    assert clip_data.folder_labels("eurosat", sorted_folders, names)["SeaLake"] == 9  # ImageFolder order
    assert clip_data.folder_labels("gtsrb", ["00000", "00042"], shipped("gtsrb").classnames) == {"00000": 0, "00042": 42}
    with pytest.raises(FedmergeError, match="task eurosat: 2 class folders .* match neither its 10 class names"):
        clip_data.folder_labels("eurosat", ["Forest", "Moon"], names)
    with pytest.raises(FedmergeError, match="task mnist: class folder 12 is not a label"):
        clip_data.folder_labels("mnist", ["3", "12"], shipped("mnist").classnames)


def test_validation_carved_from_train_or_capped(world: World) -> None:
    mnist = clip_data.open_task(world.data, "mnist")
    source, indices = clip_data.split_indices(mnist, "validation", clip_data.SplitSettings())
    assert source == "train" and len(indices) == 1  # 10% of 12 images
    source, indices = clip_data.split_indices(mnist, "validation", clip_data.SplitSettings(val_fraction=0.5))
    expected = sorted(torch.randperm(12, generator=torch.Generator().manual_seed(0))[:6].tolist())
    assert indices == expected
    other = clip_data.split_indices(mnist, "validation", clip_data.SplitSettings(val_fraction=0.5, seed=1))[1]
    assert other != indices and len(other) == 6
    assert len(clip_data.split_indices(mnist, "validation", clip_data.SplitSettings(val_fraction=0.5, max_val=2))[1]) == 2
    eurosat = clip_data.open_task(world.data, "eurosat")
    assert clip_data.split_indices(eurosat, "validation", clip_data.SplitSettings()) == ("validation", list(range(9)))
    assert len(clip_data.split_indices(eurosat, "validation", clip_data.SplitSettings(max_val=4))[1]) == 4
    with pytest.raises(FedmergeError, match="task mnist: .* has no validation split"):
        mnist.split("validation")


def test_pixels_cached_as_uint8_and_normalised_like_the_processor(world: World, direct, tmp_path: Path) -> None:
    _, _, processor = direct
    session = Session(base=str(world.base), data_dir=world.data, cache_root=tmp_path, progress=False)
    pixels = session.pixels("beta", "test")
    assert pixels.images.dtype == "uint8" and pixels.images.shape == (9, 3, 32, 32)
    images, labels = split_images(world, "beta", "test")
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(session.norm(torch.from_numpy(pixels.images.copy())), expected, rtol=0, atol=1e-5)
    assert pixels.labels.tolist() == labels

    class NoPreprocessing:  # a cache hit must not preprocess again
        to_dict = processor.to_dict

        def __call__(self, *args, **kwargs):
            raise AssertionError("images preprocessed again")

    reopened = clip_data.pixels(session.task("beta"), "test", NoPreprocessing(), session.settings, tmp_path)
    assert reopened.key == pixels.key and (reopened.images == pixels.images).all()


def test_accuracy_on_a_case_with_a_known_answer(world: World, direct, tmp_path: Path) -> None:
    """Head rows are the embeddings of three prototype images; the test split holds copies
    of the prototypes, some filed under the wrong class: 5 of 9 are right."""
    clip, _, processor = direct
    prototypes = [class_images(c, 1, seed=c)[0] for c in range(3)]
    layout = {"0": [0, 0, 1], "1": [1, 2], "2": [2, 2, 0, 0]}
    for folder, members in layout.items():
        (tmp_path / "data" / "proto" / "test" / folder).mkdir(parents=True)
        for i, prototype in enumerate(members):
            Image.fromarray(prototypes[prototype]).save(tmp_path / "data" / "proto" / "test" / folder / f"{i}.png")
    with torch.no_grad():
        pixels = processor(images=[Image.fromarray(p) for p in prototypes], return_tensors="pt")["pixel_values"]
        features = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    head = torch.nn.functional.normalize(features, dim=-1)
    assert float((head @ head.T - torch.eye(3)).max()) < 0.999  # distinct rows: each copy finds its own
    session = Session(base=str(world.base), data_dir=tmp_path / "data", cache_root=tmp_path / "cache", progress=False)
    session.heads["proto"] = head
    session.load_tower(session.base_state)
    assert session.predict("proto", "test").tolist() == [0, 0, 1, 1, 2, 2, 2, 0, 0]
    assert session.accuracy("proto", "test") == pytest.approx(5 / 9, abs=1e-12)


def test_eval_command_accuracy_and_normalized_accuracy(world: World, direct, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", str(world.towers["mnist"]), "--base", str(world.base), "--data-dir", str(world.data),
            "--tasks", ",".join(TASKS), "--json", str(out)]
    args += [a for t in TASKS for a in ("--model", f"{t}={world.towers[t]}")]
    result = CliRunner().invoke(clip_group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["tasks"]
    clip, tokenizer, _ = direct
    mnist_tower = hub_tower(world.towers["mnist"])
    for task in TASKS:
        head = direct_head(clip, tokenizer, clip_data.open_task(world.data, task).text)
        images, labels = split_images(world, task, "test")
        accuracy = direct_accuracy(direct, mnist_tower, images, labels, head)
        own = direct_accuracy(direct, hub_tower(world.towers[task]), images, labels, head)
        assert scores[task]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert scores[task]["finetuned_accuracy"] == pytest.approx(own, abs=1e-12)
        assert scores[task]["normalized_accuracy"] == pytest.approx(accuracy / own, abs=1e-12)
    assert scores["mnist"]["normalized_accuracy"] == 1.0  # the tower is MNIST's own fine-tuned one


# --- the experiment --------------------------------------------------------------------------


def test_experiment_covers_every_subset_method_and_grid_point(full_run: Path) -> None:
    results = records(full_run, "result")
    subsets = [("mnist", "eurosat"), ("mnist", "beta"), ("eurosat", "beta"), TASKS]
    assert sorted((tuple(r["subset"]), r["method"]) for r in results) == sorted((s, m) for s in subsets for m in METHODS)
    norms = json.loads((full_run / "run.json").read_text())["norms"]
    grid_records = records(full_run, "grid")
    for subset in subsets:
        lows, highs = min(norms[t] for t in subset), max(norms[t] for t in subset)
        expected = {
            "task_arithmetic": [{"lambda": lam} for lam in (0.5, 1.0)],
            "fednova": [{"lambda": lam} for lam in (0.5, 1.0)],
            "median": [{"lambda": lam} for lam in (0.5, 1.0)],
            "fedgma": [{"lambda": lam, "rho": rho} for lam in (0.5, 1.0) for rho in (0.5, 1.0)],
            "cclip": [{"lambda": lam, "rho": rho} for lam in (0.5, 1.0) for rho in (lows, lows + (highs - lows) / 2)],
        }
        for method, points in expected.items():
            found = [r["params"] for r in grid_records if tuple(r["subset"]) == subset and r["method"] == method]
            assert found == points, (subset, method)
    assert len(grid_records) == len({json.dumps([r["subset"], r["method"], r["params"]]) for r in grid_records})
    summary = (full_run / "summary.md").read_text()
    assert "Table 1" in summary and "Table 2" in summary and (full_run / "figure1.png").stat().st_size > 0
    table2 = json.loads((full_run / "summary.json").read_text())["table2"]
    assert set(table2) == {"median", "fednova", "fedgma", "cclip"} and all(row["subsets"] == 4 for row in table2.values())
    for method, row in table2.items():
        deltas = [
            r["score"] - next(b["score"] for b in results if b["subset"] == r["subset"] and b["method"] == "task_arithmetic")
            for r in results if r["method"] == method
        ]
        assert row["improved"] == pytest.approx(100 * sum(d > 1e-9 for d in deltas) / 4)
        assert row["degraded"] == pytest.approx(100 * sum(d < -1e-9 for d in deltas) / 4)


def test_norms_are_global_task_vector_norms(world: World, full_run: Path) -> None:
    norms = json.loads((full_run / "run.json").read_text())["norms"]
    base = load_clip(str(world.base)).vision_model.state_dict()
    for task in TASKS:
        tower = hub_tower(world.towers[task])
        expected = sum(float((tower[k].double() - base[k].double()).pow(2).sum()) for k in base) ** 0.5
        assert norms[task] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "cclip"])
def test_selection_on_validation_then_test(world: World, direct, full_run: Path, method: str) -> None:
    """Every grid point of the three-task merge re-scored here: merged by the paper's formula,
    evaluated with the model and processor directly, normalised by the fine-tuned towers."""
    clip, tokenizer, _ = direct
    base = {k: v.double() for k, v in clip.vision_model.state_dict().items()}
    towers = {t: {k: v.double() for k, v in hub_tower(world.towers[t]).items()} for t in TASKS}
    norms = {t: sum(float((towers[t][k] - base[k]).pow(2).sum()) for k in base) ** 0.5 for t in TASKS}
    heads = {t: direct_head(clip, tokenizer, clip_data.open_task(world.data, t).text) for t in TASKS}
    processor = direct[2]
    splits = {}
    for t in TASKS:
        for s in ("validation", "test"):
            images, labels = split_images(world, t, s)
            splits[(t, s)] = processor(images=images, return_tensors="pt")["pixel_values"], labels
    own = {key: direct_accuracy(direct, towers[key[0]], *splits[key], heads[key[0]]) for key in splits}

    def score(tower: Dict[str, torch.Tensor], split: str) -> Tuple[float, Dict[str, float]]:
        normalized = {t: direct_accuracy(direct, tower, *splits[(t, split)], heads[t]) / own[(t, split)] for t in TASKS}
        return sum(normalized.values()) / len(TASKS), normalized

    def merge(point: Dict[str, float]) -> Dict[str, torch.Tensor]:
        coefficients = {t: min(1.0, point["rho"] / norms[t]) if method == "cclip" else 1.0 for t in TASKS}
        return {k: base[k] + point["lambda"] * sum(coefficients[t] * (towers[t][k] - base[k]) for t in TASKS) for k in base}

    grid = [r for r in records(full_run, "grid") if tuple(r["subset"]) == TASKS and r["method"] == method]
    scores = [score(merge(r["params"]), "validation")[0] for r in grid]
    assert [r["score"] for r in grid] == pytest.approx(scores, abs=1e-12)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    (result,) = [r for r in records(full_run, "result") if tuple(r["subset"]) == TASKS and r["method"] == method]
    assert result["params"] == grid[best]["params"] and result["val_score"] == pytest.approx(scores[best], abs=1e-12)
    test_score, test_normalized = score(merge(result["params"]), "test")
    assert result["score"] == pytest.approx(test_score, abs=1e-12)
    assert result["test_normalized"] == pytest.approx(test_normalized, abs=1e-12)


@pytest.mark.slow
def test_resume_after_kill(world: World, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = experiment_args(world, out)
    process = subprocess.Popen(
        [str(BIN / "fedmerge"), "clip", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    log = out / "results.jsonl"
    try:
        while process.poll() is None and (not log.exists() or log.read_text().count("\n") < 3):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    before = log.read_text()
    total = len(records(full_run, "grid")) + len(records(full_run, "result"))
    assert 3 <= before.count("\n") < total
    with open(log, "a") as handle:
        handle.write('{"kind": "point", "group": "mni')  # a record cut short by the kill

    result = CliRunner().invoke(clip_group, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = log.read_text()
    assert after.startswith(before)  # nothing done before the kill was redone or lost
    lines = after.splitlines()
    assert len(lines) == total and len(set(lines)) == total
    assert records(out, "result") == records(full_run, "result")

    result = CliRunner().invoke(clip_group, args, catch_exceptions=False)  # all done: nothing to add
    assert result.exit_code == 0 and log.read_text() == after


def test_restart_with_other_settings_is_refused(world: World, full_run: Path) -> None:
    args = experiment_args(world, full_run)
    args[args.index("--lambdas") + 1] = "0.25,0.5"
    result = CliRunner().invoke(clip_group, args)
    assert result.exit_code != 0 and "holds a run with a different spec" in result.output
