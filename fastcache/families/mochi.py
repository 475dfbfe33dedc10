"""diffusers' ``MochiTransformer3DModel`` (Mochi 1): asymmetric dual-stream blocks (video
width D, text width D_text); the last block (``context_pre_only``) updates the video
stream only and returns the text unchanged. The model drops the text after the stack.

Mochi's gate sits inside a post-norm: ``x + norm2(f, tanh(g))`` with
``norm2(f, s) = (RMSNorm(f.float()) * s).to(x.dtype)``. The program routes it as
``x + tanh(g) * RMSNorm(f)`` (the branch output is the gate-free post-norm), which is the
block's arithmetic bitwise when the model runs in fp32 (or fp64). In fp16 / bf16 the block
rounds the gated product to the model dtype before the add, which ``x + gate * f`` cannot
replay: the program refuses those dtypes (stack-level methods run the blocks themselves
and are unaffected)."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._frames import config_layout
from ._rmsnorm import rms_indicator

H, E = "hidden_states", "encoder_hidden_states"
# TeaCache4Mochi/teacache_mochi.py (ali-vilab/TeaCache), numpy.poly1d order; its indicator
# is transformer_blocks[0].norm1(x, temb)[0] = RMSNorm(x) * (1 + scale_msa) (no shift).
TEACACHE_COEFFICIENTS = (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03)


def _chunks(norm, temb):
    """``MochiRMSNormZero``'s modulation: scale_msa, gate_msa, scale_mlp, gate_mlp."""
    return norm.linear(norm.silu(temb)).chunk(4, dim=1)


def _indicator(block, call):
    out = block.norm1.linear(block.norm1.silu(call["temb"]))
    scale = out.chunk(4, dim=1)[0]
    return (*rms_indicator(call[H], None, scale, block.norm1.norm.eps), ((block.norm1.linear, out),))


def _refuse_low_precision(dtype) -> None:
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"fastcache: Mochi's blocks round the gated post-norm output to {dtype} before the residual add, "
            "which the block program (x + gate * f) cannot replay exactly. Run the transformer in float32 for "
            "the methods that run block programs (FORA, EOC, TaylorSeer, ScheduleConfig, SmoothCache, Block "
            "Caching, and fastcache.calibrate), or use TeaCacheConfig, FirstBlockCacheConfig or DeltaDiTConfig."
        )


class MochiProgram(BlockProgram):
    """diffusers ``MochiTransformerBlock``: joint attention, then one MLP per stream, each
    residual through a gated post-norm (the text stream's only where the block has one)."""

    family = "diffusers-mochi"

    def branches(self, block):
        _refuse_low_precision(block.norm1.linear.weight.dtype)
        streams = (H,) if block.context_pre_only else (H, E)
        return (Branch("attn", streams), Branch("mlp", streams))

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        _refuse_low_precision(x.dtype)
        temb, pre = call["temb"], block.context_pre_only
        f32 = torch.float32
        scale_msa, gate_msa, scale_mlp, gate_mlp = _chunks(block.norm1, temb)
        if not pre:
            c_scale_msa, c_gate_msa, c_scale_mlp, c_gate_mlp = _chunks(block.norm1_context, temb)

        def attn():
            nx = (block.norm1.norm(x.to(f32)) * (1 + scale_msa[:, None].to(f32))).to(x.dtype)
            if pre:
                nc = block.norm1_context(c, temb)
            else:
                nc = (block.norm1_context.norm(c.to(f32)) * (1 + c_scale_msa[:, None].to(f32))).to(c.dtype)
            a, ca = block.attn1(
                hidden_states=nx,
                encoder_hidden_states=nc,
                image_rotary_emb=call.get("image_rotary_emb"),
                attention_mask=call["encoder_attention_mask"],
            )
            return (block.norm2(a),) if pre else (block.norm2(a), block.norm2_context(ca))

        if pre:
            (x,) = ex.residual("attn", attn, (x,), (torch.tanh(gate_msa).unsqueeze(1),))
        else:
            gates = (torch.tanh(gate_msa).unsqueeze(1), torch.tanh(c_gate_msa).unsqueeze(1))
            x, c = ex.residual("attn", attn, (x, c), gates)

        def mlp():
            fx = block.norm4(block.ff(block.norm3(x, (1 + scale_mlp.unsqueeze(1).to(f32)))))
            if pre:
                return (fx,)
            nc = block.norm3_context(c, (1 + c_scale_mlp.unsqueeze(1).to(f32)))
            return fx, block.norm4_context(block.ff_context(nc))

        if pre:
            (x,) = ex.residual("mlp", mlp, (x,), (torch.tanh(gate_mlp).unsqueeze(1),))
        else:
            gates = (torch.tanh(gate_mlp).unsqueeze(1), torch.tanh(c_gate_mlp).unsqueeze(1))
            x, c = ex.residual("mlp", mlp, (x, c), gates)
        return {H: x, E: c}


def register_programs() -> None:
    register_program("diffusers.models.transformers.transformer_mochi.MochiTransformerBlock", lambda b: MochiProgram())


def _frame_layout(model, call):
    """``hidden_states (B, C, F, H, W)``, each frame cut into ``patch_size`` squares (no
    temporal patch), frame-major."""
    return config_layout(model, call.get(H), temporal=None)


SPEC = ModelSpec(
    name="diffusers-mochi",
    model_types="diffusers.models.transformers.transformer_mochi.MochiTransformer3DModel",
    segments=("transformer_blocks",),
    streams=(H, E),
    returns=(H, E),
    # norm_out reads the video tokens only: the text passes through on a skipped step
    cached_streams=(H,),
    dropped_streams=(E,),
    modulation=_indicator,
    interior=program_for,
    teacache_coefficients=TEACACHE_COEFFICIENTS,
    frame_layout=_frame_layout,
)
