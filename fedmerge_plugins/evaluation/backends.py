"""Which lm-eval model runs the generations: ``hf`` (transformers) or ``vllm``.

Both go through lm-eval's own model registry (``lm_eval.api.registry.get_model(name)
.create_from_arg_obj(args)``), the same path ``lm_eval --model NAME --model_args ...``
takes, so the project's task configs run unchanged on either. ``Backend.model_args`` is the
one place that turns fedmerge's options into a model's constructor arguments.

vLLM is an optional extra (``pip install 'fedmerge[vllm]'``, a GPU build); it is not
installed in the test environment and has not been run on this project's machines.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fedmerge_plugins.errors import FedmergeError

BACKENDS: Tuple[str, ...] = ("hf", "vllm")


class BackendError(FedmergeError):
    """A backend that is not installed, or options it does not take."""


@dataclass(frozen=True)
class Backend:
    """lm-eval model settings. ``device`` is the hf backend's (vLLM takes its GPUs from
    ``CUDA_VISIBLE_DEVICES``); the parallelism, memory and length settings are vLLM's own."""

    name: str = "hf"
    device: str = "cpu"
    batch_size: int = 8
    dtype: Optional[str] = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: Optional[float] = None
    max_model_len: Optional[int] = None
    seed: int = 1234

    def check(self) -> None:
        """Raise BackendError for an unknown backend, a missing package or options the backend
        does not take; nothing is imported or loaded."""
        if self.name not in BACKENDS:
            raise BackendError(f"backend {self.name!r} is not one of {', '.join(BACKENDS)}")
        if self.name == "hf":
            given = [option for option, value in self._vllm_only().items() if value]
            if given:
                verb = "is" if len(given) == 1 else "are"
                raise BackendError(f"{', '.join(given)} {verb} for the vllm backend only (add --backend vllm)")
            return
        if importlib.util.find_spec("vllm") is None:
            raise BackendError(
                "the vllm backend needs the vllm package: pip install 'fedmerge[vllm]' (a GPU machine)"
            )
        if self.data_parallel_size > 1 and importlib.util.find_spec("ray") is None:
            raise BackendError("vllm with --data-parallel-size > 1 needs ray: pip install 'fedmerge[ray]'")

    def _vllm_only(self) -> Dict[str, bool]:
        return {
            "--tensor-parallel-size": self.tensor_parallel_size != 1,
            "--data-parallel-size": self.data_parallel_size != 1,
            "--gpu-memory-utilization": self.gpu_memory_utilization is not None,
            "--max-model-len": self.max_model_len is not None,
        }

    def model_args(self, model_dir: "str | Path") -> Dict[str, Any]:
        """The keyword arguments of lm-eval's ``hf`` (HFLM) or ``vllm`` (VLLM) model."""
        pretrained = str(model_dir)
        if self.name == "hf":
            dtype = self.dtype or ("float32" if self.device == "cpu" else "auto")
            return {"pretrained": pretrained, "device": self.device, "batch_size": self.batch_size, "dtype": dtype}
        args: Dict[str, Any] = {
            "pretrained": pretrained,
            "dtype": self.dtype or "auto",
            "batch_size": self.batch_size,
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "seed": self.seed,
        }
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return args

    def load(self, model_dir: "str | Path") -> Any:
        """The lm-eval model on a local merged model directory."""
        from lm_eval.api.registry import get_model

        self.check()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise BackendError(f"{model_dir} is not a model directory (no config.json)")
        return get_model(self.name).create_from_arg_obj(self.model_args(model_dir))
