"""The guards inside mergekit's own merge path (issue 31 items 2, 3, 6–9, 11, 16; issue 33
item 6; issue 32's hooks), injected through the real ``mergekit-yaml`` and ``fedmerge
inspect`` on tiny local checkpoints: the exit code, the one line, and what is on disk."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import BIN
from tests.support.synthetic import Family, make_family
from tests.test_faults import assert_nothing_written, inspect, one_error_line, recipe, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.02), names=["math", "code"], extra_tokens=(0, 0))


def mergekit_yaml(data: Dict, workdir: Path, out: Path, *extra: str, umask: int | None = None) -> subprocess.CompletedProcess:
    path = workdir / f"recipe-{out.name}.yml"
    path.write_text(yaml.safe_dump(data))
    command = [str(BIN / "mergekit-yaml"), str(path), str(out), *extra]
    before = os.umask(umask) if umask is not None else None
    try:
        return run(command)
    finally:
        if before is not None:
            os.umask(before)


def tensors_of(folder: Path) -> Dict[str, torch.Tensor]:
    merged: Dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(str(file)))
    return merged


def median_of_two(family: Family, lam: float) -> Dict[str, torch.Tensor]:
    """θ_0 + λ (τ_1 + τ_2)/2 in float64 (the median of two task vectors is their mean)."""
    return {
        name: base.double() + lam * sum(t[name].double() - base.double() for t in family.task_tensors) / 2
        for name, base in family.base_tensors.items()
    }


def assert_weights(folder: Path, expected: Dict[str, torch.Tensor]) -> None:
    merged = tensors_of(folder)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.double(), expected[name], rtol=2e-6, atol=2e-6, msg=name)


# ---- item 2: nothing of an earlier merge stays beside a new one ------------------------


@pytest.mark.parametrize("card", [True, False])
def test_merge_into_an_earlier_merge_leaves_nothing_of_it(family: Family, tmp_path: Path, card: bool) -> None:
    out = tmp_path / "out"
    first = mergekit_yaml(recipe(family, family.tasks, **{"lambda": 1.0}), tmp_path, out, "--out-shard-size", "20K")
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = sorted(p.name for p in out.iterdir())
    assert {"README.md", "mergekit_config.yml", "tokenizer.json", "model.safetensors.index.json"} <= set(earlier), earlier
    (out / "notes.txt").write_text("the user's own file")
    second = recipe(family, family.tasks, tokenizer=False, **{"lambda": 0.5})
    flags = ["--no-copy-tokenizer"] + ([] if card else ["--no-write-model-card"])
    result = mergekit_yaml(second, tmp_path, out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = tmp_path / "fresh"
    assert mergekit_yaml(second, tmp_path, fresh, *flags).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in fresh.iterdir()), "notes.txt"])
    assert not (out / "tokenizer.json").exists() and not list(out.glob("model-*-of-*.safetensors"))
    assert (out / "README.md").exists() == card and (out / "mergekit_config.yml").exists() == card
    if card:  # the new card describes the new merge
        assert "lambda: 0.5" in (out / "mergekit_config.yml").read_text()
    assert_weights(out, median_of_two(family, 0.5))


# ---- items 3 and 33.6: keys mergekit would ignore, unknown methods ----------------------


@pytest.mark.parametrize("method", ["median", "task_arithmetic"])
@pytest.mark.parametrize("typo", ["paramters", "parameter"])
def test_misspelt_top_level_key_is_one_line(family: Family, tmp_path: Path, method: str, typo: str) -> None:
    data = recipe(family, family.tasks, method=method)
    data[typo] = data.pop("parameters")
    if method == "task_arithmetic":
        for model in data["models"]:
            model["parameters"] = {"weight": 1.0}
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line == f"Error: unknown recipe key `{typo}` at the top level; did you mean `parameters`?"
    assert_nothing_written(tmp_path)


def test_misspelt_key_in_a_model_entry_is_one_line(family: Family, tmp_path: Path) -> None:
    data = recipe(family, family.tasks)
    data["models"][1]["paramters"] = {"lambda": 0.3}
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line == "Error: unknown recipe key `paramters` in models[1]; did you mean `parameters`?"
    assert_nothing_written(tmp_path)


def test_unknown_parameter_of_mergekits_own_method_is_one_line(family: Family, tmp_path: Path) -> None:
    data = recipe(family, family.tasks, method="task_arithmetic")
    data["parameters"] = {"lamda": 0.3}
    for model in data["models"]:
        model["parameters"] = {"weight": 1.0}
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line.startswith("Error: task_arithmetic: top-level parameters: unknown parameter `lamda`; task_arithmetic takes ")
    assert "`lambda`" in line and "`weight`" in line
    assert_nothing_written(tmp_path)
    data["parameters"] = {"lambda": 0.3}  # the same recipe spelt right merges
    assert mergekit_yaml(data, tmp_path, tmp_path / "out").returncode == 0


def test_unknown_method_is_one_line_naming_the_registered_ones(family: Family, tmp_path: Path) -> None:
    data = recipe(family, family.tasks, method="fedavg")
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line.startswith("Error: unknown merge_method `fedavg`; registered: ")
    assert all(name in line for name in ("cclip", "fedgma", "fednova", "median", "task_arithmetic", "ties"))
    assert_nothing_written(tmp_path)
    assert one_error_line(inspect(data, tmp_path)) == line
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "score.py").write_text("def score(model_dir):\n    return 1.0\n")
    swept = run([str(BIN / "fedmerge"), "sweep", str(path), "--lambda", "0.5,1", "--out", str(tmp_path / "sweep"),
                 "--eval", f"python:{tmp_path / 'score.py'}:score"])
    assert one_error_line(swept) == line


def test_inspect_on_a_recipe_without_models_is_one_line(family: Family, tmp_path: Path) -> None:
    data = recipe(family, family.tasks)
    del data["models"]
    line = one_error_line(inspect(data, tmp_path))
    assert line.startswith(f"Error: {tmp_path / 'inspect.yml'}: not a valid mergekit recipe: ")


# ---- items 7 and 11: the models listed ---------------------------------------------------


def test_base_model_also_listed_as_a_task_model_is_one_warning(family: Family, tmp_path: Path) -> None:
    data = recipe(family, [family.base, *family.tasks])
    result = mergekit_yaml(data, tmp_path, tmp_path / "out", "--no-write-model-card")
    assert result.returncode == 0, result.stderr[-3000:]
    message = (f"median: base model {family.base} is also listed in `models:`: mergekit uses it "
               "as the base only, so 2 task model(s) are merged, not 3")
    warnings = [line for line in result.stderr.splitlines() if "base model" in line]
    assert len(warnings) == 1 and warnings[0].endswith(message), result.stderr[-3000:]  # mergekit's logging prefixes it
    assert_weights(tmp_path / "out", median_of_two(family, 1.0))  # what the warning says
    shown = inspect(data, tmp_path)
    assert shown.returncode == 0 and [line for line in shown.stderr.splitlines() if "base model" in line] == [message], \
        shown.stderr[-3000:]


def test_the_same_model_listed_twice_is_one_line(family: Family, tmp_path: Path) -> None:
    data = recipe(family, [family.tasks[0], family.tasks[1], family.tasks[0]])
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line == f"Error: median: model {family.tasks[0]} is listed twice in `models:`"
    assert_nothing_written(tmp_path)


# ---- item 8: file modes ------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_merged_files_and_norms_follow_the_umask(family: Family, tmp_path: Path, umask: int, mode: int,
                                                 private_norm_cache: Path) -> None:
    out = tmp_path / "out"
    result = mergekit_yaml(recipe(family, family.tasks, method="cclip", rho=0.5), tmp_path, out, "--out-shard-size", "20K",
                           umask=umask)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [*out.iterdir(), private_norm_cache / "norms.json"]
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


# ---- item 9: a full disk, a read-only folder --------------------------------------------


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mounted: List[Path] = []

    def make(name: str, options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_full_disk_is_one_line_naming_the_output_and_keeps_the_earlier_merge(family: Family, tmp_path: Path, mount) -> None:
    disk = mount("disk", "size=160k")  # one merge (~110 kB of weights) fits, a second beside it does not
    out = disk / "out"
    first = mergekit_yaml(recipe(family, family.tasks, **{"lambda": 1.0}), tmp_path, out, "--no-write-model-card")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_error_line(mergekit_yaml(recipe(family, family.tasks, **{"lambda": 0.5}), tmp_path, out, "--no-write-model-card"))
    assert line == f"Error: cannot write the merge to {out}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier merge, whole
    assert [p.name for p in disk.iterdir()] == ["out"]  # no staging folder left


def test_read_only_folder_names_the_users_path(family: Family, tmp_path: Path, mount) -> None:
    folder = mount("ro", "size=1m,ro")
    for out in (folder / "out", folder / "new" / "out"):
        line = one_error_line(mergekit_yaml(recipe(family, family.tasks), tmp_path, out, "--no-write-model-card"))
        assert line == f"Error: cannot write the merge to {out}: Read-only file system"


# ---- item 6: odd training logs through mergekit-yaml -------------------------------------


@pytest.mark.parametrize("state,needle", [
    ({"log_history": [{"learning_rate": True, "step": 5}], "global_step": 10, "max_steps": 10},
     "has no valid `step` and `learning_rate`"),
    ({"log_history": [{"learning_rate": 0.1, "step": 5}], "global_step": 12, "max_steps": 10},
     "global_step 12 is beyond max_steps 10"),
])
def test_odd_training_logs_are_one_line(family: Family, tmp_path: Path, state: Dict, needle: str) -> None:
    log = tmp_path / "trainer_state.json"
    log.write_text(json.dumps(state))
    data = recipe(family, family.tasks, method="fednova")
    data["models"][0]["parameters"] = {"training_log": str(log)}
    data["models"][1]["parameters"] = {"steps": 10}
    line = one_error_line(mergekit_yaml(data, tmp_path, tmp_path / "out"))
    assert line.startswith(f"Error: fednova: model {family.tasks[0]}: `training_log`: {log}: ") and needle in line, line
    assert "no training recorded" not in line
    assert_nothing_written(tmp_path)


# ---- item 16: a missing model is a FileNotFoundError for Python callers -------------------


def test_missing_model_is_a_file_not_found_error_in_python(family: Family, tmp_path: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    missing = tmp_path / "mathh"
    config = MergeConfiguration.model_validate(recipe(family, [family.tasks[0], missing]))
    with pytest.raises(OSError) as caught:
        run_merge(config, str(tmp_path / "out"), options=MergeOptions())
    assert isinstance(caught.value, FileNotFoundError) and caught.value.errno == 2
    assert caught.value.filename == str(missing)
    assert str(caught.value) == f"model {missing}: no such folder (nor a Hugging Face hub id)"
    assert_nothing_written(tmp_path)


# ---- issue 32: the hooks -------------------------------------------------------------


def test_each_merge_is_checked_once_with_arguments_bound_by_name(family: Family, tmp_path: Path, monkeypatch) -> None:
    """run_merge called with keywords only: its checks run once (the planner it starts adds
    shapes only), and a MergePlanner started alone checks everything."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from fedmerge_plugins.guards import recipe as recipe_checks

    calls: List[str] = []
    real = recipe_checks._check_models
    monkeypatch.setattr(recipe_checks, "_check_models", lambda config: (calls.append(config.merge_method), real(config))[1])
    config = MergeConfiguration.model_validate(recipe(family, family.tasks))
    run_merge(options=MergeOptions(), out_path=str(tmp_path / "out"), merge_config=config)
    assert calls == ["median"] and (tmp_path / "out" / "config.json").exists()
    from mergekit.architecture import get_architecture_info
    from mergekit.plan import MergePlanner

    options = MergeOptions()
    MergePlanner(config=config, arch_info=get_architecture_info(config, options), options=options, out_model_config=None)
    assert calls == ["median", "median"]


def test_the_library_never_imports_the_cli() -> None:
    """Inside a click command (as in mergekit-yaml) the hooks turn an error into one line
    through ``boundary``, not ``fedmerge_plugins.cli``."""
    code = (
        "import sys, click, mergekit.merge, mergekit.plan, fedmerge_plugins.norms.cache\n"
        "from mergekit.config import MergeConfiguration\n"
        "config = MergeConfiguration.model_validate({'merge_method': 'fedavg', 'models': [{'model': '/nowhere'}]})\n"
        "with click.Context(click.Command('mergekit-yaml')):\n"
        "    try:\n"
        "        mergekit.merge.run_merge(config, '/tmp/never-written', options=None)\n"
        "    except click.ClickException as error:\n"
        "        print(error.message.split(';')[0])\n"
        "print('fedmerge_plugins.cli' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines() == ["unknown merge_method `fedavg`", "False"], done.stderr[-2000:]
