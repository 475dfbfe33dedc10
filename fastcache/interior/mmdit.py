"""Block programs of the two-stream (MM-DiT) families: Flux dual-stream and
single-stream blocks, SD3 / SD3.5 joint blocks. Streams: ``hidden_states`` (image
tokens) and ``encoder_hidden_states`` (text tokens); a joint attention feeds both."""

from __future__ import annotations

import torch

from .base import BlockProgram, Branch, Executor

H, E = "hidden_states", "encoder_hidden_states"
_ATTN2 = Branch("attn", (H, E))
_MLP2 = Branch("mlp", (H, E))
_PARALLEL = Branch("parallel", ("joint",))


def _adaln_zero(norm, temb, n_chunks):
    """AdaLayerNormZero(-X)'s modulation alone: ``linear(silu(temb))`` in chunks."""
    return norm.linear(norm.silu(temb)).chunk(n_chunks, dim=1)


def _clip16(h):
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h


class FluxDualProgram(BlockProgram):
    """diffusers ``FluxTransformerBlock``: one joint attention (both streams, each with
    its own gate), then one MLP per stream; fp16 outputs clipped as the block does."""

    family = "diffusers-flux-dual"

    def branches(self, block):
        return (_ATTN2, _MLP2)

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        temb = call["temb"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _adaln_zero(block.norm1, temb, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln_zero(
            block.norm1_context, temb, 6
        )
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
        return {H: x, E: _clip16(c)}


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
        shift_msa, scale_msa, gate = _adaln_zero(block.norm, call["temb"], 3)
        kw = call.get("joint_attention_kwargs") or {}

        def parallel():
            n = block.norm.norm(joint) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            mlp = block.act_mlp(block.proj_mlp(n))
            a = block.attn(hidden_states=n, image_rotary_emb=call.get("image_rotary_emb"), **kw)
            return (block.proj_out(torch.cat([a, mlp], dim=2)),)

        (joint,) = ex.residual("parallel", parallel, (joint,), (gate.unsqueeze(1),))
        joint = _clip16(joint)
        return {E: joint[:, :T], H: joint[:, T:]}


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
        mod = _adaln_zero(block.norm1, temb, 9 if dual else 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if not pre:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln_zero(
                block.norm1_context, temb, 6
            )

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


def register() -> None:
    from .base import register_program

    try:
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    except ImportError:
        return
    register_program(FluxTransformerBlock, lambda b: FluxDualProgram())
    register_program(FluxSingleTransformerBlock, lambda b: FluxSingleProgram())
    register_program(JointTransformerBlock, lambda b: JointProgram())
