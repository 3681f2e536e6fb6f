"""Task data: the public datasets through ``datasets``, or local JSONL files, normalized to one
record layout per task, with an optional seeded validation/test split.

Local files use the hub datasets' own fields, so one normalizer serves both:

- gsm8k: ``question``, ``answer`` (GSM8K's worked solution ending "#### 42", or a bare number)
- math: ``problem`` and ``solution`` (answer in ``\\boxed{...}``) or ``answer``
- humaneval: ``task_id``, ``prompt``, ``test`` (defines ``check(candidate)``), ``entry_point``
- mbpp: ``task_id``, ``text``, ``test_list`` (assert statements), optional ``test_setup_code``
- instruct: ``instruction``, ``output``

Normalized records add ``reference`` (the gold answer) for gsm8k and math and make ``task_id``
a string.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fedmerge_plugins.errors import DataError, PathError
from fedmerge_plugins.files import path_error
from fedmerge_plugins.evaluation.answers import gsm8k_reference, math_reference
from fedmerge_plugins.evaluation.tasks import TaskSpec, get_spec

Record = Dict[str, Any]
SPLITS = ("test", "validation")


class DataUnavailable(DataError):
    """A public dataset could not be loaded (offline, or not cached)."""


def local_path(data_dir: "str | Path", short: str) -> Path:
    """Where a task's local data lives: ``DATA_DIR/<short>.jsonl``."""
    return Path(data_dir) / f"{short}.jsonl"


def read_jsonl(path: "str | Path") -> List[Record]:
    """The JSON objects of a JSONL file, one a line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PathError(f"evaluation data file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise path_error(path, error, "read") from error
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _require(record: Mapping[str, Any], fields: Sequence[str], where: str) -> None:
    missing = [field for field in fields if field not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def normalize_record(short: str, record: Mapping[str, Any], where: str) -> Record:
    """One hub or local record -> the task's normalized record; errors name ``where``."""
    try:
        if short == "gsm8k":
            _require(record, ("question", "answer"), where)
            answer = str(record["answer"])
            return {"question": record["question"], "answer": answer, "reference": gsm8k_reference(answer)}
        if short == "math":
            _require(record, ("problem",), where)
            if "answer" in record and record["answer"] is not None:
                reference = str(record["answer"])
            else:
                _require(record, ("solution",), where)
                reference = math_reference(record["solution"])
            return {"problem": record["problem"], "reference": reference}
        if short == "humaneval":
            _require(record, ("task_id", "prompt", "test", "entry_point"), where)
            return {key: str(record[key]) for key in ("task_id", "prompt", "test", "entry_point")}
        if short == "mbpp":
            _require(record, ("task_id", "text", "test_list"), where)
            tests = record["test_list"]
            if not isinstance(tests, list) or not tests or not all(isinstance(test, str) for test in tests):
                raise DataError("test_list must be a non-empty list of assert statements")
            return {
                "task_id": str(record["task_id"]),
                "text": record["text"],
                "test_list": tests,
                "test_setup_code": record.get("test_setup_code") or "",
            }
        if short == "instruct":
            _require(record, ("instruction", "output"), where)
            return {"instruction": record["instruction"], "output": str(record["output"])}
    except (ValueError, DataError) as error:  # answers.py's parsers raise ValueError
        message = str(error)
        raise DataError(message if message.startswith(where) else f"{where}: {message}") from None
    raise DataError(f"unknown evaluation task {short!r}")


def load_hub_records(spec: TaskSpec) -> List[Record]:
    """The task's public dataset (all configs concatenated, in order) as plain records."""
    if spec.hub is None:
        raise DataError(
            f"task {spec.short!r} has no public dataset here; give a data directory holding {spec.short}.jsonl"
        )
    import datasets

    records: List[Record] = []
    for name in spec.hub.names:
        try:
            part = datasets.load_dataset(spec.hub.path, name, split=spec.hub.split)
        except Exception as error:
            label = spec.hub.path + (f" ({name})" if name else "")
            raise DataUnavailable(
                f"could not load {label} for task {spec.short!r} from the Hugging Face hub ({error}); "
                f"offline, give a data directory holding {spec.short}.jsonl instead"
            ) from error
        records.extend(dict(row) for row in part)
    return records


def check_split(split: str, validation_fraction: Optional[float], *, local: bool = True) -> None:
    """Without a validation fraction every item of the data is scored, whatever ``split``
    says: a local file is the split. Public data without a fraction is its test set, which a
    search must not select on: "validation" then needs a fraction."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if validation_fraction is None and split != "test" and not local:
        raise DataError(
            "split 'validation' of the public datasets needs a validation fraction (--validation-fraction 0.05), "
            "or give --data-dir a folder of validation files"
        )
    if validation_fraction is not None and not 0 < validation_fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), not {validation_fraction}")


def split_indices(count: int, split: str, validation_fraction: Optional[float], seed: int) -> List[int]:
    """Indices of ``split`` among ``count`` items.

    Without a fraction every item is in the split asked for. With fraction f, a seeded random
    ``max(1, round(f * count))`` items form "validation" and the rest "test"; both keep the
    data's order, and the same (count, f, seed) always gives the same split.
    """
    check_split(split, validation_fraction)
    if validation_fraction is None:
        return list(range(count))
    size = max(1, round(validation_fraction * count))
    if size >= count:
        raise DataError(f"{count} item(s) are too few for a validation fraction of {validation_fraction}")
    validation = set(random.Random(seed).sample(range(count), size))
    return [index for index in range(count) if (index in validation) == (split == "validation")]


def load_task_records(
    short: str,
    *,
    data_dir: "str | Path | None" = None,
    split: str = "test",
    validation_fraction: Optional[float] = None,
    seed: int = 1234,
) -> List[Record]:
    """Normalized records of one task: from ``DATA_DIR/<short>.jsonl`` when ``data_dir`` is
    given, otherwise from the public dataset; restricted to ``split``."""
    spec = get_spec(short)
    if data_dir is not None:
        path = local_path(data_dir, short)
        raw = read_jsonl(path)
        source = str(path)
    else:
        raw = load_hub_records(spec)
        source = spec.hub.path  # type: ignore[union-attr]  (load_hub_records checked it)
    records = [normalize_record(short, record, f"{source}, record {number}") for number, record in enumerate(raw, 1)]
    try:
        indices = split_indices(len(records), split, validation_fraction, seed)
    except DataError as error:
        raise DataError(f"{source}: {error}") from None
    return [records[index] for index in indices]


def load_task_dataset(short: str, **options: Any):
    """``custom_dataset`` for lm-eval: a ``DatasetDict`` whose "test" split holds the records.

    lm-eval passes the task's metadata (``TaskManager(metadata=...)``, CLI ``--metadata``) as
    keyword arguments; the ones read here are ``data_dir``, ``split``, ``validation_fraction``
    and ``split_seed``; anything else (version, model arguments) is ignored.
    """
    import datasets

    fraction = options.get("validation_fraction")
    records = load_task_records(
        short,
        data_dir=options.get("data_dir"),
        split=options.get("split") or "test",
        validation_fraction=None if fraction is None else float(fraction),
        seed=int(options.get("split_seed", 1234)),
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
