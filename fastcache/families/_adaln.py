"""Pieces the AdaLN families share: the adaLN-Zero modulation linear and fp16 clipping."""

from __future__ import annotations

import torch


def adaln_zero(norm, temb):
    """AdaLayerNormZero(-X)'s modulation alone: ``linear(silu(temb))``, all chunks in one
    tensor (the caller chunks it; the indicator reads chunks 0 and 1, shift and scale)."""
    return norm.linear(norm.silu(temb))


def clip16(h):
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h
