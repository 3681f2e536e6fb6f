"""Faults injected into the real ``mergekit-yaml``, ``fedmerge inspect``, ``fedmerge eval``
and ``fedmerge sweep`` on tiny local checkpoints: each fails with exactly one line naming
the model, file or tensor, leaves no output a loader would take for a model, and the
merges that should succeed give the float64 formula's weights."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file, save_file

from fedmerge_plugins.errors import RecipeError
from fedmerge_plugins.guards.recipe import check_recipe
from tests.support.synthetic import (
    Family,
    base_tensors,
    llama_config,
    make_family,
    task_tensors,
    write_checkpoint,
)
from tests.conftest import BIN

pytestmark = pytest.mark.slow
MLP = "model.layers.0.mlp.down_proj.weight"  # the first tensor, by name, that an MLP width changes


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base (96 tokens) + ``math`` (97 tokens, WizardMath's quirk) + ``code``."""
    return make_family(tmp_path_factory.mktemp("family"), scales=(0.01, 0.02), names=["math", "code"], extra_tokens=(1, 0))


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory, family: Family) -> Dict[str, Path]:
    """Task models that do not fit the base: another MLP width, another hidden size, the
    same as .bin pickles, and one with an extra vocabulary row stored as .bin."""
    root = tmp_path_factory.mktemp("odd")
    models = {}
    for name, config in (("mlp", llama_config(intermediate_size=48)), ("hidden", llama_config(hidden_size=48))):
        models[name] = write_checkpoint(root / name, config, base_tensors(config, seed=5))
    for name in ("mlp", "hidden"):
        models[f"{name}-bin"] = to_bin(models[name], root / f"{name}-bin")
    vocab = task_tensors(family.base_tensors, 0.01, seed=9, extra_tokens=1)
    models["vocab"] = write_checkpoint(root / "vocab", llama_config(), vocab)
    models["vocab-bin"] = to_bin(models["vocab"], root / "vocab-bin")
    return models


def to_bin(folder: Path, target: Path) -> Path:
    """A copy of a safetensors checkpoint as ``pytorch_model.bin``."""
    shutil.copytree(folder, target)
    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def recipe(family: Family, models: List[Path], method: str = "median", tokenizer: bool = True, **parameters) -> Dict:
    data = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"lambda": 1.0, **parameters},
    }
    if tokenizer:
        data["tokenizer"] = {"source": "base"}
    return data


def run(args: List[str], env: Optional[Dict[str, str]] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def mergekit_yaml(data: Dict, workdir: Path, name: str = "out", *extra: str) -> subprocess.CompletedProcess:
    path = workdir / f"{name}.yml"
    path.write_text(yaml.safe_dump(data))
    return run([str(BIN / "mergekit-yaml"), str(path), str(workdir / name), "--no-write-model-card", *extra])


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, and exactly one line on stderr (progress bars aside): 'Error: …'."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.stderr).replace("\r", "\n")  # progress bars' cursor moves
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
    assert all("%|" in line for line in lines[:-1]), lines  # besides it, only progress bars
    return errors[0]


def assert_nothing_written(workdir: Path, name: str = "out") -> None:
    """Neither the output nor a staging folder for it is left behind."""
    assert not (workdir / name).exists()
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(f".{name}.")]


def config_of(data: Dict) -> MergeConfiguration:
    return MergeConfiguration.model_validate(data)


# ---- shape rules ---------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "mlp-bin"])
def test_mlp_width_is_never_a_vocabulary_difference(family: Family, odd: Dict[str, Path], kind: str, tokenizer: bool) -> None:
    with pytest.raises(RecipeError) as caught:
        check_recipe(config_of(recipe(family, [family.tasks[1], odd[kind]], tokenizer=tokenizer)))
    message = str(caught.value)
    assert f"median: model {odd[kind]}: tensor {MLP} has shape (32, 48), the base model (32, 64)" in message
    assert "axis 1 differs and this is not a vocabulary tensor" in message
    assert "tokenizer" not in message and "vocabularies" not in message


@pytest.mark.parametrize("kind", ["hidden", "hidden-bin"])
def test_hidden_size_on_a_vocabulary_tensor_is_not_a_vocabulary_difference(family: Family, odd: Dict[str, Path], kind: str) -> None:
    with pytest.raises(RecipeError) as caught:
        check_recipe(config_of(recipe(family, [odd[kind]], tokenizer=True)))
    message = str(caught.value)
    assert "tensor lm_head.weight has shape (96, 48), the base model (96, 32)" in message
    assert "axis 1 differs and only its vocabulary axis 0 may differ" in message and "vocabularies" not in message


@pytest.mark.parametrize("kind", ["vocab", "vocab-bin"])
def test_vocabulary_axis_needs_a_tokenizer_setting(family: Family, odd: Dict[str, Path], kind: str) -> None:
    check_recipe(config_of(recipe(family, [odd[kind]], tokenizer=True)))
    data = recipe(family, [odd[kind]], tokenizer=False)
    with pytest.raises(RecipeError, match=r"tensor lm_head.weight has shape \(97, 32\), the base model "
                       r"\(96, 32\) \(different vocabularies: add `tokenizer: \{source: base\}`\)"):
        check_recipe(config_of(data))
    check_recipe(config_of({**data, "tokenizer_source": "base"}))  # the older spelling counts too
    from mergekit.options import MergeOptions

    check_recipe(config_of(data), options=MergeOptions(unsafe_truncate_embeddings=True))  # mergekit truncates


def test_bin_shapes_are_read_without_loading_weights(odd: Dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pickle is opened on the meta device, memory-mapped: no storage is materialised."""
    from fedmerge_plugins.guards import shapes

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    found = shapes.file_shapes(str(odd["mlp-bin"] / "pytorch_model.bin"), "mlp-bin")
    assert found[MLP] == (32, 48) and found["lm_head.weight"] == (96, 32)
    assert calls == [{"map_location": "meta", "weights_only": True, "mmap": True}]


def test_mismatch_through_mergekit_yaml_is_one_line_and_writes_nothing(family: Family, odd: Dict[str, Path], tmp_path: Path) -> None:
    line = one_error_line(mergekit_yaml(recipe(family, [family.tasks[0], odd["mlp-bin"]], method="cclip", rho=1.0), tmp_path))
    assert line.startswith(f"Error: cclip: model {odd['mlp-bin']}: tensor {MLP} has shape (32, 48), the base model (32, 64)")
    assert "vocabularies" not in line
    assert_nothing_written(tmp_path)
    line = one_error_line(mergekit_yaml(recipe(family, [odd["vocab-bin"]], tokenizer=False), tmp_path))
    assert "tensor lm_head.weight has shape (97, 32), the base model (96, 32) (different vocabularies" in line
    assert_nothing_written(tmp_path)


def test_vocabulary_difference_with_a_tokenizer_merges_to_the_formula(family: Family, odd: Dict[str, Path], tmp_path: Path) -> None:
    """math (97 tokens, safetensors) and vocab-bin (97 tokens, a pickle) with the base's tokenizer:
    θ_0 + λ (τ_1 + τ_2)/2 on the base's 96 rows, in float64."""
    vocab = load_file(str(odd["vocab"] / "model.safetensors"))
    result = mergekit_yaml(recipe(family, [family.tasks[0], odd["vocab-bin"]], **{"lambda": 0.7}), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(family.base_tensors)
    for name, base in family.base_tensors.items():
        rows = base.shape[0]
        tau = [family.task_tensors[0][name][:rows].double() - base.double(), vocab[name][:rows].double() - base.double()]
        expected = base.double() + 0.7 * (tau[0] + tau[1]) / 2
        torch.testing.assert_close(merged[name].double(), expected, rtol=2e-6, atol=2e-6, msg=name)


# ---- missing and damaged inputs ------------------------------------------------------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, family: Family) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    garbage = shutil.copytree(family.tasks[1], root / "garbage")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    truncated = shutil.copytree(family.tasks[1], root / "truncated")
    size = (truncated / "model.safetensors").stat().st_size
    os.truncate(truncated / "model.safetensors", size - 100)
    bad_bin = to_bin(family.tasks[1], root / "truncated-bin")
    os.truncate(bad_bin / "pytorch_model.bin", 2000)
    return {"garbage": garbage, "truncated": truncated, "truncated-bin": bad_bin}


@pytest.mark.parametrize("kind,reason", [
    ("garbage", "header too large"),
    ("truncated", "incomplete metadata"),
    ("truncated-bin", ""),
])
def test_damaged_weight_file_is_named(family: Family, damaged: Dict[str, Path], tmp_path: Path, kind: str, reason: str) -> None:
    line = one_error_line(mergekit_yaml(recipe(family, [family.tasks[0], damaged[kind]]), tmp_path))
    file = "pytorch_model.bin" if kind.endswith("bin") else "model.safetensors"
    assert line.startswith(f"Error: model {damaged[kind]}: cannot read ") and f"{damaged[kind] / file}" in line, line
    assert reason in line
    assert_nothing_written(tmp_path)


def test_missing_task_model_is_named(family: Family, tmp_path: Path) -> None:
    missing = family.tasks[1].parent / "mathh"
    line = one_error_line(mergekit_yaml(recipe(family, [family.tasks[0], missing]), tmp_path))
    assert line == f"Error: model {missing}: no such folder (nor a Hugging Face hub id)"
    assert_nothing_written(tmp_path)


def test_task_model_relative_path_that_looks_like_a_hub_id_offline(family: Family, tmp_path: Path) -> None:
    data = recipe(family, [family.tasks[0]])
    data["models"].append({"model": "nobody/missing-model"})
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(data))
    result = run([str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "out"), "--no-write-model-card"],
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    line = one_error_line(result)
    assert line.startswith("Error: model nobody/missing-model: no folder nobody/missing-model here, and hub id "
                           "nobody/missing-model is not in the Hugging Face cache while offline (HF_HUB_OFFLINE=1)")
    assert_nothing_written(tmp_path)


# ---- fedmerge inspect: the same rules ------------------------------------------------


def inspect(data: Dict, tmp_path: Path, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    path = tmp_path / "inspect.yml"
    path.write_text(yaml.safe_dump(data))
    return run([str(BIN / "fedmerge"), "inspect", str(path)], env=env)


def test_inspect_applies_the_shape_rules(family: Family, odd: Dict[str, Path], tmp_path: Path) -> None:
    result = mergekit_yaml(recipe(family, [family.tasks[0], odd["mlp"]]), tmp_path)
    expected = one_error_line(result)
    assert one_error_line(inspect(recipe(family, [family.tasks[0], odd["mlp"]]), tmp_path)) == expected
    line = one_error_line(inspect(recipe(family, [odd["vocab-bin"]], tokenizer=False), tmp_path))
    assert "(different vocabularies: add `tokenizer: {source: base}`)" in line
    ok = inspect(recipe(family, [family.tasks[0], odd["vocab-bin"]]), tmp_path)
    assert ok.returncode == 0 and "task vector" in ok.stdout, ok.stderr[-3000:]


def test_inspect_names_a_missing_model_and_an_offline_hub_id(family: Family, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = one_error_line(inspect(recipe(family, [family.tasks[0], missing]), tmp_path))
    assert line == f"Error: model {missing}: no such folder (nor a Hugging Face hub id)"
    data = recipe(family, [family.tasks[0]])
    data["models"].append({"model": "nobody/missing-model"})
    line = one_error_line(inspect(data, tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}))
    assert line.startswith("Error: model nobody/missing-model: no folder nobody/missing-model here") and "offline" in line


# ---- NaN mid-merge -------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory, family: Family) -> Path:
    """``code`` with one NaN in the last layer's down_proj, a tensor merged late."""
    target = shutil.copytree(family.tasks[1], tmp_path_factory.mktemp("nan") / "code-nan")
    tensors = load_file(str(target / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_nan_mid_merge_is_one_line_and_leaves_no_shards(family: Family, poisoned: Path, tmp_path: Path) -> None:
    # small shards: several are written before the poisoned tensor is reached
    line = one_error_line(mergekit_yaml(recipe(family, [family.tasks[0], poisoned]), tmp_path, "out", "--out-shard-size", "20K"))
    assert line == (f"Error: median: model {poisoned} has NaN or inf values in tensor "
                    "model.layers.1.mlp.down_proj.weight; its task vector is undefined")
    assert_nothing_written(tmp_path)


def test_nan_in_cclip_norm_starts_with_cclip(family: Family, poisoned: Path, tmp_path: Path) -> None:
    line = one_error_line(mergekit_yaml(recipe(family, [family.tasks[0], poisoned], method="cclip", rho=1.0), tmp_path))
    assert line == f"Error: cclip: model {poisoned} has NaN or inf values in tensor model.layers.1.mlp.down_proj.weight"
    assert_nothing_written(tmp_path)


# ---- fedmerge eval on a merge without a tokenizer ------------------------------------


def test_eval_on_a_merge_without_tokenizer(family: Family, tmp_path: Path) -> None:
    result = mergekit_yaml(recipe(family, [family.tasks[1]], tokenizer=False), tmp_path, "out", "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "tokenizer.json").exists()
    line = one_error_line(run([str(BIN / "fedmerge"), "eval", str(tmp_path / "out"), "--tasks", "gsm8k", "--limit", "1"]))
    assert line.startswith(f"Error: {tmp_path / 'out'}: no tokenizer (tokenizer_config.json, tokenizer.json, tokenizer.model)")


# ---- fedmerge sweep: --out checked before any checkpoint -----------------------------


def test_sweep_checks_out_before_reading_a_checkpoint(family: Family, damaged: Dict[str, Path], tmp_path: Path) -> None:
    """A foreign results.jsonl is refused first; the garbage checkpoint, which fails any
    read, is never opened (the same run with a fresh --out fails on it)."""
    out = tmp_path / "sweep"
    out.mkdir()
    foreign = '{"key": "{}", "index": 0, "parameters": {}, "scores": {}, "selection": 0, "fingerprint": "0123"}\n'
    (out / "results.jsonl").write_text(foreign)
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(recipe(family, [family.tasks[0], damaged["garbage"]], method="cclip", rho=1.0)))
    (tmp_path / "score.py").write_text("def score(model_dir):\n    return 1.0\n")
    command = [str(BIN / "fedmerge"), "sweep", str(path), "--lambda", "0.5,1", "--eval", f"python:{tmp_path / 'score.py'}:score"]
    line = one_error_line(run(command + ["--out", str(out)]))
    assert "holds results of another recipe or evaluator" in line and str(out / "results.jsonl") in line
    assert (out / "results.jsonl").read_text() == foreign and [p.name for p in out.iterdir()] == ["results.jsonl"]
    line = one_error_line(run(command + ["--out", str(tmp_path / "fresh")]))
    assert f"cannot read its weights in {damaged['garbage'] / 'model.safetensors'}" in line


# ---- SIGKILL at several moments ------------------------------------------------------

SLOW_WRITES = textwrap.dedent('''
    """Test only: pause after each step mergekit writes, so a kill can land between them."""
    import os, sys, time

    PAUSE = float(os.environ.get("FEDMERGE_TEST_PAUSE", "0"))

    class _Finder:
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname != "mergekit.merge":
                return None
            sys.meta_path.remove(cls)
            import importlib.util
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                from mergekit.io.tensor_writer import TensorWriter
                import transformers

                def slow(function):
                    def wrapper(*args, **kwargs):
                        result = function(*args, **kwargs)
                        time.sleep(PAUSE)
                        return result
                    return wrapper

                TensorWriter._write_shard_task = slow(TensorWriter._write_shard_task)
                transformers.PretrainedConfig.save_pretrained = slow(transformers.PretrainedConfig.save_pretrained)
                transformers.PreTrainedTokenizerBase.save_pretrained = slow(transformers.PreTrainedTokenizerBase.save_pretrained)

            spec.loader.exec_module = exec_module
            return spec

    if PAUSE:
        sys.meta_path.insert(0, _Finder)
''')


def loads_as_model(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(str(folder))
    except Exception:
        return False
    return True


def staged(workdir: Path, name: str) -> List[Path]:
    return [p / name for p in workdir.glob(f".{name}.fedmerge-partial-*")]


@pytest.mark.parametrize("moment", ["model-2.", "config.json", "tokenizer_config.json"])
def test_sigkill_never_leaves_a_loadable_folder(family: Family, tmp_path: Path, moment: str) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WRITES)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe(family, [family.tasks[0], family.tasks[1]])))
    env = {**os.environ, "FEDMERGE_TEST_PAUSE": "1.0",
           "PYTHONPATH": os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(
        [str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "out"), "--no-write-model-card", "--out-shard-size", "20K"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    seen: List[str] = []
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            folders = [tmp_path / "out", *staged(tmp_path, "out")]  # wherever mergekit writes
            found = [f for folder in folders if folder.is_dir() for f in os.listdir(folder)]
            seen = found
            if any(f.startswith(moment) for f in found):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, (process.returncode, seen, process.stderr.read()[-2000:])
    assert any(f.startswith(moment) for f in seen)
    assert not (tmp_path / "out").exists() and not loads_as_model(tmp_path / "out")
    assert staged(tmp_path, "out")  # the partial merge is hidden, not at the output path
    # the next merge to the same path finishes, removes the dead merge's folder, and loads
    result = run([str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "out"), "--no-write-model-card", "--out-shard-size", "20K"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert loads_as_model(tmp_path / "out") and not staged(tmp_path, "out")


def test_merge_into_an_existing_folder_replaces_it_config_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second merge into the same folder: the old config and the old merge's other weight
    files (shards, index) are gone before new files arrive; other files stay."""
    from fedmerge_plugins.guards import staging

    final = tmp_path / "out"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_text("old")
    (final / "model-00002-of-00002.safetensors").write_text("old shard")
    (final / "model.safetensors.index.json").write_text("old index")
    (final / "notes.txt").write_text("kept")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "model.safetensors").write_text("new")
    (stage / "config.json").write_text('{"new": 1}')
    order = []
    real_replace = os.replace

    def watch(source, target):
        order.append((Path(target).name, (final / "config.json").exists()))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", watch)
    staging.publish(stage, final)
    monkeypatch.undo()
    assert order == [("model.safetensors", False), ("config.json", False)]
    assert (final / "model.safetensors").read_text() == "new" and (final / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (final / "config.json").read_text() == '{"new": 1}'
