"""The C++ CPU kernels (csrc/, module fastcache._C) against the eager reference.

Every kernel test runs on every compiled CPU variant this machine can execute (baseline,
avx2, avx512; selected with ``_C.set_cpu_capability``), so a machine with AVX-512 checks
all three code paths (:func:`test_every_compiled_variant_runs_here` skips, visibly, when
the CPU cannot run one of them).

Oracle: the reference in fp64 on the same (low-precision-valued) inputs. fp32 outputs
match it to cases.FP32_RTOL/ATOL. Low-precision outputs follow
cases.assert_within_lowp_bound against the reference run in that dtype. The rel-L1 sums
are fp32 accumulations of values the oracle sees exactly, so they are held to the fp32
bound in every dtype. Element-wise ops evaluate the reference's formula in the same
order without FMA, so they must equal the reference run in the same dtype bit for bit.

Determinism: sums and written buffers are bitwise identical across runs, thread counts
and CPU variants. The decision op is compared bitwise with the reference's state on
scripted sequences.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import cases
import pytest
import torch
from expected_backends import cpp_expectation

import fastcache.ops as ops
from fastcache.ops import reference as ref

# Skip only when the extension was left out on purpose; a missing or broken build that
# should be there fails the collection with fastcache.ops.BACKEND.cpp_error.
_expect, _why = cpp_expectation(ops.BACKEND.as_dict(), os.environ)
if _expect == "skip":
    pytest.skip(f"C++ extension fastcache._C is not in use: {_why}", allow_module_level=True)
elif _expect == "fail":
    pytest.fail(_why, pytrace=False)

from fastcache import _C  # noqa: E402  (only once we know it loaded)

EPS = 1e-6
LOWP = (torch.bfloat16, torch.float16)
VARIANTS = ("baseline", "avx2", "avx512")


def _sid(shape) -> str:
    return "x".join(map(str, shape))


def _did(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(params=VARIANTS)
def variant(request):
    name = request.param
    if name not in _C.compiled_cpu_capabilities():
        pytest.skip(f"{name} kernels are not compiled into this build (compiled: {_C.compiled_cpu_capabilities()})")
    if name not in _C.supported_cpu_capabilities():
        pytest.skip(f"this CPU cannot run the {name} kernels (supported: {_C.supported_cpu_capabilities()})")
    previous = _C.set_cpu_capability(name)
    assert _C.cpu_capability() == name
    yield name
    _C.set_cpu_capability(previous)


def each_variant():
    """Run the loop body once per CPU variant this machine can execute (the oracle is
    computed once, outside the loop: that is most of the cost)."""
    previous = _C.cpu_capability()
    try:
        for name in _C.supported_cpu_capabilities():
            _C.set_cpu_capability(name)
            yield name
    finally:
        _C.set_cpu_capability(previous)


def test_every_compiled_variant_runs_here():
    """The parity tests loop over the supported variants; say so when one is left out."""
    missing = [v for v in _C.compiled_cpu_capabilities() if v not in _C.supported_cpu_capabilities()]
    if missing:
        pytest.skip(f"this CPU cannot run the {missing} kernels: their parity is not checked on this machine")
    assert _C.supported_cpu_capabilities() == _C.compiled_cpu_capabilities()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so NaNs compare equal to themselves and -0.0 differs from 0.0."""
    t = t.detach().contiguous()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    diff = (_bits(a) != _bits(b)).nonzero()
    assert diff.numel() == 0, (
        f"{what}: {diff.shape[0]} element(s) differ, first at {diff[0].tolist()}: "
        f"{a[tuple(diff[0])].item()!r} vs {b[tuple(diff[0])].item()!r}"
    )


def assert_fp32_close(kernel: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        kernel.double(), exact.double(), rtol=cases.FP32_RTOL, atol=cases.FP32_ATOL, msg=lambda m: f"{what}: {m}"
    )


def _modulation_inputs(shape, dtype, gen):
    B, N, D = shape
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    shift = (torch.randn(B, D, generator=gen) * 0.3).to(dtype)
    scale = (torch.randn(B, D, generator=gen) * 0.3).to(dtype)
    # a previous indicator close to the new one, like consecutive sampling steps
    prev = (torch.randn(shape, generator=gen) * 1.1).to(dtype)
    return x, shift, scale, prev


# ------------------------------------------------------------------ modulated_rel_l1_sums
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=_did)
@pytest.mark.parametrize("shape", cases.SHAPES, ids=_sid)
def test_modulated_rel_l1_sums_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape) * 10 + cases.DTYPES.index(dtype))
    x, shift, scale, prev = _modulation_inputs(shape, dtype, gen)
    prev_exact = prev.double()
    sums_exact = ref.modulated_rel_l1_sums(x.double(), shift.double(), scale.double(), EPS, prev_exact)
    prev_lowp = prev.clone()
    if dtype != torch.float32:
        ref.modulated_rel_l1_sums(x, shift, scale, EPS, prev_lowp)
    for variant in each_variant():
        prev_k = prev.clone()
        sums = torch.ops.fastcache.modulated_rel_l1_sums(x, shift, scale, EPS, prev_k)
        assert sums.dtype == torch.float32 and sums.shape == (shape[0], 2)
        # fp32 accumulation of values the fp64 oracle sees exactly: the fp32 bound in every dtype
        assert_fp32_close(sums, sums_exact, f"sums {variant}")
        if dtype == torch.float32:
            assert_fp32_close(prev_k, prev_exact, f"prev {variant}")
        else:
            cases.assert_within_lowp_bound(prev_k, prev_lowp, prev_exact, dtype, f"prev {variant} {_did(dtype)}")


@pytest.mark.parametrize(
    "x_dtype,prev_dtype",
    [
        (torch.bfloat16, torch.float32),  # kernel variant: prev in the accumulation dtype
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),  # converted copy, written back with rounding
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=lambda d: _did(d),
)
def test_modulated_rel_l1_sums_mixed_dtypes(variant, x_dtype, prev_dtype):
    shape = (2, 33, 97)
    gen = torch.Generator().manual_seed(3)
    x, shift, scale, _ = _modulation_inputs(shape, x_dtype, gen)
    prev = torch.randn(shape, generator=gen).to(prev_dtype)
    prev_k, prev_r = prev.clone(), prev.clone()
    sums = _C.modulated_rel_l1_sums(x, shift.float(), scale.float(), EPS, prev_k)
    sums_r = ref.modulated_rel_l1_sums(x, shift.float(), scale.float(), EPS, prev_r)
    assert sums.dtype == sums_r.dtype
    if x_dtype == torch.float64:
        torch.testing.assert_close(sums, sums_r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(prev_k, prev_r, rtol=1e-12 if prev_dtype == torch.float64 else 1e-6, atol=1e-12)
    else:
        assert_fp32_close(sums, sums_r, "sums")
        # m agrees with the reference's to a few fp32 ulps; prev stores it rounded once,
        # which can flip a rounding: one ulp of prev's dtype
        tol = max(cases.FP32_RTOL, 2 * cases.ULP.get(prev_dtype, 0.0))
        torch.testing.assert_close(prev_k.double(), prev_r.double(), rtol=tol, atol=tol)


def test_modulated_rel_l1_sums_noncontiguous(variant):
    gen = torch.Generator().manual_seed(4)
    x, shift, scale, prev = _modulation_inputs((2, 17, 97), torch.float32, gen)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    prev_t = prev.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous() and not prev_t.is_contiguous()
    prev_c = prev.clone()
    assert_bitwise(
        _C.modulated_rel_l1_sums(x_t, shift, scale, EPS, prev_t),
        _C.modulated_rel_l1_sums(x, shift, scale, EPS, prev_c),
        "sums",
    )
    assert_bitwise(prev_t, prev_c, "prev written through a strided view")


def test_modulated_rel_l1_sums_empty():
    x = torch.zeros(2, 0, 8)
    sums = _C.modulated_rel_l1_sums(x, torch.zeros(2, 8), torch.zeros(2, 8), EPS, torch.zeros(2, 0, 8))
    assert sums.shape == (2, 2) and not sums.any()


# ---------------------------------------------------------------------------- rel_l1_sums
REL_SHAPES = [s for s in cases.SHAPES] + [(3,), (2, 5, 7, 3), (2, 40000)]  # 40000 > 2 chunks of 16384


@pytest.mark.parametrize("write_prev", [True, False], ids=["write", "keep"])
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=_did)
@pytest.mark.parametrize("shape", REL_SHAPES, ids=_sid)
def test_rel_l1_sums_matches_reference(shape, dtype, write_prev):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(dtype)
    prev = (torch.randn(shape, generator=gen) * 0.9).to(dtype)
    sums_exact = ref.rel_l1_sums(x.double(), prev.double(), False)
    for variant in each_variant():
        prev_k = prev.clone()
        sums = torch.ops.fastcache.rel_l1_sums(x, prev_k, write_prev)
        assert sums.dtype == torch.float32 and sums.shape == (shape[0], 2)
        assert_fp32_close(sums, sums_exact, f"sums {variant}")
        assert_bitwise(prev_k, x if write_prev else prev, f"prev {variant}")


@pytest.mark.parametrize(
    "x_dtype,prev_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float64, torch.float64),
        (torch.float64, torch.bfloat16),
    ],
    ids=lambda d: _did(d),
)
def test_rel_l1_sums_mixed_dtypes(variant, x_dtype, prev_dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 1000, generator=gen).to(x_dtype)
    prev = torch.randn(3, 1000, generator=gen).to(prev_dtype)
    prev_k, prev_r = prev.clone(), prev.clone()
    sums = _C.rel_l1_sums(x, prev_k, True)
    sums_r = ref.rel_l1_sums(x, prev_r, True)
    assert sums.dtype == sums_r.dtype
    torch.testing.assert_close(sums, sums_r, rtol=1e-12 if x_dtype == torch.float64 else cases.FP32_RTOL, atol=1e-6)
    assert_bitwise(prev_k, prev_r, "prev <- x cast to prev's dtype")


# ----------------------------------------------------------------------- gated_residual
# (trend, w): no trend (FORA), a trend with w = 0 (dropped, like the reference), EOC's
# per-token trend, and one trend row for all tokens
TREND_CASES = [("none", 0.0), ("tokens", 0.0), ("tokens", 0.01), ("channels", 0.01)]


def _trend(kind, N, D, dtype, gen):
    if kind == "none":
        return None
    shape = (N, D) if kind == "tokens" else (D,)
    return (torch.randn(shape, generator=gen) * 0.5).to(dtype)


@pytest.mark.parametrize("trend_kind,w", TREND_CASES, ids=[f"{k}-w{w}" for k, w in TREND_CASES])
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=_did)
@pytest.mark.parametrize("shape", cases.SHAPES, ids=_sid)
def test_gated_residual_matches_reference(shape, dtype, trend_kind, w):
    B, N, D = shape
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen).to(dtype)
    gate = torch.randn(B, D, generator=gen).to(dtype)
    cached = torch.randn(shape, generator=gen).to(dtype)
    trend = _trend(trend_kind, N, D, dtype, gen)
    same = ref.gated_residual(x, gate, cached, trend, w)
    exact = ref.gated_residual(x.double(), gate.double(), cached.double(), None if trend is None else trend.double(), w)
    for variant in each_variant():
        out = torch.ops.fastcache.gated_residual(x, gate, cached, trend, w)
        assert_bitwise(out, same, f"gated_residual {variant} vs the reference in {_did(dtype)}")
    # (bitwise equal to `same`, so the fp64 bounds hold for every variant at once)
    if dtype == torch.float32:
        assert_fp32_close(out, exact, "gated_residual")
    else:
        cases.assert_within_lowp_bound(out, same, exact, dtype, "gated_residual")


@pytest.mark.parametrize(
    "x_dtype,other_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float32, torch.float64),
        (torch.float64, torch.bfloat16),
    ],
    ids=lambda d: _did(d),
)
def test_gated_residual_mixed_dtypes(variant, x_dtype, other_dtype):
    gen = torch.Generator().manual_seed(8)
    B, N, D = 2, 9, 97
    x = torch.randn(B, N, D, generator=gen).to(x_dtype)
    gate = torch.randn(B, D, generator=gen).to(other_dtype)
    cached = torch.randn(B, N, D, generator=gen).to(other_dtype)
    trend = torch.randn(1, N, D, generator=gen).to(other_dtype)  # (1, N, D) is accepted too
    out = _C.gated_residual(x, gate, cached, trend, 0.02)
    assert_bitwise(out, ref.gated_residual(x, gate, cached, trend, 0.02), "mixed-dtype gated_residual")


def test_gated_residual_noncontiguous_x_keeps_layout(variant):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(9, 2, 97, generator=gen).transpose(0, 1)  # (2, 9, 97), not contiguous
    gate = torch.randn(2, 97, generator=gen)
    cached = torch.randn(2, 9, 97, generator=gen)
    out = _C.gated_residual(x, gate, cached, None, 0.0)
    assert out.stride() == torch.empty_like(x).stride(), "the output must be laid out like the fake's empty_like(x)"
    assert_bitwise(out, ref.gated_residual(x, gate, cached, None, 0.0), "gated_residual")


# --------------------------------------------------------------- apply / store residual
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=_did)
@pytest.mark.parametrize("shape", cases.SHAPES, ids=_sid)
def test_apply_and_store_residual_match_reference(shape, dtype):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(shape, generator=gen).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    block_out = torch.randn(shape, generator=gen).to(dtype)
    same = ref.apply_residual(x, r)
    exact = ref.apply_residual(x.double(), r.double())
    stored = r.clone()
    ref.store_residual(block_out, x, torch.tensor(True), stored)
    assert not torch.equal(stored, r), "a set flag must overwrite the cached residual"
    for variant in each_variant():
        out = torch.ops.fastcache.apply_residual(x, r)
        assert_bitwise(out, same, f"apply_residual {variant}")
        for flag, want in ((torch.tensor(False), r), (torch.tensor(True), stored)):
            r_k = r.clone()
            assert torch.ops.fastcache.store_residual(block_out, x, flag, r_k) is None
            assert_bitwise(r_k, want, f"store_residual {variant} flag={bool(flag)}")
    if dtype == torch.float32:
        assert_fp32_close(out, exact, "apply_residual")
    else:
        cases.assert_within_lowp_bound(out, same, exact, dtype, "apply_residual")


@pytest.mark.parametrize(
    "out_dtype,r_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
    ids=lambda d: _did(d),
)
def test_residual_ops_mixed_dtypes(variant, out_dtype, r_dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 33, generator=gen).to(out_dtype)
    r = torch.randn(2, 7, 33, generator=gen).to(r_dtype)
    assert_bitwise(_C.apply_residual(x, r), ref.apply_residual(x, r), "apply_residual")
    block_out = torch.randn(2, 7, 33, generator=gen).to(out_dtype)
    x_in = x.to(r_dtype)  # the stack's input may come in another dtype too
    flag = torch.tensor(1.0)  # any non-zero value counts as set, like .to(torch.bool)
    r_k, r_r = r.clone(), r.clone()
    _C.store_residual(block_out, x_in, flag, r_k)
    ref.store_residual(block_out, x_in, flag, r_r)
    assert_bitwise(r_k, r_r, "store_residual")


def test_store_residual_through_strided_buffer(variant):
    r = torch.zeros(7, 2, 33).transpose(0, 1)  # (2, 7, 33) view, written in place
    out, x_in = torch.randn(2, 7, 33), torch.randn(2, 7, 33)
    _C.store_residual(out, x_in, torch.tensor(True), r)
    assert_bitwise(r, out - x_in, "residual written through a strided view")


# ------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_did)
def test_reductions_bitwise_across_threads_runs_and_variants(dtype):
    gen = torch.Generator().manual_seed(12)
    x, shift, scale, prev = _modulation_inputs((2, 512, 1153), dtype, gen)  # 2 x 37 chunks: parallel
    flat = torch.randn(2, 100000, generator=gen).to(dtype)  # 2 x 7 chunks
    flat_prev = torch.randn(2, 100000, generator=gen).to(dtype)

    def run():
        p, fp = prev.clone(), flat_prev.clone()
        return (_C.modulated_rel_l1_sums(x, shift, scale, EPS, p), p, _C.rel_l1_sums(flat, fp, True))

    threads, previous = torch.get_num_threads(), _C.cpu_capability()
    results = {}
    try:
        for name in _C.supported_cpu_capabilities():
            _C.set_cpu_capability(name)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results[(name, n, 0)] = run()
                results[(name, n, 1)] = run()
    finally:
        torch.set_num_threads(threads)
        _C.set_cpu_capability(previous)
    first_key = next(iter(results))
    for key, res in results.items():
        for a, b, what in zip(res, results[first_key], ("modulated sums", "prev", "rel_l1 sums")):
            assert_bitwise(a, b, f"{what}: {key} vs {first_key}")


# --------------------------------------------------------------------------- decision
FLUX = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


def _ratio_sums(ratios, B=2):
    """(B, 2) fp32 sums whose ratio is about `ratio` (spread unevenly over b)."""
    out = []
    for r in ratios:
        den = torch.tensor([1000.0 + 37.0 * b for b in range(B)])
        num = den * r * torch.linspace(0.7, 1.3, B)
        out.append(torch.stack([num, den], dim=1).float())
    return out


def _decision_script(name):
    """(list of (sums, timestep), coeffs, kwargs, history) for each scripted scenario."""
    T = [torch.tensor([999.0 - 40.0 * s]) for s in range(25)]
    ratios = [0.02, 0.05, 0.01, 0.03, 0.2, 0.01, 0.04, 0.06, 0.02, 0.01, 0.3, 0.02]
    base = dict(threshold=0.25, warmup=1, max_skips=0, num_steps=len(ratios))
    coeffs = torch.tensor(FLUX, dtype=torch.float32)
    sums = _ratio_sums(ratios)
    steps = list(zip(sums, T))
    hist = 64
    if name == "flux_run":
        pass
    elif name == "warmup3":
        base["warmup"] = 3
    elif name == "max_skips2":
        base.update(threshold=50.0, max_skips=2)
    elif name == "threshold0":
        base["threshold"] = 0.0
    elif name == "identity_poly":
        coeffs = torch.zeros(0)
        base["threshold"] = 0.1
    elif name == "den0_nan_inf":
        bad = [
            torch.zeros(2, 2),
            torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]),
            torch.tensor([[float("inf"), 1.0], [0.0, 1.0]]),
            torch.tensor([[1.0, -1.0], [0.0, -2.0]]),
        ]
        steps = [steps[0], steps[1], (bad[0], T[2]), steps[3], (bad[1], T[4]), (bad[2], T[5]), (bad[3], T[6])]
        steps += list(zip(sums[7:], T[7:]))
        base["num_steps"] = 0
    elif name == "two_runs":
        # the timestep rises after step 6: a new sampling run starts
        steps = steps[:7] + steps[:9]
        base["num_steps"] = 0
    elif name == "short_history":
        hist = 4
    elif name == "no_history":
        hist = 0
    elif name == "batch3_int_timestep":
        sums3 = _ratio_sums(ratios, B=3)
        steps = [(s, torch.tensor([980 - 40 * i, 0], dtype=torch.int64)) for i, s in enumerate(sums3)]
    elif name == "fp64_timestep_1d_sums":
        steps = [(s.sum(0), t.double()) for s, t in steps]
    else:
        raise KeyError(name)
    return steps, coeffs, base, hist


DECISION_SCRIPTS = [
    "flux_run",
    "warmup3",
    "max_skips2",
    "threshold0",
    "identity_poly",
    "den0_nan_inf",
    "two_runs",
    "short_history",
    "no_history",
    "batch3_int_timestep",
    "fp64_timestep_1d_sums",
]


@pytest.mark.parametrize("script", DECISION_SCRIPTS)
def test_cache_decision_bitwise_vs_reference(script):
    steps, coeffs, kw, hist = _decision_script(script)
    if hist > 0:
        state_k = ref.new_state(hist)
    else:  # the op accepts a bare header (no history rows); new_state() does not make one
        state_k = ref.new_state(1)[: ref.STATE_HEADER].clone()
    state_r = state_k.clone()
    flags = []
    for i, (sums, t) in enumerate(steps):
        flag_k = torch.ops.fastcache.cache_decision(
            sums, t, coeffs, state_k, kw["threshold"], kw["warmup"], kw["max_skips"], kw["num_steps"]
        )
        flag_r = ref.cache_decision(
            sums, t, coeffs, state_r, kw["threshold"], kw["warmup"], kw["max_skips"], kw["num_steps"]
        )
        assert flag_k.dtype == torch.bool and flag_k.shape == ()
        assert bool(flag_k) == bool(flag_r), f"step {i}: decision differs"
        assert_bitwise(state_k, state_r, f"{script} state after step {i}")
        flags.append(bool(flag_k))
    # the scripts exercise both outcomes where they should
    if script in ("flux_run", "warmup3", "max_skips2", "identity_poly", "short_history"):
        assert not all(flags) and any(flags[1:]), f"{script}: expected computed and skipped steps, got {flags}"
    if script == "threshold0":
        assert all(flags)
    if script == "max_skips2":
        skips = 0
        for f in flags:
            skips = 0 if f else skips + 1
            assert skips <= 2
    if script == "two_runs":
        assert state_k[ref.N_RUNS].item() == 2.0


def test_cache_decision_state_layout_matches_reference():
    idx = _C.STATE_INDEX
    assert _C.STATE_HEADER == ref.STATE_HEADER
    for name in ("ACC", "STEP", "SKIPS", "PREV_T", "RATIO", "RESCALED", "FLAG", "N_COMPUTED", "N_SKIPPED", "N_RUNS"):
        assert idx[name] == getattr(ref, name), name


# ----------------------------------------------------------------------- registration
OPS = ["modulated_rel_l1_sums", "rel_l1_sums", "cache_decision", "gated_residual", "apply_residual", "store_residual"]


@pytest.mark.parametrize("name", OPS)
def test_cpu_kernel_registered_from_extension(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcache::{name}", "CPU")
    dump = torch._C._dispatch_dump(f"fastcache::{name}")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU"))
    assert "bindings.cpp" in cpu_line, f"CPU kernel of fastcache::{name} is not the extension's: {cpu_line}"


def _opcheck_args(name, dtype):
    gen = torch.Generator().manual_seed(13)
    B, N, D = 2, 5, 33
    x, shift, scale, prev = _modulation_inputs((B, N, D), dtype, gen)
    if name == "modulated_rel_l1_sums":
        return (x, shift, scale, EPS, prev)
    if name == "rel_l1_sums":
        return (x, prev, True)
    if name == "cache_decision":
        return (_ratio_sums([0.1])[0], torch.tensor([500.0]), torch.tensor(FLUX), ref.new_state(8), 0.25, 1, 0, 10)
    if name == "gated_residual":
        return (x, shift, prev, torch.randn(N, D, generator=gen).to(dtype), 0.01)
    if name == "apply_residual":
        return (x, prev)
    return (x, prev, torch.tensor(True), torch.zeros_like(x))


# the decision op's state is fp32 whatever the model dtype: one case for it
OPCHECK_CASES = [
    (n, dt) for n in OPS for dt in (torch.float32, torch.bfloat16) if n != "cache_decision" or dt == torch.float32
]


@pytest.mark.parametrize("name,dtype", OPCHECK_CASES, ids=[f"{n}-{_did(dt)}" for n, dt in OPCHECK_CASES])
def test_opcheck(name, dtype):
    torch.library.opcheck(getattr(torch.ops.fastcache, name).default, _opcheck_args(name, dtype))


# ----------------------------------------------------------------------- error messages
def _raises(fn, *patterns):
    with pytest.raises(RuntimeError) as info:
        fn()
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in error message:\n{msg}"


def test_errors_name_the_argument_and_show_expected_vs_actual():
    x, s = torch.randn(2, 4, 8), torch.randn(2, 8)
    op = "fastcache::modulated_rel_l1_sums"
    _raises(
        lambda: _C.modulated_rel_l1_sums(x, s[:, None], s, EPS, x.clone()),
        op,
        r"shift must have shape \(B, D\) = \(2, 8\), got \(2, 1, 8\)",
    )
    _raises(lambda: _C.modulated_rel_l1_sums(x, s, s[:1], EPS, x.clone()), r"scale must have shape \(B, D\) = \(2, 8\)")
    _raises(
        lambda: _C.modulated_rel_l1_sums(x, s, s, EPS, torch.zeros(2, 4, 9)),
        r"prev must have shape \(B, N, D\) = \(2, 4, 8\), got \(2, 4, 9\)",
    )
    _raises(
        lambda: _C.modulated_rel_l1_sums(x.long(), s, s, EPS, x.clone()),
        r"x must have dtype torch.float32, torch.bfloat16, torch.float16 or torch.float64, got torch.int64",
    )
    _raises(
        lambda: _C.modulated_rel_l1_sums(x[0], s, s, EPS, x[0].clone()),
        r"x must be 3-D \(B, N, D\), got shape \(4, 8\)",
    )
    _raises(lambda: _C.modulated_rel_l1_sums(x.to("meta"), s, s, EPS, x.clone()), r"x must be a CPU tensor.*meta")
    _raises(
        lambda: torch.ops.fastcache.modulated_rel_l1_sums(x, s, s.int(), EPS, x.clone()),
        op,
        r"scale must have dtype .*got torch.int32",
    )

    _raises(
        lambda: _C.rel_l1_sums(x, x[:1].clone(), True),
        "fastcache::rel_l1_sums",
        r"prev must have x's shape \(2, 4, 8\), got \(1, 4, 8\)",
    )
    _raises(
        lambda: _C.gated_residual(x, s, x, torch.randn(3, 8), 0.1),
        "fastcache::gated_residual",
        r"trend must have shape \(D,\) = \(8,\), \(N, D\) = \(4, 8\) or \(1, N, D\), got \(3, 8\)",
    )
    _raises(
        lambda: _C.gated_residual(x, s[:, :4], x, None, 0.0), r"gate must have shape \(B, D\) = \(2, 8\), got \(2, 4\)"
    )
    _raises(lambda: _C.gated_residual(x, s, x[:, :3], None, 0.0), r"cached must have shape \(B, N, D\) = \(2, 4, 8\)")
    _raises(
        lambda: _C.apply_residual(x, x[:, :3]),
        "fastcache::apply_residual",
        r"r \(the cached residual\) must have x's shape",
    )
    _raises(
        lambda: _C.store_residual(x, x, torch.tensor([True, False]), x.clone()),
        "fastcache::store_residual",
        r"flag must hold one value.*got shape \(2,\)",
    )
    _raises(lambda: _C.store_residual(x, x[:1], torch.tensor(True), x.clone()), r"out, x_in and r must have one shape")

    st = ref.new_state(4)
    sums, t, c = torch.ones(2, 2), torch.tensor([1.0]), torch.tensor(FLUX)
    op = "fastcache::cache_decision"
    _raises(
        lambda: _C.cache_decision(sums, t, c, st.double(), 0.1, 1, 0, 0),
        op,
        r"state must have dtype torch.float32, got torch.float64",
    )
    _raises(
        lambda: _C.cache_decision(sums, t, c, st[:10].clone(), 0.1, 1, 0, 0),
        r"state must be a 1-D tensor of at least 16 values.*got shape \(10,\).*new_state",
    )
    _raises(
        lambda: _C.cache_decision(torch.ones(2, 3), t, c, st, 0.1, 1, 0, 0),
        r"sums must have shape \(B, 2\) or \(2,\).*got \(2, 3\)",
    )
    _raises(
        lambda: _C.cache_decision(sums, torch.zeros(0), c, st, 0.1, 1, 0, 0), r"timestep must hold at least one value"
    )


# ----------------------------------------------------------------- CPU variant controls
def test_capability_controls():
    compiled, supported = _C.compiled_cpu_capabilities(), _C.supported_cpu_capabilities()
    assert compiled[0] == "baseline" and set(supported) <= set(compiled) and "baseline" in supported
    if platform.machine() in ("x86_64", "AMD64"):
        assert compiled == ["baseline", "avx2", "avx512"]
    assert _C.cpu_capability() in supported
    with pytest.raises(ValueError, match=r"'sse9' is not a CPU kernel variant; use baseline, avx2 or avx512"):
        _C.set_cpu_capability("sse9")
    for name in set(compiled) - set(supported):
        with pytest.raises(ValueError, match="this CPU cannot run"):
            _C.set_cpu_capability(name)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_env_var_selects_variant_and_bad_value_falls_back_cleanly():
    code = """
        import warnings
        warnings.simplefilter("always")
        import fastcache.ops as ops
        print(ops.BACKEND.cpu)
        if ops.BACKEND.cpu == "cpp":
            from fastcache import _C
            print(_C.cpu_capability())
        else:
            print(ops.BACKEND.cpp_error)
        import torch
        x = torch.randn(1, 3, 8)
        print(ops.modulated_rel_l1_sums(x, torch.zeros(8), torch.zeros(8), torch.zeros_like(x)).shape)
    """
    good = _python(code, FASTCACHE_CPU_CAPABILITY="Baseline")
    assert good.returncode == 0, good.stderr
    assert good.stdout.split("\n")[:2] == ["cpp", "baseline"], good.stdout
    bad = _python(code, FASTCACHE_CPU_CAPABILITY="avx1024")
    assert bad.returncode == 0, bad.stderr  # falls back to the reference, with a warning
    lines = bad.stdout.split("\n")
    assert lines[0] == "eager", bad.stdout
    assert "FASTCACHE_CPU_CAPABILITY='avx1024' is not a CPU kernel variant" in lines[1]
    assert "C++ CPU kernels unavailable" in bad.stderr
    assert lines[2] == "torch.Size([1, 2])"


def test_schema_mismatch_is_an_import_error_not_a_crash():
    """A kernel whose C++ signature no longer matches its schema must not abort the
    process (as a static TORCH_LIBRARY_IMPL would, inside dlopen): ImportError, and no
    kernel of the extension stays half-registered."""
    code = f"""
        import importlib.util, torch
        lib = torch.library.Library("fastcache", "DEF")
        lib.define("modulated_rel_l1_sums(Tensor x, Tensor shift, Tensor scale, float eps, Tensor(a!) prev, "
                   "Tensor? hold=None) -> Tensor")
        lib.define("rel_l1_sums(Tensor x, Tensor(a!) prev) -> Tensor")  # two arguments short
        spec = importlib.util.spec_from_file_location("fastcache._C", {_C.__file__!r})
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except ImportError as e:
            print("ImportError:", e)
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        print("cpu kernel left:", has("fastcache::modulated_rel_l1_sums", "CPU"))
    """
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert "ImportError: fastcache._C could not register its CPU kernels" in res.stdout, res.stdout
    assert "fastcache::rel_l1_sums" in res.stdout and "Exception raised from" not in res.stdout
    assert "cpu kernel left: False" in res.stdout


def test_info_reports_the_cpp_backend():
    from fastcache import info

    d = info.collect()
    cpp = d["backends"]["cpp"]
    assert cpp["active"] and cpp["available"] and cpp["reason"] is None
    assert cpp["cpu_capability"] == _C.cpu_capability()
    assert cpp["supported_capabilities"] == _C.supported_cpu_capabilities()
    assert d["torch"] == torch.__version__ and d["backend"]["cpu"] == "cpp"
    text = info._format(d)
    assert f"cpp     active on CPU  (variant {_C.cpu_capability()}" in text


# ----------------------------------------------------------------------- portability
_VECTOR_INSN = re.compile(r"%[xyz]mm(1[6-9]|2\d|3[01])\b|%[yz]mm\d|%k[0-7]\b|^v[a-z]")
_AVX512_INSN = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{%k")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 ISA check")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to disassemble _C.so")
def test_no_vector_extension_code_outside_its_variant():
    """No AVX/AVX2/AVX-512 instruction outside fastcache::cpu::{AVX2,AVX512} and
    at::vec::{AVX2,AVX512}, and no AVX-512 in the AVX2 variant: the extension loads and
    runs its baseline path on any x86-64 CPU (a stray copy would be a SIGILL there)."""
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    allowed = re.compile(r"(fastcache::cpu|at::vec)::(AVX2|AVX512)::")
    bad, func, n_funcs, n_avx512 = {}, None, 0, 0
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func, n_funcs = head.group(1), n_funcs + 1
            continue
        if func is None or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1].strip()
        if not _VECTOR_INSN.search(insn):
            continue
        variant_ns = allowed.search(func)
        if variant_ns is None:
            bad.setdefault(func, []).append(insn)
        elif variant_ns.group(2) == "AVX2" and _AVX512_INSN.search(insn):
            bad.setdefault(func, []).append(insn)
        elif variant_ns.group(2) == "AVX512" and "%zmm" in insn:
            n_avx512 += 1
    assert n_funcs > 100, "disassembly looks empty"
    assert n_avx512 > 0, "the AVX-512 variant holds no zmm code: is it really compiled for AVX-512?"
    assert not bad, "vector-extension instructions outside their variant:\n" + "\n".join(
        f"{f}: {insns[:3]}" for f, insns in list(bad.items())[:10]
    )


_EMULATED_CHECK = """
import torch
import fastcache.ops as ops
from fastcache import _C
assert ops.BACKEND.cpu == "cpp", ops.BACKEND.cpp_error
g = torch.Generator().manual_seed(0)
x, p = torch.randn(2, 5, 97, generator=g), torch.randn(2, 5, 97, generator=g)
sh, sc = torch.randn(2, 97, generator=g), torch.randn(2, 97, generator=g)
pk, pr = p.clone(), p.clone()
sums = _C.modulated_rel_l1_sums(x, sh, sc, 1e-6, pk)
torch.testing.assert_close(sums, ops.reference.modulated_rel_l1_sums(x, sh, sc, 1e-6, pr))
torch.testing.assert_close(pk, pr)
xb = x.bfloat16()
assert torch.equal(_C.gated_residual(xb, sh, xb, p[0], 0.01), ops.reference.gated_residual(xb, sh, xb, p[0], 0.01))
refused = []
for name in _C.compiled_cpu_capabilities():
    try:
        _C.set_cpu_capability(name)
    except ValueError:
        refused.append(name)
print("variant", _C.supported_cpu_capabilities()[-1], "refused", ",".join(refused))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 ISA check")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (qemu-x86_64) to emulate older CPUs")
def test_runs_on_cpus_without_avx512_or_avx2():
    """Import and run the extension on emulated CPUs: Haswell (AVX2, no AVX-512) must
    pick avx2 and refuse avx512; Nehalem (no AVX at all) must run the baseline kernels.
    A stray AVX-512 / AVX instruction on the import or baseline path would be a SIGILL."""
    cpus = {"Haswell": ("avx2", "avx512"), "Nehalem": ("baseline", "avx2,avx512")}
    procs = {
        cpu: subprocess.Popen(
            ["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", _EMULATED_CHECK],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cpu in cpus
    }
    for cpu, (variant, refused) in cpus.items():
        out, err = procs[cpu].communicate(timeout=600)
        assert procs[cpu].returncode == 0, f"{cpu}: exit {procs[cpu].returncode}\n{err[-3000:]}"
        assert f"variant {variant} refused {refused}" in out, f"{cpu}: {out}"


def test_fp64_is_accumulated_in_fp64(variant):
    gen = torch.Generator().manual_seed(14)
    x, shift, scale, prev = _modulation_inputs((2, 17, 97), torch.float64, gen)
    p_k, p_r = prev.clone(), prev.clone()
    sums = _C.modulated_rel_l1_sums(x, shift, scale, EPS, p_k)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, ref.modulated_rel_l1_sums(x, shift, scale, EPS, p_r), rtol=1e-13, atol=0)
    torch.testing.assert_close(p_k, p_r, rtol=1e-13, atol=1e-13)
    assert math.isfinite(sums.sum().item())
