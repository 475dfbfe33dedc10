"""diffusers' ``LTXVideoTransformer3DModel`` (LTX-Video): one stream of packed video tokens;
each block modulates with ``scale_shift_table + temb`` (six chunks: shift, scale, gate of
self-attention, then of the MLP) around RMSNorms; an ungated cross-attention to the text
(on the un-normed stream) sits between."""

from __future__ import annotations

import numbers

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._rmsnorm import rms_indicator

H = "hidden_states"
_ATTN = Branch("attn", (H,))
_CROSS = Branch("cross", (H,), gated=False)
_MLP = Branch("mlp", (H,))
# TeaCache4LTX-Video/teacache_ltx.py (ali-vilab/TeaCache), numpy.poly1d order; its indicator
# is transformer_blocks[0].norm1(x) * (1 + scale_msa) + shift_msa.
TEACACHE_COEFFICIENTS = (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03)


def _modulation(block, temb, B):
    """The six chunks, each ``(B, 1, D)`` (``(B, N, D)`` for a per-token ``temb``)."""
    ada = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(B, temb.size(1), 6, -1)
    return ada.unbind(dim=2)


def _indicator(block, call):
    x, temb = call[H], call["temb"]
    if temb.size(1) != 1:
        raise ValueError(
            "fastcache: this LTX-Video call modulates every token separately (a per-token timestep, as "
            "LTXConditionPipeline passes); the TeaCache indicator reads one modulation per sample. Use a "
            "branch-level method (FORA, TaylorSeer, ScheduleConfig) for it."
        )
    shift, scale = _modulation(block, temb, x.size(0))[:2]
    return rms_indicator(x, shift, scale, block.norm1.eps, block.norm1.weight)


class LTXProgram(BlockProgram):
    """diffusers ``LTXVideoTransformerBlock``: self-attention (gated), cross-attention
    (ungated), MLP (gated)."""

    family = "diffusers-ltx"

    def branches(self, block):
        return (_ATTN, _CROSS, _MLP)

    def run(self, block, call, streams, ex: Executor):
        x = streams[H]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, call["temb"], x.size(0))

        def attn():
            n = block.norm1(x) * (1 + scale_msa) + shift_msa
            return (
                block.attn1(hidden_states=n, encoder_hidden_states=None, image_rotary_emb=call["image_rotary_emb"]),
            )

        (x,) = ex.residual("attn", attn, (x,), (gate_msa,))

        def cross():
            return (
                block.attn2(
                    x,
                    encoder_hidden_states=call["encoder_hidden_states"],
                    image_rotary_emb=None,
                    attention_mask=call["encoder_attention_mask"],
                ),
            )

        (x,) = ex.residual("cross", cross, (x,), (None,))

        def mlp():
            return (block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {H: x}


def register_programs() -> None:
    register_program("diffusers.models.transformers.transformer_ltx.LTXVideoTransformerBlock", lambda b: LTXProgram())


def _frame_layout(model, call):
    """The latents come packed (``(B, N, C)``, frame-major); the call's ``num_frames``,
    ``height``, ``width`` are the token grid the rotary embedding is built on."""
    f, h, w = (call.get(k) for k in ("num_frames", "height", "width"))
    if not all(isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool) for v in (f, h, w)):
        return None
    return f, h * w


SPEC = ModelSpec(
    name="diffusers-ltx",
    model_types="diffusers.models.transformers.transformer_ltx.LTXVideoTransformer3DModel",
    segments=("transformer_blocks",),
    streams=(H,),
    returns=(H,),
    modulation=_indicator,
    interior=program_for,
    teacache_coefficients=TEACACHE_COEFFICIENTS,
    frame_layout=_frame_layout,
)
