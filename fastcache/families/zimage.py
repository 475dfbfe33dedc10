"""diffusers' ``ZImageTransformer2DModel`` (Z-Image, Z-Image-Turbo): three lists of the same
block class. ``noise_refiner`` (image tokens) and ``context_refiner`` (caption tokens,
unmodulated) run first, then the model embeds and concatenates them per sample into one
padded sequence for ``layers``. The stack is ``layers`` alone (the refiners run
uncached before it: 4 of 34 blocks in Z-Image); every layer gets the same arguments.

Blocks are called positionally with the stream named ``x``. Each modulates with
``adaLN_modulation(adaln_input)`` (four chunks: scale and gate of the attention, then of
the MLP; no shift), gates through ``tanh`` and post-norms each branch output
(``x + tanh(g) * norm2(f)``). The model's timestep ``t`` is ``1 - sigma``: it rises
during a run.

TeaCache indicator: the first layer's ``attention_norm1(x) * (1 + scale_msa)``, with the
RMSNorm's weight folded into the scale; the fused indicator op normalises with a
LayerNorm (the mean removed, which RMSNorm keeps). No TeaCache coefficients are
published for Z-Image, so the rescaling is the identity."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec

X = "x"


def _refuse_per_token(call, what: str) -> None:
    if call.get("noise_mask") is not None:
        raise ValueError(
            "fastcache: this Z-Image call is in omni mode (noise_mask given): every token has its own modulation "
            f"(noisy or clean), and {what} needs one modulation per sample. Use a stack-level method that reads "
            "no modulation (FirstBlockCacheConfig, DeltaDiTConfig, MagCacheConfig) for it."
        )


def _indicator(block, call):
    _refuse_per_token(call, "the TeaCache indicator")
    a = call["adaln_input"]
    mod = block.adaLN_modulation(a)
    scale = mod.chunk(4, dim=1)[0]
    norm = block.attention_norm1
    if norm.weight is not None:
        scale = norm.weight * (1 + scale) - 1
    return call[X], torch.zeros_like(scale), scale, norm.eps, ((block.adaLN_modulation, mod, (a,)),)


class ZImageProgram(BlockProgram):
    """diffusers ``ZImageTransformerBlock``: attention, then the SwiGLU MLP; gated by
    ``tanh`` of the modulation (ungated in the unmodulated caption refiner)."""

    family = "diffusers-zimage"

    def branches(self, block):
        gated = block.modulation
        return (Branch("attn", (X,), gated=gated), Branch("mlp", (X,), gated=gated))

    def run(self, block, call, streams, ex: Executor):
        x = streams[X]
        if block.modulation:
            _refuse_per_token(call, "branch-level caching (a cached branch is re-gated per sample)")
            scale_msa, gate_msa, scale_mlp, gate_mlp = (
                block.adaLN_modulation(call["adaln_input"]).unsqueeze(1).chunk(4, 2)
            )
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        else:
            scale_msa = scale_mlp = gate_msa = gate_mlp = None

        def attn():
            n = block.attention_norm1(x)
            if scale_msa is not None:
                n = n * scale_msa
            out = block.attention(n, attention_mask=call["attn_mask"], freqs_cis=call["freqs_cis"])
            return (block.attention_norm2(out),)

        (x,) = ex.residual("attn", attn, (x,), (gate_msa,))

        def mlp():
            n = block.ffn_norm1(x)
            if scale_mlp is not None:
                n = n * scale_mlp
            return (block.ffn_norm2(block.feed_forward(n)),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {X: x}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_z_image.ZImageTransformerBlock", lambda b: ZImageProgram()
    )


SPEC = ModelSpec(
    name="diffusers-zimage",
    model_types="diffusers.models.transformers.transformer_z_image.ZImageTransformer2DModel",
    segments=("layers",),
    streams=(X,),
    returns=(X,),
    modulation=_indicator,
    timestep_arg="t",
    timestep_rises=True,
    interior=program_for,
    refuse_args=("controlnet_block_samples",),
)
