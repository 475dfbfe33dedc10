"""``apply_residual`` / ``store_residual``: the stack-level residual cache (Triton).

TeaCache, Δ-DiT and First-Block Cache (docs/methods.md) cache ``R = out - in`` of a block
stack on computed steps and replay ``out = in + R`` on skipped ones. Both are flat
elementwise kernels over any shape, int64 offsets (video latents pass 2^31 elements),
fp32 math (fp64 for fp64 inputs).

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

from ._checks import acc_is_fp64, check_contiguous, check_devices, check_float

_BLOCK = 4096


@triton.jit
def _apply_residual_kernel(
    x_ptr, r_ptr, out_ptr, numel, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(out_ptr + offs, (x + r).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_residual_kernel(
    out_ptr,
    x_in_ptr,
    flag_ptr,
    r_ptr,
    numel,
    BLOCK: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    computed = tl.load(flag_ptr) != 0
    # where(), not `&`: Triton's interpreter turns a broadcast scalar bool `&` into ints
    mask = tl.where(computed, offs < numel, False)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    x_in = tl.load(x_in_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    tl.store(r_ptr + offs, (out - x_in).to(r_ptr.dtype.element_ty), mask=mask)


def _check_same_shape(op: str, names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    if any(t.shape != tensors[0].shape for t in tensors):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
        raise ValueError(f"{op}: {shapes} must have one shape")


def apply_residual(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Schema ``apply_residual(Tensor x, Tensor r) -> Tensor``: ``x + r`` in ``x.dtype``.

    x, r: one shape, contiguous, any float dtypes. See
    :func:`fastcache.ops.reference.apply_residual`.
    """
    op = "apply_residual"
    for name, t in (("x", x), ("r", r)):
        check_float(op, name, t)
    _check_same_shape(op, ("x", "r"), x, r)
    for name, t in (("x", x), ("r", r)):
        check_contiguous(op, name, t)
    check_devices(op, "x", x, r=r)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    _apply_residual_kernel[(triton.cdiv(numel, _BLOCK),)](
        x, r, out, numel, BLOCK=_BLOCK, ACC_FP64=acc_is_fp64(x), num_warps=8
    )
    return out


def store_residual(
    out: torch.Tensor, x_in: torch.Tensor, flag: torch.Tensor, r: torch.Tensor
) -> None:
    """Schema ``store_residual(Tensor out, Tensor x_in, Tensor flag, Tensor(a!) r) -> ()``.

    ``r <- out - x_in`` (in ``r.dtype``) iff the one-element ``flag`` (bool, or any
    dtype: nonzero = set) is set, read on the device. out, x_in, r: one shape,
    contiguous. See :func:`fastcache.ops.reference.store_residual`.
    """
    op = "store_residual"
    for name, t in (("out", out), ("x_in", x_in), ("r", r)):
        check_float(op, name, t)
    _check_same_shape(op, ("out", "x_in", "r"), out, x_in, r)
    if flag.numel() != 1:
        raise ValueError(
            f"{op}: flag must be the one-element decision flag (0-dim bool from cache_decision), "
            f"got shape {tuple(flag.shape)}"
        )
    for name, t in (("out", out), ("x_in", x_in), ("r", r)):
        check_contiguous(op, name, t)
    check_devices(op, "r", r, out=out, x_in=x_in, flag=flag)
    numel = r.numel()
    if numel == 0:
        return
    _store_residual_kernel[(triton.cdiv(numel, _BLOCK),)](
        out, x_in, flag, r, numel, BLOCK=_BLOCK, ACC_FP64=acc_is_fp64(out), num_warps=8
    )
    return
