"""``forecast_residual`` / ``taylor_update_slots``: a whole stack's forecast or reused
residuals, and every slot's Taylor history update, each as one op (Triton).

``forecast_residual(x, gates, histories, dx)``: per stream, ``out = x``, then for every
slot in order ``out = out + gate_i * f_i`` (fp32 math, rounded to x's dtype after each
slot, as the per-block path rounds the stream after each residual), ``f_i`` the cached
feature (``histories[i]`` of x's shape: FORA's reuse) or the Taylor forecast of a
``(m+1, *x.shape)`` history at ``dx`` (``c_k = c_{k-1} * dx / k``, rounded to the
history's dtype as :func:`fastcache.ops.taylor_forecast` returns it). A gate is read
through its own strides (``(B|1, 1, D)``, ``(B|1, D)``, ``(D,)``: the chunk of a block's
modulation, no copy); None is an ungated residual.

One launch covers up to ``GROUP`` slots (their pointers, strides and orders are kernel
arguments and constexprs); a stack of K slots is ``ceil(K / GROUP)`` launches, the first
reading x and the rest reading the output they update in place (each program owns its
elements, so the chain is race-free). The grid is (rows = B*N, cdiv(D, BLOCK_D)).

``taylor_update_slots``: one :func:`kernels.taylor._taylor_update_kernel` launch per
slot (the op is one dispatcher call; the launches share ``dx``/``valid``/``store``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_triton_device, next_pow2
from .taylor import plan_taylor_update

GROUP = 4
_MAX_BLOCK_D = 1024


@triton.jit
def _slot(
    acc, h_ptr, g_ptr, gsb, gsd, b, offs, d, mask, c1, c2, c3, c4, E64,
    M: tl.constexpr, GATED: tl.constexpr, ACC_TY: tl.constexpr, OUT_TY: tl.constexpr,
):  # fmt: skip
    f = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC_TY)
    if M >= 1:
        f += tl.load(h_ptr + E64 + offs, mask=mask, other=0.0).to(ACC_TY) * c1
    if M >= 2:
        f += tl.load(h_ptr + 2 * E64 + offs, mask=mask, other=0.0).to(ACC_TY) * c2
    if M >= 3:
        f += tl.load(h_ptr + 3 * E64 + offs, mask=mask, other=0.0).to(ACC_TY) * c3
    if M >= 4:
        f += tl.load(h_ptr + 4 * E64 + offs, mask=mask, other=0.0).to(ACC_TY) * c4
    if M >= 1:
        f = f.to(OUT_TY).to(ACC_TY)  # the forecast in the history's dtype, as taylor_forecast returns it
    if GATED:
        g = tl.load(g_ptr + b * gsb + d * gsd, mask=mask, other=0.0).to(ACC_TY)
        acc = acc + g * f
    else:
        acc = acc + f
    return acc.to(OUT_TY).to(ACC_TY)  # the stream in its dtype after each residual


@triton.jit
def _forecast_residual_kernel(
    x_ptr, out_ptr, dx_ptr, N, D, E,
    h0, h1, h2, h3, g0, g1, g2, g3,
    gsb0, gsd0, gsb1, gsd1, gsb2, gsd2, gsb3, gsd3,
    NS: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
    GATED: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    out_ty = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    b = row // N
    offs = row * D + d
    E64 = tl.cast(E, tl.int64)
    x = tl.load(dx_ptr).to(acc_ty)
    c1 = x * 1.0 / 1
    c2 = c1 * x / 2
    c3 = c2 * x / 3
    c4 = c3 * x / 4
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    acc = _slot(acc, h0, g0, gsb0, gsd0, b, offs, d, mask, c1, c2, c3, c4, E64, M0, GATED & 1, acc_ty, out_ty)
    if NS >= 2:
        acc = _slot(acc, h1, g1, gsb1, gsd1, b, offs, d, mask, c1, c2, c3, c4, E64, M1, GATED & 2, acc_ty, out_ty)
    if NS >= 3:
        acc = _slot(acc, h2, g2, gsb2, gsd2, b, offs, d, mask, c1, c2, c3, c4, E64, M2, GATED & 4, acc_ty, out_ty)
    if NS >= 4:
        acc = _slot(acc, h3, g3, gsb3, gsd3, b, offs, d, mask, c1, c2, c3, c4, E64, M3, GATED & 8, acc_ty, out_ty)
    tl.store(out_ptr + offs, acc.to(out_ty), mask=mask)


def _gate_strides(g: torch.Tensor | None, B: int) -> tuple[int, int]:
    """(batch stride, feature stride) of a gate; a batch of 1 broadcasts (stride 0)."""
    if g is None:
        return 0, 0
    if g.dim() == 1:
        return 0, g.stride(0)
    sb = g.stride(0) if g.shape[0] > 1 else 0
    return sb, g.stride(-1)


def plan_forecast_residual(x, gates, histories, dx, out) -> list[Launch]:
    """The launches of :func:`forecast_residual` (checked arguments, x contiguous, numel > 0)."""
    B, N, D = x.shape
    rows = B * N
    block_d = min(next_pow2(D), _MAX_BLOCK_D)
    grid = (rows, triton.cdiv(D, block_d))
    launches = []
    src = x
    for s0 in range(0, len(histories), GROUP):
        hs = list(histories[s0 : s0 + GROUP])
        gs = list(gates[s0 : s0 + GROUP])
        ns = len(hs)
        orders = [h.shape[0] - 1 if h.dim() == 4 else -1 for h in hs]
        gated = sum(1 << i for i, g in enumerate(gs) if g is not None)
        hs_p = hs + [hs[0]] * (GROUP - ns)
        gs_p = [g if g is not None else x for g in gs] + [x] * (GROUP - ns)
        strides = []
        for g in gs + [None] * (GROUP - ns):
            strides.extend(_gate_strides(g, B))
        orders += [-1] * (GROUP - ns)
        args = (src, out, dx, N, D, rows * D, *hs_p, *gs_p, *strides)
        cx = {
            "NS": ns, "M0": orders[0], "M1": orders[1], "M2": orders[2], "M3": orders[3], "GATED": gated,
            "BLOCK_D": block_d, "ACC_FP64": acc_is_fp64(x),
        }  # fmt: skip
        launches.append(Launch(_forecast_residual_kernel, grid, args, cx, {"num_warps": 4}))
        src = out
    return launches


def forecast_residual(x: torch.Tensor, gates, histories, dx: torch.Tensor) -> torch.Tensor:
    """Schema ``forecast_residual(Tensor x, Tensor?[] gates, Tensor[] histories, Tensor dx) -> Tensor``;
    see :func:`fastcache.ops.reference.forecast_residual`. Returns a new contiguous tensor."""
    gates, histories = list(gates), list(histories)
    contracts.check_forecast_residual(x, gates, histories, dx)
    check_triton_device("fastcache::forecast_residual", "x", x)
    histories = [h if h.is_contiguous() else h.contiguous() for h in histories]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if not histories:
        out.copy_(x)
        return out
    for launch in plan_forecast_residual(x.contiguous(), gates, histories, dx, out):
        launch.run()
    return out


def taylor_update_slots(histories, fs, dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor) -> None:
    """Schema ``taylor_update_slots(Tensor(a!)[] histories, Tensor[] fs, Tensor dx, Tensor valid, Tensor store)
    -> ()``; see :func:`fastcache.ops.reference.taylor_update_slots`."""
    histories, fs = list(histories), list(fs)
    contracts.check_taylor_update_slots(histories, fs, dx, valid, store)
    for h, f in zip(histories, fs):
        check_triton_device("fastcache::taylor_update_slots", "histories", h)
        if f.numel():
            plan_taylor_update(h, f, dx, valid, store).run()
