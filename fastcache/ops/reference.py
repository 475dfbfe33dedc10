"""Eager reference implementations of fastcache's fused ops.

These are the oracle for every kernel test and the fallback when neither the C++
extension (CPU) nor Triton (CUDA) is available. They are written for clarity and
exactness, not speed: every accumulation is done in fp32 (fp64 when the inputs are
fp64), in the same fixed order as the kernels' final reductions, so that the
*decision* they produce is the same on every backend.

The decision-state layout (``ACC``, ``STEP``, ... ``STATE_HEADER``, ``AUX_*``) is
defined once in :mod:`fastcache.ops.layout` and re-exported here; each op's argument
contract is :mod:`fastcache.ops.contracts`, checked at the top of every function below.
"""

from __future__ import annotations

import math

import torch

from . import contracts, layout

# The layout, re-exported: fastcache.ops and the policies import it from here.
from .layout import (  # noqa: F401
    ACC,
    AUX_JITTER,
    AUX_LAST_RUN_STEPS,
    AUX_REPEATS,
    AUX_RUN_LENGTH_MISMATCHES,
    AUX_SIZE,
    FLAG,
    MAX_COEFFS,
    N_COMPUTED,
    N_RUNS,
    N_SKIPPED,
    PREV_T,
    RATIO,
    RESCALED,
    SKIPS,
    STATE_HEADER,
    STEP,
    TIMESTEP_ATOL,
    TIMESTEP_RTOL,
)


def new_state(history: int = 1024, device=None) -> torch.Tensor:
    """A fresh decision state: zeros, PREV_T = -inf, room for ``history`` steps."""
    if history < 1:
        raise ValueError(f"history must be >= 1 steps, got {history}")
    state = torch.zeros(STATE_HEADER + 3 * history, dtype=torch.float32, device=device)
    state[PREV_T] = -math.inf
    return state


def new_aux(device=None) -> torch.Tensor:
    """Fresh sampling-run counters for :func:`timestep_guard`: ``(AUX_SIZE,)`` fp32 zeros."""
    return torch.zeros(AUX_SIZE, dtype=torch.float32, device=device)


def history_len(state: torch.Tensor) -> int:
    return layout.history_len(state.numel())


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def modulated_rel_l1_sums(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    prev: torch.Tensor,
    hold: torch.Tensor | None = None,
) -> torch.Tensor:
    """TeaCache's indicator distance, fused with the indicator itself.

    ``m = LN(x) * (1 + scale) + shift`` (LayerNorm without affine, biased variance,
    computed in fp32), then per batch element ``b``::

        sums[b, 0] = sum |m[b] - prev[b]|      sums[b, 1] = sum |prev[b]|

    and ``prev <- m`` (cast to ``prev.dtype``). TeaCache's
    ``mean|I_s - I_{s-1}| / mean|I_{s-1}|`` is ``sums[:, 0].sum() / sums[:, 1].sum()``
    (the element counts cancel). The two sums are returned before the division so a
    sequence-parallel run can all-reduce them and every rank decides alike.

    ``hold``: ``None`` or a 0-dim bool on x's device (:func:`timestep_guard`'s repeat
    flag); when it is true ``prev`` is left as it was (the sums are still computed).

    Shapes: x, prev ``(B, N, D)``; shift, scale ``(B, D)``; returns ``(B, 2)`` fp32.
    """
    contracts.check_modulated_rel_l1_sums(x, shift, scale, eps, prev, hold)
    acc = _acc_dtype(x)
    xf = x.to(acc)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)
    m = (xf - mean) * torch.rsqrt(var + eps)
    m = m * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]
    p = prev.to(acc)
    num = (m - p).abs().sum(dim=(1, 2))
    den = p.abs().sum(dim=(1, 2))
    _write_unless_held(prev, m, hold)
    return torch.stack([num, den], dim=1).to(torch.float32 if acc == torch.float32 else acc)


def _write_unless_held(prev: torch.Tensor, new: torch.Tensor, hold: torch.Tensor | None) -> None:
    """``prev <- new`` (cast to prev's dtype), or no change where the device flag ``hold``
    is set: selected on the device, never read to the host."""
    new = new.to(prev.dtype)
    if hold is None:
        prev.copy_(new)
    else:
        prev.copy_(torch.where(hold.to(torch.bool), prev, new))


def rel_l1_sums(
    x: torch.Tensor, prev: torch.Tensor, write_prev: bool, hold: torch.Tensor | None = None
) -> torch.Tensor:
    """Relative-L1 sums of an already-computed indicator of any shape ``(B, ...)``.

    For models whose indicator is a timestep embedding (CogVideoX, Wan2.1) or a
    block residual (First-Block Cache). Returns ``(B, 2)``: ``sum|x - prev|``,
    ``sum|prev|`` per batch element; ``prev <- x`` when ``write_prev`` and the
    optional 0-dim bool device flag ``hold`` is not set.
    """
    contracts.check_rel_l1_sums(x, prev, write_prev, hold)
    acc = _acc_dtype(x)
    B = x.shape[0]
    xf = x.reshape(B, -1).to(acc)
    p = prev.reshape(B, -1).to(acc)
    num = (xf - p).abs().sum(dim=1)
    den = p.abs().sum(dim=1)
    if write_prev:
        _write_unless_held(prev, x, hold)
    return torch.stack([num, den], dim=1)


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
    """One TeaCache decision on device state (docs/methods.md, TeaCache; paper Sec. 3.3).

    Mirrors the kernels exactly (fp32 scalar math). Reads ``state`` and writes it in
    place; returns a 0-dim bool tensor, True = compute the block stack.

    * A new sampling run starts when ``timestep[0] > PREV_T`` (diffusers' timesteps
      fall within a run, so a rise means the sequence restarted): ACC, STEP, SKIPS and
      the per-run counters are zeroed, N_RUNS += 1.
    * ``ratio = sum(sums[:, 0]) / sum(sums[:, 1])`` summed over b in order. ``den <= 0``
      or a non-finite ratio or rescaled value forces a compute.
    * ``rescaled = poly(ratio)`` by Horner, coefficients highest power first
      (numpy.poly1d order); no coefficients = identity.
    * Forced compute: ``STEP < max(warmup, 1)`` (step 0 has no cache), ``num_steps > 0
      and STEP >= num_steps - 1`` (the last step), ``max_skips > 0 and SKIPS >=
      max_skips``, ``threshold <= 0`` (caching disabled).
    * Otherwise ``acc = ACC + rescaled``; compute iff ``acc >= threshold``.
      On compute ACC = 0, SKIPS = 0; on skip ACC = acc, SKIPS += 1.
    * History row s (if s < H): ratio, acc before the reset (0 when forced by an
      invalid ratio), flag.
    * ``hold`` (optional 0-dim bool on the state's device, :func:`timestep_guard`'s
      repeat flag): when set, the call is a repeated evaluation of the previous step:
      the state is left exactly as it was and the result is True (compute).
    * ``accumulate=False`` (First-Block Cache, docs/methods.md section 7, FB2-FB4): the
      stored ACC is not added, ``acc = 0 + rescaled``: compute iff the step's own
      distance reaches the threshold (its indicator already measures against the last
      computed step). Everything else (forcing, history, counters) is unchanged.
    """
    contracts.check_cache_decision(
        sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold, accumulate
    )
    # Pure tensor math on the state's device: no value is read back to the host, so
    # this fallback is sync-free too (just unfused).
    f32 = torch.float32
    dev = state.device
    st = state.clone()
    t = timestep.detach().reshape(-1)[0].to(dev, f32)
    new_run = t > st[PREV_T]
    zero = torch.zeros((), dtype=f32, device=dev)
    for i in (ACC, STEP, SKIPS, N_COMPUTED, N_SKIPPED):
        st[i] = torch.where(new_run, zero, st[i])
    st[N_RUNS] = st[N_RUNS] + new_run.to(f32)
    s32 = sums.detach().to(dev, f32).reshape(-1, 2)
    num = zero
    den = zero
    for b in range(s32.shape[0]):  # fixed order, like the kernels' final sum
        num = num + s32[b, 0]
        den = den + s32[b, 1]
    nan = torch.full((), math.nan, dtype=f32, device=dev)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), nan)
    cs = coeffs.detach().to(dev, f32).reshape(-1)
    if cs.numel() == 0:
        rescaled = ratio
    else:
        rescaled = zero
        for k in range(cs.numel()):
            rescaled = rescaled * ratio + cs[k]
    valid = torch.isfinite(ratio) & torch.isfinite(rescaled)
    base = st[ACC] if accumulate else zero
    acc = torch.where(valid, base + torch.where(valid, rescaled, zero), zero)
    step = st[STEP]
    forced = (step < max(warmup, 1)) | ~valid
    if num_steps > 0:
        forced = forced | (step >= num_steps - 1)
    if max_skips > 0:
        forced = forced | (st[SKIPS] >= max_skips)
    if threshold <= 0:
        forced = torch.ones_like(forced)
    compute = forced | (acc >= torch.tensor(threshold, dtype=f32, device=dev))
    cf = compute.to(f32)
    H = history_len(state)
    if H > 0:
        # Write row `step` of the history when step < H (index clamped, value kept).
        # 1-element index tensors: a 0-dim tensor index would go through __index__,
        # which reads the value back to the host.
        idx = step.clamp(max=H - 1).to(torch.long).reshape(1)
        inside = step < H
        for row, val in ((0, ratio), (1, acc), (2, cf)):
            pos = STATE_HEADER + row * H + idx
            old = st.index_select(0, pos)
            st.index_put_((pos,), torch.where(inside, val.reshape(1), old))
    st[ACC] = torch.where(compute, zero, acc)
    st[SKIPS] = torch.where(compute, zero, st[SKIPS] + 1)
    st[RATIO] = ratio
    st[RESCALED] = rescaled
    st[FLAG] = cf
    st[N_COMPUTED] = st[N_COMPUTED] + cf
    st[N_SKIPPED] = st[N_SKIPPED] + (1 - cf)
    st[STEP] = step + 1
    st[PREV_T] = t
    if hold is None:
        state.copy_(st)
        return compute.clone()
    held = hold.to(torch.bool).reshape(())
    state.copy_(torch.where(held, state, st))
    return compute | held


def timestep_guard(
    timestep: torch.Tensor,
    state: torch.Tensor,
    aux: torch.Tensor,
    rtol: float,
    atol: float,
    num_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The timestep the decision sees, and whether this call repeats the previous one.

    Runs before :func:`cache_decision` on the same ``state`` (read only: PREV_T, STEP,
    N_RUNS) and updates the ``AUX_*`` counters of ``aux`` (``(AUX_SIZE,)`` fp32, see
    :func:`new_aux`) in place. With ``t = timestep[0]`` (fp32), ``p = PREV_T``, ``seen =
    p finite`` and ``tol = max(|t|, |p| if seen else 0) * rtol + atol``:

    * ``same = seen and |t - p| <= tol``: the same step (float jitter included): the
      decision is given ``p``, so a jittery rise does not start a new run;
    * ``hold = same and STEP > 0``: a repeated evaluation (Heun/KDPM2/PNDM's second
      call, CFG as two calls): the caller computes and leaves its cache state alone
      (the ``hold=`` argument of the indicator and decision ops);
    * ``new_run = not seen or t - p > tol``; a new run after a previous one
      (N_RUNS > 0) records that run's length (STEP) in AUX_LAST_RUN_STEPS and, when
      ``num_steps > 0`` and the length differs, counts AUX_RUN_LENGTH_MISMATCHES;
    * AUX_REPEATS counts holds, AUX_JITTER counts ``same`` calls with ``t != p``.

    Returns ``(t_op, hold)``: ``(1,)`` fp32 and a 0-dim bool on the state's device.
    Pure tensor math (no host read); every operation rounds to fp32 like the kernels.
    """
    contracts.check_timestep_guard(timestep, state, aux, rtol, atol, num_steps)
    f32 = torch.float32
    t0 = timestep.detach().reshape(-1)[:1].to(state.device, f32)
    prev_t = state[PREV_T : PREV_T + 1]
    seen = torch.isfinite(prev_t)
    scale = torch.maximum(t0.abs(), torch.where(seen, prev_t, 0.0).abs())
    tol = scale * rtol + atol
    diff = t0 - prev_t
    same = seen & (diff.abs() <= tol)
    rep = same & (state[STEP : STEP + 1] > 0)
    new_run = ~seen | (diff > tol)
    had_run = state[N_RUNS : N_RUNS + 1] > 0
    jitter = same & (diff != 0)
    aux[AUX_REPEATS : AUX_REPEATS + 1].add_(rep.to(f32))
    aux[AUX_JITTER : AUX_JITTER + 1].add_(jitter.to(f32))
    ended = new_run & had_run
    last = state[STEP : STEP + 1]
    aux[AUX_LAST_RUN_STEPS : AUX_LAST_RUN_STEPS + 1].copy_(
        torch.where(ended, last, aux[AUX_LAST_RUN_STEPS : AUX_LAST_RUN_STEPS + 1])
    )
    if num_steps > 0:
        aux[AUX_RUN_LENGTH_MISMATCHES : AUX_RUN_LENGTH_MISMATCHES + 1].add_((ended & (last != num_steps)).to(f32))
    return torch.where(same, prev_t, t0), rep.reshape(())


def gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None,
    w: float,
) -> torch.Tensor:
    """AdaLN gated residual with EOC's multiplicative trend (Qiu et al. 2025, Eq. 7).

    ``out = x + gate[:, None, :] * (cached * (1 + w * trend))`` in fp32, cast to
    ``x.dtype``. x, cached ``(B, N, D)``; gate ``(B, D)``; trend ``None``, ``(N, D)``
    or ``(D,)``. ``trend=None`` or ``w=0`` is FORA's skipped-step residual.
    """
    contracts.check_gated_residual(x, gate, cached, trend, w)
    return _gated(x, gate, cached, trend, w)


def _gated(x, gate, cached, trend, w) -> torch.Tensor:
    acc = _acc_dtype(x)
    f = cached.to(acc)
    if trend is not None and w != 0.0:
        f = f * (1 + w * trend.to(acc))
    return (x.to(acc) + gate.to(acc)[:, None, :] * f).to(x.dtype)


def gated_residual_out(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None,
    w: float,
    out: torch.Tensor,
) -> None:
    """:func:`gated_residual` written into ``out`` (x's shape and dtype). ``out`` may be
    ``x`` itself: the whole result is computed before ``out`` is written."""
    contracts.check_gated_residual_out(x, gate, cached, trend, w, out)
    out.copy_(_gated(x, gate, cached, trend, w))


def apply_residual(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A skipped stack: ``out = x + r`` (fp32 math, ``x.dtype`` out)."""
    contracts.check_apply_residual(x, r)
    return _add(x, r)


def _add(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    acc = _acc_dtype(x)
    return (x.to(acc) + r.to(acc)).to(x.dtype)


def apply_residual_out(x: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`apply_residual` written into ``out`` (x's shape and dtype; may be ``x`` or
    ``r``: an in-place ``x += r``)."""
    contracts.check_apply_residual_out(x, r, out)
    out.copy_(_add(x, r))


def store_residual(out: torch.Tensor, x_in: torch.Tensor, flag: torch.Tensor, r: torch.Tensor) -> None:
    """``r <- out - x_in`` where the device flag says the stack was computed.

    The flag is read on the device: under ``torch.cond`` the store sits outside the
    branches and must not overwrite the cache on a skipped step.
    """
    contracts.check_store_residual(out, x_in, flag, r)
    acc = _acc_dtype(out)
    new = (out.to(acc) - x_in.to(acc)).to(r.dtype)
    r.copy_(torch.where(flag.to(torch.bool), new, r))


# ---------------------------------------------------------------------------
# TaylorSeer (docs/methods.md section 8, Eq. TS1-TS2)
# ---------------------------------------------------------------------------
def taylor_forecast(history: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Eq. TS2: ``f = sum_k history[k] * dx^k / k!`` (``history[k]`` = the k-th finite
    difference D^k at the last computed step; ``dx`` = steps since then, a one-element
    device tensor). history: ``(m+1, *S)``; returns ``(*S)`` in ``history.dtype``, fp32
    math (fp64 for fp64), accumulated in the order k = 0, 1, ..., m with the coefficient
    built as ``c_k = c_{k-1} * dx / k`` (the kernels do the same)."""
    contracts.check_taylor_forecast(history, dx)
    acc = _acc_dtype(history)
    x = dx.reshape(()).to(acc)
    out = history[0].to(acc)
    c = torch.ones((), dtype=acc, device=history.device)
    for k in range(1, history.shape[0]):
        c = c * x / k
        out = out + history[k].to(acc) * c
    return out.to(history.dtype)


def taylor_update(
    history: torch.Tensor, f: torch.Tensor, dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> None:
    """Eq. TS1 in place, iff the 0-dim bool device flag ``store`` is set:
    ``D^0 <- f``; ``D^{k+1} <- (D^k_new - D^k_old) / dx`` for ``k < valid`` (the orders
    the history held before this update), else 0. history: ``(m+1, *S)``; f: ``(*S)``;
    dx, valid: one-element float tensors (steps since the previous computed step; number
    of valid orders, 0 after a reset). fp32 math (fp64 for fp64)."""
    contracts.check_taylor_update(history, f, dx, valid, store)
    acc = _acc_dtype(history)
    x = dx.reshape(()).to(acc)
    nv = valid.reshape(()).to(acc)
    d = f.to(acc)
    new = []
    m = history.shape[0] - 1
    for k in range(m + 1):
        old = history[k].to(acc)
        new.append(d)
        if k < m:
            d = torch.where(nv > k, (d - old) / x, torch.zeros_like(d))
    new_h = torch.stack(new).to(history.dtype)
    history.copy_(torch.where(store.to(torch.bool), new_h, history))


# ---------------------------------------------------------------------------
# Whole-stack forecast / reuse and the multi-slot history update (every step at its floor)
# ---------------------------------------------------------------------------
def _gate3(gate: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A gate of any accepted shape as ``(B|1, 1, D)`` in ``acc`` (broadcast over tokens)."""
    if gate.dim() == 1:
        return gate.to(acc)[None, None]
    if gate.dim() == 2:
        return gate.to(acc)[:, None]
    return gate.to(acc)


def _slot_feature(h: torch.Tensor, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """A slot's feature in its own dtype: the cached tensor itself (``h`` of x's rank) or
    the Taylor forecast of a ``(m+1, *x.shape)`` history (:func:`taylor_forecast`'s arithmetic)."""
    if h.dim() == x.dim():
        return h
    acc = _acc_dtype(h)
    xv = dx.reshape(()).to(acc)
    out = h[0].to(acc)
    c = torch.ones((), dtype=acc, device=h.device)
    for k in range(1, h.shape[0]):
        c = c * xv / k
        out = out + h[k].to(acc) * c
    return out.to(h.dtype)


def forecast_residual(
    x: torch.Tensor, gates: list[torch.Tensor | None], histories: list[torch.Tensor], dx: torch.Tensor
) -> torch.Tensor:
    """Every slot of one stream of a forecast / reused stack in one op:
    ``out = x; for i: out = out + gate_i * f_i`` (fp32 math, rounded to ``x.dtype`` after
    each slot, as the per-block path rounds the stream after each residual), with
    ``f_i`` = ``histories[i]`` itself when it has x's shape (FORA's cached branch output)
    or the Taylor forecast of the ``(m+1, *x.shape)`` history at ``dx`` (rounded to its
    dtype, as :func:`taylor_forecast` returns it). ``gates[i]`` None: an ungated residual
    ``out + f_i``. x ``(B, N, D)``; a gate ``(B, 1, D)``, ``(B, D)``, ``(1, D)`` or
    ``(D,)``, any strides. Bitwise what :func:`taylor_forecast` + :func:`gated_residual` /
    :func:`apply_residual` give slot by slot."""
    contracts.check_forecast_residual(x, gates, histories, dx)
    acc = _acc_dtype(x)
    out = x
    for g, h in zip(gates, histories):
        f = _slot_feature(h, x, dx).to(acc)
        if g is None:
            out = (out.to(acc) + f).to(x.dtype)
        else:
            out = (out.to(acc) + _gate3(g, acc) * f).to(x.dtype)
    return out.clone(memory_format=torch.contiguous_format) if out is x else out.contiguous()


def taylor_update_slots(
    histories: list[torch.Tensor], fs: list[torch.Tensor], dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> None:
    """:func:`taylor_update` of every slot in one op: ``histories[i]`` from ``fs[i]``, one
    ``dx`` / ``valid`` / ``store`` for all (a computed step updates every slot)."""
    contracts.check_taylor_update_slots(histories, fs, dx, valid, store)
    for h, f in zip(histories, fs):
        taylor_update(h, f, dx, valid, store)


# ---------------------------------------------------------------------------
# Fitted filler (docs/methods.md section 12, "Fitted filler")
# ---------------------------------------------------------------------------
def history_combine(history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A fixed linear combination of the history's rows: ``out = sum_k weights[k] *
    history[k]``, accumulated in the order k = 0, 1, ..., m as ``acc = w_0 h_0``, then
    ``acc = acc + h_k w_k`` (the kernels do the same). history: ``(m+1, *S)``; weights:
    ``(m+1,)`` fp32 (fp64 math for an fp64 history); returns ``(*S)`` in history.dtype.
    With ``weights = (1, c_1, ..., c_m)``, ``c_k = c_{k-1} * dx / k`` in fp32, this is
    :func:`taylor_forecast` bit for bit."""
    contracts.check_history_combine(history, weights)
    acc = _acc_dtype(history)
    w = weights.to(acc)
    out = history[0].to(acc) * w[0]
    for k in range(1, history.shape[0]):
        out = out + history[k].to(acc) * w[k]
    return out.to(history.dtype)
