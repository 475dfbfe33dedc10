"""``taylor_forecast`` / ``taylor_update``: TaylorSeer's device work (Triton).

TaylorSeer (docs/methods.md section 8) keeps, per cached feature, the finite differences
``H[k] = D^k`` (k = 0 .. m) at the last computed step in one contiguous
``(m+1, *S)`` tensor. Both kernels are flat and element-wise over the ``E = numel(S)``
feature elements, int64 offsets, fp32 math (fp64 for fp64), the loop over orders
unrolled (``ORDER`` is a constexpr: one specialisation per order).

* forecast (Eq. TS2): ``out = sum_k H[k] * c_k``, ``c_0 = 1``, ``c_k = c_{k-1} * dx / k``;
* combine (the fitted filler, docs/methods.md section 12): ``out = sum_k w[k] * H[k]``,
  the weights a ``(m+1,)`` fp32 device tensor written by the host at plan time;
* update (Eq. TS1), in place, iff the device flag ``store`` is set: ``d = f``; for k =
  0..m: ``old = H[k]; H[k] = d; d = (k < valid) ? (d - old) / dx : 0``.

``dx``, ``valid`` and ``store`` are device scalars loaded by the kernel (never read to the
host): a compiled step graph is the same at every step. When ``store`` is off every
load and store of the update is masked.

Example::

    f_hat = taylor_forecast(hist, dx)                 # forecast step
    taylor_update(hist, f, dx, valid, store)          # after a (possibly) computed step
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcache.ops import contracts

from ._checks import Launch, acc_is_fp64, check_triton_device

_BLOCK = 1024


@triton.jit
def _taylor_forecast_kernel(
    h_ptr, dx_ptr, out_ptr, E,
    ORDER: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    E64 = tl.cast(E, tl.int64)  # k * E in int64: (ORDER + 1) * E may pass 2^31 where E does not
    x = tl.load(dx_ptr).to(acc_ty)
    acc = tl.load(h_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    c = x * 0.0 + 1.0
    for k in tl.static_range(1, ORDER + 1):
        c = c * x / k
        acc += tl.load(h_ptr + k * E64 + offs, mask=mask, other=0.0).to(acc_ty) * c
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _taylor_update_kernel(
    h_ptr, f_ptr, dx_ptr, valid_ptr, store_ptr, E,
    ORDER: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    store = tl.load(store_ptr) != 0
    # where(), not `&`: Triton's interpreter turns a broadcast scalar bool `&` into ints
    mask = tl.where(store, offs < E, False)
    E64 = tl.cast(E, tl.int64)  # k * E in int64: (ORDER + 1) * E may pass 2^31 where E does not
    x = tl.load(dx_ptr).to(acc_ty)
    nv = tl.load(valid_ptr).to(acc_ty)
    d = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    for k in tl.static_range(ORDER + 1):
        old = tl.load(h_ptr + k * E64 + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(h_ptr + k * E64 + offs, d.to(h_ptr.dtype.element_ty), mask=mask)
        if k < ORDER:
            d = tl.where(nv > k, (d - old) / x, 0.0)


def plan_taylor_forecast(history: torch.Tensor, dx: torch.Tensor, out: torch.Tensor) -> Launch:
    """The launch of ``out <- sum_k history[k] dx^k / k!`` (checked arguments, numel > 0)."""
    E = out.numel()
    grid = (triton.cdiv(E, _BLOCK),)
    args = (history, dx, out, E)
    cx = {"ORDER": history.shape[0] - 1, "BLOCK": _BLOCK, "ACC_FP64": acc_is_fp64(history)}
    return Launch(_taylor_forecast_kernel, grid, args, cx, {"num_warps": 4})


def plan_taylor_update(
    history: torch.Tensor, f: torch.Tensor, dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> Launch:
    """The launch of the in-place difference update gated by ``store`` (numel > 0)."""
    E = f.numel()
    grid = (triton.cdiv(E, _BLOCK),)
    args = (history, f, dx, valid, store, E)
    cx = {"ORDER": history.shape[0] - 1, "BLOCK": _BLOCK, "ACC_FP64": acc_is_fp64(history)}
    return Launch(_taylor_update_kernel, grid, args, cx, {"num_warps": 4})


def taylor_forecast(history: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Schema ``taylor_forecast(Tensor history, Tensor dx) -> Tensor``; see
    :func:`fastcache.ops.reference.taylor_forecast`. Returns ``(*S)`` in history's dtype."""
    contracts.check_taylor_forecast(history, dx)
    check_triton_device("fastcache::taylor_forecast", "history", history)
    out = torch.empty(history.shape[1:], dtype=history.dtype, device=history.device)
    if out.numel():
        plan_taylor_forecast(history, dx, out).run()
    return out


def taylor_update(
    history: torch.Tensor, f: torch.Tensor, dx: torch.Tensor, valid: torch.Tensor, store: torch.Tensor
) -> None:
    """Schema ``taylor_update(Tensor(a!) history, Tensor f, Tensor dx, Tensor valid, Tensor store) -> ()``;
    see :func:`fastcache.ops.reference.taylor_update`. f: contiguous, history's feature shape."""
    contracts.check_taylor_update(history, f, dx, valid, store)
    check_triton_device("fastcache::taylor_update", "history", history)
    if f.numel():
        plan_taylor_update(history, f, dx, valid, store).run()


@triton.jit
def _history_combine_kernel(
    h_ptr, w_ptr, out_ptr, E,
    ORDER: tl.constexpr, BLOCK: tl.constexpr, ACC_FP64: tl.constexpr,
):  # fmt: skip
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < E
    E64 = tl.cast(E, tl.int64)  # k * E in int64: (ORDER + 1) * E may pass 2^31 where E does not
    acc = tl.load(h_ptr + offs, mask=mask, other=0.0).to(acc_ty) * tl.load(w_ptr).to(acc_ty)
    for k in tl.static_range(1, ORDER + 1):
        acc += tl.load(h_ptr + k * E64 + offs, mask=mask, other=0.0).to(acc_ty) * tl.load(w_ptr + k).to(acc_ty)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def plan_history_combine(history: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> Launch:
    """The launch of ``out <- sum_k weights[k] history[k]`` (checked arguments, numel > 0)."""
    E = out.numel()
    grid = (triton.cdiv(E, _BLOCK),)
    args = (history, weights, out, E)
    cx = {"ORDER": history.shape[0] - 1, "BLOCK": _BLOCK, "ACC_FP64": acc_is_fp64(history)}
    return Launch(_history_combine_kernel, grid, args, cx, {"num_warps": 4})


def history_combine(history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Schema ``history_combine(Tensor history, Tensor weights) -> Tensor``; see
    :func:`fastcache.ops.reference.history_combine`. Returns ``(*S)`` in history's dtype."""
    contracts.check_history_combine(history, weights)
    check_triton_device("fastcache::history_combine", "history", history)
    out = torch.empty(history.shape[1:], dtype=history.dtype, device=history.device)
    if out.numel():
        plan_history_combine(history, weights.contiguous(), out).run()
    return out
