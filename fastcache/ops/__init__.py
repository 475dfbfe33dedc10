"""fastcache's fused ops: the public Python entry points.

Each function normalises broadcastable shapes, checks the op's argument contract
(:mod:`fastcache.ops.contracts`: metadata only, no value is read from the device;
the residual ops leave it to the op itself) and calls the dispatcher op
``torch.ops.fastcache.<name>``, which runs the C++ kernel on CPU, the Triton kernel on
CUDA, or the eager reference (:mod:`fastcache.ops.reference`). Inputs may have any
strides (read in place, not copied); the Triton kernels also need the buffers they
write in place (``prev``, ``r``) contiguous. ``apply_residual`` and ``gated_residual`` take
``out=`` to write a buffer the caller keeps (``out=x`` updates x in place).

Example::

    prev = torch.zeros_like(x)                       # (B, N, D), device-resident
    state = fastcache.ops.new_state(device=x.device)
    aux = fastcache.ops.new_aux(device=x.device)
    t_op, hold = fastcache.ops.timestep_guard(t, state, aux, num_steps=28)   # repeated call?
    sums = fastcache.ops.modulated_rel_l1_sums(x, shift, scale, prev, hold=hold)     # (B, 2)
    flag = fastcache.ops.cache_decision(sums, t_op, coeffs, state, threshold=0.25, hold=hold)
    h = fastcache.ops.apply_residual(h, residual, out=h)                 # skipped step, in place
"""

from __future__ import annotations

import torch

from . import _library, contracts, reference
from ._library import BACKEND, SCHEMAS
from .layout import (
    AUX_JITTER,
    AUX_LAST_RUN_STEPS,
    AUX_REPEATS,
    AUX_RUN_LENGTH_MISMATCHES,
    AUX_SIZE,
    MAX_COEFFS,
    STATE_HEADER,
    TIMESTEP_ATOL,
    TIMESTEP_RTOL,
)
from .reference import history_len, new_aux, new_state

__all__ = [
    "AUX_JITTER",
    "AUX_LAST_RUN_STEPS",
    "AUX_REPEATS",
    "AUX_RUN_LENGTH_MISMATCHES",
    "AUX_SIZE",
    "BACKEND",
    "SCHEMAS",
    "MAX_COEFFS",
    "STATE_HEADER",
    "TIMESTEP_ATOL",
    "TIMESTEP_RTOL",
    "apply_residual",
    "cache_decision",
    "contracts",
    "gated_residual",
    "history_combine",
    "history_len",
    "modulated_rel_l1_sums",
    "new_aux",
    "new_state",
    "reference",
    "rel_l1_ratio",
    "rel_l1_sums",
    "store_residual",
    "taylor_forecast",
    "taylor_update",
    "timestep_guard",
    "forecast_residual",
    "taylor_update_slots",
]

_ops = torch.ops.fastcache
# The residual ops are called once per block (or stack) per step: their wrappers are
# kept minimal. Their contract (shape, dtype, device, overlap) is checked by the ops
# themselves (C++; Triton and the reference call fastcache.ops.contracts), and in eager mode the wrappers call the
# OpOverload's dispatcher entry (``OpOverload._op``, what ``OpOverload.__call__`` itself
# calls: the same dispatcher path, minus one Python frame). Measured with cold caches on
# a DiT-XL/2 256px tensor, that frame and the wrapper's former checks cost 5-10 us of a
# ~80 us op (bench/README.md). Under torch.compile the wrappers call the OpOverload,
# which is what dynamo traces (is_dynamo_compiling() is constant-folded there).
_apply_residual = _ops.apply_residual.default
_apply_residual_out = _ops.apply_residual_out.default
_gated_residual = _ops.gated_residual.default
_gated_residual_out = _ops.gated_residual_out.default
_store_residual = _ops.store_residual.default
_raw_apply_residual = _apply_residual._op
_raw_apply_residual_out = _apply_residual_out._op
_raw_gated_residual = _gated_residual._op
_raw_gated_residual_out = _gated_residual_out._op
_raw_store_residual = _store_residual._op
_dynamo_compiling = torch.compiler.is_dynamo_compiling


def _compiled_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` in eager mode; ``t.contiguous()`` while dynamo traces.

    The kernels read strided inputs in place, which is what saves the per-step copy in
    eager mode. In a compiled graph, strided inputs reaching the ops made inductor's
    torch.cond subgraphs disagree about the hidden states' layout (a stride assertion
    in tests/runtime/test_compile.py on PixArt and the reference DiT, whose patch
    embeddings are transposed views), so under torch.compile the ops get contiguous
    inputs as before; inductor can fuse that copy into the producer.
    """
    return t.contiguous() if _dynamo_compiling() else t


def _per_sample_vec(op: str, name: str, v: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Accept (B, D), (B, 1, D), (1, D), (D,) modulation vectors; return contiguous (B, D)."""
    if v.dim() == 3 and v.shape[1] == 1:
        v = v[:, 0]
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[-1] != D or v.shape[0] not in (1, B):
        raise ValueError(
            f"fastcache.ops.{op}: {name} must have shape (B, D), (B, 1, D), (1, D) or (D,) with B={B}, D={D}; "
            f"got {tuple(v.shape)}"
        )
    return v.expand(B, D).contiguous()


def modulated_rel_l1_sums(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    prev: torch.Tensor,
    eps: float = 1e-6,
    hold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``m = LN(x)*(1+scale)+shift``; per-sample ``[sum|m-prev|, sum|prev|]``; ``prev <- m``.

    x, prev: ``(B, N, D)``; shift, scale: ``(B, D)`` (or broadcastable, see above).
    ``hold``: optional 0-dim bool device flag (from :func:`timestep_guard`): when true,
    ``prev`` is not written (a repeated call must not move the indicator); the sums are
    computed either way. Returns ``(B, 2)`` fp32. See
    :func:`fastcache.ops.reference.modulated_rel_l1_sums`.
    """
    if x.dim() == 3:  # anything else: the contract says what is wrong
        B, _, D = x.shape
        shift = _per_sample_vec("modulated_rel_l1_sums", "shift", shift, B, D)
        scale = _per_sample_vec("modulated_rel_l1_sums", "scale", scale, B, D)
    contracts.check_modulated_rel_l1_sums(x, shift, scale, eps, prev, hold)
    # x goes in with its strides (a transposed patch-embedding view is read in place,
    # not copied whole every step); see _compiled_layout for torch.compile
    return _ops.modulated_rel_l1_sums(_compiled_layout(x), shift, scale, float(eps), prev, hold)


def rel_l1_sums(
    x: torch.Tensor, prev: torch.Tensor, write_prev: bool = True, hold: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample ``[sum|x-prev|, sum|prev|]`` of an indicator of any shape ``(B, ...)``.

    ``x`` may have any strides (read in its logical order, no copy for 1-3-D views);
    ``prev`` must be contiguous; ``prev <- x`` when ``write_prev`` and the optional
    0-dim bool device flag ``hold`` (from :func:`timestep_guard`) is not set.
    Returns ``(B, 2)`` fp32 (fp64 for fp64 x).
    """
    contracts.check_rel_l1_sums(x, prev, write_prev, hold)
    return _ops.rel_l1_sums(_compiled_layout(x), prev, bool(write_prev), hold)


def rel_l1_ratio(sums: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``sum num / sum den`` (0-dim), or one ratio per batch element with ``per_sample``."""
    sums = sums.reshape(-1, 2)
    if per_sample:
        return sums[:, 0] / sums[:, 1]
    return sums[:, 0].sum() / sums[:, 1].sum()


def cache_decision(
    sums: torch.Tensor,
    timestep: torch.Tensor,
    coeffs: torch.Tensor,
    state: torch.Tensor,
    threshold: float,
    warmup: int = 1,
    max_skips: int = 0,
    num_steps: int = 0,
    hold: torch.Tensor | None = None,
    accumulate: bool = True,
) -> torch.Tensor:
    """The whole TeaCache decision as one device op; returns a 0-dim bool (True = compute).

    ``accumulate=False``: no accumulation, compute iff this step's (rescaled) distance
    reaches ``threshold`` or a step is forced (First-Block Cache, docs/methods.md section 7).

    ``hold``: optional 0-dim bool device flag (from :func:`timestep_guard`): when true
    the state is left exactly as it was and the result is True (a repeated call
    computes). See :func:`fastcache.ops.reference.cache_decision` for the exact semantics.
    """
    if sums.dtype == torch.float64:  # fp64 models: the decision itself runs in fp32
        sums = sums.float()
    sums = sums.contiguous()
    contracts.check_cache_decision(sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold)
    return _ops.cache_decision(
        sums,
        timestep,
        coeffs,
        state,
        float(threshold),
        int(warmup),
        int(max_skips),
        int(num_steps),
        hold,
        bool(accumulate),
    )


def timestep_guard(
    timestep: torch.Tensor,
    state: torch.Tensor,
    aux: torch.Tensor,
    num_steps: int = 0,
    *,
    rtol: float = TIMESTEP_RTOL,
    atol: float = TIMESTEP_ATOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Before a decision: ``(t_op, hold)``, the timestep the decision sees (float jitter
    removed) and whether this call repeats the previous call's timestep.

    timestep: any shape, element 0 is read on the device; state: the decision state
    (:func:`new_state`) the decision op updates right after (read only here); aux:
    ``(AUX_SIZE,)`` fp32 run counters (:func:`new_aux`, updated in place). Returns a
    ``(1,)`` fp32 ``t_op`` and a 0-dim bool ``hold``, on the state's device, with no host
    read. Pass ``t_op`` to :func:`cache_decision` and ``hold`` to the indicator and the
    decision ops; a held call computes and must not store its residual (gate the store
    with ``flag & ~hold``). See :func:`fastcache.ops.reference.timestep_guard`.
    """
    contracts.check_timestep_guard(timestep, state, aux, rtol, atol, num_steps)
    return _ops.timestep_guard(timestep, state, aux, float(rtol), float(atol), int(num_steps))


def gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None = None,
    w: float = 0.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + gate[:, None] * (cached * (1 + w * trend))`` (EOC, Qiu et al. 2025, Eq. 7;
    FORA when ``w = 0`` or no trend; docs/methods.md).

    x, cached: ``(B, N, D)``, any strides (read in place, not copied); gate: ``(B, D)``,
    ``(B, 1, D)``, ``(1, D)`` or ``(D,)``; trend: ``None``, ``(N, D)``, ``(1, N, D)`` or
    ``(D,)``. fp32 math, result in ``x.dtype``.

    ``out=None`` returns a new tensor (``torch.empty_like(x)``): the functional form, the
    one to use inside ``torch.cond`` branches. ``out=buf`` writes the result into ``buf``
    (x's shape and dtype, any layout viewable as (B, N, D)) and returns it: no
    allocation, so no fresh pages to fault in every step. ``buf`` may be ``x`` itself
    (``x`` updated in place); any other overlap with ``x`` or ``cached`` is an error.
    Under ``torch.compile`` pass a buffer distinct from the inputs.

    Example::

        h = gated_residual(h, gate_msa, attn_cache, out=h)     # FORA skipped branch, in place
    """
    if x.dim() != 3:
        contracts.check_gated_residual(x, gate, cached, trend, w)  # raises: x must be (B, N, D)
    B, N, D = x.shape
    if gate.dim() != 2 or gate.shape[0] != B or not gate.is_contiguous():
        gate = _per_sample_vec("gated_residual", "gate", gate, B, D)
    if trend is not None:
        if tuple(trend.shape) not in ((N, D), (1, N, D), (D,)):
            contracts.check_gated_residual(x, gate, cached, trend, w)  # raises: the trend's accepted shapes
        trend = trend.reshape(-1, D).contiguous() if trend.dim() != 1 else trend.contiguous()
    if _dynamo_compiling():
        x, cached = x.contiguous(), cached.contiguous()  # see _compiled_layout
        if out is None:
            return _gated_residual(x, gate, cached, trend, float(w))
        _gated_residual_out(x, gate, cached, trend, float(w), out)
        return out
    if out is None:
        return _raw_gated_residual(x, gate, cached, trend, float(w))
    _raw_gated_residual_out(x, gate, cached, trend, float(w), out)
    return out


def apply_residual(x: torch.Tensor, r: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A skipped stack: ``x + r`` (fp32 math, result in ``x.dtype``).

    x, r: one shape, any strides (read in place). ``out=None`` returns a new tensor
    (functional: use it inside ``torch.cond`` branches). ``out=buf`` writes into ``buf``
    (x's shape and dtype) and returns it, with no allocation; ``buf`` may be ``x`` (the
    in-place ``x += r``) or ``r``; any other overlap with them is an error.

    Example::

        h = apply_residual(h, cache.residual, out=h)            # TeaCache skipped step, in place
    """
    if _dynamo_compiling():
        x, r = x.contiguous(), r.contiguous()  # see _compiled_layout
        if out is None:
            return _apply_residual(x, r)
        _apply_residual_out(x, r, out)
        return out
    if out is None:
        return _raw_apply_residual(x, r)
    _raw_apply_residual_out(x, r, out)
    return out


def store_residual(out: torch.Tensor, x_in: torch.Tensor, flag: torch.Tensor, r: torch.Tensor) -> None:
    """``r <- out - x_in`` iff the device flag is set (no host read).

    out, x_in: the block stack's output and input, any strides; r: the cache buffer
    (contiguous, or any layout the backend can write in place), one shape for all three.
    """
    if _dynamo_compiling():
        _store_residual(out.contiguous(), x_in.contiguous(), flag, r)  # see _compiled_layout
    else:
        _raw_store_residual(out, x_in, flag, r)


def taylor_forecast(history: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """TaylorSeer's forecast (docs/methods.md Eq. TS2): ``sum_k history[k] * dx^k / k!``.

    history: ``(m+1, *S)`` contiguous, ``history[k]`` the k-th finite difference at the
    last computed step; dx: a ``(1,)`` fp32 device tensor, the steps since that step (a
    device value, so a compiled graph does not change from step to step). Returns
    ``(*S)`` in ``history.dtype`` (fp32 math, fp64 for fp64). No host read.

    Example::

        f_hat = taylor_forecast(hist, torch.tensor([2.0]))   # two steps after the last compute
    """
    contracts.check_taylor_forecast(history, dx)
    return _ops.taylor_forecast(history, dx.reshape(1))


def taylor_update(
    history: torch.Tensor, f: torch.Tensor, dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> None:
    """TaylorSeer's finite-difference update in place (docs/methods.md Eq. TS1), iff the
    0-dim bool device flag ``store`` is set: ``D^0 <- f``, ``D^{k+1} <- (D^k_new -
    D^k_old) / dx`` for the ``valid`` orders the history already held, 0 above them.

    history: ``(m+1, *S)`` contiguous (written in place); f: ``(*S)`` (any strides: made
    contiguous); dx, valid: ``(1,)`` fp32 device tensors (steps since the previous
    computed step; orders held, 0 after a reset); store: 0-dim bool. No host read: under
    torch.cond the update sits outside the branches and runs every step, gated by
    ``store``.
    """
    f = f.contiguous()
    contracts.check_taylor_update(history, f, dx, valid, store)
    _ops.taylor_update(history, f, dx.reshape(1), valid.reshape(1), store.reshape(()))


_forecast_residual = _ops.forecast_residual.default
_raw_forecast_residual = _forecast_residual._op
_taylor_update_slots = _ops.taylor_update_slots.default
_raw_taylor_update_slots = _taylor_update_slots._op


def forecast_residual(
    x: torch.Tensor, gates: list[torch.Tensor | None], histories: list[torch.Tensor], dx: torch.Tensor
) -> torch.Tensor:
    """Every reused / forecast slot of one stream in one op: ``out = x``, then for each slot
    in order ``out = out + gates[i] * f_i`` (fp32 math, the stream rounded to x's dtype after
    each slot, as block-by-block residuals round it). ``f_i``: ``histories[i]`` itself when
    it has x's shape (FORA's cached branch output), else the Taylor forecast of the
    ``(m+1, *x.shape)`` history at ``dx`` (:func:`taylor_forecast`, rounded to its dtype).

    x: ``(B, N, D)``; gates: per slot ``(B, 1, D)``, ``(B, D)``, ``(1, D)``, ``(D,)`` (any
    strides: the chunks of a block's modulation are read in place) or None (an ungated
    residual, e.g. PixArt's cross-attention); dx: a ``(1,)`` fp32 device tensor (unused by
    plain cached features). Returns a new contiguous tensor. Bitwise the per-slot
    :func:`taylor_forecast` + :func:`gated_residual` / :func:`apply_residual`. No host read.

    Example::

        h = forecast_residual(h, [g_attn, g_mlp], [hist_attn, hist_mlp], dx)   # two slots, one op
    """
    if _dynamo_compiling():
        return _forecast_residual(x.contiguous(), list(gates), list(histories), dx)
    return _raw_forecast_residual(x, gates, histories, dx)


def taylor_update_slots(
    histories: list[torch.Tensor], fs: list[torch.Tensor], dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> None:
    """:func:`taylor_update` of every slot in one op (a computed step updates every slot's
    history with one ``dx`` / ``valid`` / ``store``): histories ``(m+1, *S_i)`` contiguous,
    written in place; fs ``(*S_i)`` (made contiguous where they are not); dx, valid ``(1,)``
    fp32; store 0-dim bool. No host read."""
    fs = [f if f.is_contiguous() else f.contiguous() for f in fs]
    if _dynamo_compiling():
        _taylor_update_slots(list(histories), fs, dx, valid, store.reshape(()))
    else:
        _raw_taylor_update_slots(histories, fs, dx, valid, store)


def history_combine(history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A fitted forecast from the Taylor history (docs/methods.md section 12, "Fitted
    filler"): ``sum_k weights[k] * history[k]``, accumulated in the order k = 0..m.

    history: ``(m+1, *S)`` contiguous (the finite differences of
    :func:`taylor_update`); weights: ``(m+1,)`` fp32 on history's device (written by the
    host at plan time, never read back). Returns ``(*S)`` in ``history.dtype`` (fp32
    math, fp64 for fp64). No host read. Weights ``(1, dx, dx^2/2, ...)`` built as
    :func:`taylor_forecast` builds its coefficients give its forecast bit for bit.

    Example::

        f_hat = history_combine(hist, torch.tensor([1.0, 1.8, 1.1]))
    """
    contracts.check_history_combine(history, weights)
    return _ops.history_combine(history, weights)


# keep the module object reachable for introspection (fastcache.info)
library = _library
