"""diffusers' ``PixArtTransformer2DModel`` (PixArt-α/Σ):
``BasicTransformerBlock(norm_type="ada_norm_single")`` blocks, the timestep embedded once by
the model. Its spec and its program."""

from __future__ import annotations

from ..interior.base import program_for
from ..specs import ModelSpec
from ._basic import H, _BasicProgram, _check_basic, _feed_forward, _squeeze4, register_norm


def _modulation(block, call, x):
    """``scale_shift_table + timestep.reshape(B, 6, D)`` in six chunks."""
    B = x.shape[0]
    return (block.scale_shift_table[None] + call["timestep"].reshape(B, 6, -1)).chunk(6, dim=1)


def _indicator(block, call):
    x = call["hidden_states"]
    mod = _modulation(block, call, x)
    return x, mod[0], mod[1], block.norm1.eps


class AdaNormSingleProgram(_BasicProgram):
    """``BasicTransformerBlock(norm_type="ada_norm_single")`` (PixArt): the modulation
    is ``scale_shift_table + timestep.reshape(B, 6, D)`` (the model embeds the timestep
    once); cross-attention sees the un-normalised stream and is not gated."""

    family = "diffusers-basic-ada-norm-single"

    def run(self, block, call, streams, ex):
        x = streams[H]
        cak = _check_basic(block, call)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, call, x)

        def norm_mod1(h):
            return block.norm1(h) * (1 + scale_msa) + shift_msa

        x = self._self_attn(block, call, x, cak, norm_mod1, gate_msa, ex)
        x = self._cross(block, call, x, cak, ex, lambda h: h)

        def mlp():
            h = block.norm2(x) * (1 + scale_mlp) + shift_mlp
            return (_feed_forward(block, h),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {H: _squeeze4(x)}


def register_programs() -> None:
    register_norm("ada_norm_single", AdaNormSingleProgram)


SPEC = ModelSpec(
    name="diffusers-pixart",
    model_types="diffusers.models.transformers.pixart_transformer_2d.PixArtTransformer2DModel",
    segments=("transformer_blocks",),
    streams=("hidden_states",),
    returns=("hidden_states",),
    modulation=_indicator,
    interior=program_for,
)
