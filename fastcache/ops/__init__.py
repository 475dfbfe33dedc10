"""fastcache's fused ops: the public Python entry points.

Each function checks its arguments from metadata only (shapes, dtypes, devices: no
value is read from the device), normalises broadcastable shapes, and calls the
dispatcher op ``torch.ops.fastcache.<name>``, which runs the C++ kernel on CPU, the
Triton kernel on CUDA, or the eager reference (:mod:`fastcache.ops.reference`).
Inputs may have any strides (read in place, not copied); buffers written in place
(``prev``, ``r``) must be contiguous. ``apply_residual`` and ``gated_residual`` take
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

from . import _library, reference
from ._library import BACKEND, SCHEMAS
from .reference import (
    AUX_JITTER,
    AUX_LAST_RUN_STEPS,
    AUX_REPEATS,
    AUX_RUN_LENGTH_MISMATCHES,
    AUX_SIZE,
    MAX_COEFFS,
    STATE_HEADER,
    TIMESTEP_ATOL,
    TIMESTEP_RTOL,
    history_len,
    new_aux,
    new_state,
)

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
    "gated_residual",
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
]

_ops = torch.ops.fastcache
# The residual ops are called once per block (or stack) per step: their wrappers are
# kept minimal. Shape, dtype and overlap checks live in the ops themselves (C++, Triton
# and the reference all raise on them), and in eager mode the wrappers call the
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


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32/fp16/bf16/fp64), got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; move it to {ref.device}")


def _per_sample_vec(name: str, v: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Accept (B, D), (B, 1, D), (1, D), (D,) modulation vectors; return contiguous (B, D)."""
    if v.dim() == 3 and v.shape[1] == 1:
        v = v[:, 0]
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[-1] != D or v.shape[0] not in (1, B):
        raise ValueError(
            f"{name} must have shape (B, D), (B, 1, D), (1, D) or (D,) with B={B}, D={D}; got {tuple(v.shape)}"
        )
    return v.expand(B, D).contiguous()


def _check_hold(hold: torch.Tensor | None, ref: torch.Tensor) -> None:
    if hold is None:
        return
    if hold.dtype != torch.bool or hold.numel() != 1:
        raise ValueError(
            f"hold must be a 0-dim bool tensor (the second output of timestep_guard), got {hold.dtype} "
            f"{tuple(hold.shape)}"
        )
    if hold.device != ref.device:
        raise ValueError(f"hold is on {hold.device} but the op's tensors are on {ref.device}; move it there")


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
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D) hidden states, got shape {tuple(x.shape)}")
    _check_float("x", x)
    if prev.shape != x.shape:
        raise ValueError(
            f"prev must match x's shape {tuple(x.shape)}, got {tuple(prev.shape)}; a shape change "
            "needs a fresh buffer (the runtime reallocates and recomputes)"
        )
    _check_float("prev", prev)
    B, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale), ("prev", prev)):
        _check_device(name, t, x)
    shift = _per_sample_vec("shift", shift, B, D)
    scale = _per_sample_vec("scale", scale, B, D)
    if not prev.is_contiguous():
        raise ValueError("prev must be contiguous: it is written in place")
    _check_hold(hold, x)
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
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension, got a 0-dim tensor; use x.reshape(1)")
    _check_float("x", x)
    if prev.shape != x.shape:
        raise ValueError(f"prev must match x's shape {tuple(x.shape)}, got {tuple(prev.shape)}")
    _check_device("prev", prev, x)
    if not prev.is_contiguous():
        raise ValueError("prev must be contiguous: it is written in place")
    _check_hold(hold, x)
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
    if sums.dtype != torch.float32 or sums.shape[-1] != 2:
        raise ValueError(f"sums must be fp32 (B, 2) or (2,), got {sums.dtype} {tuple(sums.shape)}")
    if state.dtype != torch.float32 or state.dim() != 1 or state.numel() < STATE_HEADER + 3:
        raise ValueError("state must be a 1-D fp32 tensor from fastcache.ops.new_state()")
    if coeffs.dtype != torch.float32 or coeffs.dim() != 1 or coeffs.numel() > MAX_COEFFS:
        raise ValueError(f"coeffs must be a 1-D fp32 tensor of at most {MAX_COEFFS} values, got {tuple(coeffs.shape)}")
    if timestep.numel() < 1:
        raise ValueError("timestep must hold at least one value")
    for name, t in (("sums", sums), ("coeffs", coeffs), ("timestep", timestep)):
        if t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}")
    _check_hold(hold, state)
    return _ops.cache_decision(
        sums.contiguous(),
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
    if state.dtype != torch.float32 or state.dim() != 1 or state.numel() < STATE_HEADER:
        raise ValueError("state must be a 1-D fp32 tensor from fastcache.ops.new_state()")
    if aux.dtype != torch.float32 or aux.dim() != 1 or aux.numel() < AUX_SIZE or not aux.is_contiguous():
        raise ValueError(
            f"aux must be a contiguous 1-D fp32 tensor of {AUX_SIZE} counters from fastcache.ops.new_aux(), "
            f"got {aux.dtype} {tuple(aux.shape)}"
        )
    if timestep.numel() < 1:
        raise ValueError("timestep must hold at least one value")
    for name, t in (("aux", aux), ("timestep", timestep)):
        if t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}; move it to {state.device}")
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
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
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if gate.dim() != 2 or gate.shape[0] != B or not gate.is_contiguous():
        gate = _per_sample_vec("gate", gate, B, D)
    if trend is not None:
        if tuple(trend.shape) not in ((N, D), (D,), (1, N, D)):
            raise ValueError(f"trend must be (N, D)={N, D} or (D,)={(D,)}, got {tuple(trend.shape)}")
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


def _check_taylor_args(op: str, history: torch.Tensor, dx: torch.Tensor) -> None:
    if history.dim() < 2 or history.shape[0] < 1:
        raise ValueError(f"{op}: history must be (order+1, *feature_shape), got shape {tuple(history.shape)}")
    _check_float("history", history)
    if not history.is_contiguous():
        raise ValueError(f"{op}: history must be contiguous (it is the device-resident Taylor state)")
    if dx.numel() != 1 or dx.dtype != torch.float32:
        raise ValueError(f"{op}: dx must be a one-element fp32 tensor, got {dx.dtype} {tuple(dx.shape)}")
    if dx.device != history.device:
        raise ValueError(f"{op}: dx is on {dx.device} but history is on {history.device}; move it there")


def taylor_forecast(history: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """TaylorSeer's forecast (docs/methods.md Eq. TS2): ``sum_k history[k] * dx^k / k!``.

    history: ``(m+1, *S)`` contiguous, ``history[k]`` the k-th finite difference at the
    last computed step; dx: a ``(1,)`` fp32 device tensor, the steps since that step (a
    device value, so a compiled graph does not change from step to step). Returns
    ``(*S)`` in ``history.dtype`` (fp32 math, fp64 for fp64). No host read.

    Example::

        f_hat = taylor_forecast(hist, torch.tensor([2.0]))   # two steps after the last compute
    """
    _check_taylor_args("taylor_forecast", history, dx)
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
    _check_taylor_args("taylor_update", history, dx)
    if tuple(f.shape) != tuple(history.shape[1:]):
        raise ValueError(
            f"taylor_update: f has shape {tuple(f.shape)} but the history holds {tuple(history.shape[1:])}"
        )
    if valid.numel() != 1 or valid.dtype != torch.float32 or valid.device != history.device:
        raise ValueError("taylor_update: valid must be a one-element fp32 tensor on the history's device")
    if store.dtype != torch.bool or store.numel() != 1 or store.device != history.device:
        raise ValueError("taylor_update: store must be a 0-dim bool tensor on the history's device")
    _ops.taylor_update(history, f.contiguous(), dx.reshape(1), valid.reshape(1), store.reshape(()))


# keep the module object reachable for introspection (fastcache.info)
library = _library
