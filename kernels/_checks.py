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
