"""Triton-specific argument checks and launch helpers shared by the launchers.

Each op's argument contract (shapes, dtypes, devices, out rules, the decision-state
layout) is :mod:`fastcache.ops.contracts`, which every launcher calls first. What is
checked here is Triton's own: the device (CUDA, or CPU under the interpreter) and the
layouts the kernels address through flat offsets. Metadata only: a launcher never
reads a device value back to the host.
"""

from __future__ import annotations

import struct

import torch
import triton


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous for the Triton kernel (shape {tuple(t.shape)}, strides {t.stride()}); "
            f"pass {name}.contiguous(), or call fastcache.ops.{op.split('::')[-1]}, which does it for you"
        )


def check_triton_device(op: str, ref_name: str, ref: torch.Tensor) -> None:
    """``ref``'s device is one Triton can run on (the contract has put every tensor there)."""
    if ref.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"{op}: the Triton kernels run on CUDA tensors, got {ref_name} on {ref.device}. On CPU use the "
            "C++ or eager backend (FASTCACHE_BACKEND=cpp|eager), or set TRITON_INTERPRET=1 before "
            "anything imports triton to run the kernels in Triton's interpreter."
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
