"""Task-vector norms: the streaming pass over checkpoints (``streaming``) and the cache that
remembers its results across processes (``cache``).

``state_dict_norms`` (the norms of in-memory state dicts, for ``cclip``'s ``norm`` outside a
recipe) is this package's public entry point; it is imported on first use, so that reading
the cache does not import torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "state_dict_norms":
        from fedmerge_plugins.norms.streaming import state_dict_norms

        return state_dict_norms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
