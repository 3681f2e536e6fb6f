"""Build (or reuse) the demo's models: tokenizer, pre-trained base, three task models.

``build_models(out, config)`` writes ``out/models/{base,instruction,math,code}`` and
``out/models/manifest.json`` (what was trained how: steps, learning rate, batch size,
loss, time; the task-vector norms). The manifest carries a cache key, a hash of the build
configuration, the source of the modules that shape the models and the torch and
transformers versions: a later run with the same key reuses the models, anything else
(or ``rebuild=True``) builds them again.

Training heterogeneity as in the paper's appendix B.1: the math model is fine-tuned with a
10× larger learning rate than the other two (as SVHN's 1e-4 against 1e-5), and the three
use different step counts, so the math task vector is the outlier.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Mapping, Optional

from fedmerge_plugins.demo import data
from fedmerge_plugins.demo.train import ModelShape, TrainSpec

MANIFEST = "manifest.json"
# task model directory name (as the paper names them) -> evaluation task
TASK_MODELS: Dict[str, str] = {"instruction": "instruct", "math": "gsm8k", "code": "humaneval"}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built models."""

    seed: int = 0
    vocab_size: int = 768
    shape: ModelShape = ModelShape()
    corpus_documents: int = 12000
    pretrain: TrainSpec = TrainSpec(steps=1200, learning_rate=3e-3, batch_size=32, warmup_fraction=0.05, weight_decay=0.01)
    finetune: Mapping[str, TrainSpec] = field(
        default_factory=lambda: {
            "instruction": TrainSpec(steps=300, learning_rate=3e-4, batch_size=16),
            "math": TrainSpec(steps=150, learning_rate=3e-3, batch_size=16),
            "code": TrainSpec(steps=200, learning_rate=3e-4, batch_size=16),
        }
    )
    n_validation: int = 24
    n_test: int = 60

    def scaled(self, pretrain_steps: int, finetune_fraction: float, corpus_documents: int) -> "BuildConfig":
        """The same recipe with fewer steps (a common factor keeps the steps' ratios)."""
        return replace(
            self,
            corpus_documents=corpus_documents,
            pretrain=replace(self.pretrain, steps=pretrain_steps),
            finetune={
                name: replace(spec, steps=max(1, round(spec.steps * finetune_fraction)))
                for name, spec in self.finetune.items()
            },
        )


SIZES: Dict[str, BuildConfig] = {
    "full": BuildConfig(),
    "small": BuildConfig().scaled(pretrain_steps=600, finetune_fraction=0.6, corpus_documents=6000),
}


def config_dict(config: BuildConfig) -> dict:
    result = asdict(config)
    result["finetune"] = {name: asdict(spec) for name, spec in config.finetune.items()}
    return result


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
    payload = json.dumps([config_dict(config), versions, sources], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    for name in ["base", *TASK_MODELS]:
        if not (models_dir / name / "model.safetensors").is_file():
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
    from fedmerge_plugins.norms import state_dict_norms

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
    torch.manual_seed(config.seed)
    splits = task_splits(config)
    corpus = data.pretraining_corpus(config.corpus_documents, config.seed)
    instruction_texts = [
        "".join(data.training_pair(task, record)) for task in data.TASKS for record in splits[task].train
    ]
    tokenizer = train_tokenizer(corpus + instruction_texts, config.vocab_size, models_dir / "tokenizer")
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
    models = {"base": {"path": "base", "training": asdict(pretraining)}}
    task_states = {}
    for index, (name, task) in enumerate(TASK_MODELS.items()):
        spec = config.finetune[name]
        model = LlamaForCausalLM(base.config)
        model.load_state_dict(base_state)
        pairs = [data.training_pair(task, record) for record in splits[task].train]
        record = train(
            model,
            response_examples(tokenizer, pairs, max_length),
            spec,
            pad_id=tokenizer.pad_token_id,
            seed=config.seed + 1 + index,
            description=f"fine-tune {name}",
        )
        save_model(model, tokenizer, models_dir / name, record)
        task_states[name] = model.state_dict()
        models[name] = {"path": name, "task": task, "training": asdict(record)}
    norms = state_dict_norms(base_state, task_states)
    for name in TASK_MODELS:
        models[name]["task_vector_norm"] = norms[name]
    manifest = {
        "key": key,
        "config": config_dict(config),
        "models": models,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"Models: built in {manifest['build_seconds']:.0f} s")
    return manifest
