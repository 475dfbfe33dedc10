"""``rel_l1_sums``: relative-L1 sums of an already-computed indicator (Triton).

For indicators that are not the modulated hidden state: a timestep embedding
(CogVideoX, Wan2.1; docs/methods.md, TeaCache) or a first-block residual (First-Block
Cache). ``x`` of any shape ``(B, ...)`` is viewed as ``(B, M)``::

    sums[b] = (sum_m |x[b, m] - prev[b, m]|, sum_m |prev[b, m]|)     prev <- x  (WRITE_PREV)

Grid ``(B, cdiv(M, BLOCK))``; each program writes one partial pair, then
:func:`fastcache.kernels._partials.finish_sums` reduces them in a fixed order, so the
result is bitwise identical run to run. Accumulation is fp32 (fp64 for fp64 inputs).

Example::

    sums = rel_l1_sums(temb, prev_temb, True)     # (B, 2) fp32; prev_temb now holds temb
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_contiguous, check_triton_device, next_pow2, sums_dtype, view3
from ._partials import finish_sums

_BLOCK_MAX = 4096


@triton.jit
def _rel_l1_partials_kernel(
    x_ptr,
    prev_ptr,
    partials_ptr,
    M,
    P,
    DL,
    sxb,
    sxn,
    sxd,
    hold_ptr,
    BLOCK: tl.constexpr,
    WRITE_PREV: tl.constexpr,
    X_FLAT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    HAS_HOLD: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    # grid (P, B): the partials axis, which reaches 10^5 programs on long videos, on axis 0
    # (CUDA's gridDim.y is at most 65535); the batch on axis 1
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(0)
    # int64: B * M (and M alone) may pass 2^31 elements
    offs = pid_p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = pid_b * M
    if X_FLAT:  # contiguous x
        x_offs = base + offs
    else:  # x seen as (B, M // DL, DL) with its own strides, read in logical order
        x_offs = pid_b * sxb + (offs // DL) * sxn + (offs % DL) * sxd
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(acc_ty)
    p = tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(acc_ty)
    num = tl.sum(tl.abs(x - p), axis=0)
    den = tl.sum(tl.abs(p), axis=0)
    out = partials_ptr + (pid_b * P + pid_p) * 2
    tl.store(out, num)
    tl.store(out + 1, den)
    if WRITE_PREV:
        if HAS_HOLD:  # timestep_guard's repeat flag, read on the device: set = prev kept
            mask = tl.where(tl.load(hold_ptr) == 0, mask, False)  # (`mask & scalar` trips the interpreter)
        tl.store(prev_ptr + base + offs, x.to(prev_ptr.dtype.element_ty), mask=mask)


def rel_l1_sums(
    x: torch.Tensor, prev: torch.Tensor, write_prev: bool, hold: torch.Tensor | None = None
) -> torch.Tensor:
    """Schema ``rel_l1_sums(Tensor x, Tensor(a!) prev, bool write_prev, Tensor? hold=None) -> Tensor``.

    hold: ``None`` or a one-value bool the kernel loads (set = prev not written).

    x, prev: same shape ``(B, ...)``; x any strides (viewable as (B, M // D, D), D its
    last dim; otherwise copied), prev contiguous; any float dtype each. Returns ``(B, 2)``
    fp32 (fp64 for fp64 x). See :func:`fastcache.ops.reference.rel_l1_sums`.
    """
    op = "fastcache::rel_l1_sums"
    contracts.check_rel_l1_sums(x, prev, write_prev, hold)
    check_contiguous(op, "prev", prev)  # written through flat offsets
    check_triton_device(op, "x", x)
    B = x.shape[0]
    if B == 0:
        return torch.empty((0, 2), dtype=sums_dtype(x), device=x.device)
    launch, partials = plan_rel_l1(x, prev, write_prev, hold)
    launch.run()
    return finish_sums(partials)


def plan_rel_l1(x, prev, write_prev, hold=None) -> tuple[Launch, torch.Tensor]:
    """The launch of the partial-sums kernel and its ``(B, P, 2)`` output (checked, B > 0)."""
    B = x.shape[0]
    M = x.numel() // B
    flat = x.is_contiguous()
    DL = x.shape[-1] if x.dim() >= 2 and x.shape[-1] else 1
    x3 = x if flat else view3(x, (B, M // DL, DL))
    strides = (0, 0, 0) if flat else x3.stride()
    BLOCK = min(next_pow2(M), _BLOCK_MAX)
    P = max(triton.cdiv(M, BLOCK), 1)  # M == 0: one all-masked program per sample -> zeros
    partials = torch.empty((B, P, 2), dtype=sums_dtype(x), device=x.device)
    has_hold = hold is not None and bool(write_prev)  # without a write there is nothing to hold
    args = (x3, prev, partials, M, P, DL, *strides, hold if has_hold else partials)
    constexprs = {
        "BLOCK": BLOCK,
        "WRITE_PREV": bool(write_prev),
        "X_FLAT": flat,
        "ACC_FP64": acc_is_fp64(x),
        "HAS_HOLD": has_hold,
    }
    return Launch(_rel_l1_partials_kernel, (P, B), args, constexprs, {"num_warps": 8 if BLOCK >= 4096 else 4}), partials
