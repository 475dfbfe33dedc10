"""``apply_residual`` / ``store_residual``: the stack-level residual cache (Triton).

TeaCache, Δ-DiT and First-Block Cache (docs/methods.md) cache ``R = out - in`` of a block
stack on computed steps and replay ``out = in + R`` on skipped ones. Both are flat
elementwise kernels over any shape, int64 offsets (video latents pass 2^31 elements),
fp32 math (fp64 for fp64 inputs).
Every operand is addressed through its own (B, N, D) strides (a transposed
patch-embedding view is read in place, never copied); the grid tiles (B*N)-rows by
D-columns. ``apply_residual_out`` writes a caller-owned buffer, which may be ``x``
itself (in place: each element is loaded before it is stored, by the same program).

``store_residual`` reads the 0-dim decision flag on the device: under ``torch.cond``
the store sits outside the branches and runs every step, so on a skipped step it must
leave ``r`` alone, without the host ever learning which branch ran. When the flag is
off every load and store is masked, so a skipped step costs one byte of traffic.

Example::

    flag = cache_decision(...)
    out = torch.cond(flag, run_blocks, lambda h: apply_residual(h, r), (h,))
    store_residual(out, h, flag, r)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_triton_device, dims3, next_pow2, view3

_TILE = 4096
_BLOCK_D_MAX = 1024


@triton.jit
def _tile_offsets(rows, cols, N, sb, sn, sd):
    """int64 element offsets of a (rows, cols) tile of a strided (B, N, D) tensor."""
    r64 = rows.to(tl.int64)
    return ((r64 // N) * sb + (r64 % N) * sn)[:, None] + cols.to(tl.int64)[None, :] * sd


@triton.jit
def _apply_residual_kernel(
    x_ptr, r_ptr, out_ptr, R, N, D,
    sxb, sxn, sxd, srb, srn, srd, sob, son, sod,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (b, n)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + _tile_offsets(rows, cols, N, sxb, sxn, sxd), mask=mask, other=0.0).to(acc_ty)
    r = tl.load(r_ptr + _tile_offsets(rows, cols, N, srb, srn, srd), mask=mask, other=0.0).to(acc_ty)
    o_offs = _tile_offsets(rows, cols, N, sob, son, sod)
    tl.store(out_ptr + o_offs, (x + r).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_residual_kernel(
    out_ptr, x_in_ptr, flag_ptr, r_ptr, R, N, D,
    sob, son, sod, sxb, sxn, sxd, srb, srn, srd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    computed = tl.load(flag_ptr) != 0
    inside = (rows < R)[:, None] & (cols < D)[None, :]
    # where(), not `&`: Triton's interpreter turns a broadcast scalar bool `&` into ints
    mask = tl.where(computed, inside, False)
    out = tl.load(out_ptr + _tile_offsets(rows, cols, N, sob, son, sod), mask=mask, other=0.0).to(acc_ty)
    x_in = tl.load(x_in_ptr + _tile_offsets(rows, cols, N, sxb, sxn, sxd), mask=mask, other=0.0).to(acc_ty)
    r_offs = _tile_offsets(rows, cols, N, srb, srn, srd)
    tl.store(r_ptr + r_offs, (out - x_in).to(r_ptr.dtype.element_ty), mask=mask)


def _tiles(B: int, N: int, D: int) -> tuple[tuple[int, int], dict]:
    BLOCK_D = min(next_pow2(D), _BLOCK_D_MAX)
    BLOCK_R = max(1, min(next_pow2(B * N), _TILE // BLOCK_D))
    grid = (triton.cdiv(B * N, BLOCK_R), triton.cdiv(D, BLOCK_D))
    return grid, {"BLOCK_R": BLOCK_R, "BLOCK_D": BLOCK_D}


def plan_apply_residual(x: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> Launch:
    """The launch of ``out <- x + r`` (checked arguments, numel > 0)."""
    B, N, D = dims3(x)
    x3, r3, o3 = (view3(t, (B, N, D)) for t in (x, r, out))
    if o3.data_ptr() != out.data_ptr():  # view3 had to copy: writes would be lost
        raise ValueError(
            f"fastcache::apply_residual_out: out (shape {tuple(out.shape)}, strides {out.stride()}) must be "
            "viewable as (B, N, D) for the Triton kernel; pass a contiguous buffer"
        )
    grid, tiles = _tiles(B, N, D)
    args = (x3, r3, o3, B * N, N, D, *x3.stride(), *r3.stride(), *o3.stride())
    return Launch(_apply_residual_kernel, grid, args, dict(tiles, ACC_FP64=acc_is_fp64(x)), {"num_warps": 8})


def plan_store_residual(out: torch.Tensor, x_in: torch.Tensor, flag: torch.Tensor, r: torch.Tensor) -> Launch:
    """The launch of ``r <- out - x_in`` iff ``flag`` (checked arguments, numel > 0)."""
    B, N, D = dims3(out)
    o3, x3, r3 = (view3(t, (B, N, D)) for t in (out, x_in, r))
    grid, tiles = _tiles(B, N, D)
    args = (o3, x3, flag, r3, B * N, N, D, *o3.stride(), *x3.stride(), *r3.stride())
    return Launch(_store_residual_kernel, grid, args, dict(tiles, ACC_FP64=acc_is_fp64(out)), {"num_warps": 8})


def apply_residual(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Schema ``apply_residual(Tensor x, Tensor r) -> Tensor``: ``x + r`` in ``x.dtype``.

    x, r: one shape, any strides, any float dtypes. Returns ``torch.empty_like(x)``
    filled. See :func:`fastcache.ops.reference.apply_residual`.
    """
    contracts.check_apply_residual(x, r)
    check_triton_device("fastcache::apply_residual", "x", x)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    if view3(out, dims3(x)).data_ptr() != out.data_ptr():  # a permuted >3-D layout: write a contiguous result
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    plan_apply_residual(x, r, out).run()
    return out


def apply_residual_out(x: torch.Tensor, r: torch.Tensor, out: torch.Tensor) -> None:
    """Schema ``apply_residual_out(Tensor x, Tensor r, Tensor(a!) out) -> ()``.

    ``out <- x + r``; out: x's shape and dtype, any strides viewable as (B, N, D); may be
    ``x`` or ``r`` (in place), must not partially overlap them.
    """
    contracts.check_apply_residual_out(x, r, out)
    check_triton_device("fastcache::apply_residual_out", "x", x)
    if x.numel():
        plan_apply_residual(x, r, out).run()


def store_residual(out: torch.Tensor, x_in: torch.Tensor, flag: torch.Tensor, r: torch.Tensor) -> None:
    """Schema ``store_residual(Tensor out, Tensor x_in, Tensor flag, Tensor(a!) r) -> ()``.

    ``r <- out - x_in`` (in ``r.dtype``) iff the one-element ``flag`` (bool, or any
    dtype: nonzero = set) is set, read on the device. out, x_in, r: one shape, any
    strides. See :func:`fastcache.ops.reference.store_residual`.
    """
    op = "fastcache::store_residual"
    contracts.check_store_residual(out, x_in, flag, r)
    check_triton_device(op, "r", r)
    if r.numel() == 0:
        return
    r3 = view3(r, dims3(out))
    if r3.data_ptr() != r.data_ptr():  # view3 had to copy: writes would be lost
        raise ValueError(
            f"{op}: r (shape {tuple(r.shape)}, strides {r.stride()}) must be viewable as (B, N, D) for the Triton "
            "kernel (it is written in place); pass a contiguous r"
        )
    plan_store_residual(out, x_in, flag, r).run()
