"""What a finished, loadable model folder holds: ``config.json`` and a tokenizer.

A merge is published with ``config.json`` (``staging``), and mergekit copies or builds a
tokenizer unless told not to (``--no-copy-tokenizer``, or a base without one). Evaluation
needs both; ``check_model_folder`` says which is missing, in one line, before anything
is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from fedmerge_plugins.errors import FedmergeError

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


class ModelFolderError(FedmergeError):
    """A model folder without a config or a tokenizer (named by folder)."""


def has_tokenizer(folder: Union[str, Path]) -> bool:
    return any((Path(folder) / name).exists() for name in TOKENIZER_FILES)


def check_model_folder(folder: Union[str, Path]) -> None:
    """Raise ModelFolderError unless ``folder`` holds a config and a tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"{folder}: no config.json; not a model folder, or a merge that did not finish"
        )
    if not has_tokenizer(folder):
        raise ModelFolderError(
            f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}): the merge was written without one; "
            "copy the base model's tokenizer files into it, or merge again without --no-copy-tokenizer "
            "(or with `tokenizer: {source: base}`)"
        )
