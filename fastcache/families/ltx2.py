"""diffusers' ``LTX2VideoTransformer3DModel`` (LTX-2, audio + video): one list of blocks,
each carrying two streams, the video tokens and the audio tokens, both read after the
list (the model returns a video and an audio prediction): both are cached.

Each block, per stream: self-attention (gated), text cross-attention (ungated; gated by
``gate_text_q`` where the block has ``*_cross_attn_adaln``, LTX-2.3), the audio-video
exchange (audio-to-video into the video stream, video-to-audio into the audio stream,
both read the streams as they were before either update: one branch), then the MLP
(gated). Modulation: the block's own ``get_mod_params`` (``scale_shift_table + temb``),
as LTX-Video's, around RMSNorms.

The model passes spatio-temporal guidance (``spatio_temporal_guidance_blocks``) to some
blocks only: a cached stack, which replays the first block's arguments, refuses it.
With ``isolate_modalities`` the block skips the audio-video exchange; the program then
adds zero (the branch list stays fixed, each stream bitwise what the block returns).
The TeaCache authors published no polynomial for LTX-2; the indicator is the video
stream's, as for LTX-Video (:mod:`.ltx`), on the raw relative L1 distance."""

from __future__ import annotations

import torch

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._rmsnorm import rms_indicator

H, A = "hidden_states", "audio_hidden_states"
_ATTN = Branch("attn", (H, A))
_AV = Branch("av", (H, A))
_MLP = Branch("mlp", (H, A))


def _indicator(block, call):
    """The first block's video self-attention input ``norm1(x) * (1 + scale_msa) + shift_msa``."""
    x, temb = call[H], call["temb"]
    if temb.size(1) != 1:
        raise ValueError(
            "fastcache: this LTX-2 call modulates every video token separately (a per-token timestep of shape "
            "(batch, tokens), as the image-to-video and condition pipelines pass); the TeaCache indicator reads one "
            "modulation per sample. Use a branch-level method (FORA, TaylorSeer, ScheduleConfig) or "
            "FirstBlockCacheConfig for it."
        )
    shift, scale = block.get_mod_params(block.scale_shift_table, temb, x.size(0))[:2]
    return rms_indicator(x, shift, scale, block.norm1.eps, block.norm1.weight)


def _prompt_mod(block, table, temb_prompt, like, B):
    """The text keys' shift and scale (LTX-2.3's prompt AdaLN), as the block computes them."""
    if temb_prompt is not None:
        return block.get_mod_params(table, temb_prompt, B)
    return table[None, None].to(device=like.device, dtype=like.dtype).unbind(dim=2)


class LTX2Program(BlockProgram):
    """diffusers ``LTX2VideoTransformerBlock``: self-attention, text cross-attention, the
    audio-video exchange and the MLP, each one branch over both streams."""

    family = "diffusers-ltx2"

    def branches(self, block):
        return (_ATTN, Branch("cross", (H, A), gated=block.cross_attn_adaln), _AV, _MLP)

    def run(self, block, call, streams, ex: Executor):
        x, a = streams[H], streams[A]
        B = x.size(0)
        mod = block.get_mod_params
        v_ada = mod(block.scale_shift_table, call["temb"], B)
        a_ada = mod(block.audio_scale_shift_table, call["temb_audio"], B)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = v_ada[:6]
        a_shift_msa, a_scale_msa, a_gate_msa, a_shift_mlp, a_scale_mlp, a_gate_mlp = a_ada[:6]
        perturb = {}
        if block.perturbed_attn:
            perturb = {"perturbation_mask": call.get("perturbation_mask"), "all_perturbed": call.get("all_perturbed")}

        def attn():
            nx = block.norm1(x) * (1 + scale_msa) + shift_msa
            fx = block.attn1(
                hidden_states=nx,
                encoder_hidden_states=None,
                query_rotary_emb=call.get("video_rotary_emb"),
                attention_mask=call.get("self_attention_mask"),
                **perturb,
            )
            na = block.audio_norm1(a) * (1 + a_scale_msa) + a_shift_msa
            fa = block.audio_attn1(
                hidden_states=na,
                encoder_hidden_states=None,
                query_rotary_emb=call.get("audio_rotary_emb"),
                attention_mask=call.get("audio_self_attention_mask"),
                **perturb,
            )
            return fx, fa

        x, a = ex.residual("attn", attn, (x, a), (gate_msa, a_gate_msa))

        v_q, a_q = block.video_cross_attn_adaln, block.audio_cross_attn_adaln

        def cross():
            c, ca = call["encoder_hidden_states"], call["audio_encoder_hidden_states"]
            if block.cross_attn_adaln:
                shift_kv, scale_kv = _prompt_mod(block, block.prompt_scale_shift_table, call.get("temb_prompt"), x, B)
                a_shift_kv, a_scale_kv = _prompt_mod(
                    block, block.audio_prompt_scale_shift_table, call.get("temb_prompt_audio"), a, B
                )
                c = c * (1 + scale_kv) + shift_kv
                ca = ca * (1 + a_scale_kv) + a_shift_kv
            nx = block.norm2(x)
            if v_q:
                nx = nx * (1 + v_ada[7]) + v_ada[6]
            fx = block.attn2(
                nx, encoder_hidden_states=c, query_rotary_emb=None, attention_mask=call.get("encoder_attention_mask")
            )
            na = block.audio_norm2(a)
            if a_q:
                na = na * (1 + a_ada[7]) + a_ada[6]
            fa = block.audio_attn2(
                na,
                encoder_hidden_states=ca,
                query_rotary_emb=None,
                attention_mask=call.get("audio_encoder_attention_mask"),
            )
            return fx, fa

        x, a = ex.residual("cross", cross, (x, a), (v_ada[8] if v_q else None, a_ada[8] if a_q else None))

        a2v, v2a = call.get("use_a2v_cross_attention", True), call.get("use_v2a_cross_attention", True)
        if a2v or v2a:
            v_ss, v_g = (
                block.video_a2v_cross_attn_scale_shift_table[:4, :],
                block.video_a2v_cross_attn_scale_shift_table[4:, :],
            )
            a_ss, a_g = (
                block.audio_a2v_cross_attn_scale_shift_table[:4, :],
                block.audio_a2v_cross_attn_scale_shift_table[4:, :],
            )
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = mod(v_ss, call["temb_ca_scale_shift"], B)
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = mod(a_ss, call["temb_ca_audio_scale_shift"], B)
            a2v_gate = mod(v_g, call["temb_ca_gate"], B)[0].squeeze(2)
            v2a_gate = mod(a_g, call["temb_ca_audio_gate"], B)[0].squeeze(2)

        def av():
            if not (a2v or v2a):
                return torch.zeros_like(x), torch.zeros_like(a)
            nx, na = block.audio_to_video_norm(x), block.video_to_audio_norm(a)
            fx = fa = None
            if a2v:
                fx = block.audio_to_video_attn(
                    nx * (1 + v_a2v_scale.squeeze(2)) + v_a2v_shift.squeeze(2),
                    encoder_hidden_states=na * (1 + a_a2v_scale.squeeze(2)) + a_a2v_shift.squeeze(2),
                    query_rotary_emb=call.get("ca_video_rotary_emb"),
                    key_rotary_emb=call.get("ca_audio_rotary_emb"),
                    attention_mask=call.get("a2v_cross_attention_mask"),
                )
            if v2a:
                fa = block.video_to_audio_attn(
                    na * (1 + a_v2a_scale.squeeze(2)) + a_v2a_shift.squeeze(2),
                    encoder_hidden_states=nx * (1 + v_v2a_scale.squeeze(2)) + v_v2a_shift.squeeze(2),
                    query_rotary_emb=call.get("ca_audio_rotary_emb"),
                    key_rotary_emb=call.get("ca_video_rotary_emb"),
                    attention_mask=call.get("v2a_cross_attention_mask"),
                )
            return (torch.zeros_like(x) if fx is None else fx), (torch.zeros_like(a) if fa is None else fa)

        x, a = ex.residual("av", av, (x, a), (a2v_gate if a2v else None, v2a_gate if v2a else None))

        def mlp():
            fx = block.ff(block.norm3(x) * (1 + scale_mlp) + shift_mlp)
            fa = block.audio_ff(block.audio_norm3(a) * (1 + a_scale_mlp) + a_shift_mlp)
            return fx, fa

        x, a = ex.residual("mlp", mlp, (x, a), (gate_mlp, a_gate_mlp))
        return {H: x, A: a}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_ltx2.LTX2VideoTransformerBlock", lambda b: LTX2Program()
    )


SPEC = ModelSpec(
    name="diffusers-ltx2",
    model_types="diffusers.models.transformers.transformer_ltx2.LTX2VideoTransformer3DModel",
    segments=("transformer_blocks",),
    streams=(H, A),
    returns=(H, A),
    # the model projects both streams after the list (video and audio predictions)
    cached_streams=(H, A),
    modulation=_indicator,
    interior=program_for,
    # per-block arguments (perturbation_mask only for the listed blocks): not one replayable call
    refuse_args=("spatio_temporal_guidance_blocks",),
)
