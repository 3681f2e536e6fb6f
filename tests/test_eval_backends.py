"""Backend selection for lm-eval: hf and vllm go through one code path (lm-eval's model registry).

vLLM is not installed here (no GPU): its model is never constructed. The arguments built for it
are checked against the constructor of lm-eval's VLLM class, read from lm-eval's source.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmerge_plugins.evaluation.backends import Backend, BackendError
from tests.eval_fixtures import write_chain_model

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def vllm_init_parameters() -> set:
    """Named parameters of lm-eval's VLLM.__init__, from its source (vllm itself is not importable)."""
    spec = importlib.util.find_spec("lm_eval")
    source = Path(spec.origin).parent / "models" / "vllm_causallms.py"
    tree = ast.parse(source.read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "VLLM")
    init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    return {arg.arg for arg in init.args.args + init.args.kwonlyargs} - {"self"}


def test_vllm_model_args(tmp_path):
    backend = Backend(
        name="vllm",
        batch_size=16,
        dtype="bfloat16",
        tensor_parallel_size=2,
        data_parallel_size=4,
        gpu_memory_utilization=0.85,
        max_model_len=4096,
        seed=7,
    )
    args = backend.model_args(tmp_path / "merged")
    assert args == {
        "pretrained": str(tmp_path / "merged"),
        "dtype": "bfloat16",
        "batch_size": 16,
        "tensor_parallel_size": 2,
        "data_parallel_size": 4,
        "seed": 7,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
    }
    named = vllm_init_parameters()
    # gpu_memory_utilization is a vLLM engine argument: lm-eval passes **kwargs on to vllm.LLM
    assert set(args) - named == {"gpu_memory_utilization"}
    defaults = Backend(name="vllm").model_args("m")
    assert defaults["dtype"] == "auto" and "max_model_len" not in defaults and "gpu_memory_utilization" not in defaults


def test_hf_model_args():
    assert Backend().model_args("m") == {"pretrained": "m", "device": "cpu", "batch_size": 8, "dtype": "float32"}
    assert Backend(device="cuda:1", batch_size=2).model_args("m")["dtype"] == "auto"


def test_checks():
    with pytest.raises(BackendError, match="--tensor-parallel-size, --max-model-len are for the vllm backend only"):
        Backend(tensor_parallel_size=2, max_model_len=10).check()
    with pytest.raises(BackendError, match="'sglang' is not one of hf, vllm"):
        Backend(name="sglang").check()
    Backend().check()
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(BackendError, match=r"pip install 'fedmerge\[vllm\]'"):
            Backend(name="vllm").check()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_chain_model(tmp_path_factory.mktemp("tiny"), {"ping": "pong"}, ["ping pong"] * 4)


def test_hf_goes_through_lm_eval_registry(tiny_model, monkeypatch):
    import lm_eval.api.registry as registry
    from lm_eval.models.huggingface import HFLM

    asked = []
    real = registry.get_model

    def spy(name):
        asked.append(name)
        return real(name)

    monkeypatch.setattr(registry, "get_model", spy)
    lm = Backend(batch_size=3).load(tiny_model)
    assert asked == ["hf"]
    assert isinstance(lm, HFLM) and lm.batch_size_per_gpu == 3 and str(lm.device) == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_cli_vllm_missing_is_one_line_before_output(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    out = tmp_path / "results"
    command = [str(Path(sys.executable).parent / "fedmerge"), "eval", str(tiny_model), "--tasks", "gsm8k",
               "--data-dir", str(data), "--backend", "vllm", "--tensor-parallel-size", "2", "--output", str(out)]
    env = {**os.environ, **OFFLINE}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: the vllm backend needs the vllm package: pip install 'fedmerge[vllm]' (a GPU machine)"
    ]
    assert not out.exists()
    hf_only = subprocess.run(command[:-6] + ["--max-model-len", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert hf_only.returncode == 1
    assert hf_only.stderr.strip().splitlines() == ["Error: --max-model-len is for the vllm backend only (add --backend vllm)"]


def test_sweep_builds_its_backend_through_the_same_path(tmp_path, monkeypatch):
    """``fedmerge sweep --eval lm-eval --backend vllm …`` gives its evaluator the Backend that
    ``fedmerge eval`` builds from the same options (vllm pretended present: nothing loads it)."""
    from click.testing import CliRunner

    import fedmerge_plugins.sweep.run as sweep_run
    from fedmerge_plugins.evaluation.cli import backend_from_options
    from fedmerge_plugins.sweep.cli import sweep_command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    seen = {}
    monkeypatch.setattr(sweep_run, "run_sweep", lambda recipe, out, evaluator, **kw: seen.update(evaluator=evaluator, **kw))
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: task_arithmetic\n")
    common = [str(recipe), "--lambda", "0.5", "--eval", "lm-eval", "--tasks", "gsm8k", "--data-dir", str(data), "--split", "test"]
    vllm = ["--backend", "vllm", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8", "--max-model-len", "64"]
    result = CliRunner().invoke(sweep_command, common + vllm + ["--max-gen-toks", "0", "--batch-size", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    backend = seen["evaluator"].options["backend"]
    assert backend == backend_from_options("vllm", 2, 1, 0.8, 64, device="cpu", batch_size=4)
    assert backend.model_args("m") == {"pretrained": "m", "dtype": "auto", "batch_size": 4, "tensor_parallel_size": 2,
                                       "data_parallel_size": 1, "seed": 1234, "gpu_memory_utilization": 0.8, "max_model_len": 64}
    assert seen["evaluator"].options["max_gen_toks"] is None  # 0: each task's own limit
    assert seen["evaluator"].description.endswith(" backend=vllm")
    result = CliRunner().invoke(sweep_command, common, catch_exceptions=False)  # hf: the description of older logs
    assert result.exit_code == 0 and seen["evaluator"].options["backend"] == Backend(batch_size=8)
    assert "backend=" not in seen["evaluator"].description and "max_gen_toks" not in seen["evaluator"].description
    python = CliRunner().invoke(sweep_command, [str(recipe), "--lambda", "0.5", "--eval", "python:x.py:f", "--backend", "vllm"])
    assert python.exit_code == 2 and "--backend and the vllm settings are for --eval lm-eval only" in python.output
