"""Build (or reuse) the demo's models: tokenizer, pre-trained base, task models per seed.

``build_models(out, config)`` writes ``out/models/base`` and, for each fine-tuning seed s,
``out/models/seed<s>/{instruction,math,code}`` (the homogeneous setting: one learning rate and
step count for all three) and ``out/models/seed<s>/<model>-x<factor>-<steps>`` (the candidates
of the heterogeneous setting: that model fine-tuned at ``lr_factor`` times the rate, one run
saved after each candidate step count). ``out/models/manifest.json`` records what was trained
how (steps, learning rate, batch size, loss, time) and the task-vector norms. The manifest
carries a cache key, a hash of the build configuration, the source of the modules that shape
the models and the torch and transformers versions: a later run with the same key reuses the
models, anything else (or ``rebuild=True``) builds them again.

The base is pre-trained on a corpus in which a small share of the documents are training items
in the tasks' own prompt format (as Llama-2 saw some math and code), so fine-tuning is short
and the task vectors stay small and compatible: the regime where task arithmetic works.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.train import ModelShape, TrainSpec
from fedmerge_plugins.store import digest

MANIFEST = "manifest.json"
# task model directory name (as the paper names them) -> evaluation task
TASK_MODELS: Dict[str, str] = {"instruction": "instruct", "math": "gsm8k", "code": "humaneval"}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built models."""

    seed: int = 0  # data splits, corpus, tokenizer, pre-training
    seeds: Tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds
    vocab_size: int = 768
    shape: ModelShape = ModelShape()
    corpus_documents: int = 12000
    format_share: float = 0.06  # share of pre-training documents that are task-format training items (a third per task)
    pretrain: TrainSpec = TrainSpec(steps=1200, learning_rate=3e-3, batch_size=32, warmup_fraction=0.05, weight_decay=0.01)
    finetune: TrainSpec = TrainSpec(steps=150, learning_rate=3e-4, batch_size=16)  # every task, homogeneous
    heterogeneous_model: str = "code"  # fine-tuned at lr_factor × the rate in the heterogeneous setting
    lr_factor: float = 10.0
    heterogeneous_steps: Tuple[int, ...] = (25, 50, 100, 150)  # candidates, picked on validation
    n_validation: int = 40
    n_test: int = 200

    def scaled(self, pretrain_steps: int, finetune_fraction: float, corpus_documents: int) -> "BuildConfig":
        """The same recipe with fewer steps (a common factor keeps the steps' ratios)."""
        fraction = lambda steps: max(1, round(steps * finetune_fraction))  # noqa: E731
        return replace(
            self,
            corpus_documents=corpus_documents,
            pretrain=replace(self.pretrain, steps=pretrain_steps),
            finetune=replace(self.finetune, steps=fraction(self.finetune.steps)),
            heterogeneous_steps=tuple(sorted({fraction(s) for s in self.heterogeneous_steps})),
        )

    @property
    def heterogeneous_spec(self) -> TrainSpec:
        """The heterogeneous model's run: lr_factor × the rate, for the largest candidate count."""
        return replace(self.finetune, learning_rate=self.finetune.learning_rate * self.lr_factor, steps=max(self.heterogeneous_steps))


SIZES: Dict[str, BuildConfig] = {
    "full": BuildConfig(),
    # the full build's first two seeds: with 700 pre-training steps the math model fell below the base
    "small": replace(BuildConfig(), seeds=(0, 1)),
}


def candidate_name(config: BuildConfig, steps: int) -> str:
    """``math-x10-50``: the heterogeneous candidate fine-tuned for ``steps`` steps."""
    return f"{config.heterogeneous_model}-x{config.lr_factor:g}-{steps}"


def config_dict(config: BuildConfig) -> dict:
    return asdict(config)


def cache_key(config: BuildConfig) -> str:
    """Hash of the configuration, the code that builds the models and the library versions."""
    import tokenizers
    import torch
    import transformers

    from fedmerge_plugins.demo import tokenizer, train
    from fedmerge_plugins.evaluation import prompts

    sources = [inspect.getsource(module) for module in (data, tokenizer, train, prompts)]
    sources.append(inspect.getsource(build_models))
    versions = [torch.__version__, transformers.__version__, tokenizers.__version__]
    return digest(config_dict(config), versions, sources, length=16)


def read_manifest(models_dir: Path) -> Optional[dict]:
    try:
        return json.loads((models_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cached_manifest(models_dir: Path, key: str) -> Optional[dict]:
    """The manifest when it matches ``key`` and every model it lists is on disk."""
    manifest = read_manifest(models_dir)
    if manifest is None or manifest.get("key") != key:
        return None
    entries = [manifest["base"], *(entry for models in manifest["seeds"].values() for entry in models.values())]
    for entry in entries:
        if not (models_dir / entry["path"] / "model.safetensors").is_file():
            return None
    return manifest


def task_splits(config: BuildConfig) -> Dict[str, data.Splits]:
    return {task: data.task_splits(task, config.n_validation, config.n_test, config.seed) for task in data.TASKS}


def build_models(out: Path, config: BuildConfig, *, rebuild: bool = False, log=print) -> dict:
    """Build the models under ``out/models`` unless a matching build is there; returns the manifest."""
    import torch
    from transformers import LlamaForCausalLM

    from fedmerge_plugins.demo.tokenizer import train_tokenizer
    from fedmerge_plugins.demo.train import document_examples, llama_config, response_examples, save_model, train
    from fedmerge_plugins.norms.streaming import state_dict_norms

    models_dir = out / "models"
    key = cache_key(config)
    manifest = None if rebuild else cached_manifest(models_dir, key)
    if manifest is not None:
        log(f"Models: reusing the build in {models_dir} (key {key}; --rebuild builds them again)")
        return manifest
    log(f"Models: building in {models_dir} (key {key})")
    started = time.perf_counter()
    if models_dir.exists():
        shutil.rmtree(models_dir)
    splits = task_splits(config)
    formatted = {task: ["".join(data.training_pair(task, record)) for record in splits[task].train] for task in data.TASKS}
    corpus = data.pretraining_corpus(config.corpus_documents, config.seed, formatted, config.format_share)
    tokenizer = train_tokenizer(corpus, config.vocab_size, models_dir / "tokenizer")
    max_length = config.shape.max_length

    torch.manual_seed(config.seed)
    base = LlamaForCausalLM(llama_config(config.shape, tokenizer))
    pretraining = train(
        base,
        document_examples(tokenizer, corpus, max_length),
        config.pretrain,
        pad_id=tokenizer.pad_token_id,
        seed=config.seed,
        description="pre-train base",
    )
    save_model(base, tokenizer, models_dir / "base", pretraining)
    base_state = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
    examples = {
        name: response_examples(tokenizer, [data.training_pair(task, r) for r in splits[task].train], max_length)
        for name, task in TASK_MODELS.items()
    }
    seeds: Dict[str, Dict[str, dict]] = {}
    for seed in config.seeds:
        entries: Dict[str, dict] = {}
        task_states = {}

        def keep(name: str, model, record, task: str) -> None:
            path = f"seed{seed}/{name}"
            save_model(model, tokenizer, models_dir / path, record)
            task_states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            entries[name] = {"path": path, "task": task, "training": asdict(record)}

        runs = [(name, config.finetune, name) for name in TASK_MODELS]
        runs.append((config.heterogeneous_model, config.heterogeneous_spec, None))
        for index, (name, spec, label) in enumerate(runs):
            task = TASK_MODELS[name]
            model = LlamaForCausalLM(base.config)
            model.load_state_dict(base_state)
            if label is None:  # the heterogeneous candidates: one run, saved after each candidate count
                snapshot = lambda record, model=model, task=task: keep(candidate_name(config, record.steps), model, record, task)  # noqa: E731
                record = train(
                    model, examples[name], spec, pad_id=tokenizer.pad_token_id, seed=1000 * seed + 1 + TASK_ORDER[name],
                    description=f"seed {seed}: fine-tune {name} at {config.lr_factor:g}x", snapshot_steps=config.heterogeneous_steps, snapshot=snapshot,
                )
                keep(candidate_name(config, record.steps), model, record, task)
            else:
                record = train(
                    model, examples[name], spec, pad_id=tokenizer.pad_token_id, seed=1000 * seed + 1 + TASK_ORDER[name],
                    description=f"seed {seed}: fine-tune {name}",
                )
                keep(name, model, record, task)
        norms = state_dict_norms(base_state, task_states)
        for name, entry in entries.items():
            entry["task_vector_norm"] = norms[name]
        seeds[str(seed)] = entries
    manifest = {
        "key": key,
        "config": config_dict(config),
        "base": {"path": "base", "training": asdict(pretraining)},
        "seeds": seeds,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(manifest, indent=1)
    (models_dir / MANIFEST).write_text(text + "\n")
    log(f"Models: built in {manifest['build_seconds']:.0f} s")
    return json.loads(text)  # as a later run reads it back (tuples become lists)


TASK_ORDER = {name: index for index, name in enumerate(TASK_MODELS)}
