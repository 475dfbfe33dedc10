"""diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5): video and text streams
through joint attention and ONE feed-forward on the concatenated ``[text; video]`` tokens,
each stream with its own gates (``CogVideoXLayerNormZero``: a shared LayerNorm, six chunks).
The model drops the text stream after the stack."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._frames import config_layout

H, E = "hidden_states", "encoder_hidden_states"
_ATTN2 = Branch("attn", (H, E))
_MLP2 = Branch("mlp", (H, E))
# TeaCache4CogVideoX1.5/teacache_sample_video.py (ali-vilab/TeaCache), "CogVideoX-5b" (also
# its "CogVideoX-5b-I2V"), numpy.poly1d order. That file fits one polynomial per checkpoint
# (CogVideoX-2b, 1.5-5B and 1.5-5B-I2V differ: docs/methods.md lists them; pass them as
# TeaCacheConfig(coefficients=...)). Its indicator is the time embedding ``emb`` (the blocks'
# ``temb``), not a modulated input, and so is this family's.
TEACACHE_COEFFICIENTS = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)


def _indicator(block, call):
    """TeaCache-CogVideoX's indicator, ``temb`` itself, in the op's LayerNorm form:
    ``LN(0) * (1 + 0) + temb == temb`` exactly (one zero token per sample)."""
    temb = call["temb"]
    zero = temb.new_zeros(temb.shape[0], 1, temb.shape[1])
    return zero, temb, torch.zeros_like(temb), block.norm1.norm.eps


def _chunks(norm, temb):
    """``CogVideoXLayerNormZero``'s modulation: shift, scale, gate, enc_shift, enc_scale, enc_gate."""
    return norm.linear(norm.silu(temb)).chunk(6, dim=1)


class CogVideoXProgram(BlockProgram):
    """diffusers ``CogVideoXBlock``: joint attention, then one feed-forward on
    ``cat([text, video])`` split back per stream; both residuals gated per stream."""

    family = "diffusers-cogvideox"

    def branches(self, block):
        return (_ATTN2, _MLP2)

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        S = c.size(1)
        temb = call["temb"]
        kw = call.get("attention_kwargs") or {}
        shift, scale, gate, c_shift, c_scale, c_gate = _chunks(block.norm1, temb)

        def attn():
            nx = block.norm1.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
            nc = block.norm1.norm(c) * (1 + c_scale)[:, None, :] + c_shift[:, None, :]
            return block.attn1(
                hidden_states=nx, encoder_hidden_states=nc, image_rotary_emb=call.get("image_rotary_emb"), **kw
            )

        x, c = ex.residual("attn", attn, (x, c), (gate[:, None, :], c_gate[:, None, :]))
        shift, scale, gate, c_shift, c_scale, c_gate = _chunks(block.norm2, temb)

        def mlp():
            nx = block.norm2.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
            nc = block.norm2.norm(c) * (1 + c_scale)[:, None, :] + c_shift[:, None, :]
            ff = block.ff(torch.cat([nc, nx], dim=1))
            return ff[:, S:], ff[:, :S]

        x, c = ex.residual("mlp", mlp, (x, c), (gate[:, None, :], c_gate[:, None, :]))
        return {H: x, E: c}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.cogvideox_transformer_3d.CogVideoXBlock", lambda b: CogVideoXProgram()
    )


def _frame_layout(model, call):
    """``hidden_states (B, F, C, H, W)`` (frames before channels), patches ``patch_size``
    (and ``patch_size_t`` on CogVideoX 1.5) flattened frame-major; the text tokens the
    patch embedding puts in front are split off before the blocks."""
    return config_layout(model, call.get(H), frames_dim=1)


SPEC = ModelSpec(
    name="diffusers-cogvideox",
    model_types="diffusers.models.transformers.cogvideox_transformer_3d.CogVideoXTransformer3DModel",
    segments=("transformer_blocks",),
    streams=(H, E),
    returns=(H, E),
    # norm_final / norm_out read the video tokens only: the text passes through on a skipped step
    cached_streams=(H,),
    dropped_streams=(E,),
    modulation=_indicator,
    interior=program_for,
    teacache_coefficients=TEACACHE_COEFFICIENTS,
    frame_layout=_frame_layout,
)
