"""Scoring for the demo through ``fedmerge_plugins.evaluation`` (lm-eval with ``eval/``'s tasks).

Two ways in, both ``lm_eval.simple_evaluate`` on the same task objects:

- ``score_directory``: a model directory on disk (the references and mergekit's merges);
- ``StateScorer``: one model object whose weights are replaced in place for each candidate
  of the validation search, so a candidate costs a merge in memory and the generations,
  not a checkpoint write and load.

``quiet()`` keeps lm-eval's, transformers' and mergekit's own bars and log lines off the
terminal (the demo shows its own progress); on an error the captured output is shown.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

Scores = Dict[str, float]
Items = Dict[str, List[float]]  # task -> each item's score (1 or 0), in data order


@dataclass(frozen=True)
class Scored:
    """Accuracy per task and the item scores it is the mean of (for paired bootstraps)."""

    scores: Scores
    items: Items
NOISY_LOGGERS = ("lm_eval", "lm-eval", "transformers", "mergekit", "datasets", "accelerate", "fedmerge_plugins.norms.streaming")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Capture stdout, stderr and library log records below ERROR for the duration."""
    buffer = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-20000:])
        raise
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class TaskCache:
    """lm-eval task objects per (data directory, tasks), loaded once."""

    def __init__(self) -> None:
        self._loaded: Dict[Tuple[str, Tuple[str, ...]], Mapping[str, object]] = {}

    def get(self, data_dir: Path, tasks: Sequence[str]) -> Mapping[str, object]:
        from fedmerge_plugins.evaluation.api import load_tasks

        key = (str(data_dir), tuple(tasks))
        if key not in self._loaded:
            with quiet():
                self._loaded[key] = load_tasks(tuple(tasks), data_dir=data_dir)
        return self._loaded[key]


class Scorer:
    """Generation settings shared by every evaluation of a demo run."""

    def __init__(self, *, batch_size: int, max_gen_toks: int, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.device = device
        self.tasks = TaskCache()

    def run(self, lm: object, data_dir: Path, tasks: Sequence[str], output_dir: Optional[Path], name: str) -> Scored:
        from fedmerge_plugins.evaluation.api import evaluate_lm

        with quiet():
            result = evaluate_lm(
                lm,
                self.tasks.get(data_dir, tasks),
                max_gen_toks=self.max_gen_toks,
                allow_code_execution=True,
                output_dir=output_dir,
                model_name=name,
            )
        return Scored(dict(result.scores), {task: result.item_scores(task) for task in tasks})

    def score_directory(
        self, model_dir: Path, data_dir: Path, tasks: Sequence[str], output_dir: Optional[Path] = None
    ) -> Scored:
        """Load ``model_dir`` with lm-eval's ``hf`` model and score it on ``tasks``."""
        from fedmerge_plugins.evaluation.api import load_model

        with quiet():
            lm = load_model(model_dir, device=self.device, batch_size=self.batch_size)
        return self.run(lm, data_dir, tasks, output_dir, model_dir.name)


def state_digest(state: Mapping[str, object]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()  # type: ignore[attr-defined]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class StateScorer:
    """Scores state dicts with one in-memory model (the architecture of ``model_dir``). A state
    scored before on the same items is not scored again: merges that come out identical, bit for
    bit (a merge set without the heterogeneous model, in both settings; grid points that give the
    same merge), cost one evaluation."""

    def __init__(self, scorer: Scorer, model_dir: Path) -> None:
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.scorer = scorer
        self.scored: Dict[Tuple[str, str, Tuple[str, ...]], Scored] = {}
        with quiet():
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(scorer.device)
            self.model.eval()
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=scorer.batch_size)

    def score(self, state: Mapping[str, object], data_dir: Path, tasks: Sequence[str], name: str = "candidate") -> Scored:
        key = (state_digest(state), str(data_dir), tuple(tasks))
        if key not in self.scored:
            self.model.load_state_dict(state, strict=True)
            self.scored[key] = self.scorer.run(self.lm, data_dir, tasks, None, name)
        return self.scored[key]
