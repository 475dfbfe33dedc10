"""diffusers' ``Lumina2Transformer2DModel`` (Lumina-Image 2.0): three lists of the same
block class. ``context_refiner`` (caption tokens, unmodulated) and ``noise_refiner``
(image tokens) run first, then the model packs caption and image tokens per sample into
one padded sequence for ``layers``. The stack is ``layers`` alone (the refiners run
uncached before it, as in the TeaCache authors' Lumina2 code); every layer gets the same
arguments.

Each modulated block reads ``norm1.linear(silu(temb))`` (``LuminaRMSNormZero``: four
chunks, scale and gate of the attention, then of the MLP; no shift), gates through
``tanh`` and post-norms each branch output (``x + tanh(g) * norm2(f)``). The pipeline
passes ``1 - t / 1000``: the timestep rises during a run.

TeaCache indicator: the first layer's ``norm1(x, temb)[0]`` = ``RMSNorm(x) * (1 +
scale_msa)`` (TeaCache4Lumina2), through the LayerNorm-form op on ``[x, -x]``
(``_rmsnorm.py``)."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._rmsnorm import rms_indicator

H = "hidden_states"
# TeaCache4Lumina2/teacache_lumina2.py (ali-vilab/TeaCache at 7c10efc), the "v1" polynomial
# its code uses (numpy.poly1d order); its README offers a "v2" fit (docs/methods.md).
TEACACHE_COEFFICIENTS = (393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344)


def _modulation(block, temb):
    """``LuminaRMSNormZero``'s linear: (scale_msa, gate_msa, scale_mlp, gate_mlp), each ``(B, D)``,
    and the linear's output."""
    emb = block.norm1.linear(block.norm1.silu(temb))
    return emb.chunk(4, dim=1), emb


def _indicator(block, call):
    (scale, *_), emb = _modulation(block, call["temb"])
    norm = block.norm1.norm
    return (*rms_indicator(call[H], None, scale, norm.eps, norm.weight), ((block.norm1.linear, emb),))


class Lumina2Program(BlockProgram):
    """diffusers ``Lumina2TransformerBlock``: attention, then the SwiGLU MLP, each output
    post-normed; gated by ``tanh`` of the modulation (ungated in the caption refiner)."""

    family = "diffusers-lumina2"

    def branches(self, block):
        gated = block.modulation
        return (Branch("attn", (H,), gated=gated), Branch("mlp", (H,), gated=gated))

    def run(self, block, call, streams, ex: Executor):
        x = streams[H]
        if block.modulation:
            (scale_msa, gate_msa, scale_mlp, gate_mlp), _ = _modulation(block, call["temb"])
            gate_msa, gate_mlp = gate_msa.unsqueeze(1).tanh(), gate_mlp.unsqueeze(1).tanh()
        else:
            gate_msa = gate_mlp = None

        def attn():
            n = block.norm1.norm(x) * (1 + scale_msa[:, None]) if block.modulation else block.norm1(x)
            out = block.attn(
                hidden_states=n,
                encoder_hidden_states=n,
                attention_mask=call["attention_mask"],
                image_rotary_emb=call["image_rotary_emb"],
            )
            return (block.norm2(out),)

        (x,) = ex.residual("attn", attn, (x,), (gate_msa,))

        def mlp():
            n = block.ffn_norm1(x)
            if block.modulation:
                n = n * (1 + scale_mlp.unsqueeze(1))
            return (block.ffn_norm2(block.feed_forward(n)),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {H: x}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_lumina2.Lumina2TransformerBlock", lambda b: Lumina2Program()
    )


SPEC = ModelSpec(
    name="diffusers-lumina2",
    model_types="diffusers.models.transformers.transformer_lumina2.Lumina2Transformer2DModel",
    segments=("layers",),
    streams=(H,),
    returns=(H,),
    modulation=_indicator,
    timestep_rises=True,
    interior=program_for,
    teacache_coefficients=TEACACHE_COEFFICIENTS,
)
