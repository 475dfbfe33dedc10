"""diffusers' ``SanaTransformer2DModel`` (Sana, Sana-Sprint): one stream of image tokens.
The model embeds the timestep once (``AdaLayerNormSingle``: the blocks' ``timestep``
argument is the ``6 * D`` modulation vector); each block adds its ``scale_shift_table``
(six chunks, PixArt's layout: shift, scale, gate of the linear self-attention, then of
the MLP). An ungated cross-attention to the caption reads the un-normed stream; the MLP
(``GLUMBConv``) is convolutional, so the block gets the token grid's ``height`` and
``width``.

TeaCache indicator: the first block's ``norm1(x) * (1 + scale_msa) + shift_msa``. No
TeaCache coefficients are published for Sana, so the rescaling is the identity."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec

H = "hidden_states"
_ATTN = Branch("attn", (H,))
_CROSS = Branch("cross", (H,), gated=False)
_MLP = Branch("mlp", (H,))


def _modulation(block, call, x):
    """``scale_shift_table[None] + timestep.reshape(B, 6, D)`` in six ``(B, 1, D)`` chunks."""
    return (block.scale_shift_table[None] + call["timestep"].reshape(x.shape[0], 6, -1)).chunk(6, dim=1)


def _indicator(block, call):
    x = call[H]
    shift, scale = _modulation(block, call, x)[:2]
    return x, shift, scale, block.norm1.eps


class SanaProgram(BlockProgram):
    """diffusers ``SanaTransformerBlock``: linear self-attention (gated), cross-attention
    (ungated; absent without ``cross_attention_dim``), convolutional MLP (gated)."""

    family = "diffusers-sana"

    def branches(self, block):
        return (_ATTN, _CROSS, _MLP) if block.attn2 is not None else (_ATTN, _MLP)

    def run(self, block, call, streams, ex: Executor):
        x = streams[H]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, call, x)

        def attn():
            n = (block.norm1(x) * (1 + scale_msa) + shift_msa).to(x.dtype)
            return (block.attn1(n),)

        (x,) = ex.residual("attn", attn, (x,), (gate_msa,))

        if block.attn2 is not None:

            def cross():
                return (
                    block.attn2(
                        x,
                        encoder_hidden_states=call["encoder_hidden_states"],
                        attention_mask=call["encoder_attention_mask"],
                    ),
                )

            (x,) = ex.residual("cross", cross, (x,), (None,))

        def mlp():
            n = block.norm2(x) * (1 + scale_mlp) + shift_mlp
            n = n.unflatten(1, (call["height"], call["width"])).permute(0, 3, 1, 2)
            return (block.ff(n).flatten(2, 3).permute(0, 2, 1),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {H: x}


def register_programs() -> None:
    register_program("diffusers.models.transformers.sana_transformer.SanaTransformerBlock", lambda b: SanaProgram())


SPEC = ModelSpec(
    name="diffusers-sana",
    model_types="diffusers.models.transformers.sana_transformer.SanaTransformer2DModel",
    segments=("transformer_blocks",),
    streams=(H,),
    returns=(H,),
    modulation=_indicator,
    interior=program_for,
    refuse_args=("controlnet_block_samples",),
)
