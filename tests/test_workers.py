"""Units of work on a local Ray of 2 workers (bound to 127.0.0.1) give exactly the serial results;
a worker that dies has its unit run again; tensors are shared through Ray's object store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedmerge_plugins.workers import WorkerSettings, WorkersError, pack, run_units, unpack

ray = pytest.importorskip("ray")


def weighted_sum(shared, unit):
    """θ_0 + λ Σ τ_t in float32, a stand-in for merging a grid point."""
    lam, _ = unit
    base = shared["base"].float()
    total = sum(model.float() - base for model in shared["models"])
    return (base + lam * total).to(shared["base"].dtype)


def die_once(shared, unit):
    lam, marker = unit
    marker = Path(marker)
    attempts = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(attempts + 1))
    if lam == 0.5 and attempts == 0:
        os._exit(1)  # the worker process dies, as under SIGKILL or the OOM killer
    return weighted_sum(shared, unit)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def inputs():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=generator).bfloat16()
    models = [(base.float() + 0.1 * torch.randn(64, 33, generator=generator)).bfloat16() for _ in range(3)]
    return {"base": base, "models": models}


def test_pack_round_trip_shares_memory():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64):
        tensor = (torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7).to(dtype)
        back = unpack(pack({"a": [tensor]}))["a"][0]
        assert back.dtype == dtype and torch.equal(back, tensor)
        assert back.data_ptr() == tensor.data_ptr()  # views all the way, no copy


def test_ray_matches_serial_bit_for_bit(local_ray, tmp_path):
    shared = inputs()
    units = [(lam, str(tmp_path / f"{lam}")) for lam in (0.25, 0.5, 1.0, 1.5, 2.0)]
    serial, distributed = {}, {}
    run_units(weighted_sum, shared, units, WorkerSettings(), lambda unit, result: serial.setdefault(unit, result))
    run_units(weighted_sum, shared, units, WorkerSettings(workers=2, gpus_per_worker=0),
              lambda unit, result: distributed.setdefault(unit, result))
    assert set(serial) == set(distributed) == set(units)
    for unit in units:
        assert torch.equal(serial[unit].view(torch.int16), distributed[unit].view(torch.int16))
    assert ray.is_initialized()  # a session the caller started is left running


def test_dead_worker_unit_runs_again(local_ray, tmp_path):
    shared = inputs()
    units = [(lam, str(tmp_path / f"marker-{lam}")) for lam in (0.25, 0.5, 1.0)]
    results = []
    run_units(die_once, shared, units, WorkerSettings(workers=2, gpus_per_worker=0),
              lambda unit, result: results.append(unit))
    assert sorted(results) == sorted(units)  # every unit reported once
    assert (tmp_path / "marker-0.5").read_text() == "2"  # the killed unit ran again
    assert (tmp_path / "marker-0.25").read_text() == "1"


def test_settings_checks(monkeypatch):
    with pytest.raises(WorkersError, match="--workers must be >= 0"):
        WorkerSettings(workers=-1).check()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(WorkersError, match=r"pip install 'fedmerge\[ray\]'"):
        WorkerSettings(workers=2).check()
    WorkerSettings().check()  # serial needs no Ray
    assert WorkerSettings(workers=2, gpus_per_worker=0).describe() == "on a local Ray of 2 workers (0 GPU per worker)"
