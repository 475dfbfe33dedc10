"""Shared shapes, dtypes and error bounds for the op parity tests (every backend)."""

from __future__ import annotations

import torch

# (B, N, D): odd sizes on purpose (1, 97, 1153 = 1152 + 1, 1025 tokens)
SHAPES = [(1, 1, 1), (2, 1, 97), (3, 17, 97), (1, 1025, 64), (2, 33, 1153), (2, 256, 1152)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# fp32: tight relative bound on sums / outputs (fp32 accumulation, different order).
FP32_RTOL = 2e-5
FP32_ATOL = 1e-5
# low precision: kernel error vs fp64 oracle must stay within LOWP_FACTOR x the error of
# the eager reference computed in that dtype, plus an absolute floor of a few ulps.
LOWP_FACTOR = 2.0
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_lowp_bound(kernel_out, lowp_ref_out, exact_out, dtype, what=""):
    """flash-attention's rule: |kernel - exact| <= factor * |lowp_eager - exact| + floor."""
    k = max_err(kernel_out, exact_out)
    r = max_err(lowp_ref_out, exact_out)
    floor = 4 * ULP[dtype] * max(1.0, exact_out.double().abs().max().item())
    assert k <= LOWP_FACTOR * r + floor, f"{what}: kernel err {k:.3e} > {LOWP_FACTOR} x eager err {r:.3e} + {floor:.3e}"
