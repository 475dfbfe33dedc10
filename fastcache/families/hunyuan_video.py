"""diffusers' ``HunyuanVideoTransformer3DModel`` (HunyuanVideo text-to-video): dual-stream
blocks, then single-stream blocks on the concatenated tokens, both lists called with the
same 7 positional arguments (``freqs_cis`` / ``image_rotary_emb`` at the same position; the
runtime replays them positionally). The text token refiner inside ``context_embedder``
runs before the stack, uncached. Streams: ``hidden_states`` (video tokens) and
``encoder_hidden_states`` (text tokens); the model drops the text after the stack."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._adaln import adaln_zero, dual_adaln_zero
from ._frames import config_layout

H, E = "hidden_states", "encoder_hidden_states"
_ATTN2 = Branch("attn", (H, E))
_MLP2 = Branch("mlp", (H, E))
_PARALLEL = Branch("parallel", ("joint",))
# TeaCache4HunyuanVideo/teacache_sample_video.py (ali-vilab/TeaCache), numpy.poly1d order;
# its indicator is the first double block's img_norm1(img) modulated by img_mod's shift/scale.
TEACACHE_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


def _rope(call):
    """The rotary table: the dual block names it ``freqs_cis``, the single ``image_rotary_emb``."""
    return call["freqs_cis"] if "freqs_cis" in call else call.get("image_rotary_emb")


def frame_layout(model, call):
    """``hidden_states (B, C, F, H, W)``, Conv3d patches ``(patch_size_t, patch_size,
    patch_size)`` flattened frame-major (HunyuanVideo and HunyuanVideo 1.5)."""
    return config_layout(model, call.get(H))


def _indicator(block, call):
    """The first dual-stream block's video-stream modulation (chunks 0, 1 of six)."""
    if "TokenReplace" in type(block).__name__:
        raise ValueError(
            "fastcache: this HunyuanVideo model modulates its first-frame tokens separately "
            "(image_condition_type='token_replace', HunyuanVideo I2V); the TeaCache indicator reads one "
            "modulation per sample. Use First-Block Cache or a step schedule (ScheduleConfig) for it."
        )
    out = adaln_zero(block.norm1, call["temb"])
    shift, scale = out.chunk(6, dim=1)[:2]
    return call[H], shift, scale, block.norm1.norm.eps, ((block.norm1.linear, out),)


class HunyuanDualProgram(BlockProgram):
    """diffusers ``HunyuanVideoTransformerBlock``: joint attention (each stream its own
    gate), then one MLP per stream."""

    family = "diffusers-hunyuanvideo-dual"

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

        def attn():
            nx = block.norm1.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            nc = block.norm1_context.norm(c) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
            return block.attn(
                hidden_states=nx,
                encoder_hidden_states=nc,
                attention_mask=call.get("attention_mask"),
                image_rotary_emb=_rope(call),
            )

        x, c = ex.residual("attn", attn, (x, c), (gate_msa.unsqueeze(1), c_gate_msa.unsqueeze(1)))

        def mlp():
            nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            return block.ff(nx), block.ff_context(nc)

        x, c = ex.residual("mlp", mlp, (x, c), (gate_mlp.unsqueeze(1), c_gate_mlp.unsqueeze(1)))
        return {H: x, E: c}


class HunyuanSingleProgram(BlockProgram):
    """diffusers ``HunyuanVideoSingleTransformerBlock``: video and text tokens concatenated
    (video first) into one "joint" stream; attention and MLP run in parallel on the same
    modulated input and meet in ``proj_out(cat(attn, mlp))`` under ONE gate: one branch."""

    family = "diffusers-hunyuanvideo-single"

    def branches(self, block):
        return (_PARALLEL,)

    def run(self, block, call, streams, ex: Executor):
        x, c = streams[H], streams[E]
        S = c.shape[1]
        joint = torch.cat([x, c], dim=1)
        shift_msa, scale_msa, gate = adaln_zero(block.norm, call["temb"]).chunk(3, 1)

        def parallel():
            n = block.norm.norm(joint) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            mlp = block.act_mlp(block.proj_mlp(n))
            a, ca = block.attn(
                hidden_states=n[:, :-S, :],
                encoder_hidden_states=n[:, -S:, :],
                attention_mask=call.get("attention_mask"),
                image_rotary_emb=_rope(call),
            )
            return (block.proj_out(torch.cat([torch.cat([a, ca], dim=1), mlp], dim=2)),)

        (joint,) = ex.residual("parallel", parallel, (joint,), (gate.unsqueeze(1),))
        return {H: joint[:, :-S, :], E: joint[:, -S:, :]}


def register_programs() -> None:
    m = "diffusers.models.transformers.transformer_hunyuan_video."
    register_program(m + "HunyuanVideoTransformerBlock", lambda b: HunyuanDualProgram())
    register_program(m + "HunyuanVideoSingleTransformerBlock", lambda b: HunyuanSingleProgram())


SPEC = ModelSpec(
    name="diffusers-hunyuanvideo",
    model_types="diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoTransformer3DModel",
    segments=("transformer_blocks", "single_transformer_blocks"),
    streams=(H, E),
    returns=(H, E),
    # norm_out reads the video tokens only: the text stream passes through on a skipped step
    cached_streams=(H,),
    dropped_streams=(E,),
    modulation=_indicator,
    interior=program_for,
    teacache_coefficients=TEACACHE_COEFFICIENTS,
    frame_layout=frame_layout,
)
