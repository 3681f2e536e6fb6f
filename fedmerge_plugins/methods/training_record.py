"""FedNova's ‖a_t‖₁ = Σ_k η_t^(k) (paper §4.2) from what a recipe says about a training run.

Three sources, in the order they are tried for one task model:

- ``training_log``: Hugging Face Trainer records (``trainer_state.json``, or an output or
  checkpoint folder holding one). The steps done are its ``global_step``; the schedule
  spans its ``max_steps``. When the schedule is known (the recipe's ``schedule``, or a
  JSON/YAML training-arguments file next to the log; ``training_args.bin`` is a pickle and
  is never read), Σ_k η_k is exact and every logged rate is checked against it. Otherwise
  each logged rate stands for the steps since the previous log (the steps after the last
  log take the last rate), with the error bound of ``log_estimate``. Several runs, their
  paths joined with ``os.pathsep`` (``:``), add up.
- ``schedule`` with ``steps`` and ``learning_rate`` (the peak) and ``warmup_steps`` or
  ``warmup_ratio``: Σ_k η_k stepped exactly through ``transformers.get_scheduler`` on a
  dummy optimizer, remembered per process.
- ``steps`` × ``learning_rate``: the constant form (``learning_rate`` defaults to 1).

The Trainer logs the rate after ``optimizer.step()`` and before ``lr_scheduler.step()``:
the rate logged at global step s is the one step s used, the scheduler's value after s − 1
steps. Every sum is exact (rational), rounded once where it is shown.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.store import FileIdentity, file_identity

SCHEDULES: Tuple[str, ...] = (
    "constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
)  # transformers' names (SchedulerType)
RECORD_KEYS: Tuple[str, ...] = ("steps", "learning_rate", "schedule", "warmup_steps", "warmup_ratio", "training_log")
STATE_FILE = "trainer_state.json"
ARGS_FILES = ("training_args.json", "training_args.yaml", "training_args.yml")
METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")  # rates follow metrics: not reproducible
RATE_TOLERANCE = 1e-9  # relative: a logged rate and the schedule's agree within it


class TrainingRecordError(FedmergeError):
    """A training record that cannot be used; one line naming the key or file."""


@dataclass(frozen=True)
class Schedule:
    """A transformers learning-rate schedule: ``name`` over ``length`` steps, peak ``peak``."""

    name: str
    peak: float
    length: int  # num_training_steps
    warmup: int  # num_warmup_steps, resolved
    kwargs: Tuple[Tuple[str, Any], ...] = ()  # lr_scheduler_kwargs, sorted

    def describe(self) -> str:
        warmup = f", warm-up {self.warmup}" if self.warmup and self.name != "constant" else ""
        extra = "".join(f", {k}={v}" for k, v in self.kwargs)
        return f"{self.name}{warmup}{extra}, peak {self.peak:g} over {self.length} steps"


@dataclass(frozen=True)
class EffectiveSteps:
    """‖a_t‖₁ of one task model (up to the common η) and where it came from."""

    value: Fraction  # Σ_k η_k
    bound: Fraction  # |value − true Σ_k η_k| ≤ bound; 0 when exact
    source: str  # "constant", "schedule", "log+schedule" (exact) or "log" (estimate)
    steps: int  # optimizer steps
    detail: str


def schedule_rates(schedule: Schedule) -> Tuple[float, ...]:
    """The rate of each step 0 … length − 1, from transformers' own scheduler."""
    return _schedule_rates(schedule)


@functools.lru_cache(maxsize=64)
def _schedule_rates(schedule: Schedule) -> Tuple[float, ...]:
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule.peak)
    try:
        scheduler = get_scheduler(
            schedule.name, optimizer, num_warmup_steps=schedule.warmup,
            num_training_steps=schedule.length, scheduler_specific_kwargs=dict(schedule.kwargs),
        )
    except (ValueError, TypeError) as error:
        raise TrainingRecordError(f"schedule {schedule.describe()}: transformers refuses it: {error}") from None
    rates: List[float] = []
    group = optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for _ in range(schedule.length):
            rates.append(float(group["lr"]))
            scheduler.step()
    return tuple(rates)


def exact_sum(values: Sequence[float]) -> Fraction:
    """Σ values in exact rational arithmetic (floats are dyadic: one integer sum)."""
    pairs = [value.as_integer_ratio() for value in values]
    if not pairs:
        return Fraction(0)
    denominator = max(d for _, d in pairs)  # powers of two
    return Fraction(sum(n * (denominator // d) for n, d in pairs), denominator)


@functools.lru_cache(maxsize=64)
def schedule_sum(schedule: Schedule, steps: int) -> Fraction:
    """Σ of the rates of the first ``steps`` steps of ``schedule``."""
    return exact_sum(schedule_rates(schedule)[:steps])


def warmup_count(length: int, warmup_steps: Optional[float], warmup_ratio: Optional[float]) -> int:
    """num_warmup_steps as the Trainer resolves it: ``TrainingArguments.get_warmup_steps``
    (transformers 5: a ``warmup_steps`` below 1 is a ratio); ``warmup_ratio`` (transformers 4)
    is ceil(length × ratio)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    if warmup_steps and warmup_ratio:
        raise TrainingRecordError("give `warmup_steps` or `warmup_ratio`, not both")
    value = warmup_ratio if warmup_ratio else (warmup_steps or 0)
    return int(TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=value), length))


# --- Trainer records -------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedRun:
    """What one ``trainer_state.json`` says."""

    path: Path
    steps: int  # global_step: optimizer steps done
    max_steps: int  # the schedule's length
    rates: Tuple[Tuple[int, float], ...]  # (global step, logged rate), increasing steps
    first_entry: str  # the first logged entry as JSON (to recognise a resumed run)
    schedule: Optional[Schedule]  # from a training-arguments file, if there is one
    schedule_note: str  # where the schedule came from, or why there is none


def state_file(path: Path) -> Path:
    """``trainer_state.json`` for ``path``: the file, the folder's own, else the one of its
    latest ``checkpoint-N`` folder."""
    if path.is_file():
        return path
    if not path.exists():
        raise TrainingRecordError(f"{path}: no such file or folder")
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    checkpoints = [
        (int(match.group(1)), child)
        for child in path.iterdir()
        if (match := re.fullmatch(r"checkpoint-(\d+)", child.name)) and (child / STATE_FILE).is_file()
    ]
    if not checkpoints:
        raise TrainingRecordError(f"{path}: no {STATE_FILE} in it or in a checkpoint-N folder (a Trainer output folder?)")
    return max(checkpoints)[1] / STATE_FILE


def read_run(path: Path) -> LoggedRun:
    file = state_file(Path(path)).resolve()
    return _read_run(file, file_identity(str(file)))


def _integer(data: Mapping[str, Any], key: str, file: Path) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TrainingRecordError(f"{file}: `{key}` is {value!r}, not a step count")
    return value


@functools.lru_cache(maxsize=256)
def _read_run(file: Path, identity: FileIdentity) -> LoggedRun:
    """The run logged in ``file``, read again whenever its ``identity`` changes."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingRecordError(f"{file}: cannot read it as JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("log_history"), list):
        raise TrainingRecordError(f"{file}: no `log_history` list: not a Trainer's {STATE_FILE}")
    steps, max_steps = _integer(data, "global_step", file), _integer(data, "max_steps", file)
    if steps == 0:
        raise TrainingRecordError(f"{file}: global_step 0: no training recorded")
    if steps > max_steps:
        raise TrainingRecordError(
            f"{file}: global_step {steps} is beyond max_steps {max_steps}, the length of the schedule it trained "
            "with: not one consistent Trainer record (max_steps edited, or the state of another run?)"
        )
    rates: List[Tuple[int, float]] = []
    first = ""
    for entry in data["log_history"]:
        if not isinstance(entry, dict) or "learning_rate" not in entry:
            continue  # evaluation and summary entries
        step, rate = entry.get("step"), entry["learning_rate"]
        numbers = isinstance(step, int) and isinstance(rate, (int, float)) and not isinstance(step, bool) and not isinstance(rate, bool)
        if not numbers or not math.isfinite(rate) or rate < 0:
            raise TrainingRecordError(f"{file}: log entry {entry!r} has no valid `step` and `learning_rate`")
        if not 0 < step <= steps or (rates and step <= rates[-1][0]):
            raise TrainingRecordError(
                f"{file}: logged step {step} is out of order or beyond global_step {steps} (logs of several runs pasted together?)"
            )
        first = first or json.dumps(entry, sort_keys=True)
        rates.append((step, float(rate)))
    schedule, note = _saved_schedule(file, max_steps)
    return LoggedRun(file, steps, max_steps, tuple(rates), first, schedule, note)


def _saved_schedule(state: Path, length: int) -> Tuple[Optional[Schedule], str]:
    """The schedule in a JSON/YAML training-arguments file beside the log or in the folder
    above it (a checkpoint's output folder)."""
    for folder in (state.parent, state.parent.parent):
        for name in ARGS_FILES:
            if (folder / name).is_file():
                return _args_schedule(folder / name, length)
    pickled = any((folder / "training_args.bin").is_file() for folder in (state.parent, state.parent.parent))
    return None, "training_args.bin not read (a pickle)" if pickled else "no training-arguments file"


def _args_schedule(path: Path, length: int) -> Tuple[Optional[Schedule], str]:
    import yaml

    try:
        args = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TrainingRecordError(f"{path}: cannot read the training arguments: {error}") from None
    if not isinstance(args, dict) or "lr_scheduler_type" not in args or "learning_rate" not in args:
        raise TrainingRecordError(f"{path}: no `lr_scheduler_type` and `learning_rate`: not a TrainingArguments file")
    name = str(args["lr_scheduler_type"]).removeprefix("SchedulerType.").lower()
    if name in METRIC_DRIVEN:
        return None, f"{path.name}: {name} follows the metrics, the log is used"
    kwargs = args.get("lr_scheduler_kwargs") or {}
    try:
        if any(isinstance(args.get(key), bool) for key in ("learning_rate", "warmup_steps", "warmup_ratio")):
            raise TypeError("true/false where a number belongs")
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
        peak = float(args["learning_rate"])
        warmup_steps = float(args.get("warmup_steps") or 0)
        warmup_ratio = float(args.get("warmup_ratio") or 0)
    except (TypeError, ValueError) as error:
        raise TrainingRecordError(f"{path}: unreadable learning_rate, warmup or lr_scheduler_kwargs: {error}") from None
    # transformers 4 took warmup_steps if > 0, else warmup_ratio; 5 has only warmup_steps
    warmup = warmup_count(length, warmup_steps, None) if warmup_steps > 0 else warmup_count(length, None, warmup_ratio)
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    schedule = Schedule(name, peak, length, warmup, frozen)
    return schedule, f"schedule from {path.name}"


def check_against(run: LoggedRun, schedule: Schedule, origin: str) -> None:
    """Every logged rate equals the schedule's rate at that step."""
    rates = schedule_rates(schedule)
    for step, logged in run.rates:
        expected = rates[step - 1]
        if abs(logged - expected) > RATE_TOLERANCE * max(abs(expected), abs(logged)):
            raise TrainingRecordError(
                f"{run.path}: the learning rate logged at step {step} is {logged!r}, the {origin} schedule "
                f"({schedule.describe()}) gives {expected!r}: it is not the schedule this run trained with"
            )


def log_estimate(rates: Sequence[Tuple[int, float]], steps: int, peak: Optional[float] = None) -> Tuple[Fraction, Fraction]:
    """(estimate, bound) of Σ_k η_k over ``steps`` steps from the logged ``(step, rate)``.

    Each logged rate η_i stands for the steps since the previous log; the steps after the
    last log take the last rate. A logged step's rate is exact; each other step's rate lies
    in a range, and the error lies between the sums of the ranges' ends less the estimate:
    the bound is the larger side. The ranges assume every rate lies in [0, P] (P: ``peak``,
    else the highest logged rate, which a peak between two logs can exceed) and that the
    rate moves monotonically between two logs unless the logged rates turn around there:
    - between logs whose neighbours keep one direction: between the two logged rates;
    - where the logged rates rise then fall (a warm-up's end): up to P; where they fall then
      rise (a restart): down to 0;
    - before the first log: [0, η_1] if the rates rise or stay from there (a warm-up from 0),
      else [0, P]; after the last log: [0, η_m] unless they rise at the end ([0, P]).
    A log at every step is exact (bound 0), and so is a constant rate.
    """
    if not rates:
        raise TrainingRecordError("no learning rate logged")
    top = Fraction(max(peak or 0.0, max(rate for _, rate in rates)))
    values = [Fraction(rate) for _, rate in rates]
    slopes = [(b > a) - (b < a) for a, b in zip(values, values[1:])]  # slopes[i]: from log i to i + 1
    ranges = []  # (unknown steps, lowest rate, highest rate, the rate they are estimated with)
    estimate, previous = Fraction(0), 0
    for i, (step, _) in enumerate(rates):
        if i == 0:
            rising_start = bool(slopes) and slopes[0] >= 0
            low, high = Fraction(0), (values[0] if rising_start else top)
        else:
            before = slopes[i - 2] if i >= 2 else (1 if slopes[0] > 0 else None)  # None: unknown
            turns = [d for d in (before, slopes[i - 1], slopes[i] if i < len(slopes) else None) if d]
            peak_inside = before is None or any(a > 0 > b for a, b in zip(turns, turns[1:]))
            trough_inside = any(a < 0 < b for a, b in zip(turns, turns[1:]))
            ends = (values[i - 1], values[i])
            low = Fraction(0) if trough_inside else min(ends)
            high = top if peak_inside else max(ends)
        ranges.append((step - previous - 1, low, high, values[i]))
        estimate += (step - previous) * values[i]
        previous = step
    falling_end = bool(slopes) and slopes[-1] <= 0
    ranges.append((steps - previous, Fraction(0), values[-1] if falling_end else top, values[-1]))
    estimate += (steps - previous) * values[-1]
    below = sum((n * (value - low) for n, low, _, value in ranges), Fraction(0))
    above = sum((n * (high - value) for n, _, high, value in ranges), Fraction(0))
    return estimate, max(below, above)


# --- One task model's record ------------------------------------------------------------


def effective_steps(values: Mapping[str, Any]) -> EffectiveSteps:
    """‖a_t‖₁ from one task model's resolved fednova parameters (``RECORD_KEYS``; absent or
    None: not given). Remembered per process; a log file rewritten is read again."""
    key = tuple((name, values.get(name)) for name in RECORD_KEYS)
    logs = values.get("training_log")
    signature: Tuple[Any, ...] = ()
    if logs:
        signature = tuple(_stat(Path(p)) for p in split_logs(logs))
    return _effective_steps(key, signature)


def split_logs(logs: str) -> List[str]:
    """The runs of a ``training_log`` value: paths joined with ``os.pathsep``."""
    return [part for part in str(logs).split(os.pathsep) if part.strip()]


def _stat(path: Path) -> Tuple[Any, ...]:
    try:
        return file_identity(str(state_file(path).resolve()))
    except (TrainingRecordError, OSError):
        return (str(path), None)  # resolved (and reported) by _effective_steps


@functools.lru_cache(maxsize=1024)
def _effective_steps(key: Tuple[Tuple[str, Any], ...], signature: Tuple[Any, ...]) -> EffectiveSteps:
    values = dict(key)
    steps, rate, name = values["steps"], values["learning_rate"], values["schedule"]
    warmup_steps, warmup_ratio, logs = values["warmup_steps"], values["warmup_ratio"], values["training_log"]
    if name == "constant" and (warmup_steps or warmup_ratio):
        raise TrainingRecordError(
            "`schedule: constant` ignores warm-up in transformers (the Trainer would too): "
            "use `constant_with_warmup`, or drop the warm-up"
        )
    if (warmup_steps or warmup_ratio) and name is None:
        raise TrainingRecordError("`warmup_steps`/`warmup_ratio` need a `schedule`")
    if logs:
        if steps is not None:
            raise TrainingRecordError("give `steps` or `training_log`, not both: the log's global_step is the step count")
        if name is not None and rate is None:
            raise TrainingRecordError("`schedule` needs `learning_rate`, its peak rate")
        try:
            return _from_logs(split_logs(logs), name, rate, warmup_steps, warmup_ratio)
        except TrainingRecordError as error:
            raise TrainingRecordError(f"`training_log`: {error}") from None
    if steps is None:
        raise TrainingRecordError("missing required parameter `steps` (or give `training_log`)")
    if name is None:
        rate = 1.0 if rate is None else rate
        return EffectiveSteps(Fraction(steps) * Fraction(rate), Fraction(0), "constant", steps, f"{steps} steps × {rate:g}")
    if rate is None:
        raise TrainingRecordError("`schedule` needs `learning_rate`, its peak rate")
    schedule = Schedule(name, float(rate), steps, warmup_count(steps, warmup_steps, warmup_ratio))
    return EffectiveSteps(schedule_sum(schedule, steps), Fraction(0), "schedule", steps, schedule.describe())


def _from_logs(
    paths: Sequence[str], name: Optional[str], peak: Optional[float], warmup_steps: Optional[float], warmup_ratio: Optional[float]
) -> EffectiveSteps:
    if not paths:
        raise TrainingRecordError("no path given")
    runs = [read_run(Path(p)) for p in paths]
    for later, run in enumerate(runs):
        for earlier in runs[:later]:
            if run.path == earlier.path:
                raise TrainingRecordError(f"{run.path} is named twice")
            if run.first_entry and run.first_entry == earlier.first_entry:
                raise TrainingRecordError(
                    f"{run.path} resumed {earlier.path} from a checkpoint (its log repeats the same "
                    "steps): give only the resumed run, its log covers both"
                )
    total, bound, details, scheduled = Fraction(0), Fraction(0), [], True
    for run in runs:
        schedule, origin = run.schedule, run.schedule_note
        if name is not None:
            assert peak is not None
            schedule = Schedule(name, float(peak), run.max_steps, warmup_count(run.max_steps, warmup_steps, warmup_ratio))
            origin = "schedule from the recipe"
        if schedule is not None:
            check_against(run, schedule, "recipe's" if name is not None else "saved")
            total += schedule_sum(schedule, run.steps)
            details.append(f"{run.path}: {run.steps} steps, {schedule.describe()} ({origin}; {len(run.rates)} logged rates agree)")
            continue
        if not run.rates:
            raise TrainingRecordError(
                f"{run.path}: no learning rate logged and no schedule saved: give `schedule`, `learning_rate` and the warm-up"
            )
        estimate, error = log_estimate(run.rates, run.steps, peak)
        total, bound, scheduled = total + estimate, bound + error, False
        details.append(f"{run.path}: {run.steps} steps, {len(run.rates)} logged rates, error ≤ {float(error):.4g} ({origin})")
    source = "log+schedule" if scheduled else "log"
    return EffectiveSteps(total, bound, source, sum(run.steps for run in runs), "; ".join(details))

