"""``gated_residual``: AdaLN gated residual with EOC's multiplicative trend (Triton).

EOC (Qiu et al., arXiv 2501.19243, Eq. 7) corrects a cached branch output with the
prior trend before the usual AdaLN gated residual; FORA (arXiv 2407.01425) is the
special case without trend::

    out[b, n, d] = x[b, n, d] + gate[b, d] * (cached[b, n, d] * (1 + w * trend[., d]))

x, cached ``(B, N, D)``; gate ``(B, D)``; trend ``(N, D)`` (per token), ``(D,)`` (per
channel) or ``None``. The mode compiles out: ``HAS_TREND`` is False for no trend or
``w == 0`` (FORA), ``TREND_PER_TOKEN`` picks the trend's indexing. fp32 math (fp64 for
fp64 x), output in ``x.dtype``. Grid over ``(B*N)``-row by ``D``-column tiles; x,
cached and out are addressed through their own strides (int64 offsets: ``B*N*D``
passes 2^31 for long videos); ``gated_residual_out`` writes a caller-owned buffer.

Example::

    x = gated_residual(x, gate_msa, attn_cache, trend_attn, 0.01)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_contiguous, check_triton_device, next_pow2
from .residual import _tile_offsets

_TILE = 4096
_BLOCK_D_MAX = 1024


@triton.jit
def _gated_residual_kernel(
    x_ptr, gate_ptr, cached_ptr, trend_ptr, out_ptr, R, N, D, w,
    sxb, sxn, sxd, scb, scn, scd, sob, son, sod,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_TREND: tl.constexpr,
    TREND_PER_TOKEN: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (b, n)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + _tile_offsets(rows, cols, N, sxb, sxn, sxd), mask=mask, other=0.0).to(acc_ty)
    f = tl.load(cached_ptr + _tile_offsets(rows, cols, N, scb, scn, scd), mask=mask, other=0.0).to(acc_ty)
    gate = tl.load(
        gate_ptr + ((rows // N).to(tl.int64) * D)[:, None] + cols[None, :], mask=mask, other=0.0
    ).to(acc_ty)
    if HAS_TREND:
        if TREND_PER_TOKEN:
            t_offs = ((rows % N).to(tl.int64) * D)[:, None] + cols[None, :]
            trend = tl.load(trend_ptr + t_offs, mask=mask, other=0.0).to(acc_ty)
        else:
            trend = tl.load(trend_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
            trend = trend[None, :]
        f = f * (1.0 + w * trend)
    out = x + gate * f
    o_offs = _tile_offsets(rows, cols, N, sob, son, sod)
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_triton(op, x, gate, trend):
    """Triton's own rules on top of the contract: gate and trend are read through flat offsets."""
    for name, t in (("gate", gate), ("trend", trend)):
        if t is not None:
            check_contiguous(op, name, t)
    check_triton_device(op, "x", x)


def plan_gated_residual(x, gate, cached, trend, w, out) -> Launch:
    """The launch of ``out <- x + gate * (cached * (1 + w * trend))`` (checked, numel > 0)."""
    B, N, D = x.shape
    has_trend = trend is not None and w != 0.0
    per_token = trend is not None and trend.dim() != 1
    BLOCK_D = min(next_pow2(D), _BLOCK_D_MAX)
    BLOCK_R = max(1, min(next_pow2(B * N), _TILE // BLOCK_D))
    grid = (triton.cdiv(B * N, BLOCK_R), triton.cdiv(D, BLOCK_D))
    args = (
        x, gate, cached, trend if has_trend else x,  # trend is never read when HAS_TREND is False
        out, B * N, N, D, float(w), *x.stride(), *cached.stride(), *out.stride(),
    )  # fmt: skip
    constexprs = {"BLOCK_R": BLOCK_R, "BLOCK_D": BLOCK_D, "HAS_TREND": has_trend, "TREND_PER_TOKEN": per_token,
                  "ACC_FP64": acc_is_fp64(x)}  # fmt: skip
    return Launch(_gated_residual_kernel, grid, args, constexprs, {"num_warps": 4 if BLOCK_R * BLOCK_D <= 2048 else 8})


def gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None,
    w: float,
) -> torch.Tensor:
    """Schema ``gated_residual(Tensor x, Tensor gate, Tensor cached, Tensor? trend, float w) -> Tensor``.

    x, cached ``(B, N, D)``, any strides; gate ``(B, D)``; trend ``None``, ``(N, D)`` or
    ``(D,)`` (contiguous). Returns ``torch.empty_like(x)`` filled.
    See :func:`fastcache.ops.reference.gated_residual`.
    """
    contracts.check_gated_residual(x, gate, cached, trend, w)
    _check_triton("fastcache::gated_residual", x, gate, trend)
    out = torch.empty_like(x)
    if x.numel():
        plan_gated_residual(x, gate, cached, trend, w, out).run()
    return out


def gated_residual_out(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None,
    w: float,
    out: torch.Tensor,
) -> None:
    """Schema ``gated_residual_out(Tensor x, Tensor gate, Tensor cached, Tensor? trend, float w,
    Tensor(a!) out) -> ()``: :func:`gated_residual` into ``out`` (may be ``x``: in place)."""
    contracts.check_gated_residual_out(x, gate, cached, trend, w, out)
    _check_triton("fastcache::gated_residual_out", x, gate, trend)
    if x.numel():
        plan_gated_residual(x, gate, cached, trend, w, out).run()
