"""The four kernels against float64 computations of the paper's formulas (eqs. 11–14),
and the invariants the README states for them (section "The methods"), through mergekit's
Python API."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import pytest
import torch
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.methods.common import BLOCK
from fedmerge_plugins.methods.fedgma import full_agreement_count
from fedmerge_plugins.methods.fednova import fednova_coefficients
from fedmerge_plugins.methods.median import median_of
from fedmerge_plugins.norms.streaming import state_dict_norms

SHAPE = (7, 5)


def make_inputs(count: int, seed: int = 0, dtype: torch.dtype = torch.float32, shape=SHAPE) -> List[torch.Tensor]:
    """Base first, then ``count`` task models with task vectors of different scales."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    tasks = [base + (0.5 + t) * torch.randn(shape, generator=generator, dtype=torch.float64) for t in range(count)]
    return [x.to(dtype) for x in [base, *tasks]]


def merge(tensors: Sequence[torch.Tensor], method: str, **parameters) -> torch.Tensor:
    return merge_tensors(list(tensors), method, base_index=0, parameters=parameters, name="w")


def task_vectors64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    base = tensors[0].double()
    return torch.stack([t.double() - base for t in tensors[1:]])


# ---- float64 references, written from the paper's equations -------------------------


def ref_fednova(tensors, lam, steps, rates):
    tau = task_vectors64(tensors)
    a = [s * r for s, r in zip(steps, rates)]
    mean_a = sum(a) / len(a)
    return tensors[0].double() + lam * mean_a * sum(tau[t] / a[t] for t in range(len(a)))


def ref_fedgma(tensors, lam, rho):
    tau = task_vectors64(tensors)
    agreement = torch.sign(tau).mean(dim=0).abs()
    mask = torch.where(agreement >= rho, torch.ones_like(agreement), agreement)
    return tensors[0].double() + lam * mask * tau.sum(dim=0)


def ref_median(tensors, lam):
    tau, _ = task_vectors64(tensors).sort(dim=0)
    count = tau.shape[0]
    middle = tau[count // 2] if count % 2 else (tau[count // 2 - 1] + tau[count // 2]) / 2
    return tensors[0].double() + lam * middle


def ref_cclip(tensors, lam, rho):
    tau = task_vectors64(tensors)
    norms = [float(torch.linalg.vector_norm(t)) for t in tau]
    return tensors[0].double() + lam * sum(t * min(1.0, rho / n) for t, n in zip(tau, norms))


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    tolerance = {torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


# ---- values ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fednova_matches_eq11(count: int, dtype: torch.dtype) -> None:
    tensors = make_inputs(count, seed=count, dtype=dtype)
    steps = [100 * (t + 1) for t in range(count)]
    rates = [1e-5 * (10 if t == 0 else 1) for t in range(count)]
    merged = merge(tensors, "fednova", **{"lambda": 0.7}, steps=steps, learning_rate=rates)
    close(merged, ref_fednova(tensors, 0.7, steps, rates), dtype)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_fedgma_matches_eq12(count: int, rho: float) -> None:
    tensors = make_inputs(count, seed=10 + count)
    merged = merge(tensors, "fedgma", **{"lambda": 0.6}, rho=rho)
    close(merged, ref_fedgma(tensors, 0.6, rho))


def test_fedgma_agreement_boundary_is_inclusive() -> None:
    # A = k/T is compared with ρ as the float64 quotient: 3/10 ≥ 0.3 keeps mask 1.
    assert full_agreement_count(0.3, 10) == 3
    assert full_agreement_count(0.1, 2) == 1 and full_agreement_count(1.0, 2) == 2
    assert full_agreement_count(0.0, 4) == 0
    # T = 4, two models up and two down on every coordinate but one: A ∈ {0, 0.5, 1}
    base = torch.zeros(4)
    signs = [[1, 1, 1, 1], [1, -1, 1, 1], [1, -1, -1, 1], [1, 1, -1, -1]]
    tensors = [base] + [torch.tensor(s, dtype=torch.float32) for s in signs]
    merged = merge(tensors, "fedgma", rho=0.5)
    # sums: [4, 0, 0, 2]; agreement [1, 0, 0, 0.5]; ρ = 0.5 keeps the last coordinate whole
    assert merged.tolist() == [4.0, 0.0, 0.0, 2.0]
    assert merge(tensors, "fedgma", rho=0.51).tolist() == [4.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_median_matches_eq13(count: int) -> None:
    tensors = make_inputs(count, seed=20 + count)
    merged = merge(tensors, "median", **{"lambda": 0.9})
    close(merged, ref_median(tensors, 0.9))


@pytest.mark.parametrize("count", range(1, 12))
def test_median_network_selects_the_middle_with_ties(count: int) -> None:
    """The pruned min/max network against a full sort, on small integers (many ties)."""
    generator = torch.Generator().manual_seed(count)
    rows = torch.randint(-3, 4, (count, 5000), generator=generator).to(torch.float64)
    ordered = rows.sort(dim=0).values
    expected = (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
    got = median_of([row.clone() for row in rows], torch.empty(5000, dtype=torch.float64))
    assert torch.equal(got, expected)


def test_median_of_two_is_their_mean() -> None:
    base, a, b = make_inputs(2, seed=3)
    merged = merge([base, a, b], "median")
    expected = base.double() + ((a.double() - base.double()) + (b.double() - base.double())) / 2
    close(merged, expected)


def test_median_is_not_the_lower_median() -> None:
    base = torch.zeros(3)
    tensors = [base, torch.tensor([1.0, 4.0, -2.0]), torch.tensor([3.0, 0.0, 2.0])]
    assert merge(tensors, "median").tolist() == [2.0, 2.0, 0.0]
    four = tensors + [torch.tensor([10.0, 10.0, 10.0]), torch.tensor([-10.0, -10.0, -10.0])]
    assert merge(four, "median").tolist() == [2.0, 2.0, 0.0]


@pytest.mark.parametrize("count", [3, 4])
def test_median_beyond_quantile_limit(count: int) -> None:
    """More than 2^24 elements (torch.quantile refuses these), across chunk boundaries."""
    size = 2**24 + BLOCK // 2
    generator = torch.Generator().manual_seed(count)
    tensors = [torch.randn(size, generator=generator) for _ in range(count + 1)]
    merged = merge(tensors, "median")
    # exact check on a strided sample, including both sides of the chunk boundary
    picks = torch.cat([torch.arange(0, size, 9973), torch.arange(BLOCK - 5, BLOCK + 5), torch.arange(size - 5, size)])
    small = [t[picks] for t in tensors]
    close(merged[picks], ref_median(small, 1.0))


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("rho", [0.5, 3.0, 100.0])
def test_cclip_matches_eq14(count: int, rho: float) -> None:
    tensors = make_inputs(count, seed=30 + count)
    norms = state_dict_norms({"w": tensors[0]}, {i: {"w": t} for i, t in enumerate(tensors[1:])})
    merged = merge(tensors, "cclip", **{"lambda": 0.8}, rho=rho, norm=[norms[i] for i in range(count)])
    close(merged, ref_cclip(tensors, 0.8, rho))


def test_cclip_uses_the_global_norm_not_the_tensor_norm() -> None:
    """Two tensors of one model: the clip factor comes from both together."""
    base = {"a": torch.zeros(4), "b": torch.zeros(3)}
    big = {"a": torch.full((4,), 3.0), "b": torch.full((3,), 4.0)}  # ‖τ‖ = sqrt(36+48)
    small = {"a": torch.full((4,), 0.5), "b": torch.zeros(3)}  # ‖τ‖ = 1
    norms = state_dict_norms(base, {"big": big, "small": small})
    assert norms["big"] == pytest.approx(math.sqrt(84)) and norms["small"] == pytest.approx(1.0)
    merged = merge_state_dicts(
        {"base": base, "big": big, "small": small}, "cclip", base="base",
        parameters={"rho": 2.0, "norm": norms},
    )
    factor = 2.0 / math.sqrt(84)
    torch.testing.assert_close(merged["a"], torch.full((4,), 3.0 * factor + 0.5))
    torch.testing.assert_close(merged["b"], torch.full((3,), 4.0 * factor))


def test_cclip_zero_task_vector_is_not_divided_by() -> None:
    base, task = make_inputs(1, seed=5)
    merged = merge([base, base.clone(), task], "cclip", rho=0.1, norm=[0.0, 4.0])
    expected = base.double() + (task.double() - base.double()) * (0.1 / 4.0)
    close(merged, expected)


# ---- past the block size: every method, bf16 and fp32 inputs ------------------------------

LONG = 2 * BLOCK + 4099  # three blocks on the CPU, the last one partial


def long_case(method: str, count: int, dtype: torch.dtype):
    """(merged, float64 formula) for ``count`` task models of ``LONG`` elements."""
    tensors = make_inputs(count, seed=140 + count, dtype=dtype, shape=(LONG,))
    if method == "fednova":
        steps, rates = [100 * (t + 1) for t in range(count)], [1e-5 * (10 if t == 0 else 1) for t in range(count)]
        return merge(tensors, method, **{"lambda": 0.7}, steps=steps, learning_rate=rates), ref_fednova(tensors, 0.7, steps, rates)
    if method == "fedgma":
        return merge(tensors, method, **{"lambda": 0.7}, rho=0.6), ref_fedgma(tensors, 0.7, 0.6)
    if method == "median":
        return merge(tensors, method, **{"lambda": 0.7}), ref_median(tensors, 0.7)
    norms = [float(torch.linalg.vector_norm(tau)) for tau in task_vectors64(tensors)]
    rho = sorted(norms)[count // 2]  # clips the larger task vectors only
    return merge(tensors, method, **{"lambda": 0.7}, rho=rho, norm=norms), ref_cclip(tensors, 0.7, rho)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("method", ["fednova", "fedgma", "median", "cclip"])
def test_kernels_match_the_formula_past_the_block_size(method: str, count: int, dtype: torch.dtype) -> None:
    """The merged tensor, cast to the input dtype, against the float64 formula cast the same
    way: within one rounding of that dtype (bf16: 2^-7 relative; the kernel computes in
    float32 and rounds once, the reference rounds once from float64) plus float32's own
    error on these magnitudes (|result| < 25: 1e-5)."""
    assert LONG > BLOCK and LONG % BLOCK
    merged, expected = long_case(method, count, dtype)
    assert merged.dtype == dtype and merged.shape == (LONG,)
    rtol = {torch.bfloat16: 2**-7, torch.float32: 2e-6}[dtype]
    torch.testing.assert_close(merged.double(), expected.to(dtype).double(), rtol=rtol, atol=1e-5)


# ---- dtype and device handling -----------------------------------------------------------


@pytest.mark.parametrize(
    "method,parameters",
    [
        ("fednova", {"steps": [10, 30, 20], "learning_rate": [1.0, 0.1, 2.0], "lambda": 0.4}),
        ("fedgma", {"rho": 0.4, "lambda": 0.9}),
        ("median", {"lambda": 0.5}),
        ("cclip", {"rho": 1.0, "norm": [0.5, 2.0, 8.0], "lambda": 0.7}),
    ],
)
def test_low_precision_inputs_are_computed_in_float32(method: str, parameters: Dict) -> None:
    tensors16 = make_inputs(3, seed=40, dtype=torch.bfloat16)
    merged = merge(tensors16, method, **parameters)
    assert merged.dtype == torch.bfloat16
    upcast = merge([t.float() for t in tensors16], method, **parameters)
    assert torch.equal(merged, upcast.to(torch.bfloat16))


# ---- invariants ---------------------------------------------------------------------------


def task_arithmetic(tensors: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    return merge(tensors, "task_arithmetic", **{"lambda": lam}, weight=1.0)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_fednova_with_equal_training_is_task_arithmetic(count: int) -> None:
    tensors = make_inputs(count, seed=50 + count)
    merged = merge(tensors, "fednova", **{"lambda": 0.3}, steps=1000, learning_rate=2e-5)
    assert fednova_coefficients([0.02] * count) == [1.0] * count
    assert torch.equal(merged, task_arithmetic(tensors, 0.3))


def test_fednova_depends_only_on_ratios() -> None:
    tensors = make_inputs(3, seed=60)
    one = merge(tensors, "fednova", steps=[100, 200, 300], learning_rate=[1e-4, 1e-5, 1e-5])
    scaled = merge(tensors, "fednova", steps=[1000, 2000, 3000], learning_rate=[1e-5, 1e-6, 1e-6])
    assert torch.equal(one, scaled)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_fedgma_rho_zero_is_task_arithmetic(count: int) -> None:
    tensors = make_inputs(count, seed=70 + count)
    assert torch.equal(merge(tensors, "fedgma", rho=0.0, **{"lambda": 0.45}), task_arithmetic(tensors, 0.45))


def test_fedgma_two_models_one_mask_for_every_positive_rho() -> None:
    tensors = make_inputs(2, seed=80)
    masks = {tuple(merge(tensors, "fedgma", rho=rho).flatten().tolist()) for rho in (0.05, 0.3, 0.7, 1.0)}
    assert len(masks) == 1


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_cclip_large_rho_is_task_arithmetic(count: int) -> None:
    tensors = make_inputs(count, seed=90 + count)
    norms = [float(torch.linalg.vector_norm(t.double() - tensors[0].double())) for t in tensors[1:]]
    merged = merge(tensors, "cclip", rho=max(norms), norm=norms, **{"lambda": 0.65})
    assert torch.equal(merged, task_arithmetic(tensors, 0.65))


@pytest.mark.parametrize("method,parameters", [("median", {}), ("fedgma", {"rho": 0.6})])
def test_model_order_does_not_matter(method: str, parameters: Dict) -> None:
    tensors = make_inputs(5, seed=100)
    forward = merge(tensors, method, **parameters)
    backward = merge([tensors[0], *reversed(tensors[1:])], method, **parameters)
    if method == "median":
        assert torch.equal(forward, backward)  # min/max network: exact
    else:
        torch.testing.assert_close(forward, backward, rtol=1e-6, atol=1e-6)  # sum order rounding


@pytest.mark.parametrize(
    "method,parameters", [("fednova", {"steps": 7}), ("fedgma", {"rho": 0.9}), ("median", {}), ("cclip", {"rho": 1e9, "norm": 1.0})]
)
def test_single_task_model_is_task_arithmetic(method: str, parameters: Dict) -> None:
    tensors = make_inputs(1, seed=110)
    assert torch.equal(merge(tensors, method, **parameters, **{"lambda": 0.5}), task_arithmetic(tensors, 0.5))


def test_kernels_do_not_modify_their_inputs() -> None:
    tensors = make_inputs(3, seed=120)
    copies = [t.clone() for t in tensors]
    for method, parameters in [("fednova", {"steps": 3}), ("fedgma", {"rho": 0.2}), ("median", {}), ("cclip", {"rho": 1.0, "norm": 2.0})]:
        merge(tensors, method, **parameters)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,parameters,needle",
    [
        ("fedgma", {"rho": 1.5}, "`rho` must be in [0, 1]"),
        ("fedgma", {"rho": -0.1}, "`rho` must be in [0, 1]"),
        ("cclip", {"rho": 0.0, "norm": 1.0}, "`rho` must be > 0"),
        ("fednova", {"steps": 0}, "`steps` must be an integer > 0"),
        ("fednova", {"steps": 5, "learning_rate": -1e-5}, "`learning_rate` must be > 0"),
        ("median", {"lambda": float("nan")}, "`lambda` must be a finite number"),
        ("median", {"rh0": 0.5}, "Unknown parameter(s) for median: rh0"),
    ],
)
def test_bad_parameters_are_named(method: str, parameters: Dict, needle: str) -> None:
    with pytest.raises(Exception) as caught:
        merge(make_inputs(2), method, **parameters)
    assert needle in str(caught.value)


@pytest.mark.parametrize("method", ["fednova", "fedgma", "median", "cclip"])
def test_base_model_is_required(method: str) -> None:
    with pytest.raises(ValueError, match="requires a base input"):
        merge_tensors(make_inputs(2), method, parameters={"steps": 1, "rho": 0.5, "norm": 1.0})


@pytest.mark.parametrize("method,parameters", [("fednova", {"steps": 1}), ("fedgma", {"rho": 0.5}), ("median", {}), ("cclip", {"rho": 1.0, "norm": 1.0})])
def test_non_finite_task_vector_names_model_and_tensor(method: str, parameters: Dict) -> None:
    base, a, b = make_inputs(2, seed=130)
    b = b.clone()
    b[1, 2] = float("nan")
    with pytest.raises(FedmergeError, match=r"model wizardmath has NaN or inf values in tensor w"):
        merge_tensors([base, a, b], method, base_index=0, ids=["llama", "wizardlm", "wizardmath"], parameters=parameters, name="w")


def test_shape_mismatch_names_tensor() -> None:
    base, a = make_inputs(1)
    with pytest.raises(ValueError, match="Tensor size mismatch for w"):
        merge([base, a, torch.zeros(3, 3)], "median")


def test_cclip_without_norm_outside_a_recipe_asks_for_it() -> None:
    with pytest.raises(FedmergeError, match=r"no task-vector norm for model 'math'.*`norm`"):
        merge_tensors(make_inputs(1), "cclip", base_index=0, ids=["base", "math"], parameters={"rho": 1.0})
