"""Each fused op's argument contract, written once.

One check function per op of the ``fastcache`` dispatcher namespace, with the op's
schema signature (``CHECKS[name](*schema_args)``): shapes, dtypes, devices, the
out-buffer rules and the decision-state layout (:mod:`fastcache.ops.layout`). It reads
metadata only (no device value reaches the host) and raises ``TypeError`` (a floating
input of another dtype) or ``ValueError`` (everything else) with a message that names
the op (``fastcache::<name>``), the argument, what was expected, what was passed, and
the fix.

Who calls it: the eager reference (:mod:`fastcache.ops.reference`) and the Triton
launchers (``kernels/``) at the top of each op, and the public wrappers of
:mod:`fastcache.ops` for the once-per-step ops, after normalising broadcastable shapes
(so a C++-backed call fails with the same Python error). The residual wrappers call
nothing (their per-block cost is measured, bench/README.md): the op checks. The C++
kernels (``csrc/``) check the same rules with their named checks (``csrc/checks.h``,
``RuntimeError`` with the same content); tests/ops/test_contracts.py holds the three
backends to the same rejections.

What is backend-specific stays with the backend: Triton's layouts (contiguous small
operands, ``prev`` written through flat offsets, ``D <= MAX_D``, CUDA or the
interpreter); the C++ kernels' CPU-only rule.
"""

from __future__ import annotations

import torch

from .layout import AUX_SIZE, MAX_COEFFS, STATE_HEADER

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = "torch.float32, torch.float16, torch.bfloat16 or torch.float64"


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


# ----------------------------------------------------------------------------- rules
def floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOATS:
        raise TypeError(
            f"{op}: {name} must be a floating tensor ({_FLOAT_NAMES}), got {t.dtype}; convert it, e.g. {name}.float()"
        )


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move it to {ref.device}"
            )


def hold_flag(op: str, hold: torch.Tensor | None) -> None:
    """``hold``: None or one bool value (timestep_guard's repeat flag), loaded on the device."""
    if hold is not None and (hold.dtype != torch.bool or hold.numel() != 1):
        raise ValueError(
            f"{op}: hold must be a 0-dim bool tensor (the repeat flag from timestep_guard), got "
            f"{hold.dtype} {_shape(hold)}"
        )


def one_float32(op: str, name: str, t: torch.Tensor, what: str) -> None:
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(
            f"{op}: {name} must be a one-element fp32 tensor (torch.float32, {what}), got {t.dtype} {_shape(t)}"
        )


def contiguous(op: str, name: str, t: torch.Tensor, why: str) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous ({why}), got shape {_shape(t)} strides {t.stride()}; "
            f"pass {name}.contiguous()"
        )


def state_buffer(op: str, state: torch.Tensor) -> None:
    """The decision state: 1-D fp32, the STATE_HEADER values and 3 rows of H history steps."""
    if state.dtype != torch.float32 or state.dim() != 1 or state.numel() < STATE_HEADER:
        raise ValueError(
            f"{op}: state must be a 1-D torch.float32 tensor of at least {STATE_HEADER} values (header + 3 history "
            f"rows), got {state.dtype} {_shape(state)}; create it with fastcache.ops.new_state()"
        )


def timestep_value(op: str, timestep: torch.Tensor) -> None:
    if timestep.numel() < 1:
        raise ValueError(
            f"{op}: timestep must hold at least one value (element 0 is read), got shape {_shape(timestep)}"
        )
    if timestep.is_complex():
        raise TypeError(f"{op}: timestep must be real, got {timestep.dtype}")


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of the storage ``t`` can touch (csrc/ops.cpp extents_intersect)."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride
        if span < 0:
            lo += span
        else:
            hi += span
    base = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    return base + lo * t.element_size(), base + (hi + 1) * t.element_size()


def out_buffer(op: str, out: torch.Tensor, like: torch.Tensor, **inputs: torch.Tensor) -> None:
    """``out``: ``like``'s (x's) shape and dtype, on its device, no self-overlap, and either one
    of ``inputs`` exactly (an in-place update: same start and strides) or disjoint from them."""
    floating(op, "out", out)
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{op}: out must have x's shape {_shape(like)} and dtype {like.dtype}, got {_shape(out)} {out.dtype}"
        )
    same_device(op, "x", like, out=out)
    if out.numel() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(
            f"{op}: out has overlapping elements (an expanded or self-overlapping view: shape {_shape(out)}, "
            f"strides {out.stride()}); pass a dense buffer"
        )
    for name, t in inputs.items():
        if t.numel() == 0 or out.numel() == 0 or t.device != out.device:
            continue
        if t.data_ptr() == out.data_ptr() and t.stride() == out.stride():
            continue  # out IS the input: in place, each element read before it is written
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        a0, a1 = _extent(out)
        b0, b1 = _extent(t)
        if a0 < b1 and b0 < a1:
            raise ValueError(
                f"{op}: out shares memory with {name} but is not {name} itself (a shifted or re-strided view of it); "
                f"pass out={name} for an in-place update, or a separate buffer"
            )


# ----------------------------------------------------------------------------- ops
def check_modulated_rel_l1_sums(x, shift, scale, eps, prev, hold=None) -> None:
    """x, prev ``(B, N, D)``; shift, scale ``(B, D)``; all floating, one device; hold."""
    op = "fastcache::modulated_rel_l1_sums"
    floating(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D) hidden states (3-D), got shape {_shape(x)}")
    B, N, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        floating(op, name, t)
        if _shape(t) != (B, D):
            raise ValueError(
                f"{op}: {name} must be (B, D) = {(B, D)}, got {_shape(t)}; "
                "fastcache.ops.modulated_rel_l1_sums broadcasts (1, D), (D,) and (B, 1, D) for you"
            )
    floating(op, "prev", prev)
    if prev.shape != x.shape:
        raise ValueError(
            f"{op}: prev must match x's shape {_shape(x)}, got {_shape(prev)}; a shape change needs a fresh "
            "buffer (torch.zeros_like(x))"
        )
    same_device(op, "x", x, shift=shift, scale=scale, prev=prev, hold=hold)
    hold_flag(op, hold)


def check_rel_l1_sums(x, prev, write_prev, hold=None) -> None:
    """x ``(B, ...)``, prev x's shape, both floating, one device; hold."""
    op = "fastcache::rel_l1_sums"
    floating(op, "x", x)
    if x.dim() < 1:
        raise ValueError(
            f"{op}: x must have a leading batch dimension (B, ...), got a 0-dim tensor (shape ()); use x.reshape(1)"
        )
    floating(op, "prev", prev)
    if prev.shape != x.shape:
        raise ValueError(f"{op}: prev must match x's shape {_shape(x)}, got {_shape(prev)}; use torch.zeros_like(x)")
    same_device(op, "x", x, prev=prev, hold=hold)
    hold_flag(op, hold)


def check_cache_decision(
    sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold=None, accumulate=True
) -> None:
    """sums fp32 ``(B, 2)``/``(2,)``; timestep >= 1 value; coeffs 1-D fp32 <= MAX_COEFFS; state."""
    op = "fastcache::cache_decision"
    if sums.dtype != torch.float32 or sums.dim() < 1 or sums.shape[-1] != 2:
        raise ValueError(
            f"{op}: sums must be fp32 (B, 2) or (2,) (the output of the rel-L1 ops), got {sums.dtype} "
            f"{_shape(sums)}; use sums.float() (fastcache.ops.cache_decision does it for you)"
        )
    timestep_value(op, timestep)
    if coeffs.dtype != torch.float32 or coeffs.dim() != 1 or coeffs.numel() > MAX_COEFFS:
        raise ValueError(
            f"{op}: coeffs must be a 1-D torch.float32 tensor of at most {MAX_COEFFS} values (highest power first), "
            f"got {coeffs.dtype} {_shape(coeffs)}"
        )
    state_buffer(op, state)
    same_device(op, "state", state, sums=sums, timestep=timestep, coeffs=coeffs, hold=hold)
    hold_flag(op, hold)


def check_timestep_guard(timestep, state, aux, rtol, atol, num_steps) -> None:
    """timestep >= 1 value; state (read only); aux contiguous 1-D fp32 of AUX_SIZE; rtol, atol >= 0."""
    op = "fastcache::timestep_guard"
    timestep_value(op, timestep)
    state_buffer(op, state)
    if aux.dtype != torch.float32 or aux.dim() != 1 or aux.numel() < AUX_SIZE or not aux.is_contiguous():
        raise ValueError(
            f"{op}: aux must be a contiguous 1-D torch.float32 tensor of {AUX_SIZE} counters, got {aux.dtype} "
            f"{_shape(aux)} strides {aux.stride()}; create it with fastcache.ops.new_aux()"
        )
    same_device(op, "state", state, aux=aux, timestep=timestep)
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"{op}: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")


def _gated(op, x, gate, cached, trend) -> None:
    floating(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D) (3-D), got shape {_shape(x)}")
    B, N, D = x.shape
    floating(op, "gate", gate)
    if _shape(gate) != (B, D):
        raise ValueError(
            f"{op}: gate must be (B, D) = {(B, D)}, got {_shape(gate)}; "
            "fastcache.ops.gated_residual broadcasts (1, D), (D,) and (B, 1, D) for you"
        )
    floating(op, "cached", cached)
    if cached.shape != x.shape:
        raise ValueError(f"{op}: cached must match x's shape {_shape(x)}, got {_shape(cached)}")
    if trend is not None:
        floating(op, "trend", trend)
        if _shape(trend) not in ((N, D), (1, N, D), (D,)):
            raise ValueError(
                f"{op}: trend must be (D,) = {(D,)}, (N, D) = {(N, D)} or (1, N, D), got {_shape(trend)} "
                "(EOC's per-token trend, or one row for all tokens)"
            )
    same_device(op, "x", x, gate=gate, cached=cached, trend=trend)


def check_gated_residual(x, gate, cached, trend, w) -> None:
    """x, cached ``(B, N, D)``; gate ``(B, D)``; trend None, ``(N, D)``, ``(1, N, D)`` or ``(D,)``."""
    _gated("fastcache::gated_residual", x, gate, cached, trend)


def check_gated_residual_out(x, gate, cached, trend, w, out) -> None:
    """:func:`check_gated_residual`, and out: x's shape and dtype, x / cached itself or disjoint."""
    op = "fastcache::gated_residual_out"
    _gated(op, x, gate, cached, trend)
    out_buffer(op, out, x, x=x, cached=cached)


def _apply(op, x, r) -> None:
    floating(op, "x", x)
    floating(op, "r", r)
    if r.shape != x.shape:
        raise ValueError(
            f"{op}: x {_shape(x)} and r {_shape(r)} (the cached residual) must have one shape; "
            "a shape change needs a fresh cache (recompute the step)"
        )
    same_device(op, "x", x, r=r)


def check_apply_residual(x, r) -> None:
    """x, r: one shape, floating, one device."""
    _apply("fastcache::apply_residual", x, r)


def check_apply_residual_out(x, r, out) -> None:
    """:func:`check_apply_residual`, and out: x's shape and dtype, x / r itself or disjoint."""
    op = "fastcache::apply_residual_out"
    _apply(op, x, r)
    out_buffer(op, out, x, x=x, r=r)


def check_store_residual(out, x_in, flag, r) -> None:
    """out, x_in, r: one shape, floating; flag one real value; one device."""
    op = "fastcache::store_residual"
    for name, t in (("out", out), ("x_in", x_in), ("r", r)):
        floating(op, name, t)
    if x_in.shape != out.shape or r.shape != out.shape:
        raise ValueError(
            f"{op}: out {_shape(out)}, x_in {_shape(x_in)} and r {_shape(r)} must have one shape "
            "(the cached residual has the stack's shape)"
        )
    if flag.numel() != 1 or flag.is_complex():
        raise ValueError(
            f"{op}: flag must be the one-element decision flag (0-dim bool from cache_decision), got "
            f"{flag.dtype} {_shape(flag)}"
        )
    same_device(op, "r", r, out=out, x_in=x_in, flag=flag)


def _history(op, history, dx) -> None:
    floating(op, "history", history)
    if history.dim() < 2 or history.shape[0] < 1:
        raise ValueError(f"{op}: history must be (order+1, *feature_shape) (at least 2-D), got shape {_shape(history)}")
    contiguous(op, "history", history, "the device-resident Taylor state, written in place")
    one_float32(op, "dx", dx, "steps since the last computed step")
    same_device(op, "history", history, dx=dx)


def check_taylor_forecast(history, dx) -> None:
    """history contiguous ``(m+1, *S)`` floating; dx one fp32 value; one device."""
    _history("fastcache::taylor_forecast", history, dx)


def check_taylor_update(history, f, dx, valid, store) -> None:
    """:func:`check_taylor_forecast`, f ``(*S)`` contiguous in history's dtype, valid one fp32
    value, store one bool; one device."""
    op = "fastcache::taylor_update"
    _history(op, history, dx)
    if _shape(f) != _shape(history)[1:]:
        raise ValueError(
            f"{op}: f has shape {_shape(f)} but the history holds {_shape(history)[1:]}; f must have the history's "
            "feature shape"
        )
    if f.dtype != history.dtype:
        raise TypeError(f"{op}: f must have the history's dtype {history.dtype}, got {f.dtype}")
    contiguous(op, "f", f, "fastcache.ops.taylor_update makes it so")
    one_float32(op, "valid", valid, "the orders the history holds")
    if store.numel() != 1 or store.dtype != torch.bool:
        raise ValueError(
            f"{op}: store must be a 0-dim bool tensor (torch.bool, the store flag of the step), got {store.dtype} "
            f"{_shape(store)}"
        )
    same_device(op, "history", history, f=f, valid=valid, store=store)


def check_history_combine(history, weights) -> None:
    """history contiguous ``(m+1, *S)`` floating; weights 1-D fp32 of ``m+1`` values; one device."""
    op = "fastcache::history_combine"
    floating(op, "history", history)
    if history.dim() < 2 or history.shape[0] < 1:
        raise ValueError(f"{op}: history must be (order+1, *feature_shape) (at least 2-D), got shape {_shape(history)}")
    contiguous(op, "history", history, "the device-resident Taylor state, written in place")
    if weights.dim() != 1 or weights.shape[0] != history.shape[0] or weights.dtype != torch.float32:
        raise ValueError(
            f"{op}: weights must be a 1-D torch.float32 tensor of {history.shape[0]} values (one per history row), "
            f"got {weights.dtype} {_shape(weights)}"
        )
    same_device(op, "history", history, weights=weights)


CHECKS = {
    "modulated_rel_l1_sums": check_modulated_rel_l1_sums,
    "rel_l1_sums": check_rel_l1_sums,
    "cache_decision": check_cache_decision,
    "timestep_guard": check_timestep_guard,
    "gated_residual": check_gated_residual,
    "gated_residual_out": check_gated_residual_out,
    "apply_residual": check_apply_residual,
    "apply_residual_out": check_apply_residual_out,
    "store_residual": check_store_residual,
    "taylor_forecast": check_taylor_forecast,
    "taylor_update": check_taylor_update,
    "history_combine": check_history_combine,
}


# ----------------------------------------------------------------------------- multi-slot ops
def check_forecast_residual(x, gates, histories, dx) -> None:
    """x ``(B, N, D)`` floating; one gate (None, ``(B|1, 1, D)``, ``(B|1, D)`` or ``(D,)``,
    floating) per history; each history x's shape (a cached feature) or ``(m+1, *x.shape)``
    contiguous with m <= 4, in x's dtype; dx one fp32 value; one device."""
    op = "fastcache::forecast_residual"
    floating(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {_shape(x)}")
    B, N, D = x.shape
    if len(gates) != len(histories):
        raise ValueError(
            f"{op}: gates has {len(gates)} entries but histories has {len(histories)}; pass one gate (or None for "
            "an ungated residual) per slot"
        )
    one_float32(op, "dx", dx, "steps since the last computed step")
    same_device(op, "x", x, dx=dx)
    for i, (g, h) in enumerate(zip(gates, histories)):
        name = f"histories[{i}]"
        if h.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {h.dtype}")
        if _shape(h) != (B, N, D) and (h.dim() != 4 or _shape(h)[1:] != (B, N, D) or not 1 <= h.shape[0] <= 5):
            raise ValueError(
                f"{op}: {name} has shape {_shape(h)}; expected x's shape {(B, N, D)} (a cached feature) or "
                f"(m+1, {B}, {N}, {D}) with 1 <= m+1 <= 5 (a Taylor history)"
            )
        if h.dim() == 4:
            contiguous(op, name, h, "the Taylor state is allocated contiguous")
        same_device(op, "x", x, **{name: h})
        if g is None:
            continue
        gname = f"gates[{i}]"
        floating(op, gname, g)
        ok = (
            (g.dim() == 1 and g.shape[0] == D)
            or (g.dim() == 2 and g.shape[0] in (1, B) and g.shape[1] == D)
            or (g.dim() == 3 and g.shape[0] in (1, B) and g.shape[1] == 1 and g.shape[2] == D)
        )
        if not ok:
            raise ValueError(
                f"{op}: {gname} has shape {_shape(g)}; a gate must be ({B}, 1, {D}), ({B}, {D}), (1, {D}) or "
                f"({D},) for x of shape {(B, N, D)}, or None for an ungated residual"
            )
        same_device(op, "x", x, **{gname: g})


def check_taylor_update_slots(histories, fs, dx, valid, store) -> None:
    """:func:`check_taylor_update` for every (history, f) pair; as many fs as histories."""
    if len(histories) != len(fs):
        raise ValueError(
            f"fastcache::taylor_update_slots: histories has {len(histories)} entries but fs has {len(fs)}; pass "
            "one new feature per history"
        )
    for h, f in zip(histories, fs):
        check_taylor_update(h, f, dx, valid, store)


CHECKS["forecast_residual"] = check_forecast_residual
CHECKS["taylor_update_slots"] = check_taylor_update_slots
