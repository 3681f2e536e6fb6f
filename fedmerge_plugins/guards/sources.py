"""Whether every model a recipe names can be found, checked before mergekit resolves it.

mergekit takes any path that does not exist for a Hugging Face hub id, so a typo in a
local path ends in a traceback about the form of repo ids, and a hub id while offline in
one about the cache. ``check_sources`` says which model is missing, in one line: a local
folder that does not exist (or has no ``config.json``), or, offline (``HF_HUB_OFFLINE=1``),
a hub id that is not in the Hugging Face cache. Online, hub ids are left to mergekit.
A model that is nowhere is a ``ModelNotFoundError``, also a ``FileNotFoundError`` (as
mergekit's own error for it is an ``OSError``).
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from mergekit.common import ModelPath
from mergekit.config import MergeConfiguration

from fedmerge_plugins.errors import InputError


class ModelNotFoundError(InputError, FileNotFoundError):
    """A model (or adapter) that is neither a folder here nor (offline) in the hub cache;
    ``errno`` ENOENT and ``filename`` the path, for callers that catch ``OSError``."""

    def __init__(self, message: str, path: str) -> None:
        FileNotFoundError.__init__(self, errno.ENOENT, message, path)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple:
        return type(self), (self.strerror, self.filename)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_repo_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def check_source(source: ModelPath, what: str, *, needs_config: bool = True, cache_dir: Optional[str] = None) -> None:
    """Raise InputError, naming ``what``, if ``source`` can be neither read locally nor
    (offline) found in the hub cache."""
    path = source.path
    if os.path.isdir(path):
        if needs_config and not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{what}: folder {path} has no config.json (not a model folder, or an unfinished merge)")
        return
    if os.path.exists(path):
        raise InputError(f"{what}: {path} is a file; give the model's folder")
    if not _is_repo_id(path):
        raise ModelNotFoundError(f"{what}: no such folder (nor a Hugging Face hub id)", path)
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        name = "config.json" if needs_config else "adapter_config.json"
        cached = try_to_load_from_cache(path, name, cache_dir=cache_dir, revision=source.revision)
        if not isinstance(cached, str):
            raise ModelNotFoundError(
                f"{what}: no folder {path} here, and hub id {path} is not in the Hugging Face cache "
                "while offline (HF_HUB_OFFLINE=1): fix the path or download the model first",
                path,
            )


def check_sources(config: MergeConfiguration, cache_dir: Optional[str] = None) -> None:
    """Every model (and LoRA adapter) the recipe references can be found."""
    for model in config.referenced_models():
        check_source(model.model, f"model {model}", cache_dir=cache_dir)
        if model.lora is not None:
            check_source(model.lora, f"LoRA adapter of model {model}", needs_config=False, cache_dir=cache_dir)
