"""diffusers' ``QwenImageTransformer2DModel`` (Qwen-Image, -Edit, -Layered): one list of
dual-stream blocks (image and text tokens, joint attention). Each block modulates both
streams from ``temb`` with its own ``img_mod`` / ``txt_mod`` (six chunks each: shift,
scale, gate of the attention, then of the MLP). The model reads only the image tokens
after the stack.

Edit models (``zero_cond_t``) double ``temb`` and pick a modulation per token
(``modulate_index``): the indicator and the branch programs (one gate per sample) refuse
them with the methods that do work."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._adaln import clip16

H, E = "hidden_states", "encoder_hidden_states"
_ATTN = Branch("attn", (H, E))
_MLP = Branch("mlp", (H, E))


def _split(params):
    """``QwenImageTransformerBlock._modulate``'s shift, scale, gate, each ``(B, 1, D)``."""
    shift, scale, gate = params.chunk(3, dim=-1)
    return shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)


def _refuse_per_token(block, what: str) -> None:
    if block.zero_cond_t:
        raise ValueError(
            f"fastcache: this Qwen-Image model has zero_cond_t=True (an edit model): it modulates every token "
            f"separately (the condition image's tokens at t=0), and {what} needs one modulation per sample. "
            "Use a stack-level method that reads no modulation (FirstBlockCacheConfig, DeltaDiTConfig, "
            "MagCacheConfig) for it."
        )


def _indicator(block, call):
    """The image stream's attention modulation (chunks 0, 1 of ``img_mod(temb)``)."""
    _refuse_per_token(block, "the TeaCache indicator")
    temb = call["temb"]
    out = block.img_mod(temb)
    shift, scale = out.chunk(6, dim=-1)[:2]
    return call[H], shift, scale, block.img_norm1.eps, ((block.img_mod, out, (temb,)),)


class QwenImageProgram(BlockProgram):
    """diffusers ``QwenImageTransformerBlock``: joint attention (each stream gated), then
    one MLP per stream (gated); fp16 outputs clipped as the block does."""

    family = "diffusers-qwenimage"

    def branches(self, block):
        _refuse_per_token(block, "branch-level caching (a cached branch is re-gated per sample)")
        return (_ATTN, _MLP)

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        temb = call["temb"]
        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        shift1, scale1, gate1 = _split(img_mod1)
        c_shift1, c_scale1, c_gate1 = _split(txt_mod1)
        shift2, scale2, gate2 = _split(img_mod2)
        c_shift2, c_scale2, c_gate2 = _split(txt_mod2)
        kw = call.get("joint_attention_kwargs") or {}

        def attn():
            nx = block.img_norm1(x) * (1 + scale1) + shift1
            nc = block.txt_norm1(c) * (1 + c_scale1) + c_shift1
            img, txt = block.attn(
                hidden_states=nx,
                encoder_hidden_states=nc,
                encoder_hidden_states_mask=call.get("encoder_hidden_states_mask"),
                image_rotary_emb=call.get("image_rotary_emb"),
                **kw,
            )
            return img, txt

        x, c = ex.residual("attn", attn, (x, c), (gate1, c_gate1))

        def mlp():
            nx = block.img_norm2(x) * (1 + scale2) + shift2
            nc = block.txt_norm2(c) * (1 + c_scale2) + c_shift2
            return block.img_mlp(nx), block.txt_mlp(nc)

        x, c = ex.residual("mlp", mlp, (x, c), (gate2, c_gate2))
        return {H: clip16(x), E: clip16(c)}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock", lambda b: QwenImageProgram()
    )


SPEC = ModelSpec(
    name="diffusers-qwenimage",
    model_types="diffusers.models.transformers.transformer_qwenimage.QwenImageTransformer2DModel",
    segments=("transformer_blocks",),
    streams=(H, E),
    returns=(E, H),
    # norm_out / proj_out read the image tokens only: the text stream is dropped after the stack
    cached_streams=(H,),
    dropped_streams=(E,),
    modulation=_indicator,
    interior=program_for,
    refuse_args=("controlnet_block_samples",),
)
