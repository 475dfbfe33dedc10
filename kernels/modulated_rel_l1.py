"""``modulated_rel_l1_sums``: TeaCache's indicator and its distance in one pass (Triton).

TeaCache (Liu et al., arXiv 2411.19108, Sec. 3.3) measures the first block's
timestep-modulated input ``I_s = LN(x) * (1 + scale) + shift`` (LayerNorm without
affine, biased variance, eps inside the square root) and its relative L1 change
``d_s = sum|I_s - I_{s-1}| / sum|I_{s-1}|``. This kernel reads ``x`` and ``prev`` once,
writes ``prev <- I_s`` and returns the per-sample sums before the division, so that a
sequence-parallel run can all-reduce them::

    sums[b] = (sum_{n,d} |m[b,n,d] - prev[b,n,d]|, sum_{n,d} |prev[b,n,d]|)

Layout: x ``(B, N, D)`` with any strides (read in place); prev ``(B, N, D)`` contiguous;
shift, scale ``(B, D)`` contiguous. Each program normalises a ``(BLOCK_N, BLOCK_D)``
tile of whole rows (``BLOCK_D >= D``: the LayerNorm needs the full row), grid
``(cdiv(N, BLOCK_N), B)`` (the long axis first: CUDA caps gridDim.y at 65535); per-program
partials are reduced in a fixed order by :func:`fastcache.kernels._partials.finish_sums`.
fp32 accumulation whatever the input dtype (fp64 for fp64 inputs).

Example::

    sums = modulated_rel_l1_sums(x, shift_msa, scale_msa, 1e-6, prev)   # (B, 2) fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_contiguous, check_triton_device, next_pow2, sums_dtype
from ._partials import finish_sums

# Whole rows live in one tile; 16384 channels covers every DiT we know of (FLUX 3072,
# Wan 5120) with room to spare. Past it the launcher refuses with a clear error.
MAX_D = 16384
_TILE = 4096  # elements per program: BLOCK_N rows x BLOCK_D channels


@triton.jit
def _modulated_rel_l1_kernel(
    x_ptr,
    shift_ptr,
    scale_ptr,
    prev_ptr,
    partials_ptr,
    N,
    D,
    P,
    eps,
    sxb,
    sxn,
    sxd,
    hold_ptr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_FP64: tl.constexpr,
    HAS_HOLD: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    # grid (P, B): the partials axis, which reaches 10^5 programs on long videos, on axis 0
    # (CUDA's gridDim.y is at most 65535); the batch on axis 1
    pid_b = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    # int64: (b * N + n) * D passes 2^31 for long video token sequences
    offs = ((pid_b * N + rows) * D)[:, None] + cols[None, :]
    # x through its own strides: a transposed patch-embedding view is read in place
    x_offs = (pid_b * sxb + rows.to(tl.int64) * sxn)[:, None] + cols.to(tl.int64)[None, :] * sxd

    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(acc_ty)
    # IEEE div/sqrt (per row, so free): for fp32 a plain `/` and tl.sqrt compile to
    # the approximate div.full / sqrt.approx; these match the reference's 1/sqrt.
    # (fp64 `/` and sqrt are IEEE already, and div_rn/sqrt_rn take fp32 only.)
    d = D + tl.zeros(
        [BLOCK_N], acc_ty
    )  # D as a float vector (D may arrive as constexpr 1)
    one = tl.full([BLOCK_N], 1.0, acc_ty)
    if ACC_FP64:
        mean = tl.sum(x, axis=1) / d
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / d
        rstd = one / tl.sqrt(var + eps)
    else:
        mean = tl.math.div_rn(tl.sum(x, axis=1), d)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.math.div_rn(tl.sum(xc * xc, axis=1), d)
        rstd = tl.math.div_rn(one, tl.sqrt_rn(var + eps))
    shift = tl.load(shift_ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(acc_ty)
    scale = tl.load(scale_ptr + pid_b * D + cols, mask=col_ok, other=0.0).to(acc_ty)
    m = (xc * rstd[:, None]) * (1.0 + scale[None, :]) + shift[None, :]

    p = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    num = tl.sum(tl.sum(tl.where(mask, tl.abs(m - p), 0.0), axis=1), axis=0)
    den = tl.sum(tl.sum(tl.abs(p), axis=1), axis=0)
    out = partials_ptr + (pid_b * P + pid_n) * 2
    tl.store(out, num)
    tl.store(out + 1, den)
    if HAS_HOLD:  # timestep_guard's repeat flag, read on the device: set = prev kept
        mask = tl.where(tl.load(hold_ptr) == 0, mask, False)  # (`mask & scalar` trips the interpreter)
    tl.store(prev_ptr + offs, m.to(prev_ptr.dtype.element_ty), mask=mask)


def modulated_rel_l1_sums(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    prev: torch.Tensor,
    hold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Schema ``modulated_rel_l1_sums(Tensor x, Tensor shift, Tensor scale, float eps, Tensor(a!) prev,
    Tensor? hold=None) -> Tensor``.

    x, prev ``(B, N, D)``; shift, scale ``(B, D)``; x any strides, the others contiguous;
    any float dtypes; hold ``None`` or a one-value bool the kernel loads (set = prev kept).
    Returns ``(B, 2)`` fp32 (fp64 for fp64 x) and writes ``prev`` in place.
    See :func:`fastcache.ops.reference.modulated_rel_l1_sums`.
    """
    op = "fastcache::modulated_rel_l1_sums"
    contracts.check_modulated_rel_l1_sums(x, shift, scale, eps, prev, hold)
    B, N, D = x.shape
    for name, t in (("shift", shift), ("scale", scale), ("prev", prev)):
        check_contiguous(op, name, t)  # read / written through flat offsets
    check_triton_device(op, "x", x)
    if D > MAX_D:
        raise ValueError(
            f"{op}: D={D} channels exceeds the Triton kernel's whole-row tile ({MAX_D}); "
            "use the eager or C++ backend (FASTCACHE_BACKEND=eager|cpp) for this model"
        )
    out_dtype = sums_dtype(x)
    if x.numel() == 0:
        # No rows: nothing to normalise, both sums are empty sums.
        return torch.zeros((B, 2), dtype=out_dtype, device=x.device)
    launch, partials = plan_modulated_rel_l1(x, shift, scale, eps, prev, hold)
    launch.run()
    return finish_sums(partials)


def plan_modulated_rel_l1(x, shift, scale, eps, prev, hold=None) -> tuple[Launch, torch.Tensor]:
    """The launch of the partial-sums kernel and its ``(B, P, 2)`` output (checked, numel > 0)."""
    B, N, D = x.shape
    BLOCK_D = next_pow2(D)
    BLOCK_N = max(1, min(next_pow2(N), _TILE // BLOCK_D))
    P = triton.cdiv(N, BLOCK_N)
    partials = torch.empty((B, P, 2), dtype=sums_dtype(x), device=x.device)
    tile = BLOCK_N * BLOCK_D
    hold_arg = partials if hold is None else hold  # an unused pointer when there is no hold
    args = (x, shift, scale, prev, partials, N, D, P, float(eps), *x.stride(), hold_arg)
    constexprs = {"BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D, "ACC_FP64": acc_is_fp64(x), "HAS_HOLD": hold is not None}
    options = {"num_warps": 4 if tile <= 2048 else (8 if tile <= 8192 else 16)}
    return Launch(_modulated_rel_l1_kernel, (P, B), args, constexprs, options), partials
