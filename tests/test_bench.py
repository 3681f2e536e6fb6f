"""bench/: the floor merge's values, the report's ratios, and a smoke run at the tiny size.

No timing is asserted: the benchmark measures, the tests only check that what it reports
is computed from its samples and that the runs it times did the work they claim.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from tests.support.synthetic import make_family

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


floor = load_script("floor")
bench = load_script("bench")  # puts bench/ on sys.path: its modules import each other by name
import bench_inputs  # noqa: E402
import bench_measure  # noqa: E402
import bench_report  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floor_is_task_arithmetic_in_float64(tmp_path: Path, dtype: torch.dtype) -> None:
    family = make_family(tmp_path / "family", scales=[0.01, 0.03, 0.1], dtype=dtype, shards=2)
    lam = 0.7
    target = floor.floor_merge(tmp_path / "out", family.base, family.tasks, lam)
    merged = load_file(str(target))
    assert set(merged) == set(family.base_tensors)
    for name, base in family.base_tensors.items():
        tau = sum(t[name].double() - base.double() for t in family.task_tensors)
        expected = (base.double() + lam * tau).to(dtype)
        assert merged[name].dtype == dtype
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=float(expected.abs().max()) * 2**-7)
    assert (tmp_path / "out" / "config.json").exists()


def test_floor_names_the_model_missing_a_tensor(tmp_path: Path) -> None:
    family = make_family(tmp_path / "family", scales=[0.01], extra_tokens=[1])
    with pytest.raises(ValueError, match=r"task0: no tensor (lm_head|model.embed_tokens).weight of shape \(96, 32\)"):
        floor.floor_merge(tmp_path / "out", family.base, family.tasks, 1.0)
    assert not (tmp_path / "out").exists()


def test_summary_ratios_are_medians_over_medians() -> None:
    inputs = bench_inputs.Inputs("tiny", Path("."), Path("b"), [Path(f"t{i}") for i in range(4)], 10**6)
    chosen = [v for v in bench_inputs.variants(inputs) if v.name in {"task_arithmetic", "median", "floor"}]
    sample = lambda wall, cpu, rss: bench_measure.Sample(wall, cpu, rss, 0.0)  # noqa: E731
    samples = {
        "task_arithmetic": [sample(10, 8, 100), sample(12, 9, 110), sample(30, 20, 90)],
        "median": [sample(13, 10, 105), sample(11, 12, 120), sample(14, 11, 100)],
        "floor": [sample(4, 2, 50), sample(5, 3, 50), sample(6, 4, 50)],
    }
    rows = bench_report.summarize(chosen, samples)
    assert rows["median"]["wall_s"] == 13 and rows["task_arithmetic"]["wall_s"] == 12
    assert rows["median"]["wall_s_vs_task_arithmetic"] == pytest.approx(13 / 12)
    assert rows["median"]["cpu_s_vs_task_arithmetic"] == pytest.approx(11 / 9)
    assert rows["median"]["peak_rss_mib_vs_task_arithmetic"] == pytest.approx(105 / 100)
    assert rows["median"]["wall_s_vs_floor"] == pytest.approx(13 / 5)
    assert "wall_s_vs_task_arithmetic" not in rows["floor"]
    lines = bench_report.verdicts(rows, {})
    assert lines == ["- median: wall 1.083× (target ≤ 1.3×), peak memory 1.050× (target ≤ 1.1×): met"]
    rows["median"]["peak_rss_mib_vs_task_arithmetic"] = 1.2
    assert bench_report.verdicts(rows, {})[0].endswith("**missed**")


def test_ratios_net_of_start_up_and_memory_split() -> None:
    inputs = bench_inputs.Inputs("tiny", Path("."), Path("b"), [Path(f"t{i}") for i in range(4)], 10**6)
    chosen = [v for v in bench_inputs.variants(inputs) if v.name in {"startup", "task_arithmetic", "cclip_cold", "floor", "sweep_lambda20"}]
    sample = lambda wall, anon, file: bench_measure.Sample(wall, 1.0, anon + file, 0.0, anon, file, 5, anon + file)  # noqa: E731
    samples = {
        "startup": [sample(9, 300, 100), sample(8, 300, 100), sample(10, 300, 100)],
        "task_arithmetic": [sample(12, 400, 1000), sample(11, 420, 900), sample(13, 410, 1100)],
        "cclip_cold": [sample(15, 440, 2000), sample(14, 430, 2100), sample(16, 450, 1900)],
        "floor": [sample(5, 100, 1000)] * 3,
        "sweep_lambda20": [sample(27, 2500, 1000)] * 3,
    }
    rows = bench_report.summarize(chosen, samples)
    assert rows["cclip_cold"]["wall_net_s"] == 15 - 9
    assert rows["cclip_cold"]["wall_net_vs_task_arithmetic"] == pytest.approx((15 - 9) / (12 - 9))
    assert rows["cclip_cold"]["peak_anon_mib_vs_task_arithmetic"] == pytest.approx(440 / 410)
    assert rows["cclip_cold"]["peak_file_mib_vs_task_arithmetic"] == pytest.approx(2000 / 1000)
    assert rows["sweep_lambda20"]["wall_s_vs_task_arithmetic"] == pytest.approx(27 / 12)
    assert rows["sweep_lambda20"]["wall_net_vs_task_arithmetic"] == pytest.approx((27 - 9) / (12 - 9))
    assert "wall_net_s" not in rows["floor"] and "wall_net_s" not in rows["startup"]
    lines = bench_report.verdicts(rows, {})  # peak memory: ru_maxrss medians, 2440 / 1400 and 3500 / 1400
    assert "- cclip_cold: wall 1.250× (target ≤ 1.8×; net of start-up 2.000×), peak memory 1.743× (target ≤ 1.1×): **missed**" in lines
    # issue 30 lowered the sweep's target from 3× to 1.5× (its points are merged into a loaded model now)
    assert "- sweep_lambda20: wall 2.250× (target ≤ 1.5×; net of start-up 6.000×), peak memory 2.500× (no target): **missed**" in lines


def test_lm_eval_sweep_compares_with_one_point_by_hand_and_reports_the_split() -> None:
    inputs = bench_inputs.Inputs("tiny", Path("."), Path("b"), [Path(f"t{i}") for i in range(4)], 10**6)
    chosen = [v for v in bench_inputs.variants(inputs) if v.name in {"startup", "task_arithmetic", "by_hand_lmeval", "sweep_cclip_lmeval20"}]
    sample = lambda wall: bench_measure.Sample(wall, 1.0, 100.0, 0.0)  # noqa: E731
    split = lambda merge: {**vars(sample(30.0)), "point_split_s": {"merge": merge, "copy": 0.1, "evaluate": 0.5}}  # noqa: E731
    samples = {"startup": [sample(5.0)] * 3, "task_arithmetic": [sample(8.0)] * 3, "by_hand_lmeval": [sample(20.0)] * 3,
               "sweep_cclip_lmeval20": [sample(30.0)] * 3}
    rows = bench_report.summarize(chosen, samples)
    assert rows["sweep_cclip_lmeval20"]["wall_s_vs_task_arithmetic"] == pytest.approx(30 / 20)  # to the point by hand
    assert "- sweep_cclip_lmeval20: wall 1.500× (target ≤ 2.0×; net of start-up 1.667×), peak memory 1.000× (no target): met" in bench_report.verdicts(rows, {})
    lines = bench_report.point_splits({"sweep_cclip_lmeval20": [split(0.2), split(0.4), split(0.3)]})
    assert "- sweep_cclip_lmeval20, per point (median): merge 0.300 s, copy 0.100 s, evaluate 0.500 s" in lines


def test_memory_split_of_a_child(tmp_path: Path) -> None:
    """A child that allocates 96 MiB and maps 64 MiB of a file: the sampler sees both."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"\1" * (64 << 20))
    child = (
        "import mmap, sys, time\n"
        "block = bytearray(96 << 20); block[::4096] = b'x' * (len(block) // 4096)  # every page touched\n"
        "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "print('mapped', flush=True); time.sleep(1.0)\n"
    )
    sample = bench_measure.run_child([sys.executable, "-c", child, str(data)], dict(os.environ), tmp_path / "log", interval=0.02)
    assert "mapped" in (tmp_path / "log").read_text()
    assert sample.memory_samples > 3
    assert 96 <= sample.peak_anon_mib < 96 + 64  # the bytearray, plus the interpreter's own
    assert 64 <= sample.peak_file_mib < 64 + 64  # the mapped pages, plus the interpreter's libraries
    assert sample.peak_sampled_rss_mib >= 96 + 64 and sample.peak_rss_mib >= sample.peak_sampled_rss_mib - 1
    fields = bench_measure.proc_kib("VmRSS:\t    1000 kB\nRssAnon:\t     250 kB\nName:\tpython\nThreads:\t2\n")
    assert fields == {"VmRSS": 1000, "RssAnon": 250}


def test_warm_norm_cache_that_is_rewritten_is_an_error(tmp_path: Path) -> None:
    warm = next(v for v in bench_inputs.variants(bench_inputs.Inputs("tiny", tmp_path, tmp_path, [tmp_path] * 4, 10)) if v.name == "cclip_warm")
    (tmp_path / "norms.json").write_text(json.dumps({"a": 1, "b": 2, "c": 3}))
    before = bench_measure.norm_file_state(tmp_path)
    bench_measure.check_norm_cache(warm, tmp_path, before)  # untouched: fine
    (tmp_path / "norms.json").write_text(json.dumps({"a": 1, "b": 2, "c": 4}))
    os.utime(tmp_path / "norms.json", ns=(before + 10**9, before + 10**9))
    with pytest.raises(RuntimeError, match="recomputed"):
        bench_measure.check_norm_cache(warm, tmp_path, before)


@pytest.mark.slow
def test_bench_smoke_at_tiny_size(tmp_path: Path) -> None:
    variants = "startup,task_arithmetic,median,cclip_cold,cclip_warm,floor,sweep_lambda20"
    command = [
        sys.executable, str(REPO / "bench" / "bench.py"), "--size", "tiny", "--repeat", "1", "--warmup", "0",
        "--variants", variants, "--startup-runs", "2", "--plugin-runs", "1",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    runs = json.loads((tmp_path / "results" / "results.json").read_text())["runs"]
    assert list(runs) == ["tiny"]
    report = runs["tiny"]
    assert list(report["rows"]) == variants.split(",")
    startup, ta = report["rows"]["startup"]["wall_s"], report["rows"]["task_arithmetic"]["wall_s"]
    for name in ("median", "cclip_cold", "cclip_warm", "sweep_lambda20"):
        row = report["rows"][name]
        assert len(report["samples"][name]) == 1
        assert row["wall_s_vs_task_arithmetic"] == pytest.approx(row["wall_s"] / ta)
        assert row["wall_s_vs_floor"] == pytest.approx(row["wall_s"] / report["rows"]["floor"]["wall_s"])
        assert row["wall_net_s"] == pytest.approx(row["wall_s"] - startup)
        if ta > startup:
            assert row["wall_net_vs_task_arithmetic"] == pytest.approx((row["wall_s"] - startup) / (ta - startup))
    for name, row in report["rows"].items():
        assert row["peak_anon_mib"] > 0 and row["peak_file_mib"] > 0, name  # sampled from /proc/<pid>/status
        assert row["peak_anon_mib"] <= row["peak_rss_mib"] + 1, name
    assert report["recipes"]["median"]["merge_method"] == "median"
    assert report["startup"]["startup"]["autoload_importtime_us"] > 0
    assert set(report["startup"]["plugin"]["with"]) >= {"register", "install_planner_check", "install_run_merge_check"}
    text = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "| cclip_warm | 3 |" in text and "| sweep_lambda20 | 3 |" in text and "autoload at start-up" in text
    ratio = report["rows"]["cclip_cold"]["wall_s_vs_task_arithmetic"]
    assert f"| tiny | {report['rows']['startup']['wall_s']:.2f} |" in text and f"{ratio:.2f}×" in text  # the summary line
    assert "bench/bench.py --size tiny" in report["command"]


def test_results_keep_one_run_per_preset_and_cache_setting(tmp_path: Path) -> None:
    """A run replaces the run of its label only; a results.json of one run (the format before
    runs were kept side by side) becomes that run; the notes below the marker survive."""
    inputs = bench_inputs.Inputs("tiny", Path("."), Path("b"), [Path(f"t{i}") for i in range(4)], 10**6)
    chosen = [v for v in bench_inputs.variants(inputs) if v.name in {"startup", "task_arithmetic", "cclip_cold"}]

    def report(size: str, drop: bool, wall: float) -> dict:
        samples = {
            "startup": [bench_measure.Sample(2.0, 1.0, 100, 0.5)],
            "task_arithmetic": [bench_measure.Sample(4.0, 1.0, 100, 0.5)],
            "cclip_cold": [bench_measure.Sample(wall, 1.0, 100, 0.5)],
        }
        return {
            "command": f"bench.py --size {size}", "date": "today", "machine": {
                "cpu": "cpu", "cores": 2, "torch_threads": 2, "ram_gib": 1, "os": "os", "python": "3", "torch": "t",
                "mergekit": "m", "safetensors": "s", "fedmerge": "f"},
            "inputs": {"size": size, "config": {}, "parameters": 10, "clip_rho": 1.0}, "repeat": 1, "warmup": 0,
            "drop_caches": drop, "load": {"median": 0.5, "min": 0.5, "max": 0.5},
            "rows": bench_report.summarize(chosen, samples), "startup": {},
        }  # fmt: skip

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(report("1b", False, 6.0)))  # the old, single-run format
    (out / "RESULTS.md").write_text("old\n" + bench_inputs.MARKER + "\n## Notes\nkept\n")
    bench_report.write_report(out, report("270m", False, 5.0))
    bench_report.write_report(out, report("1b", True, 8.0))
    bench_report.write_report(out, report("270m", False, 7.0))  # replaces the first 270m run
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert list(runs) == ["270m", "1b", "1b, page cache dropped before every run"]
    assert [r["rows"]["cclip_cold"]["wall_s"] for r in runs.values()] == [7.0, 6.0, 8.0]
    text = (out / "RESULTS.md").read_text()
    assert text.count("## 270m\n") == 1 and "## 1b\n" in text and "## 1b, page cache dropped before every run\n" in text
    assert "| 270m | 2.00 | 4.00 | – | – | – | – | 1.75× (2.50×) | – | – |" in text
    assert "| 1b, page cache dropped before every run | 2.00 | 4.00 | – | – | – | – | 2.00× (3.00×) | – | – |" in text
    assert text.endswith(bench_inputs.MARKER + "\n## Notes\nkept\n") and not text.startswith("old")
