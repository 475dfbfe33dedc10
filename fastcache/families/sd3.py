"""diffusers' ``SD3Transformer2DModel`` (SD3, SD3.5): joint blocks on the image and text
streams, SD3.5's extra image self-attention, a last block that drops the text stream.
Its spec and its program."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._adaln import adaln_zero

H, E = "hidden_states", "encoder_hidden_states"


def _modulation(block, temb):
    """``norm1.linear(silu(temb))``: six chunks, nine with SD3.5's dual attention."""
    return adaln_zero(block.norm1, temb).chunk(9 if block.use_dual_attention else 6, dim=1)


def _indicator(block, call):
    out = adaln_zero(block.norm1, call["temb"])
    shift, scale = out.chunk(9 if block.use_dual_attention else 6, dim=1)[:2]
    return call["hidden_states"], shift, scale, block.norm1.norm.eps, ((block.norm1.linear, out),)


class JointProgram(BlockProgram):
    """diffusers ``JointTransformerBlock`` (SD3, SD3.5): joint attention on both
    streams, SD3.5's extra image self-attention (``attn2``, "dual attention") and one
    MLP per stream. The last block (``context_pre_only``) drops the text stream: its
    branches update the image stream only and it returns None for the text."""

    family = "diffusers-sd3-joint"

    def branches(self, block):
        pre = block.context_pre_only
        out = [Branch("attn", (H,) if pre else (H, E))]
        if block.use_dual_attention:
            out.append(Branch("attn2", (H,)))
        out.append(Branch("mlp", (H,) if pre else (H, E)))
        return tuple(out)

    def outputs(self, block, inputs):
        return tuple(n for n in inputs if not (block.context_pre_only and n == E))

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        temb = call["temb"]
        kw = call.get("joint_attention_kwargs") or {}
        dual, pre = block.use_dual_attention, block.context_pre_only
        mod = _modulation(block, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if not pre:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = adaln_zero(
                block.norm1_context, temb
            ).chunk(6, 1)

        def norm_x(h):
            return block.norm1.norm(h)

        def attn():
            nx = norm_x(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            if pre:
                nc = block.norm1_context(c, temb)
            else:
                nc = block.norm1_context.norm(c) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
            a, ca = block.attn(hidden_states=nx, encoder_hidden_states=nc, **kw)
            return (a,) if pre else (a, ca)

        if pre:
            (x,) = ex.residual("attn", attn, (x,), (gate_msa.unsqueeze(1),))
        else:
            x, c = ex.residual("attn", attn, (x, c), (gate_msa.unsqueeze(1), c_gate_msa.unsqueeze(1)))

        if dual:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            # SD35AdaLayerNormZeroX modulates the block INPUT's norm for attn2 too.
            x_in = streams[H]

            def attn2():
                n2 = norm_x(x_in) * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
                return (block.attn2(hidden_states=n2, **kw),)

            (x,) = ex.residual("attn2", attn2, (x,), (gate_msa2.unsqueeze(1),))

        def ff(module, h):
            if block._chunk_size is not None:
                from diffusers.models.attention import _chunked_feed_forward

                return _chunked_feed_forward(module, h, block._chunk_dim, block._chunk_size)
            return module(h)

        def mlp():
            nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            if pre:
                return (ff(block.ff, nx),)
            nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            return ff(block.ff, nx), ff(block.ff_context, nc)

        if pre:
            (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp.unsqueeze(1),))
            return {H: x, E: None}
        x, c = ex.residual("mlp", mlp, (x, c), (gate_mlp.unsqueeze(1), c_gate_mlp.unsqueeze(1)))
        return {H: x, E: c}


def register_programs() -> None:
    register_program("diffusers.models.attention.JointTransformerBlock", lambda b: JointProgram())


SPEC = ModelSpec(
    name="diffusers-sd3",
    model_types="diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel",
    segments=("transformer_blocks",),
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    cached_streams=("hidden_states",),
    dropped_streams=("encoder_hidden_states",),  # the last block may return None for it
    modulation=_indicator,
    interior=program_for,
    refuse_args=("block_controlnet_hidden_states", "skip_layers"),
)
