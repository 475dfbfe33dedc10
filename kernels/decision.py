"""``cache_decision``: the whole TeaCache decision as one single-program kernel (Triton).

TeaCache (Liu et al., arXiv 2411.19108, Sec. 3.3; docs/methods.md): ``d_s = sum num /
sum den``, ``A <- A + poly(d_s)``, compute iff a step is forced or ``A >= threshold``.
Everything happens on the device on a flat fp32 ``state`` (layout: the table in
:mod:`fastcache.ops.layout`, whose numbers the kernels read as ``tl.constexpr`` globals);
the launcher never reads a value back to the host, so a sampling loop can decide,
branch (``torch.cond``) and record its history without a single synchronisation.

Bitwise contract with the reference: scalar fp32 math in the reference's order.
``sum over b`` runs 0..B-1 sequentially; the division is IEEE (``div_rn``: a plain
``/`` compiles to the approximate ``div.full.f32``); Horner ``r = r * ratio + c`` must
not be contracted into an FMA (the reference rounds the product), so the kernel is
always launched with :data:`COMPILE_OPTIONS` (``enable_fp_fusion=False``), which makes
the PTX keep ``mul.rn.f32`` + ``add.rn.f32`` (tests/ops/test_ptx.py checks it).

Example::

    flag = cache_decision(sums, t, coeffs, state, 0.25, 1, 0, 28)   # 0-dim bool, on device
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts, layout

from ._checks import Launch, check_contiguous, check_triton_device, to_fp32

# FMA contraction would change the Horner bits vs the reference: never fuse here.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# The state and aux layouts (fastcache/ops/layout.py) as globals a jit function may read.
_HEADER: tl.constexpr = tl.constexpr(layout.STATE_HEADER)
_ACC: tl.constexpr = tl.constexpr(layout.ACC)
_STEP: tl.constexpr = tl.constexpr(layout.STEP)
_SKIPS: tl.constexpr = tl.constexpr(layout.SKIPS)
_PREV_T: tl.constexpr = tl.constexpr(layout.PREV_T)
_RATIO: tl.constexpr = tl.constexpr(layout.RATIO)
_RESCALED: tl.constexpr = tl.constexpr(layout.RESCALED)
_FLAG: tl.constexpr = tl.constexpr(layout.FLAG)
_N_COMPUTED: tl.constexpr = tl.constexpr(layout.N_COMPUTED)
_N_SKIPPED: tl.constexpr = tl.constexpr(layout.N_SKIPPED)
_N_RUNS: tl.constexpr = tl.constexpr(layout.N_RUNS)
_AUX_REPEATS: tl.constexpr = tl.constexpr(layout.AUX_REPEATS)
_AUX_LAST_RUN_STEPS: tl.constexpr = tl.constexpr(layout.AUX_LAST_RUN_STEPS)
_AUX_RUN_LENGTH_MISMATCHES: tl.constexpr = tl.constexpr(layout.AUX_RUN_LENGTH_MISMATCHES)
_AUX_JITTER: tl.constexpr = tl.constexpr(layout.AUX_JITTER)


@triton.jit
def _cache_decision_kernel(
    sums_ptr,
    t_ptr,
    coeffs_ptr,
    state_ptr,
    flag_ptr,
    B,
    n_coeffs,
    H,
    threshold,
    min_steps,
    last_step,
    max_skips,
    has_last,
    has_max_skips,
    caching_off,
    hold_ptr,
    HAS_HOLD: tl.constexpr,
    ACCUMULATE: tl.constexpr = True,
):
    # hold (timestep_guard's repeat flag) is read here, on the device: when set, no store
    # to the state happens and the flag is True (compute)
    if HAS_HOLD:
        keep = tl.load(hold_ptr) == 0
    else:
        keep = tl.full([], 1, tl.int1)
    t = tl.load(t_ptr).to(tl.float32)
    acc_prev = tl.load(state_ptr + _ACC)
    step = tl.load(state_ptr + _STEP)
    skips = tl.load(state_ptr + _SKIPS)
    prev_t = tl.load(state_ptr + _PREV_T)
    n_computed = tl.load(state_ptr + _N_COMPUTED)
    n_skipped = tl.load(state_ptr + _N_SKIPPED)
    n_runs = tl.load(state_ptr + _N_RUNS)

    # Diffusers' timesteps fall within a run: a rise means the sampler restarted.
    new_run = t > prev_t
    acc_prev = tl.where(new_run, 0.0, acc_prev)
    step = tl.where(new_run, 0.0, step)
    skips = tl.where(new_run, 0.0, skips)
    n_computed = tl.where(new_run, 0.0, n_computed)
    n_skipped = tl.where(new_run, 0.0, n_skipped)
    n_runs = n_runs + tl.where(new_run, 1.0, 0.0)

    num = tl.zeros([], dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    for b in range(B):  # fixed order, the reference's
        num = num + tl.load(sums_ptr + 2 * b)
        den = den + tl.load(sums_ptr + 2 * b + 1)
    den_ok = den > 0.0
    safe_den = tl.where(den_ok, den, 1.0)
    ratio = tl.where(den_ok, tl.math.div_rn(num, safe_den), float("nan"))

    poly = tl.zeros([], dtype=tl.float32)
    for k in range(n_coeffs):  # Horner, highest power first (numpy.poly1d order)
        poly = poly * ratio + tl.load(coeffs_ptr + k)
    rescaled = tl.where(n_coeffs > 0, poly, ratio)

    finite_ratio = tl.abs(ratio) < float("inf")  # False for NaN too
    valid = finite_ratio & (tl.abs(rescaled) < float("inf"))
    if not ACCUMULATE:  # First-Block Cache: 0 + rescaled, the reference's order
        acc_prev = tl.zeros([], dtype=tl.float32)
    acc = tl.where(valid, acc_prev + tl.where(valid, rescaled, 0.0), 0.0)
    forced = (step < min_steps) | (valid == 0)
    forced = forced | ((has_last != 0) & (step >= last_step))
    forced = forced | ((has_max_skips != 0) & (skips >= max_skips))
    forced = forced | (caching_off != 0)
    compute = forced | (acc >= threshold)
    cf = tl.where(compute, 1.0, 0.0)

    # History row `step` when it fits: ratio, acc before the reset, flag.
    inside = (step < H) & keep
    row = tl.where(inside, step, 0.0).to(tl.int32)
    hist = state_ptr + _HEADER + row
    tl.store(hist, ratio, mask=inside)
    tl.store(hist + H, acc, mask=inside)
    tl.store(hist + 2 * H, cf, mask=inside)

    tl.store(state_ptr + _ACC, tl.where(compute, 0.0, acc), mask=keep)
    tl.store(state_ptr + _STEP, step + 1.0, mask=keep)
    tl.store(state_ptr + _SKIPS, tl.where(compute, 0.0, skips + 1.0), mask=keep)
    tl.store(state_ptr + _PREV_T, t, mask=keep)
    tl.store(state_ptr + _RATIO, ratio, mask=keep)
    tl.store(state_ptr + _RESCALED, rescaled, mask=keep)
    tl.store(state_ptr + _FLAG, cf, mask=keep)
    tl.store(state_ptr + _N_COMPUTED, n_computed + cf, mask=keep)
    tl.store(state_ptr + _N_SKIPPED, n_skipped + (1.0 - cf), mask=keep)
    tl.store(state_ptr + _N_RUNS, n_runs, mask=keep)
    tl.store(flag_ptr, compute | (keep == 0))


@triton.jit
def _timestep_guard_kernel(
    t_ptr, state_ptr, aux_ptr, t_op_ptr, hold_ptr, rtol, atol, num_steps, HAS_NUM_STEPS: tl.constexpr
):
    """fastcache.ops.reference.timestep_guard as one program: fp32 scalar math in the
    reference's order (tol = scale * rtol + atol, two roundings: launched without FMA)."""
    t0 = tl.load(t_ptr).to(tl.float32)
    step = tl.load(state_ptr + _STEP)
    prev_t = tl.load(state_ptr + _PREV_T)
    n_runs = tl.load(state_ptr + _N_RUNS)
    seen = tl.abs(prev_t) < float("inf")  # isfinite (False for NaN too)
    scale = tl.maximum(tl.abs(t0), tl.abs(tl.where(seen, prev_t, 0.0)))
    tol = scale * rtol + atol
    diff = t0 - prev_t
    same = seen & (tl.abs(diff) <= tol)
    rep = same & (step > 0.0)
    new_run = (seen == 0) | (diff > tol)
    jitter = same & (diff != 0.0)
    ended = new_run & (n_runs > 0.0)
    tl.store(aux_ptr + _AUX_REPEATS, tl.load(aux_ptr + _AUX_REPEATS) + tl.where(rep, 1.0, 0.0))
    tl.store(aux_ptr + _AUX_LAST_RUN_STEPS, tl.where(ended, step, tl.load(aux_ptr + _AUX_LAST_RUN_STEPS)))
    if HAS_NUM_STEPS:
        mismatch = ended & (step != num_steps)
        n_mismatch = tl.load(aux_ptr + _AUX_RUN_LENGTH_MISMATCHES)
        tl.store(aux_ptr + _AUX_RUN_LENGTH_MISMATCHES, n_mismatch + tl.where(mismatch, 1.0, 0.0))
    tl.store(aux_ptr + _AUX_JITTER, tl.load(aux_ptr + _AUX_JITTER) + tl.where(jitter, 1.0, 0.0))
    tl.store(t_op_ptr, tl.where(same, prev_t, t0))
    tl.store(hold_ptr, rep)


def cache_decision(
    sums: torch.Tensor,
    timestep: torch.Tensor,
    coeffs: torch.Tensor,
    state: torch.Tensor,
    threshold: float,
    warmup: int,
    max_skips: int,
    num_steps: int,
    hold: torch.Tensor | None = None,
    accumulate: bool = True,
) -> torch.Tensor:
    """Schema ``cache_decision(Tensor sums, Tensor timestep, Tensor coeffs, Tensor(a!) state,
    float threshold, int warmup, int max_skips, int num_steps, Tensor? hold=None,
    bool accumulate=True) -> Tensor`` (``accumulate=False``: no accumulator, First-Block Cache).

    sums ``(B, 2)`` or ``(2,)`` fp32; timestep: any shape, element 0 is read on the
    device (int timesteps are cast to fp32 on the device first); coeffs ``(K,)`` fp32,
    ``K <= MAX_COEFFS``; state 1-D fp32 from ``fastcache.ops.new_state``; hold ``None`` or a one-value
    bool (loaded by the kernel: set = state untouched, True returned). Returns a 0-dim bool
    on the state's device (True = compute). See :func:`fastcache.ops.reference.cache_decision`.
    """
    op = "fastcache::cache_decision"
    contracts.check_cache_decision(
        sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold, accumulate
    )
    for name, t in (("sums", sums), ("coeffs", coeffs), ("state", state)):
        check_contiguous(op, name, t)  # read and written through flat offsets
    check_triton_device(op, "state", state)
    launch, flag = plan_cache_decision(
        sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold, accumulate
    )
    launch.run()
    return flag


def plan_cache_decision(
    sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold=None, accumulate=True
):
    """The single-program launch of the decision and its 0-dim bool output (checked args)."""
    if not timestep.is_floating_point():
        # Device-side cast (an int tensor cannot be loaded as fp32); no host read.
        timestep = timestep.reshape(-1)[:1].to(torch.float32)
    # element 0 of any-strided timestep: data_ptr() is the address of index (0, ..., 0)
    flag = torch.empty((), dtype=torch.bool, device=state.device)
    B = sums.numel() // 2
    H = layout.history_len(state.numel())
    args = (
        sums, timestep, coeffs, state, flag, B, coeffs.numel(), H, to_fp32(threshold), max(int(warmup), 1),
        int(num_steps) - 1, int(max_skips), int(int(num_steps) > 0), int(int(max_skips) > 0), int(threshold <= 0),
        flag if hold is None else hold,  # an unused pointer when there is no hold
    )  # fmt: skip
    constexprs = {"HAS_HOLD": hold is not None, "ACCUMULATE": bool(accumulate)}
    return Launch(_cache_decision_kernel, (1,), args, constexprs, {"num_warps": 1, **COMPILE_OPTIONS}), flag


def timestep_guard(
    timestep: torch.Tensor, state: torch.Tensor, aux: torch.Tensor, rtol: float, atol: float, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Schema ``timestep_guard(Tensor timestep, Tensor state, Tensor(a!) aux, float rtol, float atol,
    int num_steps) -> (Tensor, Tensor)``.

    timestep: any shape, element 0 read on the device; state: 1-D fp32 decision state
    (read only); aux: contiguous ``(AUX_SIZE,)`` fp32 counters (updated in place). Returns
    ``(t_op (1,) fp32, hold 0-dim bool)`` on the state's device. See
    :func:`fastcache.ops.reference.timestep_guard`.
    """
    op = "fastcache::timestep_guard"
    contracts.check_timestep_guard(timestep, state, aux, rtol, atol, num_steps)
    check_contiguous(op, "state", state)  # read through flat offsets
    check_triton_device(op, "state", state)
    launch, t_op, hold = plan_timestep_guard(timestep, state, aux, rtol, atol, num_steps)
    launch.run()
    return t_op, hold


def plan_timestep_guard(timestep, state, aux, rtol, atol, num_steps):
    """The single-program launch of the guard and its ``(1,)`` fp32 / 0-dim bool outputs."""
    if not timestep.is_floating_point():
        timestep = timestep.reshape(-1)[:1].to(torch.float32)  # device-side cast, no host read
    t_op = torch.empty((1,), dtype=torch.float32, device=state.device)
    hold = torch.empty((), dtype=torch.bool, device=state.device)
    args = (timestep, state, aux, t_op, hold, to_fp32(rtol), to_fp32(atol), float(int(num_steps)))
    constexprs = {"HAS_NUM_STEPS": int(num_steps) > 0}
    return Launch(_timestep_guard_kernel, (1,), args, constexprs, {"num_warps": 1, **COMPILE_OPTIONS}), t_op, hold
