"""Parity of the Triton kernels (fastcache.kernels) with the eager reference.

The launchers run directly on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton).

Oracle: the reference in fp64 on the same (low-precision-valued) inputs. fp32 outputs
must match it to cases.FP32_RTOL/ATOL; low-precision outputs follow
cases.assert_within_lowp_bound against the reference run in that dtype, and must lie
within one ulp of it.

bf16 under the interpreter: the interpreter's fp32 -> bf16 cast TRUNCATES (it drops
the low 16 bits; triton/runtime/interpreter.py `_convert_float` without a rounding
mode), while compiled kernels round to nearest (tests/ops/test_ptx.py checks the PTX).
So the bf16 "reference in that dtype" here is the reference's fp32 result truncated
the same way (:func:`_bf16_truncate`); :func:`test_interpreter_bf16_cast_truncates`
pins that fact down. fp16 casts round to nearest in both, and fp32 is never loosened.

The decision kernel is checked bitwise against the reference state (ratio, rescaled,
acc, counters, history) on scripted sequences.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cases
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")
from fastcache.kernels import LAUNCHERS, decision  # noqa: E402  (after the importorskip)

from fastcache.ops import reference as ref  # noqa: E402

KERNELS_DIR = str(Path(decision.__file__).resolve().parent)
LOWP = (torch.bfloat16, torch.float16)
BIG = (2, 256, 1152)  # the interpreter needs seconds per op here: fp32 only
SMALL_SHAPES = [s for s in cases.SHAPES if s != BIG]
SHAPE_DTYPES = [(s, torch.float32) for s in cases.SHAPES] + [(s, dt) for s in SMALL_SHAPES for dt in LOWP]


def _id(param):
    shape, dtype = param
    return f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"


# ------------------------------------------------------------------------- helpers
def _bf16_truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits, as Triton's interpreter casts."""
    bits = t.to(torch.float32).contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: already a bf16 value


def _to_lowp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How the kernels (under the interpreter) cast an fp32 result to ``dtype``."""
    return _bf16_truncate(t) if dtype == torch.bfloat16 else t.to(dtype)


def _lowp_outputs(fn, dtype, args, lowp_outputs):
    """Run the reference in fp32 on the lowp-valued inputs and cast ``lowp_outputs``
    (indices into args, or "ret") like the kernel does.

    The reference computes bf16/fp16 inputs in fp32 and casts once at the end, so on
    the fp32-upcast inputs it produces exactly the value before that cast.
    """
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ret = fn(*up)
    return {k: _to_lowp(ret if k == "ret" else up[k], dtype) for k in lowp_outputs}


def _fp64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _assert_fp32_close(kernel, exact, what):
    torch.testing.assert_close(
        kernel.double(),
        exact.double(),
        rtol=cases.FP32_RTOL,
        atol=cases.FP32_ATOL,
        msg=lambda m: f"{what}: {m}",
    )


def _assert_within_one_ulp(kernel, lowp_ref, dtype, what):
    """Elementwise |kernel - ref| <= one ulp of ``dtype`` at ref (ties of the cast)."""
    mant = 7 if dtype == torch.bfloat16 else 10
    r = lowp_ref.double()
    ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(torch.finfo(dtype).tiny))) - mant)
    diff = (kernel.double() - r).abs()
    bad = diff > ulp
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than one ulp (max {diff.max():.3e})"


def _check_lowp(kernel, lowp_ref, exact, dtype, what):
    cases.assert_within_lowp_bound(kernel, lowp_ref, exact, dtype, what)
    _assert_within_one_ulp(kernel, lowp_ref, dtype, what)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # bitwise view of fp32 (NaN == NaN, -0 != 0)


def _rand(shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(shape) * scale + offset).to(dtype)


# ------------------------------------------------------------------- rel-L1 sums
@pytest.mark.parametrize("param", SHAPE_DTYPES, ids=_id)
def test_modulated_rel_l1_sums_parity(param):
    (B, N, D), dtype = param
    x = _rand((B, N, D), dtype, scale=2.0, offset=0.5)
    shift, scale = _rand((B, D), dtype, 0.5), _rand((B, D), dtype, 0.2)
    prev0 = _rand((B, N, D), dtype)
    prev = prev0.clone()
    sums = LAUNCHERS["modulated_rel_l1_sums"](x, shift, scale, 1e-6, prev)
    assert sums.shape == (B, 2) and sums.dtype == torch.float32

    exact_prev = prev0.double()
    exact = ref.modulated_rel_l1_sums(*_fp64([x, shift, scale, 1e-6]), exact_prev)
    # the sums are fp32 accumulations of exactly representable inputs: fp32 bound always
    _assert_fp32_close(sums, exact, "sums")
    if dtype == torch.float32:
        _assert_fp32_close(prev, exact_prev, "prev <- m")
    else:
        lowp = _lowp_outputs(
            ref.modulated_rel_l1_sums,
            dtype,
            [x, shift, scale, 1e-6, prev0.clone()],
            [4],
        )
        _check_lowp(prev, lowp[4], exact_prev, dtype, "prev <- m")


@pytest.mark.parametrize("write_prev", [True, False])
@pytest.mark.parametrize("param", SHAPE_DTYPES, ids=_id)
def test_rel_l1_sums_parity(param, write_prev):
    (B, N, D), dtype = param
    x, prev0 = _rand((B, N, D), dtype), _rand((B, N, D), dtype)
    prev = prev0.clone()
    sums = LAUNCHERS["rel_l1_sums"](x, prev, write_prev)
    assert sums.shape == (B, 2) and sums.dtype == torch.float32
    exact = ref.rel_l1_sums(x.double(), prev0.double(), False)
    _assert_fp32_close(sums, exact, "sums")
    assert torch.equal(prev, x if write_prev else prev0), "prev must be x (write_prev) or untouched"


@pytest.mark.parametrize("shape", [(4,), (2, 3, 5, 7), (3, 1)])
def test_rel_l1_sums_any_rank(shape):
    x, prev = torch.randn(shape), torch.randn(shape)
    exact = ref.rel_l1_sums(x.double(), prev.double(), False)
    sums = LAUNCHERS["rel_l1_sums"](x, prev, True)
    _assert_fp32_close(sums, exact, f"sums {shape}")
    assert torch.equal(prev, x)


def test_rel_l1_sums_mixed_dtypes_and_empty_rows():
    x, prev = torch.randn(2, 3, 64), torch.randn(2, 3, 64).to(torch.float16)
    prev0 = prev.clone()
    sums = LAUNCHERS["rel_l1_sums"](x, prev, True)
    _assert_fp32_close(sums, ref.rel_l1_sums(x.double(), prev0.double(), False), "mixed")
    assert torch.equal(prev, x.to(torch.float16))
    empty = LAUNCHERS["rel_l1_sums"](torch.empty(3, 0), torch.empty(3, 0), True)
    assert torch.equal(empty, torch.zeros(3, 2))


def test_fp64_inputs_accumulate_in_fp64():
    x, shift, scale, prev = (
        torch.randn(2, 5, 33),
        torch.randn(2, 33),
        torch.randn(2, 33),
        torch.randn(2, 5, 33),
    )
    p_k, p_r = prev.double(), prev.double()
    sums = LAUNCHERS["modulated_rel_l1_sums"](x.double(), shift.double(), scale.double(), 1e-6, p_k)
    exact = ref.modulated_rel_l1_sums(x.double(), shift.double(), scale.double(), 1e-6, p_r)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_k, p_r, rtol=1e-12, atol=1e-12)


def test_sums_are_deterministic():
    """Per-program partials + fixed-order final sum: two runs are bitwise equal."""
    B, N, D = 2, 300, 97
    x, shift, scale, prev = (
        torch.randn(B, N, D),
        torch.randn(B, D),
        torch.randn(B, D),
        torch.randn(B, N, D),
    )
    runs = [LAUNCHERS["modulated_rel_l1_sums"](x, shift, scale, 1e-6, prev.clone()) for _ in range(2)]
    runs += [LAUNCHERS["rel_l1_sums"](x, prev.clone(), False) for _ in range(2)]
    assert torch.equal(_bits(runs[0]), _bits(runs[1]))
    assert torch.equal(_bits(runs[2]), _bits(runs[3]))


def test_sums_use_several_partials_in_fixed_order():
    """Enough rows that the grid has many programs per sample; the result is the
    fixed-order sum of the per-program partials (checked against a sum of per-block
    sums done in the same order)."""
    B, M = 2, 3 * 4096 + 17
    x, prev = torch.randn(B, M), torch.randn(B, M)
    sums = LAUNCHERS["rel_l1_sums"](x, prev, False)
    _assert_fp32_close(sums, ref.rel_l1_sums(x.double(), prev.double(), False), "multi-block sums")


# ------------------------------------------------------------------ residual ops
TREND_MODES = ["none", "per_token", "per_channel", "w0"]
# every mode on every small shape; the big shape (seconds per op in the interpreter)
# runs the per-token trend, the mode that reads the most
GATED_PARAMS = [
    pytest.param(p, mode, id=f"{_id(p)}-{mode}")
    for p in SHAPE_DTYPES
    for mode in TREND_MODES
    if p[0] != BIG or mode == "per_token"
]


@pytest.mark.parametrize(("param", "trend_mode"), GATED_PARAMS)
def test_gated_residual_parity(param, trend_mode):
    (B, N, D), dtype = param
    x, cached, gate = (
        _rand((B, N, D), dtype),
        _rand((B, N, D), dtype),
        _rand((B, D), dtype),
    )
    trend = {
        "none": None,
        "per_token": _rand((N, D), dtype, 3.0),
        "per_channel": _rand((D,), dtype, 3.0),
        "w0": _rand((N, D), dtype, 3.0),
    }[trend_mode]
    w = 0.0 if trend_mode == "w0" else 0.05
    out = LAUNCHERS["gated_residual"](x, gate, cached, trend, w)
    assert out.dtype == dtype and out.shape == x.shape
    args = [x, gate, cached, trend, w]
    exact = ref.gated_residual(*_fp64(args))
    if dtype == torch.float32:
        _assert_fp32_close(out, exact, "out")
    else:
        lowp = _lowp_outputs(ref.gated_residual, dtype, args, ["ret"])["ret"]
        _check_lowp(out, lowp, exact, dtype, "out")


@pytest.mark.parametrize("param", SHAPE_DTYPES, ids=_id)
def test_apply_residual_parity(param):
    shape, dtype = param
    x, r = _rand(shape, dtype), _rand(shape, dtype)
    out = LAUNCHERS["apply_residual"](x, r)
    assert out.dtype == dtype
    exact = ref.apply_residual(x.double(), r.double())
    if dtype == torch.float32:
        _assert_fp32_close(out, exact, "out")
    else:
        lowp = _lowp_outputs(ref.apply_residual, dtype, [x, r], ["ret"])["ret"]
        _check_lowp(out, lowp, exact, dtype, "out")


@pytest.mark.parametrize("flag_value", [True, False])
@pytest.mark.parametrize("param", SHAPE_DTYPES, ids=_id)
def test_store_residual_parity(param, flag_value):
    shape, dtype = param
    out, x_in, r0 = _rand(shape, dtype), _rand(shape, dtype), _rand(shape, dtype)
    r = r0.clone()
    assert LAUNCHERS["store_residual"](out, x_in, torch.tensor(flag_value), r) is None
    if not flag_value:
        assert torch.equal(r, r0), "a skipped step must leave the cached residual untouched"
        return
    exact = out.double() - x_in.double()
    if dtype == torch.float32:
        _assert_fp32_close(r, exact, "r")
    else:
        lowp = _lowp_outputs(ref.store_residual, dtype, [out, x_in, torch.tensor(True), r0.clone()], [3])[3]
        _check_lowp(r, lowp, exact, dtype, "r")


@pytest.mark.parametrize(
    "flag",
    [torch.tensor(True), torch.tensor([1.0]), torch.tensor(0, dtype=torch.int32)],
)
def test_store_residual_flag_any_dtype(flag):
    out, x_in, r0 = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    r, r_ref = r0.clone(), r0.clone()
    LAUNCHERS["store_residual"](out, x_in, flag, r)
    ref.store_residual(out, x_in, flag, r_ref)
    assert torch.equal(r, r_ref)


def test_residual_round_trip_mixed_dtypes():
    """fp32 residual cache for a bf16 stream: store then apply reproduces the output."""
    x_in = torch.randn(2, 9, 40).to(torch.bfloat16)
    out = torch.randn(2, 9, 40).to(torch.bfloat16)
    r = torch.zeros(2, 9, 40)
    LAUNCHERS["store_residual"](out, x_in, torch.tensor(True), r)
    assert torch.equal(r, out.float() - x_in.float())  # exact in fp32
    again = LAUNCHERS["apply_residual"](x_in, r)
    assert torch.equal(again, out)  # x_in + (out - x_in) is exact in fp32, out is a bf16 value


def test_interpreter_bf16_cast_truncates():
    """The fact the bf16 model above rests on: 1 + 3/512 lies between bf16 values
    1 + 1/128 and 1 + 2/128 ... truncation gives 1.0 + 0/128, rounding 1 + 1/128.
    If Triton's interpreter starts rounding, drop _bf16_truncate (use .to(bfloat16))."""
    x = torch.full((4,), 1.0 + 3 / 512, dtype=torch.float32)
    out = LAUNCHERS["apply_residual"](torch.zeros(4, dtype=torch.bfloat16), x)
    assert torch.equal(out, _bf16_truncate(x)), "interpreter no longer truncates fp32 -> bf16"
    assert not torch.equal(out, x.to(torch.bfloat16))


# ----------------------------------------------------------------- cache decision
FLUX = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


def test_decision_layout_matches_reference():
    names = [
        "ACC",
        "STEP",
        "SKIPS",
        "PREV_T",
        "RATIO",
        "RESCALED",
        "FLAG",
        "N_COMPUTED",
        "N_SKIPPED",
        "N_RUNS",
    ]
    # the kernels read the one layout (fastcache/ops/layout.py) as tl.constexpr globals
    for name in names + ["AUX_REPEATS", "AUX_LAST_RUN_STEPS", "AUX_RUN_LENGTH_MISMATCHES", "AUX_JITTER"]:
        assert getattr(decision, f"_{name}").value == getattr(ref, name), f"kernels/decision.py _{name} != layout"
    assert decision._HEADER.value == ref.STATE_HEADER


def _run_decisions(
    steps,
    *,
    coeffs=FLUX,
    threshold=0.25,
    warmup=1,
    max_skips=0,
    num_steps=0,
    history=64,
):
    """Feed ``steps`` = [(sums (B, 2), timestep tensor)] to both; compare bitwise each step."""
    cs = torch.tensor(coeffs, dtype=torch.float32)
    st_k, st_r = ref.new_state(history), ref.new_state(history)
    flags = []
    for i, (sums, t) in enumerate(steps):
        f_k = LAUNCHERS["cache_decision"](sums, t, cs, st_k, threshold, warmup, max_skips, num_steps)
        f_r = ref.cache_decision(sums, t, cs, st_r, threshold, warmup, max_skips, num_steps)
        assert f_k.dtype == torch.bool and f_k.dim() == 0
        assert bool(f_k) == bool(f_r), f"step {i}: flag {bool(f_k)} != reference {bool(f_r)}"
        diff = (_bits(st_k) != _bits(st_r)).nonzero().flatten().tolist()
        assert not diff, f"step {i}: state differs at {diff}: {st_k[diff].tolist()} vs {st_r[diff].tolist()}"
        flags.append(bool(f_k))
    return flags, st_k


def _sums_for(ratios, B=2, den=(1.0, 3.0)):
    """(B, 2) sums whose global ratio is exactly-ish ``r``: num_b = r * den_b."""
    out = []
    for r in ratios:
        d = torch.tensor(den[:B], dtype=torch.float32)
        out.append(torch.stack([d * r, d], dim=1))
    return out


def _timesteps(n, start=999.0):
    return [torch.tensor([start - i * (start / n)], dtype=torch.float32) for i in range(n)]


def _horner(ratio: float, coeffs, fma: bool) -> float:
    f = lambda v: torch.tensor(v, dtype=torch.float32).item()
    r = 0.0
    for c in coeffs:
        r = f(r * ratio + f(c)) if fma else f(f(r * ratio) + f(c))  # fma: one rounding (fp64 exact product)
    return r


def test_decision_teacache_sequence_bitwise():
    ratios = [
        0.0,
        0.31,
        0.12,
        0.05,
        0.072,
        0.11,
        0.09,
        0.04,
        0.035,
        0.2,
        0.066,
        0.081,
        0.05,
        0.07,
    ] * 2
    n = len(ratios)
    flags, st = _run_decisions(list(zip(_sums_for(ratios), _timesteps(n))), threshold=0.4, num_steps=n)
    assert flags[0] and flags[-1], "first and last steps are forced"
    assert not all(flags), "this sequence must skip some steps (else it tests nothing)"
    H = ref.history_len(st)
    assert st[ref.STATE_HEADER + 2 * H : ref.STATE_HEADER + 2 * H + n].tolist() == [float(f) for f in flags]
    assert st[ref.N_COMPUTED].item() + st[ref.N_SKIPPED].item() == n
    # The bitwise check above can see FMA contraction: on this sequence a contracted
    # Horner gives different fp32 bits for some ratio.
    r32 = [(s[:, 0].sum() / s[:, 1].sum()).item() for s in _sums_for(ratios)]
    assert any(_horner(r, FLUX, True) != _horner(r, FLUX, False) for r in r32)


def test_decision_forced_steps_warmup_last_and_max_skips():
    n = 12
    tiny = _sums_for([1e-4] * n)  # rescaled ~0.264 per step with FLUX; threshold high
    flags, _ = _run_decisions(list(zip(tiny, _timesteps(n))), threshold=100.0, warmup=3, num_steps=n)
    assert flags == [True] * 3 + [False] * (n - 4) + [True]
    flags, _ = _run_decisions(list(zip(tiny, _timesteps(n))), threshold=100.0, max_skips=2)
    assert flags == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
    ]


def test_decision_threshold_off_and_identity_poly():
    n = 6
    steps = list(zip(_sums_for([0.01] * n), _timesteps(n)))
    flags, _ = _run_decisions(steps, threshold=0.0)
    assert all(flags), "threshold <= 0 disables caching"
    flags, st = _run_decisions(steps, coeffs=[], threshold=0.025)
    assert flags == [
        True,
        False,
        False,
        True,
        False,
        False,
    ]  # identity: acc 0.01, 0.02, 0.03 >= 0.025
    assert st[ref.RESCALED].item() == st[ref.RATIO].item()
    # acc reaching the threshold exactly computes (>=): 0.25 + 0.25 == 0.5 in fp32
    steps = list(zip(_sums_for([0.25] * 4), _timesteps(4)))
    flags, _ = _run_decisions(steps, coeffs=[], threshold=0.5)
    assert flags == [True, False, True, False]


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[1.0, 0.0], [2.0, 0.0]]),  # den == 0
        torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]),
        torch.tensor([[float("inf"), 1.0], [0.0, 1.0]]),
        torch.tensor([[1.0, -2.0], [0.0, 1.0]]),  # den < 0
        torch.tensor([[1e30, 1e-30], [0.0, 1e-30]]),  # finite sums, ratio overflows to inf
    ],
)
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy, on purpose
def test_decision_invalid_ratio_forces_compute(bad):
    n = 5
    sums = _sums_for([0.001] * n)
    sums[3] = bad
    flags, st = _run_decisions(list(zip(sums, _timesteps(n))), threshold=10.0)
    assert flags[3], "an undefined/non-finite ratio must force a compute"
    H = ref.history_len(st)
    assert st[ref.STATE_HEADER + H + 3].item() == 0.0, "history acc is 0 when forced by an invalid ratio"
    assert st[ref.STATE_HEADER + H + 4].item() > 0.0, "the next step accumulates from 0 again"


def test_decision_new_run_when_timestep_rises():
    n = 7
    run = list(zip(_sums_for([0.02] * n), _timesteps(n)))
    flags, st = _run_decisions(run + run + run[:3], threshold=0.5, num_steps=n)
    assert st[ref.N_RUNS].item() == 3
    assert st[ref.STEP].item() == 3
    assert flags[n] and flags[2 * n], "a new run starts with a forced compute"


def test_decision_history_rows_beyond_h_are_not_written():
    n = 9
    steps = list(zip(_sums_for([0.05 * (i % 3) for i in range(n)]), _timesteps(n)))
    for H in (1, 4):
        _, st = _run_decisions(steps, threshold=0.3, history=H)
        assert st.numel() == ref.STATE_HEADER + 3 * H


@pytest.mark.parametrize(
    "timestep",
    [
        torch.tensor(500, dtype=torch.int64),
        torch.tensor([500.0, 1.0], dtype=torch.bfloat16),
        torch.tensor([[500.25]], dtype=torch.float64),
        torch.arange(8, dtype=torch.float32).flip(0)[::2],  # strided: element 0 is 7.0
        torch.tensor([700], dtype=torch.int32),
    ],
    ids=["int64-0d", "bf16", "fp64-2d", "strided", "int32"],
)
def test_decision_timestep_dtypes(timestep):
    sums = _sums_for([0.1])[0]
    cs = torch.tensor(FLUX, dtype=torch.float32)
    st_k, st_r = ref.new_state(8), ref.new_state(8)
    for _ in range(2):  # second call: same timestep, no new run
        f_k = LAUNCHERS["cache_decision"](sums, timestep, cs, st_k, 0.3, 1, 0, 0)
        f_r = ref.cache_decision(sums, timestep, cs, st_r, 0.3, 1, 0, 0)
        assert bool(f_k) == bool(f_r)
        assert torch.equal(_bits(st_k), _bits(st_r))
    assert st_k[ref.PREV_T].item() == float(timestep.reshape(-1)[0].float())


def test_decision_single_sample_sums_and_many_samples():
    for sums in (torch.tensor([0.3, 2.0]), torch.rand(7, 2) + 0.01):
        n = 4
        _run_decisions([(sums, t) for t in _timesteps(n)], threshold=0.5)


# --------------------------------------------------------- host reads and errors
class _HostRead(AssertionError):
    pass


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Fail if code in kernels/ reads a tensor value to the host (item, bool, cpu...).

    Triton's interpreter itself copies tensors around; only calls made from a file in
    kernels/ count.
    """

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(KERNELS_DIR):
                raise _HostRead(f"{caller} called Tensor.{name}: a host read in a launcher")
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in (
        "item",
        "tolist",
        "cpu",
        "numpy",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
    ):
        guard(name)


def test_launchers_never_read_device_values(forbid_host_reads):
    B, N, D = 2, 5, 33
    x, p = torch.randn(B, N, D), torch.randn(B, N, D)
    sums = LAUNCHERS["modulated_rel_l1_sums"](x, torch.randn(B, D), torch.randn(B, D), 1e-6, p)
    LAUNCHERS["rel_l1_sums"](x, p, True)
    flag = LAUNCHERS["cache_decision"](sums, torch.tensor(3), torch.tensor(FLUX), ref.new_state(4), 0.2, 1, 2, 10)
    y = LAUNCHERS["gated_residual"](x, torch.randn(B, D), p, torch.randn(N, D), 0.1)
    y = LAUNCHERS["apply_residual"](y, p)
    LAUNCHERS["store_residual"](y, x, flag, p)
    xt = torch.randn(B, D, N).transpose(1, 2)  # strided inputs and the out= forms too
    LAUNCHERS["modulated_rel_l1_sums"](xt, torch.randn(B, D), torch.randn(B, D), 1e-6, p)
    LAUNCHERS["rel_l1_sums"](xt, p, False)
    LAUNCHERS["apply_residual_out"](xt, p, y)
    LAUNCHERS["gated_residual_out"](xt, torch.randn(B, D), p, None, 0.0, y)
    LAUNCHERS["store_residual"](xt, x, flag, p)
    # and the guard works: a host read from kernels/ would have raised
    code = compile("t.item()", os.path.join(KERNELS_DIR, "probe.py"), "eval")
    with pytest.raises(_HostRead):
        eval(code, {"t": sums})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (  # strided x is read in place now; an out that is a shifted view of x is refused
            lambda: (lambda b: LAUNCHERS["apply_residual_out"](b[:, :3], torch.randn(2, 3, 4), b[:, 1:]))(
                torch.randn(2, 4, 4)
            ),
            "shares memory with x",
        ),
        (
            lambda: LAUNCHERS["apply_residual"](torch.randn(4), torch.randn(5)),
            "must have one shape",
        ),
        (
            lambda: LAUNCHERS["rel_l1_sums"](torch.randn(2, 3), torch.randn(2, 4), True),
            "prev must match",
        ),
        (
            lambda: LAUNCHERS["modulated_rel_l1_sums"](
                torch.randn(2, 3, 4),
                torch.randn(4),
                torch.randn(2, 4),
                1e-6,
                torch.randn(2, 3, 4),
            ),
            r"shift must be \(B, D\)",
        ),
        (
            lambda: LAUNCHERS["gated_residual"](
                torch.randn(2, 3, 4),
                torch.randn(2, 4),
                torch.randn(2, 3, 4),
                torch.randn(3),
                1.0,
            ),
            "trend must be",
        ),
        (
            lambda: LAUNCHERS["cache_decision"](
                torch.zeros(2, 2),
                torch.ones(1),
                torch.zeros(9),
                ref.new_state(4),
                0.1,
                1,
                0,
                0,
            ),
            "at most 8",
        ),
        (
            lambda: LAUNCHERS["cache_decision"](
                torch.zeros(2, 2).double(),
                torch.ones(1),
                torch.zeros(4),
                ref.new_state(4),
                0.1,
                1,
                0,
                0,
            ),
            "sums must be fp32",
        ),
        (
            lambda: LAUNCHERS["store_residual"](
                torch.ones(3),
                torch.ones(3),
                torch.ones(2, dtype=torch.bool),
                torch.ones(3),
            ),
            "one-element decision flag",
        ),
        (
            lambda: LAUNCHERS["apply_residual"](torch.ones(3, dtype=torch.int32), torch.ones(3)),
            "floating tensor",
        ),
    ],
)
def test_launcher_errors_say_what_to_fix(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_modulated_rejects_rows_wider_than_the_tile():
    D = 16385
    x = torch.zeros(1, 1, D)
    with pytest.raises(ValueError, match="exceeds the Triton kernel's whole-row tile"):
        LAUNCHERS["modulated_rel_l1_sums"](x, torch.zeros(1, D), torch.zeros(1, D), 1e-6, x.clone())


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        LAUNCHERS["apply_residual"](torch.ones(3), torch.ones(3))


# ------------------------------------------------------------ through the dispatcher
_DISPATCHER_SCRIPT = textwrap.dedent(
    """
    import torch
    import fastcache.ops as ops
    from fastcache.ops import reference as ref

    assert ops.BACKEND.cpu == "triton", ops.BACKEND.as_dict()
    # proof that the dispatcher reaches the Triton launcher and not the reference: the
    # interpreter truncates fp32 -> bf16 (1 + 3/512 -> 1.0), the reference rounds
    y = torch.ops.fastcache.apply_residual(torch.zeros(4, dtype=torch.bfloat16), torch.full((4,), 1 + 3 / 512))
    assert torch.equal(y, torch.ones(4, dtype=torch.bfloat16)), y
    torch.manual_seed(0)
    f = torch.ops.fastcache
    B, N, D = 2, 5, 33
    for dt in (torch.float32, torch.bfloat16):
        x, p = torch.randn(B, N, D).to(dt), torch.randn(B, N, D).to(dt)
        sh, sc, g = torch.randn(B, D).to(dt), torch.randn(B, D).to(dt), torch.randn(B, D).to(dt)
        samples = {
            "modulated_rel_l1_sums": (x, sh, sc, 1e-6, p.clone()),
            "rel_l1_sums": (x, p.clone(), True),
            "cache_decision": (torch.rand(B, 2), torch.tensor([10.0]), torch.tensor([1.0, 0.5]),
                               ref.new_state(8), 0.3, 1, 0, 0),
            "timestep_guard": (torch.tensor([10.0]), ref.new_state(8), ref.new_aux(), 1e-5, 1e-7, 4),
            "gated_residual": (x, g, p, torch.randn(N, D).to(dt), 0.1),
            "apply_residual": (x, p),
            "store_residual": (x, p, torch.tensor(True), torch.zeros(B, N, D).to(dt)),
            "apply_residual_out": (x, p, torch.empty_like(x)),
            "gated_residual_out": (x, g, p, None, 0.0, torch.empty_like(x)),
            "taylor_forecast": (torch.randn(3, B, N, D).to(dt), torch.tensor([2.0])),
            "taylor_update": (torch.randn(3, B, N, D).to(dt), x.contiguous(), torch.tensor([2.0]),
                              torch.tensor([1.0]), torch.tensor(True)),
            "forecast_residual": (x, [g, None], [torch.randn(3, B, N, D).to(dt), p], torch.tensor([2.0])),
            "taylor_update_slots": ([torch.randn(3, B, N, D).to(dt), torch.randn(2, B, N, D).to(dt)],
                                    [x.contiguous(), p], torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(True)),
            "history_combine": (torch.randn(3, B, N, D).to(dt), torch.tensor([1.0, 2.0, 2.0])),
        }
        assert set(samples) == set(ops.SCHEMAS), "opcheck every registered op"
        for name, args in samples.items():
            torch.library.opcheck(getattr(f, name).default, args)
    # the hold (repeated-call) forms: the Triton kernels load the flag themselves
    st = ref.new_state(8)
    st[3], st[1], st[9] = 20.0, 2.0, 1.0  # PREV_T, STEP, N_RUNS: mid-run
    for h in (torch.tensor(True), torch.tensor(False)):
        torch.library.opcheck(f.modulated_rel_l1_sums.default, (x, sh, sc, 1e-6, p.clone(), h))
        torch.library.opcheck(f.rel_l1_sums.default, (x, p.clone(), True, h))
        torch.library.opcheck(f.cache_decision.default, (torch.rand(B, 2), torch.tensor([10.0]),
                              torch.tensor([1.0, 0.5]), st.clone(), 0.3, 1, 0, 0, h))
    for t in (20.0, 20.0001, 10.0, 30.0):
        torch.library.opcheck(f.timestep_guard.default, (torch.tensor([t]), st.clone(), ref.new_aux(), 1e-5, 1e-7, 4))
    # quick parity through the public wrappers (dispatcher -> Triton launchers)
    x, p = torch.randn(B, N, D), torch.randn(B, N, D)
    sh, sc = torch.randn(D), torch.randn(1, D)
    pk, pr = p.clone(), p.clone()
    s_k = ops.modulated_rel_l1_sums(x, sh, sc, pk)
    s_r = ref.modulated_rel_l1_sums(x, sh[None].expand(B, D), sc.expand(B, D), 1e-6, pr)
    torch.testing.assert_close(s_k, s_r, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(pk, pr, rtol=2e-5, atol=1e-5)
    st_k, st_r = ops.new_state(8), ops.new_state(8)
    cs = torch.tensor([2.0, 0.1])
    for t in (900.0, 800.0, 700.0):
        fk = ops.cache_decision(s_k, torch.tensor(t), cs, st_k, threshold=0.5, num_steps=3)
        fr = ref.cache_decision(s_k, torch.tensor(t), cs, st_r, 0.5, 1, 0, 3)
        assert bool(fk) == bool(fr) and torch.equal(st_k.view(torch.int32), st_r.view(torch.int32))
    r = torch.zeros_like(x)
    ops.store_residual(x + 1, x, fk, r)
    torch.testing.assert_close(ops.apply_residual(x, r), x + 1)
    print("dispatcher-ok")
    """
)


def test_dispatcher_path_with_triton_backend():
    """FASTCACHE_BACKEND=triton registers the launchers for CPU: opcheck every op and
    check parity through the public wrappers, in a fresh process (backend selection
    happens at import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTCACHE_BACKEND="triton")
    proc = subprocess.run(
        [sys.executable, "-c", _DISPATCHER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"dispatcher subprocess failed:\n{proc.stderr[-6000:]}"
    assert "dispatcher-ok" in proc.stdout
