"""diffusers' ``FluxTransformer2DModel`` (FLUX.1): dual-stream blocks, then single-stream
blocks on the concatenated tokens. Its spec and its two programs. Streams:
``hidden_states`` (image tokens) and ``encoder_hidden_states`` (text tokens)."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._adaln import adaln_zero, clip16, dual_adaln_zero

H, E = "hidden_states", "encoder_hidden_states"
_ATTN2 = Branch("attn", (H, E))
_MLP2 = Branch("mlp", (H, E))
_PARALLEL = Branch("parallel", ("joint",))
# TeaCache-FLUX's published rescaling polynomial (numpy.poly1d order)
TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


def _indicator(block, call):
    """The first dual-stream block's image-stream modulation (chunks 0, 1 of six)."""
    out = adaln_zero(block.norm1, call["temb"])
    shift, scale = out.chunk(6, dim=1)[:2]
    return call["hidden_states"], shift, scale, block.norm1.norm.eps, ((block.norm1.linear, out),)


class FluxDualProgram(BlockProgram):
    """diffusers ``FluxTransformerBlock``: one joint attention (both streams, each with
    its own gate), then one MLP per stream; fp16 outputs clipped as the block does."""

    family = "diffusers-flux-dual"

    def branches(self, block):
        return (_ATTN2, _MLP2)

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        temb = call["temb"]
        (
            (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp),
            (
                c_shift_msa,
                c_scale_msa,
                c_gate_msa,
                c_shift_mlp,
                c_scale_mlp,
                c_gate_mlp,
            ),
        ) = dual_adaln_zero(block, temb)
        kw = call.get("joint_attention_kwargs") or {}

        def attn():
            nx = block.norm1.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            nc = block.norm1_context.norm(c) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
            outs = block.attn(
                hidden_states=nx, encoder_hidden_states=nc, image_rotary_emb=call.get("image_rotary_emb"), **kw
            )
            if len(outs) != 2:
                raise ValueError(
                    "fastcache: the Flux attention returned an IP-adapter output; branch-level caching does not "
                    "model it. Remove the cache for IP-adapter runs."
                )
            return outs

        x, c = ex.residual("attn", attn, (x, c), (gate_msa.unsqueeze(1), c_gate_msa.unsqueeze(1)))

        def mlp():
            nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            return block.ff(nx), block.ff_context(nc)

        x, c = ex.residual("mlp", mlp, (x, c), (gate_mlp.unsqueeze(1), c_gate_mlp.unsqueeze(1)))
        return {H: x, E: clip16(c)}


class FluxSingleProgram(BlockProgram):
    """diffusers ``FluxSingleTransformerBlock``: text and image tokens concatenated
    into one "joint" stream; attention and MLP run in parallel on the same modulated
    input and meet in ``proj_out(cat(attn, mlp))`` under ONE gate, so they form one
    branch ("parallel") — they cannot be reused separately."""

    family = "diffusers-flux-single"

    def branches(self, block):
        return (_PARALLEL,)

    def run(self, block, call, streams, ex: Executor):
        c, x = streams[E], streams[H]
        T = c.shape[1]
        joint = torch.cat([c, x], dim=1)
        shift_msa, scale_msa, gate = adaln_zero(block.norm, call["temb"]).chunk(3, 1)
        kw = call.get("joint_attention_kwargs") or {}

        def parallel():
            n = block.norm.norm(joint) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            mlp = block.act_mlp(block.proj_mlp(n))
            a = block.attn(hidden_states=n, image_rotary_emb=call.get("image_rotary_emb"), **kw)
            return (block.proj_out(torch.cat([a, mlp], dim=2)),)

        (joint,) = ex.residual("parallel", parallel, (joint,), (gate.unsqueeze(1),))
        joint = clip16(joint)
        return {E: joint[:, :T], H: joint[:, T:]}


def register_programs() -> None:
    m = "diffusers.models.transformers.transformer_flux."
    register_program(m + "FluxTransformerBlock", lambda b: FluxDualProgram())
    register_program(m + "FluxSingleTransformerBlock", lambda b: FluxSingleProgram())


SPEC = ModelSpec(
    name="diffusers-flux",
    model_types="diffusers.models.transformers.transformer_flux.FluxTransformer2DModel",
    segments=("transformer_blocks", "single_transformer_blocks"),
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    # The reference TeaCache-FLUX caches the image tokens only: the text stream leaving the
    # single-stream blocks is dropped by the model (norm_out sees the image tokens), so it
    # passes through unchanged on a skipped step.
    cached_streams=("hidden_states",),
    dropped_streams=("encoder_hidden_states",),
    modulation=_indicator,
    interior=program_for,
    refuse_args=("controlnet_block_samples", "controlnet_single_block_samples"),
    teacache_coefficients=TEACACHE_COEFFICIENTS,
)
