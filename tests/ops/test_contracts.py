"""One argument contract per op, held by every backend.

Each op's contract is written once in Python (fastcache/ops/contracts.py), called by the
eager reference and the Triton launchers; the C++ kernels keep their named checks
(csrc/checks.h). Here the three backends (the reference, the C++ kernels of
``fastcache._C`` and the Triton launchers under ``TRITON_INTERPRET=1``, each called
directly with the dispatcher schema's arguments) get the same bad inputs: every one
must be refused, with a message that names the op (``fastcache::<op>``), the argument,
and the expected / actual values the case lists. A valid call per op and backend runs
first, so a case fails only for the one argument it breaks.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from expected_backends import cpp_expectation

import fastcache.ops as ops
from fastcache.ops import contracts, layout
from fastcache.ops import reference as R

B, N, D = 2, 4, 8


# ----------------------------------------------------------------------------- backends
def _cpp_param():
    action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
    if action == "skip":
        return pytest.param("cpp", marks=pytest.mark.skip(reason=why), id="cpp")
    return pytest.param("cpp", id="cpp")  # a broken build fails in _impl()


def _triton_param():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return pytest.param("triton", marks=pytest.mark.skip(reason=f"triton is not importable: {e}"), id="triton")
    return pytest.param("triton", id="triton")


BACKENDS = [pytest.param("eager", id="eager"), _cpp_param(), _triton_param()]
_LIST_OPS = ("forecast_residual", "taylor_update_slots")


def _impl(backend: str, op: str):
    if backend == "cpp":
        action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
        if action == "fail":
            pytest.fail(why, pytrace=False)
        from fastcache import _C

        # the list-taking ops have no pybind entry: the dispatcher runs their C++ kernel on CPU
        return getattr(_C, op) if op not in _LIST_OPS else getattr(torch.ops.fastcache, op).default
    if backend == "triton":
        from fastcache.kernels import LAUNCHERS

        return LAUNCHERS[op]
    return getattr(R, op)


# ----------------------------------------------------------------------------- valid calls
def _good(op: str) -> dict:
    """A valid call of ``op``: the schema's arguments, in order."""
    x, cached = torch.randn(B, N, D), torch.randn(B, N, D)
    vec = torch.randn(B, D)
    if op == "modulated_rel_l1_sums":
        return dict(x=x, shift=vec, scale=vec.clone(), eps=1e-6, prev=torch.zeros(B, N, D), hold=None)
    if op == "rel_l1_sums":
        return dict(x=x, prev=torch.zeros(B, N, D), write_prev=True, hold=None)
    if op == "cache_decision":
        return dict(
            sums=torch.ones(B, 2), timestep=torch.tensor([900.0]), coeffs=torch.tensor([1.0, 0.0]),
            state=R.new_state(4), threshold=0.1, warmup=1, max_skips=0, num_steps=0, hold=None, accumulate=True,
        )  # fmt: skip
    if op == "timestep_guard":
        return dict(
            timestep=torch.tensor([900.0]), state=R.new_state(4), aux=R.new_aux(), rtol=1e-5, atol=1e-7, num_steps=0
        )
    if op in ("gated_residual", "gated_residual_out"):
        a = dict(x=x, gate=vec, cached=cached, trend=torch.randn(N, D), w=0.1)
        if op == "gated_residual_out":
            a["out"] = torch.empty(B, N, D)
        return a
    if op in ("apply_residual", "apply_residual_out"):
        a = dict(x=x, r=cached)
        if op == "apply_residual_out":
            a["out"] = torch.empty(B, N, D)
        return a
    if op == "store_residual":
        return dict(out=x, x_in=cached, flag=torch.tensor(True), r=torch.zeros(B, N, D))
    if op == "taylor_forecast":
        return dict(history=torch.randn(3, N, D), dx=torch.tensor([1.0]))
    if op == "taylor_update":
        return dict(
            history=torch.randn(3, N, D), f=torch.randn(N, D), dx=torch.tensor([1.0]), valid=torch.tensor([1.0]),
            store=torch.tensor(True),
        )  # fmt: skip
    if op == "forecast_residual":
        return dict(x=x, gates=[vec, None], histories=[torch.randn(2, B, N, D), cached], dx=torch.tensor([1.0]))
    if op == "taylor_update_slots":
        return dict(
            histories=[torch.randn(3, N, D)], fs=[torch.randn(N, D)], dx=torch.tensor([1.0]),
            valid=torch.tensor([1.0]), store=torch.tensor(True),
        )  # fmt: skip
    if op == "history_combine":
        return dict(history=torch.randn(3, N, D), weights=torch.tensor([1.0, 0.5, 0.25]))
    raise KeyError(op)


def _set(**kw):
    return lambda a: a.update({k: v() if callable(v) else v for k, v in kw.items()})


def _overlap_out(name):
    """out = a view of ``name`` shifted by one token: shares its memory, is not it."""

    def mutate(a):
        buf = torch.randn(B, N + 1, D)
        a[name], a["out"] = buf[:, :N], buf[:, 1:]

    return mutate


META = "meta"  # a tensor on another device than the rest (testable without a GPU)
f64, i32, i64 = torch.float64, torch.int32, torch.int64

# (op, case id, mutation of the valid call, the argument, tokens every message must hold)
MOD = "modulated_rel_l1_sums"
CASES = [
    (MOD, "x_2d", _set(x=lambda: torch.randn(N, D), prev=lambda: torch.zeros(N, D)), "x", ["(4, 8)"]),
    (MOD, "x_dtype", _set(x=lambda: torch.ones(B, N, D, dtype=i64)), "x", ["torch.int64"]),
    (MOD, "shift_shape", _set(shift=lambda: torch.randn(B, 1, D)), "shift", ["(2, 1, 8)", "(2, 8)"]),
    (MOD, "scale_dtype", _set(scale=lambda: torch.ones(B, D, dtype=i32)), "scale", ["torch.int32"]),
    (MOD, "prev_shape", _set(prev=lambda: torch.zeros(B, N, 9)), "prev", ["(2, 4, 9)", "(2, 4, 8)"]),
    (MOD, "scale_device", _set(scale=lambda: torch.randn(B, D, device=META)), "scale", [META]),
    (MOD, "hold_dtype", _set(hold=lambda: torch.tensor(1.0)), "hold", ["torch.float32"]),
    ("rel_l1_sums", "x_0d", _set(x=lambda: torch.tensor(1.0), prev=lambda: torch.tensor(0.0)), "x", ["0-dim"]),
    ("rel_l1_sums", "x_dtype", _set(x=lambda: torch.ones(B, N, D, dtype=i64)), "x", ["torch.int64"]),
    ("rel_l1_sums", "prev_shape", _set(prev=lambda: torch.zeros(1, N, D)), "prev", ["(1, 4, 8)", "(2, 4, 8)"]),
    ("rel_l1_sums", "prev_device", _set(prev=lambda: torch.zeros(B, N, D, device=META)), "prev", [META]),
    ("rel_l1_sums", "hold_shape", _set(hold=lambda: torch.ones(2, dtype=torch.bool)), "hold", ["(2,)"]),
    ("cache_decision", "sums_shape", _set(sums=lambda: torch.ones(B, 3)), "sums", ["(2, 3)"]),
    ("cache_decision", "sums_dtype", _set(sums=lambda: torch.ones(B, 2, dtype=f64)), "sums", ["torch.float64"]),
    ("cache_decision", "timestep_empty", _set(timestep=lambda: torch.zeros(0)), "timestep", ["(0,)"]),
    ("cache_decision", "coeffs_too_many", _set(coeffs=lambda: torch.zeros(9)), "coeffs", ["(9,)", "8"]),
    ("cache_decision", "coeffs_dtype", _set(coeffs=lambda: torch.zeros(2, dtype=f64)), "coeffs", ["torch.float64"]),
    ("cache_decision", "state_dtype", _set(state=lambda: R.new_state(4).double()), "state", ["torch.float64"]),
    ("cache_decision", "state_short", _set(state=lambda: torch.zeros(10)), "state", ["(10,)", "16", "new_state"]),
    ("cache_decision", "coeffs_device", _set(coeffs=lambda: torch.zeros(2, device=META)), "coeffs", [META]),
    ("cache_decision", "hold_shape", _set(hold=lambda: torch.ones(2, dtype=torch.bool)), "hold", ["(2,)"]),
    ("timestep_guard", "state_short", _set(state=lambda: torch.zeros(10)), "state", ["(10,)", "16", "new_state"]),
    ("timestep_guard", "aux_short", _set(aux=lambda: torch.zeros(3)), "aux", ["(3,)", "4", "new_aux"]),
    ("timestep_guard", "aux_dtype", _set(aux=lambda: torch.zeros(4, dtype=f64)), "aux", ["torch.float64"]),
    ("timestep_guard", "aux_strided", _set(aux=lambda: torch.zeros(8)[::2]), "aux", ["contiguous"]),
    ("timestep_guard", "timestep_empty", _set(timestep=lambda: torch.zeros(0)), "timestep", ["(0,)"]),
    ("timestep_guard", "rtol_negative", _set(rtol=-1.0), "rtol", [">= 0"]),
    ("timestep_guard", "aux_device", _set(aux=lambda: torch.zeros(4, device=META)), "aux", [META]),
]
for _op in ("gated_residual", "gated_residual_out"):
    CASES += [
        (_op, "x_2d", _set(x=lambda: torch.randn(N, D)), "x", ["(4, 8)"]),
        (_op, "x_dtype", _set(x=lambda: torch.ones(B, N, D, dtype=i64)), "x", ["torch.int64"]),
        (_op, "gate_shape", _set(gate=lambda: torch.randn(B, 4)), "gate", ["(2, 4)", "(2, 8)"]),
        (_op, "cached_shape", _set(cached=lambda: torch.randn(B, 3, D)), "cached", ["(2, 3, 8)", "(2, 4, 8)"]),
        (_op, "trend_shape", _set(trend=lambda: torch.randn(3, D)), "trend", ["(3, 8)", "(4, 8)"]),
        (_op, "trend_dtype", _set(trend=lambda: torch.ones(N, D, dtype=i64)), "trend", ["torch.int64"]),
        (_op, "gate_device", _set(gate=lambda: torch.randn(B, D, device=META)), "gate", [META]),
    ]
for _op, _input in (("gated_residual_out", "cached"), ("apply_residual_out", "r")):
    CASES += [
        (_op, "out_shape", _set(out=lambda: torch.empty(B, N, 9)), "out", ["(2, 4, 9)", "(2, 4, 8)"]),
        (_op, "out_dtype", _set(out=lambda: torch.empty(B, N, D, dtype=f64)), "out", ["torch.float64"]),
        (_op, "out_overlaps_x", _overlap_out("x"), "out", ["shares memory with x"]),
        (_op, f"out_overlaps_{_input}", _overlap_out(_input), "out", [f"shares memory with {_input}"]),
        (_op, "out_expanded", _set(out=lambda: torch.empty(1, N, D).expand(B, N, D)), "out", ["overlapping"]),
        (_op, "out_device", _set(out=lambda: torch.empty(B, N, D, device=META)), "out", [META]),
    ]
for _op in ("apply_residual", "apply_residual_out"):
    CASES += [
        (_op, "r_shape", _set(r=lambda: torch.randn(B, 3, D)), "r", ["(2, 3, 8)", "(2, 4, 8)"]),
        (_op, "x_dtype", _set(x=lambda: torch.ones(B, N, D, dtype=i64)), "x", ["torch.int64"]),
        (_op, "r_device", _set(r=lambda: torch.randn(B, N, D, device=META)), "r", [META]),
    ]
CASES += [
    ("store_residual", "r_shape", _set(r=lambda: torch.zeros(B, 3, D)), "r", ["(2, 3, 8)", "(2, 4, 8)"]),
    ("store_residual", "x_in_dtype", _set(x_in=lambda: torch.ones(B, N, D, dtype=i64)), "x_in", ["torch.int64"]),
    ("store_residual", "flag_shape", _set(flag=lambda: torch.ones(2, dtype=torch.bool)), "flag", ["(2,)"]),
    ("store_residual", "flag_device", _set(flag=lambda: torch.tensor(True, device=META)), "flag", [META]),
]
for _op in ("taylor_forecast", "taylor_update"):
    CASES += [
        (_op, "history_1d", _set(history=lambda: torch.randn(5)), "history", ["(5,)"]),
        (_op, "history_strided", _set(history=lambda: torch.randn(3, D, N).transpose(1, 2)), "history", ["contiguous"]),
        (_op, "history_dtype", _set(history=lambda: torch.ones(3, N, D, dtype=i64)), "history", ["torch.int64"]),
        (_op, "dx_dtype", _set(dx=lambda: torch.tensor([1.0], dtype=f64)), "dx", ["torch.float64"]),
        (_op, "dx_shape", _set(dx=lambda: torch.ones(2)), "dx", ["(2,)"]),
        (_op, "dx_device", _set(dx=lambda: torch.ones(1, device=META)), "dx", [META]),
    ]
CASES += [
    ("taylor_update", "f_shape", _set(f=lambda: torch.randn(N, 9)), "f", ["(4, 9)", "(4, 8)"]),
    ("taylor_update", "f_dtype", _set(f=lambda: torch.randn(N, D, dtype=f64)), "f", ["torch.float64"]),
    ("taylor_update", "f_strided", _set(f=lambda: torch.randn(D, N).t()), "f", ["contiguous"]),
    ("taylor_update", "valid_dtype", _set(valid=lambda: torch.ones(1, dtype=f64)), "valid", ["torch.float64"]),
    ("taylor_update", "store_dtype", _set(store=lambda: torch.tensor(1.0)), "store", ["torch.float32"]),
    ("taylor_update", "store_device", _set(store=lambda: torch.tensor(True, device=META)), "store", [META]),
]
CASES += [
    ("history_combine", "history_1d", _set(history=lambda: torch.randn(5)), "history", ["(5,)"]),
    ("history_combine", "weights_len", _set(weights=lambda: torch.ones(2)), "weights", ["3 values", "(2,)"]),
    ("history_combine", "weights_dtype", _set(weights=lambda: torch.ones(3, dtype=f64)), "weights", ["torch.float64"]),
    ("history_combine", "weights_device", _set(weights=lambda: torch.ones(3, device=META)), "weights", [META]),
]

CASES += [
    ("forecast_residual", "x_2d", _set(x=lambda: torch.randn(N, D)), "x", ["(4, 8)"]),
    ("forecast_residual", "gate_shape", _set(gates=lambda: [torch.randn(B, 4), None]), "gates[0]", ["(2, 4)"]),
    ("forecast_residual", "histories_shape", _set(histories=lambda: [torch.randn(B, 3, D), torch.randn(B, N, D)]),
     "histories[0]", ["(2, 3, 8)", "(2, 4, 8)"]),
    ("forecast_residual", "dx_shape", _set(dx=lambda: torch.ones(2)), "dx", ["(2,)"]),
    ("taylor_update_slots", "fs_count", _set(fs=lambda: []), "fs", ["1", "0"]),
]  # fmt: skip


# ----------------------------------------------------------------------------- tests
def test_one_check_per_op_and_cases_for_every_op():
    assert set(contracts.CHECKS) == set(ops.SCHEMAS), "every dispatcher op has exactly one contract"
    covered = {op for op, *_ in CASES}
    assert covered == set(ops.SCHEMAS), f"ops without a bad-input case: {sorted(set(ops.SCHEMAS) - covered)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(ops.SCHEMAS))
def test_valid_call_is_accepted(op, backend):
    _impl(backend, op)(*_good(op).values())
    contracts.CHECKS[op](*_good(op).values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("op", "case", "mutate", "arg", "tokens"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_backends_reject_the_same_bad_input(op, case, mutate, arg, tokens, backend):
    fn = _impl(backend, op)
    args = _good(op)
    mutate(args)
    errors = (RuntimeError,) if backend == "cpp" else (ValueError, TypeError)
    with pytest.raises(errors) as info:
        fn(*args.values())
    msg = str(info.value)
    assert re.search(rf"fastcache::{op}(?!\w)", msg), f"{backend}: the message does not name fastcache::{op}:\n{msg}"
    assert re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", msg), f"{backend}: the message does not name {arg}:\n{msg}"
    for token in tokens:
        assert token in msg, f"{backend}: {token!r} (expected / actual) missing from:\n{msg}"


def test_cpp_layout_copy_matches_the_one_definition():
    action, why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
    if action == "skip":
        pytest.skip(why)
    if action == "fail":
        pytest.fail(why, pytrace=False)
    from fastcache import _C

    assert _C.STATE_INDEX == layout.STATE_INDEX
    assert _C.AUX_INDEX == layout.AUX_INDEX
    assert (_C.STATE_HEADER, _C.MAX_COEFFS, _C.AUX_SIZE) == (layout.STATE_HEADER, layout.MAX_COEFFS, layout.AUX_SIZE)
