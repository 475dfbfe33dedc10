"""Pieces the AdaLN families share: the adaLN-Zero modulation linear and fp16 clipping."""

from __future__ import annotations

import torch


def adaln_zero(norm, temb):
    """AdaLayerNormZero(-X)'s modulation alone: ``linear(silu(temb))``, all chunks in one
    tensor (the caller chunks it; the indicator reads chunks 0 and 1, shift and scale)."""
    return norm.linear(norm.silu(temb))


def dual_adaln_zero(block, temb):
    """A dual-stream block's two adaLN-Zero modulations (``norm1`` for the image stream,
    ``norm1_context`` for the text), each as its six chunks: shift, scale, gate of the
    attention, then of the MLP (Flux's and HunyuanVideo's dual blocks)."""
    return adaln_zero(block.norm1, temb).chunk(6, 1), adaln_zero(block.norm1_context, temb).chunk(6, 1)


def clip16(h):
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h
