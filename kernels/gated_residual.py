"""``gated_residual``: AdaLN gated residual with EOC's multiplicative trend (Triton).

EOC (Qiu et al., arXiv 2501.19243, Eq. 7) corrects a cached branch output with the
prior trend before the usual AdaLN gated residual; FORA (arXiv 2407.01425) is the
special case without trend::

    out[b, n, d] = x[b, n, d] + gate[b, d] * (cached[b, n, d] * (1 + w * trend[., d]))

x, cached ``(B, N, D)``; gate ``(B, D)``; trend ``(N, D)`` (per token), ``(D,)`` (per
channel) or ``None``. The mode compiles out: ``HAS_TREND`` is False for no trend or
``w == 0`` (FORA), ``TREND_PER_TOKEN`` picks the trend's indexing. fp32 math (fp64 for
fp64 x), output in ``x.dtype``. Grid over ``(B*N)``-row by ``D``-column tiles; row
offsets are int64 since ``B*N*D`` passes 2^31 for long videos.

Example::

    x = gated_residual(x, gate_msa, attn_cache, trend_attn, 0.01)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    acc_is_fp64,
    check_contiguous,
    check_devices,
    check_float,
    next_pow2,
)

_TILE = 4096
_BLOCK_D_MAX = 1024


@triton.jit
def _gated_residual_kernel(
    x_ptr,
    gate_ptr,
    cached_ptr,
    trend_ptr,
    out_ptr,
    R,
    N,
    D,
    w,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TREND: tl.constexpr,
    TREND_PER_TOKEN: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (b, n)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offs = (rows.to(tl.int64) * D)[:, None] + cols[None, :]

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    f = tl.load(cached_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    gate = tl.load(
        gate_ptr + ((rows // N) * D)[:, None] + cols[None, :], mask=mask, other=0.0
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
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def gated_residual(
    x: torch.Tensor,
    gate: torch.Tensor,
    cached: torch.Tensor,
    trend: torch.Tensor | None,
    w: float,
) -> torch.Tensor:
    """Schema ``gated_residual(Tensor x, Tensor gate, Tensor cached, Tensor? trend, float w) -> Tensor``.

    x, cached ``(B, N, D)``; gate ``(B, D)``; trend ``None``, ``(N, D)`` or ``(D,)``;
    all contiguous. Returns a new tensor like ``x``.
    See :func:`fastcache.ops.reference.gated_residual`.
    """
    op = "gated_residual"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    named = [("x", x), ("gate", gate), ("cached", cached)] + (
        [("trend", trend)] if trend is not None else []
    )
    for name, t in named:
        check_float(op, name, t)
    if cached.shape != x.shape:
        raise ValueError(
            f"{op}: cached must match x's shape {tuple(x.shape)}, got {tuple(cached.shape)}"
        )
    if tuple(gate.shape) != (B, D):
        raise ValueError(
            f"{op}: gate must be (B, D) = {(B, D)}, got {tuple(gate.shape)}; "
            f"fastcache.ops.{op} broadcasts (1, D), (D,) and (B, 1, D) for you"
        )
    per_token = False
    if trend is not None:
        if tuple(trend.shape) in ((N, D), (1, N, D)):
            per_token = True
        elif tuple(trend.shape) != (D,):
            raise ValueError(
                f"{op}: trend must be (N, D) = {(N, D)} or (D,) = {(D,)}, got {tuple(trend.shape)}"
            )
    for name, t in named:
        check_contiguous(op, name, t)
    check_devices(op, "x", x, gate=gate, cached=cached, trend=trend)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    has_trend = trend is not None and w != 0.0
    BLOCK_D = min(next_pow2(D), _BLOCK_D_MAX)
    BLOCK_R = max(1, min(next_pow2(B * N), _TILE // BLOCK_D))
    grid = (triton.cdiv(B * N, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _gated_residual_kernel[grid](
        x,
        gate,
        cached,
        trend if has_trend else x,  # never read when HAS_TREND is False
        out,
        B * N,
        N,
        D,
        float(w),
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
        HAS_TREND=has_trend,
        TREND_PER_TOKEN=per_token,
        ACC_FP64=acc_is_fp64(x),
        num_warps=4 if BLOCK_R * BLOCK_D <= 2048 else 8,
    )
    return out
