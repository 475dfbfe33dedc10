"""Decision semantics on scripted ratio sequences, against traces computed by hand.

Runs through every backend this machine has: the dispatcher (C++ on CPU when built),
the eager reference, and the Triton launcher under the interpreter.
"""

import math

import pytest
import torch
from expected_backends import triton_decision_backend

from fastcache import ops
from fastcache.ops import reference as R


def _backends():
    # The Triton launcher is skipped (visibly, with the reason) only when triton itself
    # is not importable; a broken fastcache.kernels fails the collection.
    return [("dispatch", ops.cache_decision), ("reference", R.cache_decision), triton_decision_backend()]


BACKENDS = _backends()


def _sums(ratio):
    """(num, den) fp32 sums whose ratio is exactly `ratio` (den = 1), or special cases."""
    if ratio == "den0":
        return torch.tensor([[1.0, 0.0]])
    return torch.tensor([[float(ratio), 1.0]])


def run(fn, ratios, threshold, coeffs=(), warmup=1, max_skips=0, num_steps=0, timesteps=None, history=64):
    state = ops.new_state(history)
    cs = torch.tensor(coeffs, dtype=torch.float32)
    flags, accs = [], []
    for i, r in enumerate(ratios):
        t = torch.tensor([1000.0 - i if timesteps is None else timesteps[i]])
        flags.append(bool(fn(_sums(r), t, cs, state, threshold, warmup, max_skips, num_steps)))
        accs.append(float(state[R.ACC]))
    return flags, accs, state


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_accumulate_threshold_reset(name, fn):
    # step 0 forced; then acc: 0.1, 0.2 (skip, skip), 0.3 >= 0.25 -> compute, reset; 0.1 skip; 0.3 compute
    flags, accs, st = run(fn, [9.0, 0.1, 0.1, 0.1, 0.1, 0.2], threshold=0.25)
    assert flags == [True, False, False, True, False, True]
    assert accs == pytest.approx([0.0, 0.1, 0.2, 0.0, 0.1, 0.0], abs=1e-7)
    assert st[R.N_COMPUTED] == 3 and st[R.N_SKIPPED] == 3 and st[R.STEP] == 6
    H = R.history_len(st)
    assert st[R.STATE_HEADER + H + 3].item() == pytest.approx(0.3, abs=1e-6)  # acc before the reset
    assert st[R.STATE_HEADER + 2 * H : R.STATE_HEADER + 2 * H + 6].tolist() == [1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_polynomial_rescale(name, fn):
    # poly(x) = 2x^2 + 0x + 0.05: ratio 0.1 -> 0.07, 0.2 -> 0.13; acc 0.07, 0.20 (skip), 0.33 -> compute
    flags, accs, st = run(fn, [1.0, 0.1, 0.2, 0.2], threshold=0.3, coeffs=(2.0, 0.0, 0.05))
    assert flags == [True, False, False, True]
    assert st[R.RESCALED].item() == pytest.approx(0.13, abs=1e-6)
    assert accs[2] == pytest.approx(0.20, abs=1e-6)


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_forced_first_last_warmup_and_max_skips(name, fn):
    flags, _, _ = run(fn, [0.0] * 8, threshold=1.0, warmup=2, max_skips=2, num_steps=8)
    # warmup 0,1; skips 2,3; max_skips forces 4; skips 5,6; last step (7) forced
    assert flags == [True, True, False, False, True, False, False, True]


@pytest.mark.parametrize("name, fn", BACKENDS)
@pytest.mark.parametrize("bad", ["den0", math.nan, math.inf])
def test_undefined_ratio_forces_compute(name, fn, bad):
    flags, accs, st = run(fn, [1.0, 0.01, bad, 0.01], threshold=0.5)
    assert flags == [True, False, True, False]
    assert accs[2] == 0.0
    if bad == "den0":
        assert math.isnan(st[R.STATE_HEADER + 2].item())


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_threshold_zero_always_computes(name, fn):
    flags, _, _ = run(fn, [0.0, 0.0, -5.0, 0.0], threshold=0.0, coeffs=(1.0, -1.0))
    assert flags == [True] * 4


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_rising_timestep_starts_a_new_run(name, fn):
    ts = [999, 500, 1, 999, 500]
    flags, _, st = run(fn, [1.0, 0.01, 0.01, 0.01, 0.01], threshold=0.5, timesteps=ts)
    assert flags == [True, False, False, True, False]  # the rise at index 3 forces step 0 of run 2
    assert st[R.N_RUNS] == 2 and st[R.STEP] == 2 and st[R.N_COMPUTED] == 1 and st[R.N_SKIPPED] == 1


@pytest.mark.parametrize("name, fn", BACKENDS)
def test_batch_sums_are_summed_in_order(name, fn):
    state = ops.new_state(8)
    cs = torch.tensor([], dtype=torch.float32)
    fn(torch.tensor([[1.0, 1.0]]), torch.tensor([10.0]), cs, state, 0.5, 1, 0, 0)
    # per-sample ratios 0.1 and 0.5 but pooled (0.1 + 0.5) / (1 + 1) = 0.3
    fn(torch.tensor([[0.1, 1.0], [0.5, 1.0]]), torch.tensor([9.0]), cs, state, 0.5, 1, 0, 0)
    assert state[R.RATIO].item() == pytest.approx(0.3, abs=1e-7)


def test_per_sample_and_pooled_ratio():
    sums = torch.tensor([[1.0, 4.0], [3.0, 4.0]])
    assert ops.rel_l1_ratio(sums).item() == pytest.approx(0.5)
    assert ops.rel_l1_ratio(sums, per_sample=True).tolist() == [0.25, 0.75]


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.modulated_rel_l1_sums(
                torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
            ),
            r"x must be \(B, N, D\)",
        ),
        (
            lambda: ops.modulated_rel_l1_sums(
                torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.zeros(2, 4), torch.zeros(2, 3, 4)
            ),
            "shift must have shape",
        ),
        (
            lambda: ops.modulated_rel_l1_sums(
                torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3, 5)
            ),
            "prev must match",
        ),
        (
            lambda: ops.modulated_rel_l1_sums(
                torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3, 4)
            ),
            "x must be a floating",
        ),
        (
            lambda: ops.cache_decision(torch.zeros(2, 3), torch.zeros(1), torch.zeros(0), ops.new_state(4), 0.1),
            "sums must be",
        ),
        (
            lambda: ops.cache_decision(torch.zeros(1, 2), torch.zeros(1), torch.zeros(9), ops.new_state(4), 0.1),
            "at most 8",
        ),
        (
            lambda: ops.cache_decision(torch.zeros(1, 2), torch.zeros(1), torch.zeros(0), torch.zeros(5), 0.1),
            "new_state",
        ),
        (
            lambda: ops.gated_residual(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.zeros(7)),
            "trend must be",
        ),
        # checked inside the op (C++: RuntimeError; reference and Triton: ValueError)
        (lambda: ops.apply_residual(torch.zeros(2, 3), torch.zeros(2, 4)), "cached residual"),
        (lambda: ops.apply_residual(torch.zeros(2, 3), torch.zeros(2, 3), out=torch.zeros(2, 3, 1)), "out must"),
        (
            lambda: ops.store_residual(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(True), torch.zeros(3)),
            "one shape",
        ),
    ],
)
def test_wrapper_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_dispatch_backend_registered():
    info = ops.BACKEND.as_dict()
    assert info["cpu"] in ("cpp", "eager", "triton")
    if info["cpu"] == "eager":
        assert info["cpp_error"], "a fallback to the reference must say why"
