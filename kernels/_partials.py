"""Fixed-order final reduction of per-program partial sums (both rel-L1 ops).

The sums feed a cache decision, so they must be bitwise reproducible: the first kernel
of each op writes one ``(num, den)`` pair per program into ``partials (B, P, 2)`` (no
atomics), and :func:`finish_sums` reduces them here, one program per batch element,
in a fixed order. The result does not depend on how programs were scheduled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import Launch, next_pow2

_BLOCK_P_MAX = 1024


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, P, BLOCK_P: tl.constexpr):
    """out[b] = (sum_p partials[b, p, 0], sum_p partials[b, p, 1]), p in fixed chunks."""
    pid_b = tl.program_id(0).to(tl.int64)
    base = partials_ptr + pid_b * P * 2
    offs = tl.arange(0, BLOCK_P)
    acc_num = tl.zeros([BLOCK_P], dtype=out_ptr.dtype.element_ty)
    acc_den = tl.zeros([BLOCK_P], dtype=out_ptr.dtype.element_ty)
    for start in range(0, P, BLOCK_P):
        p = start + offs
        mask = p < P
        acc_num += tl.load(base + 2 * p, mask=mask, other=0.0)
        acc_den += tl.load(base + 2 * p + 1, mask=mask, other=0.0)
    tl.store(out_ptr + pid_b * 2, tl.sum(acc_num, axis=0))
    tl.store(out_ptr + pid_b * 2 + 1, tl.sum(acc_den, axis=0))


def plan_finish_sums(partials: torch.Tensor) -> tuple[Launch, torch.Tensor]:
    """The launch reducing ``(B, P, 2)`` partials (B >= 1) and its ``(B, 2)`` output."""
    B, P, _ = partials.shape
    out = torch.empty((B, 2), dtype=partials.dtype, device=partials.device)
    BLOCK_P = min(next_pow2(P), _BLOCK_P_MAX)
    return Launch(_sum_partials_kernel, (B,), (partials, out, P), {"BLOCK_P": BLOCK_P}, {"num_warps": 4}), out


def finish_sums(partials: torch.Tensor) -> torch.Tensor:
    """``(B, P, 2)`` partials -> ``(B, 2)`` sums, deterministic. ``P >= 1``."""
    if partials.shape[0] == 0:
        return torch.empty((0, 2), dtype=partials.dtype, device=partials.device)
    launch, out = plan_finish_sums(partials)
    launch.run()
    return out
