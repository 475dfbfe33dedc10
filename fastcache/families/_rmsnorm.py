"""The TeaCache indicator of an RMSNorm-modulated block, through the LayerNorm-form op.

fastcache's indicator op computes ``LN(x) * (1 + scale) + shift`` (LayerNorm without
affine). For ``x' = [x, -x]`` (concatenated channels) the mean is 0 and the biased variance
is ``mean(x^2)``, so ``LN(x') = [RMS(x), -RMS(x)]``: with ``scale' = [s, s]`` and ``shift' =
[b, -b]`` the op's indicator is ``[m, -m]`` for ``m = RMS(x) * (1 + s) + b``, and its
relative-L1 distance (both sums doubled) is ``m``'s. The cost is one copy of ``x`` per step.
"""

from __future__ import annotations

import torch


def rms_indicator(x, shift, scale, eps, weight=None):
    """``(x', shift', scale', eps)`` for the indicator ``RMSNorm(x) * (1 + scale) + shift``
    (``RMSNorm`` without affine, or with ``weight``); ``shift`` may be None (no shift).
    shift, scale: ``(B, D)`` or ``(B, 1, D)``."""
    scale = scale.reshape(scale.shape[0], -1)
    if weight is not None:
        scale = weight * (1 + scale) - 1
    shift = torch.zeros_like(scale) if shift is None else shift.reshape(shift.shape[0], -1)
    return torch.cat([x, -x], dim=-1), torch.cat([shift, -shift], dim=-1), torch.cat([scale, scale], dim=-1), eps
