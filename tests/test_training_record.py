"""FedNova's ‖a_t‖₁ from the training record, against a real Hugging Face Trainer run whose
callback records the rate of every optimizer step: exact from the schedule parameters,
exact from a log with the schedule (recipe or saved JSON arguments), within the stated
bound from the log alone; resumed and several runs; errors in one line naming the key."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from fedmerge_plugins.methods import training_record as tr
from fedmerge_plugins.methods.training_record import TrainingRecordError, effective_steps, log_estimate

STEPS, PEAK, WARMUP = 30, 1e-3, 5


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        out = self.linear(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.x[i].sum()}


@dataclass
class Run:
    out: Path
    rates: List[float]  # the rate of every optimizer step, as the optimizer used it


def train(out: Path, logging_steps: int, resume: Optional[Path] = None, constant: Optional[float] = None) -> Run:
    """A few dozen Trainer steps, warm-up + cosine (``constant``: that rate, no warm-up),
    logged every ``logging_steps``, checkpoints at 15 and 30, the final state in ``out``."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rates: List[float] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
            rates.append(optimizer.param_groups[0]["lr"])

    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, learning_rate=constant or PEAK,
        lr_scheduler_type="constant" if constant else "cosine", warmup_steps=0 if constant else WARMUP,
        logging_steps=logging_steps, save_strategy="steps", save_steps=15, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Data(), callbacks=[Record()])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_state()
    (out / "arguments.json").write_text(args.to_json_string())  # under a name fedmerge does not read
    return Run(out, rates)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Run]:
    root = tmp_path_factory.mktemp("trainer")
    every4 = train(root / "every4", 4)
    shutil.copytree(every4.out, root / "with_args")
    (root / "with_args" / "arguments.json").rename(root / "with_args" / "training_args.json")
    return {
        "every4": every4,
        "every1": train(root / "every1", 1),
        "with_args": Run(root / "with_args", every4.rates),  # the same run, its arguments saved as JSON
        # resumed from every4's checkpoint-15 in a folder of its own: steps 16 … 30 again
        "resumed": train(root / "resumed", 4, resume=every4.out / "checkpoint-15"),
        "constant": train(root / "constant", 4, constant=3e-3),
    }


def record(**values: object) -> tr.EffectiveSteps:
    return effective_steps(values)


def exact(rates: List[float]) -> Fraction:
    return sum((Fraction(r) for r in rates), Fraction(0))


COSINE = {"schedule": "cosine", "learning_rate": PEAK, "warmup_steps": WARMUP}


def test_the_trainer_used_the_rates_its_log_says(runs: Dict[str, Run]) -> None:
    """The fact the log reading rests on: the rate logged at step s is the rate step s used."""
    run = runs["every4"]
    state = json.loads((run.out / "trainer_state.json").read_text())
    logged = [(e["step"], e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]
    assert len(run.rates) == STEPS and [s for s, _ in logged] == list(range(4, STEPS + 1, 4))
    assert all(rate == run.rates[step - 1] for step, rate in logged)
    assert run.rates[0] == 0.0 and max(run.rates) == PEAK  # warm-up from 0


def test_schedule_parameters_give_the_recorded_sum_exactly(runs: Dict[str, Run]) -> None:
    effective = record(steps=STEPS, **COSINE)
    assert effective.source == "schedule" and effective.bound == 0
    assert effective.value == exact(runs["every4"].rates)
    # a ratio: transformers 5 reads warmup_steps < 1 as one, transformers 4 had warmup_ratio
    assert tr.warmup_count(STEPS, 0.2, None) == tr.warmup_count(STEPS, None, 0.2) == math.ceil(STEPS * 0.2) == 6
    assert record(steps=STEPS, schedule="cosine", learning_rate=PEAK, warmup_ratio=1 / 6).value == effective.value


def test_constant_form_is_unchanged_and_equals_the_constant_schedule() -> None:
    assert record(steps=300, learning_rate=2e-5).value == Fraction(300) * Fraction(2e-5)
    assert record(steps=300).value == 300
    assert record(steps=300, learning_rate=2e-5, schedule="constant").value == Fraction(300) * Fraction(2e-5)


def test_log_alone_is_within_the_stated_bound(runs: Dict[str, Run]) -> None:
    run = runs["every4"]
    effective = record(training_log=str(run.out))
    truth = exact(run.rates)
    assert effective.source == "log" and effective.steps == STEPS
    assert 0 < abs(effective.value - truth) <= effective.bound
    assert effective.bound < truth / 4  # a bound that says something (here about 20%)
    # logged at every step: exact, bound 0
    every1 = record(training_log=str(runs["every1"].out))
    assert every1.bound == 0 and every1.value == exact(runs["every1"].rates)


def test_log_estimate_formula_by_hand() -> None:
    # rates logged at steps 2 and 4 of 5: 2 × 0.5 + 2 × 0.25 + 1 × 0.25 (the tail takes the last rate)
    estimate, bound = log_estimate([(2, 0.5), (4, 0.25)], 5)
    assert estimate == Fraction(7, 4)
    # error ranges: before log 1 (falling start: [0, P], P = 0.5) [−0.5, 0]; step 3 (a peak may lie
    # before log 1: [0.25, P]) [0, 0.25]; the tail ([0, η_2]) [−0.25, 0]: the error is in [−0.75, 0.25]
    assert bound == Fraction(3, 4)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
@pytest.mark.parametrize("every", [1, 3, 10])
def test_bound_holds_for_every_schedule(name: str, warmup: int, every: int) -> None:
    """Subsampled rates of each schedule: the true sum lies within the bound (41 steps: a tail)."""
    length = 41
    kwargs = (("num_cycles", 2),) if name == "cosine_with_restarts" else ()
    schedule = tr.Schedule(name, 2e-4, length, 0 if name == "constant" else warmup, kwargs)
    rates = tr.schedule_rates(schedule)
    logged = [(step, rates[step - 1]) for step in range(every, length + 1, every)]
    estimate, bound = log_estimate(logged, length, peak=2e-4)
    assert abs(estimate - exact(list(rates))) <= bound
    if every == 3:
        assert bound < exact(list(rates)) / 4  # not vacuous (at most 19.4% here)
    if every == 1 or name == "constant":
        assert estimate == exact(list(rates))


def test_log_with_a_schedule_is_exact_and_checked(runs: Dict[str, Run]) -> None:
    run = runs["every4"]
    effective = record(training_log=str(run.out), **COSINE)
    assert effective.source == "log+schedule" and effective.bound == 0
    assert effective.value == exact(run.rates)
    # a checkpoint folder: its 15 steps of the 30-step schedule
    checkpoint = record(training_log=str(run.out / "checkpoint-15"), **COSINE)
    assert checkpoint.steps == 15 and checkpoint.value == exact(run.rates[:15])
    with pytest.raises(TrainingRecordError, match=r"logged at step 8 is 0.00098429\d+, the recipe's schedule \(linear, warm-up 5.* gives 0.00092"):
        record(training_log=str(run.out), schedule="linear", learning_rate=PEAK, warmup_steps=WARMUP)


def test_saved_json_arguments_give_the_schedule(runs: Dict[str, Run]) -> None:
    run = runs["with_args"]
    effective = record(training_log=str(run.out))
    assert effective.source == "log+schedule" and effective.value == exact(run.rates)
    assert "training_args.json" in effective.detail
    # a checkpoint reads the arguments in the output folder above it
    assert record(training_log=str(run.out / "checkpoint-15")).value == exact(run.rates[:15])
    # training_args.bin is a pickle: never read
    assert "training_args.bin not read" in record(training_log=str(runs["every4"].out / "checkpoint-15")).detail


def test_resumed_run_covers_both_and_runs_add_up(runs: Dict[str, Run]) -> None:
    first, resumed = runs["every4"], runs["resumed"]
    assert len(resumed.rates) == 15  # steps 16 … 30 ran again
    whole = record(training_log=str(resumed.out), **COSINE)
    assert whole.steps == STEPS and whole.value == exact(first.rates[:15] + resumed.rates)
    with pytest.raises(TrainingRecordError, match=r"resumed .*every4.* give only the resumed run"):
        record(training_log=os.pathsep.join([str(first.out), str(resumed.out)]))
    both = record(training_log=os.pathsep.join([str(first.out), str(runs["every1"].out)]), **COSINE)
    assert both.steps == 2 * STEPS and both.value == exact(first.rates + runs["every1"].rates)


@pytest.mark.parametrize(
    "values,needle",
    [
        ({"training_log": "/nonexistent/run"}, r"^`training_log`: /nonexistent/run: no such file or folder$"),
        ({"steps": 10, "training_log": "LOG"}, r"give `steps` or `training_log`, not both"),
        ({"steps": 10, "schedule": "constant", "learning_rate": 1.0, "warmup_steps": 3}, r"`schedule: constant` ignores warm-up"),
        ({"steps": 10, "schedule": "cosine"}, r"`schedule` needs `learning_rate`"),
        ({"steps": 10, "warmup_steps": 3}, r"need a `schedule`"),
        ({"training_log": "LOG", "warmup_steps": 3}, r"need a `schedule`"),
        ({"learning_rate": 1.0}, r"missing required parameter `steps` \(or give `training_log`\)"),
        ({"steps": 10, "schedule": "cosine", "learning_rate": 1.0, "warmup_steps": 2, "warmup_ratio": 0.1}, r"not both"),
        ({"steps": 10, "schedule": "polynomial", "learning_rate": 1e-8}, r"transformers refuses it: lr_end"),
    ],
)
def test_bad_records_are_one_line(values: Dict[str, object], needle: str, runs: Dict[str, Run]) -> None:
    values = {k: (str(runs["every4"].out) if v == "LOG" else v) for k, v in values.items()}
    with pytest.raises(TrainingRecordError, match=needle) as error:
        effective_steps(values)
    assert "\n" not in str(error.value)


def test_unreadable_logs_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "trainer_state.json").write_text("{not json")
    with pytest.raises(TrainingRecordError, match=r"broken/trainer_state.json: cannot read it as JSON"):
        record(training_log=str(tmp_path / "broken"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingRecordError, match=r"empty: no trainer_state.json in it or in a checkpoint-N folder"):
        record(training_log=str(tmp_path / "empty"))
    state = tmp_path / "nolr.json"
    state.write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 5}], "global_step": 10, "max_steps": 10}))
    with pytest.raises(TrainingRecordError, match=r"nolr.json: no learning rate logged and no schedule saved"):
        record(training_log=str(state))
    assert record(training_log=str(state), schedule="linear", learning_rate=0.1).value == exact(
        list(tr.schedule_rates(tr.Schedule("linear", 0.1, 10, 0)))
    )
    state.write_text(json.dumps({"log_history": [{"learning_rate": 0.1, "step": 5}, {"learning_rate": 0.1, "step": 3}], "global_step": 10, "max_steps": 10}))
    with pytest.raises(TrainingRecordError, match=r"logged step 3 is out of order"):
        record(training_log=str(state))


# --- through mergekit-yaml and fedmerge inspect ----------------------------------------


def fednova_recipe(family, per_model: List[Dict[str, object]], method: str = "fednova", lam: float = 0.7) -> Dict:
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": m} for p, m in zip(family.tasks, per_model)],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }


def mergekit_yaml(config: Dict, workdir: Path, name: str) -> Dict[str, torch.Tensor]:
    import subprocess

    import yaml
    from safetensors.torch import load_file

    from tests.conftest import BIN

    path = workdir / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(workdir / name), "--no-write-model-card"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(workdir / name / "model.safetensors"))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    from tests.support.synthetic import make_family

    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.02, 0.1))


@pytest.mark.slow
def test_mergekit_yaml_from_logs_equals_explicit_values(runs: Dict[str, Run], family, tmp_path: Path) -> None:
    """Saved JSON arguments, a constant rate logged every 4 steps, a log of every step: the
    same weights, bit for bit, as the equivalent explicit values, and eq. 11 in float64."""
    from_logs = [
        {"training_log": str(runs["with_args"].out)},
        {"training_log": str(runs["constant"].out)},
        {"training_log": str(runs["every1"].out)},
    ]
    explicit = [{"steps": STEPS, **COSINE}, {"steps": STEPS, "learning_rate": 3e-3}, {"steps": STEPS, **COSINE}]
    merged = mergekit_yaml(fednova_recipe(family, from_logs), tmp_path, "logs")
    reference = mergekit_yaml(fednova_recipe(family, explicit), tmp_path, "explicit")
    assert set(merged) == set(reference) and all(torch.equal(merged[k], reference[k]) for k in merged)
    a = [float(exact(runs["with_args"].rates)), STEPS * 3e-3, float(exact(runs["every1"].rates))]
    assert a[1] > 5 * a[0]  # heterogeneous
    for name, base in family.base_tensors.items():
        tau = [t[name].double() - base.double() for t in family.task_tensors]
        expected = base.double() + 0.7 * (sum(a) / 3) * sum(v / w for v, w in zip(tau, a))
        torch.testing.assert_close(merged[name].double(), expected, rtol=2e-6, atol=2e-6, msg=name)


def test_equal_logs_are_task_arithmetic_bit_for_bit(runs: Dict[str, Run], family) -> None:
    """The kernel reads the logs itself (mergekit's Python API, ids of our choosing)."""
    from mergekit.merge_methods.api import merge_state_dicts

    import fedmerge_plugins

    fedmerge_plugins.register()
    models = {f"m{i}": tensors for i, tensors in enumerate(family.task_tensors)}
    inputs = {"base": family.base_tensors, **models}
    log = {m: str(runs["every4"].out) for m in models}  # the estimate from the log alone
    with torch.no_grad():
        merged = merge_state_dicts(inputs, "fednova", base="base", parameters={"lambda": 0.7, "training_log": log})
        reference = merge_state_dicts(inputs, "task_arithmetic", base="base", parameters={"lambda": 0.7, "weight": {m: 1.0 for m in models}})
        heterogeneous = merge_state_dicts(
            inputs, "fednova", base="base", parameters={"lambda": 0.7, "training_log": {**log, "m1": str(runs["constant"].out)}}
        )
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    assert not all(torch.equal(heterogeneous[k], reference[k]) for k in reference)


def test_inspect_shows_where_each_norm_came_from(runs: Dict[str, Run], family, tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from fedmerge_plugins.diagnostics.cli import inspect_command

    per_model = [{"steps": 40, "learning_rate": 5e-4}, {"steps": STEPS, **COSINE}, {"training_log": str(runs["every4"].out)}]
    path = tmp_path / "fednova.yml"
    path.write_text(yaml.safe_dump(fednova_recipe(family, per_model)))
    result = CliRunner().invoke(inspect_command, [str(path), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    nova = json.loads((tmp_path / "r.json").read_text())["fednova"]
    log = record(training_log=str(runs["every4"].out))
    a = [40 * 5e-4, float(exact(runs["every4"].rates)), float(log.value)]
    assert nova["sources"] == ["constant", "schedule", "log"]
    assert nova["effective_steps"] == pytest.approx(a, rel=1e-15)
    assert nova["bounds"] == [0.0, 0.0, pytest.approx(float(log.bound), rel=1e-15)]
    w = [x / sum(a) for x in a]
    assert nova["weights"] == pytest.approx(w, rel=1e-12)
    assert nova["chi_square"] == pytest.approx(sum((1 / 3 - x) ** 2 / x for x in w), rel=1e-12)
    table = result.output[result.output.index("FedNova training"):]
    for needle in ("constant", "schedule", "log", f"± {float(log.bound):.3g}", "cosine, warm-up 5, peak 0.001 over 30 steps", f"χ²(p‖w) = {nova['chi_square']:.6g}"):
        assert needle in table, needle

    per_model[2] = {"training_log": str(tmp_path / "no-such-run")}
    path.write_text(yaml.safe_dump(fednova_recipe(family, per_model)))
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"Error: fednova: model {family.tasks[2]}: `training_log`: {tmp_path / 'no-such-run'}: no such file or folder"
    ]
