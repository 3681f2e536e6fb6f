"""The sweep tests' family and recipes: a base and three task models with tensors past the
kernels' block size (one task model has an extra token, so the recipe aligns vocabularies),
and one recipe per method the sweep runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from tests.support.synthetic import Family, llama_config, make_family

# (shared, per task model) parameters; FedNova's steps are 100·(t + 1)
METHODS: Dict[str, tuple] = {
    "task_arithmetic": ({}, {"weight": 0.7}),
    "fednova": ({}, {}),
    "fedgma": ({"rho": 0.5}, {}),
    "median": ({}, {}),
    "cclip": ({"rho": 0.05}, {}),
}


def sweep_family(root: Path) -> Family:
    """Tensors past methods.common.BLOCK (several blocks per kernel); task model 1 has one more token."""
    config = llama_config(hidden_size=576, intermediate_size=640, vocab_size=512, num_hidden_layers=1)
    return make_family(root, scales=(0.01, 0.02, 0.2), extra_tokens=(0, 1, 0), config=config)


def method_recipe(family: Family, method: str, dtype: str, lam: float, out_dtype: Optional[str] = None) -> Dict[str, Any]:
    """The recipe of ``method`` over ``family`` at ``lam`` (vocabularies aligned to the base's tokenizer)."""
    shared, per_model = METHODS[method]
    models = []
    for index, path in enumerate(family.tasks):
        parameters = dict(per_model)
        if method == "fednova":
            parameters["steps"] = 100 * (index + 1)
        models.append({"model": str(path), **({"parameters": parameters} if parameters else {})})
    data = {"merge_method": method, "base_model": str(family.base), "models": models,
            "parameters": {"lambda": lam, **shared}, "tokenizer": {"source": "base"}, "dtype": dtype}
    if out_dtype:
        data["out_dtype"] = out_dtype
    return data
