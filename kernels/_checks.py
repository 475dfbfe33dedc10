"""Argument checks shared by the Triton launchers.

Every check reads metadata only (shape, dtype, stride, device): a launcher never reads
a device value back to the host. Messages name the argument, say what was wrong and how
to fix it; the public wrappers in :mod:`fastcache.ops` normalise most inputs already,
so these fire when a launcher is called directly or through the raw dispatcher op.
"""

from __future__ import annotations

import struct

import torch
import triton

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOATS:
        raise TypeError(
            f"{op}: {name} must be a floating tensor (fp32/fp16/bf16/fp64), got {t.dtype}"
        )


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
            f"pass {name}.contiguous(), or call fastcache.ops.{op}, which does it for you"
        )


def check_devices(
    op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None
) -> None:
    """All tensors on ``ref``'s device, and that device one Triton can run on."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move it to {ref.device}"
            )
    if ref.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"{op}: the Triton kernels run on CUDA tensors, got {ref_name} on {ref.device}. On CPU use the "
            "C++ or eager backend (FASTCACHE_BACKEND=cpp|eager), or set TRITON_INTERPRET=1 before "
            "anything imports triton to run the kernels in Triton's interpreter."
        )


def check_hold(op: str, hold: torch.Tensor | None) -> None:
    """``hold`` is None or one bool value (timestep_guard's repeat flag); metadata only:
    the kernel loads the value itself."""
    if hold is not None and (hold.dtype != torch.bool or hold.numel() != 1):
        raise ValueError(
            f"{op}: hold must be a 0-dim bool tensor (the repeat flag from timestep_guard), got "
            f"{hold.dtype} {tuple(hold.shape)}"
        )


def acc_is_fp64(t: torch.Tensor) -> bool:
    """fp64 inputs accumulate in fp64 (like the reference); everything else in fp32."""
    return t.dtype == torch.float64


def sums_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_fp32(value: float) -> float:
    """Round a Python float to the nearest fp32 (host arithmetic, no device involved).

    The reference compares fp32 state against ``torch.tensor(value, dtype=float32)``;
    pre-rounding makes the kernel compare against the same number whether the scalar
    reaches it as fp32 (compiled) or as a Python float (interpreter).
    """
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class Launch:
    """One kernel launch as a launcher would make it: the jit function, the grid, the
    runtime arguments (in the kernel's parameter order) and the constexpr / compile
    options. Launchers build it with their ``plan_*`` function and :meth:`run` it;
    tests/ops/test_ptx.py builds the same objects and compiles exactly these
    specialisations for sm_90 / sm_80, so the tested PTX is the PTX a GPU call compiles.
    """

    __slots__ = ("kernel", "grid", "args", "constexprs", "options")

    def __init__(self, kernel, grid: tuple, args: tuple, constexprs: dict, options: dict):
        self.kernel, self.grid, self.args = kernel, tuple(grid), tuple(args)
        self.constexprs, self.options = dict(constexprs), dict(options)

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def view3(t: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``t`` as ``(B, N, D)`` in its logical order: a view when its strides allow one
    (any contiguous tensor, transposed 2-D/3-D views), else a copy (metadata decides;
    no device value is read)."""
    if tuple(t.shape) == tuple(shape):
        return t
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def dims3(t: torch.Tensor) -> tuple[int, int, int]:
    """The ``(B, N, D)`` an element-wise op sees for a tensor of any shape."""
    if t.dim() == 3:
        return tuple(t.shape)
    if t.dim() == 0:
        return (1, 1, 1)
    D = t.shape[-1]
    return (1, t.numel() // D if D else 0, D)


def check_out(op: str, out: torch.Tensor, like: torch.Tensor, **inputs: torch.Tensor) -> None:
    """``out`` has the shape and dtype of ``like`` (x) and is either one of ``inputs`` exactly (in
    place: same storage offset and strides) or disjoint from them (metadata only)."""
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{op}: out must have x's shape {tuple(like.shape)} and dtype {like.dtype}, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    for name, t in inputs.items():
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        if t.data_ptr() == out.data_ptr() and t.stride() == out.stride():
            continue
        raise ValueError(
            f"{op}: out shares memory with {name} but is not {name} itself (different offset or strides); "
            f"pass out={name} for an in-place update, or a separate buffer"
        )
