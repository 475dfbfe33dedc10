"""Tiny instances of diffusers 0.42.1's video transformer classes (the "reach zoo",
video share): the real classes at configs taken from diffusers' own model tests, each
with the inputs its pipeline passes and a scheduler ``Case.sample`` can run.

Latent layouts follow the pipelines: (B, C, F, H, W) for most classes, (B, F, C, H, W)
for CogVideoX, (B, F, H, W, C) for Kandinsky 5, packed tokens (B, F*H*W, C) for LTX /
LTX-2. Conditioning that the pipeline builds once per call (text embeddings, masks,
rotary tables, clean-history latents, the audio stream of LTX-2) is built once here from
fixed generators; only the latents and the timestep change per step.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from support.zoo import WAN_CONFIG, Case, _gen, _randomize_zero_init


def _finish(m: torch.nn.Module) -> torch.nn.Module:
    m = m.eval()
    _randomize_zero_init(m)
    return m


def _b(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The 0-dim scheduler timestep expanded to the batch of ``x``, as every pipeline does."""
    return t.expand(x.shape[0])


def wan_vace_case(B=2) -> Case:
    """WanVACETransformer3DModel: 3 main blocks, VACE control blocks hinted at layers 0 and 2."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    m = _finish(WanVACETransformer3DModel(**WAN_CONFIG, vace_layers=[0, 2], vace_in_channels=12))
    text = torch.randn(B, 6, 16, generator=_gen(3))
    control = torch.randn(B, 12, 2, 8, 8, generator=_gen(4))
    return Case(
        "wanvace",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=_b(x, t),
            encoder_hidden_states=text[: x.shape[0]],
            control_hidden_states=control[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def skyreels_v2_case(B=2) -> Case:
    """SkyReelsV2Transformer3DModel (Wan-like); the pipeline's UniPC in flow mode."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    m = _finish(SkyReelsV2Transformer3DModel(**WAN_CONFIG))
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "skyreelsv2",
        m,
        inputs=lambda x, t: dict(hidden_states=x, timestep=_b(x, t), encoder_hidden_states=text[: x.shape[0]]),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=lambda: UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
        ),
        batch=B,
    )


def chronoedit_case(B=2) -> Case:
    """ChronoEditTransformer3DModel (Wan-like, temporal-reasoning rope skip); text-only tiny config."""
    from diffusers import ChronoEditTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        ChronoEditTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=3,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=None,
            added_kv_proj_dim=None,
            rope_max_seq_len=64,
            pos_embed_seq_len=None,
            rope_temporal_skip_len=8,
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "chronoedit",
        m,
        inputs=lambda x, t: dict(hidden_states=x, timestep=_b(x, t), encoder_hidden_states=text[: x.shape[0]]),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


_HV_CFG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=3,
    num_single_layers=2,
    num_refiner_layers=2,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 4, 4),
)


def hunyuan_video_case(B=2) -> Case:
    """HunyuanVideoTransformer3DModel: token refiner (2), dual-stream (3), single-stream (2) blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    m = _finish(HunyuanVideoTransformer3DModel(**_HV_CFG, image_condition_type=None))
    text = torch.randn(B, 6, 16, generator=_gen(3))
    pooled = torch.randn(B, 8, generator=_gen(4))
    mask = torch.ones(B, 6)
    mask[1:, 4:] = 0  # a padded prompt in the second sample
    return Case(
        "hunyuanvideo",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=_b(x, t),
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=mask[: x.shape[0]],
            pooled_projections=pooled[: x.shape[0]],
            guidance=torch.full((x.shape[0],), 6000.0),  # pipeline: guidance_scale * 1000
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def hunyuan_video15_case(B=2) -> Case:
    """HunyuanVideo15Transformer3DModel (t2v); the pipeline concatenates [latents, cond, mask]
    on channels, so in_channels = 2 * 4 + 1; the cond latents and mask are zero for t2v."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    m = _finish(
        HunyuanVideo15Transformer3DModel(
            in_channels=9,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=3,
            num_refiner_layers=2,
            mlp_ratio=2.0,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=12,
            rope_axes_dim=(2, 2, 4),
            target_size=16,
            task_type="t2v",
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    text2 = torch.randn(B, 4, 8, generator=_gen(4))
    image_embeds = torch.zeros(B, 3, 12)  # the t2v pipeline passes zeros

    def inputs(x, t):
        n = x.shape[0]
        cond = torch.zeros(n, 5, *x.shape[2:])
        return dict(
            hidden_states=torch.cat([x, cond], dim=1),
            timestep=_b(x, t),
            encoder_hidden_states=text[:n],
            encoder_attention_mask=torch.ones(n, 6),
            encoder_hidden_states_2=text2[:n],
            encoder_attention_mask_2=torch.ones(n, 4),
            image_embeds=image_embeds[:n],
        )

    return Case(
        "hunyuanvideo15",
        m,
        inputs=inputs,
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def hunyuan_video_framepack_case(B=2) -> Case:
    """HunyuanVideoFramepackTransformer3DModel: HunyuanVideo's stacks plus image projection and
    clean-history latents (1x / 2x / 4x) prepended as extra tokens."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        HunyuanVideoFramepackTransformer3DModel(
            **_HV_CFG,
            image_condition_type=None,
            has_image_proj=True,
            image_proj_dim=16,
            has_clean_x_embedder=True,
        )
    )
    F, H, W = 2, 8, 8
    text = torch.randn(B, 6, 16, generator=_gen(3))
    pooled = torch.randn(B, 8, generator=_gen(4))
    image_embeds = torch.randn(B, 5, 16, generator=_gen(5))
    clean = torch.randn(B, 4, 1, H, W, generator=_gen(6))
    hist2 = torch.randn(B, 4, 1, H, W, generator=_gen(7))
    hist4 = torch.randn(B, 4, 4, H, W, generator=_gen(8))

    def inputs(x, t):
        n = x.shape[0]
        return dict(
            hidden_states=x,
            timestep=_b(x, t),
            encoder_hidden_states=text[:n],
            encoder_attention_mask=torch.ones(n, 6),
            pooled_projections=pooled[:n],
            image_embeds=image_embeds[:n],
            indices_latents=torch.arange(F) + 6,
            guidance=torch.full((n,), 10000.0),
            latents_clean=clean[:n],
            indices_latents_clean=torch.tensor([0]),
            latents_history_2x=hist2[:n],
            indices_latents_history_2x=torch.tensor([1]),
            latents_history_4x=hist4[:n],
            indices_latents_history_4x=torch.arange(2, 6),
        )

    return Case(
        "hunyuanvideoframepack",
        m,
        inputs=inputs,
        latents=lambda g: torch.randn(B, 4, F, H, W, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def ltx_case(B=2) -> Case:
    """LTXVideoTransformer3DModel on packed tokens (B, F*H*W, C), patch size 1."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        LTXVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=3,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
        )
    )
    F, H, W = 2, 4, 4
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "ltx",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_b(x, t),
            encoder_attention_mask=torch.ones(x.shape[0], 6, dtype=torch.bool),
            num_frames=F,
            height=H,
            width=W,
            rope_interpolation_scale=(8 / 25, 32, 32),  # (vae temporal / frame rate, spatial, spatial)
        ),
        latents=lambda g: torch.randn(B, F * H * W, 4, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: o.sample,
        batch=B,
    )


def ltx2_case(B=2) -> Case:
    """LTX2VideoTransformer3DModel: audio-video blocks; the video stream is sampled, the audio
    stream is a fixed input (its prediction is dropped)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        LTX2VideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=8,
            num_layers=3,
            qk_norm="rms_norm_across_heads",
            caption_channels=16,
            rope_double_precision=False,
        )
    )
    F, H, W, FA = 2, 4, 4, 5
    text = torch.randn(B, 6, 16, generator=_gen(3))
    audio_text = torch.randn(B, 6, 16, generator=_gen(4))
    audio = torch.randn(B, FA, 4, generator=_gen(5))

    def inputs(x, t):
        n = x.shape[0]
        return dict(
            hidden_states=x,
            audio_hidden_states=audio[:n],
            encoder_hidden_states=text[:n],
            audio_encoder_hidden_states=audio_text[:n],
            timestep=_b(x, t),
            sigma=_b(x, t),
            encoder_attention_mask=torch.ones(n, 6, dtype=torch.bool),
            audio_encoder_attention_mask=torch.ones(n, 6, dtype=torch.bool),
            num_frames=F,
            height=H,
            width=W,
            fps=24.0,
            audio_num_frames=FA,
        )

    return Case(
        "ltx2",
        m,
        inputs=inputs,
        latents=lambda g: torch.randn(B, F * H * W, 4, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: o.sample,
        batch=B,
    )


def cogvideox_case(B=2) -> Case:
    """CogVideoXTransformer3DModel (1.0: sinusoidal 3D positions); latents (B, F, C, H, W),
    v-prediction with the pipeline's CogVideoXDDIMScheduler."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=8,
            num_layers=3,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
        )
    )
    text = torch.randn(B, 8, 8, generator=_gen(3))
    return Case(
        "cogvideox",
        m,
        inputs=lambda x, t: dict(hidden_states=x, encoder_hidden_states=text[: x.shape[0]], timestep=_b(x, t)),
        latents=lambda g: torch.randn(B, 2, 4, 8, 8, generator=g),
        scheduler=lambda: CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"),
        batch=B,
    )


def sana_video_case(B=2) -> Case:
    """SanaVideoTransformer3DModel; the pipeline's DPM-Solver in flow mode."""
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        SanaVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=3,
            num_cross_attention_heads=2,
            cross_attention_head_dim=12,
            cross_attention_dim=24,
            caption_channels=16,
            mlp_ratio=2.5,
            dropout=0.0,
            attention_bias=False,
            sample_size=8,
            patch_size=(1, 2, 2),
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "sanavideo",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=torch.ones(x.shape[0], 6),
            timestep=_b(x, t),
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=lambda: DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
        ),
        batch=B,
    )


def mochi_case(B=2) -> Case:
    """MochiTransformer3DModel (asymmetric dual-stream, the last block drops the context stream)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=3,
            pooled_projection_dim=16,
            in_channels=4,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=16,
            time_embed_dim=4,
            activation_fn="swiglu",
            max_sequence_length=16,
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1:, 4:] = False
    return Case(
        "mochi",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_b(x, t),
            encoder_attention_mask=mask[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def allegro_case(B=2) -> Case:
    """AllegroTransformer3DModel with the rotary tables its pipeline builds; DDIM (eps)."""
    from diffusers import AllegroTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    torch.manual_seed(0)
    m = _finish(
        AllegroTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=24,  # the pipeline's 3D rope splits the head in 3 rotary pairs
            in_channels=4,
            out_channels=4,
            num_layers=3,
            cross_attention_dim=48,  # the caption projection maps text to inner_dim = 48
            sample_width=8,
            sample_height=8,
            sample_frames=8,
            caption_channels=8,
        )
    )
    F, H, W = 2, 8, 8
    cfg = m.config
    gh, gw = H // cfg.patch_size, W // cfg.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg.attention_head_dim,
        crops_coords=((0, 0), (gh, gw)),
        grid_size=(gh, gw),
        temporal_size=F,
        interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    rotary = ((freqs_t, freqs_h, freqs_w), tuple(pos))
    text = torch.randn(B, 6, 8, generator=_gen(3))
    return Case(
        "allegro",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=torch.ones(x.shape[0], 6),
            timestep=_b(x, t),
            image_rotary_emb=rotary,
        ),
        latents=lambda g: torch.randn(B, 4, F, H, W, generator=g),
        scheduler=DDIMScheduler,
        batch=B,
    )


def _edm_euler() -> EDMEulerScheduler:
    s = EDMEulerScheduler()
    s.is_scale_input_called = True  # the case's inputs() applies scale_model_input's c_in itself
    return s


def cosmos_case(B=2) -> Case:
    """CosmosTransformer3DModel at Cosmos-1 (text2world) settings, with its EDM-Euler scheduler:
    the model gets c_in * x (the pipeline's ``scale_model_input``) and the EDM noise
    ``t = 0.25 * log(sigma)``. Cosmos Predict2 uses the same class and block stack."""
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        CosmosTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=12,
            num_layers=3,
            mlp_ratio=2,
            text_embed_dim=16,
            adaln_lora_dim=4,
            max_size=(4, 32, 32),
            patch_size=(1, 2, 2),
            rope_scale=(2.0, 1.0, 1.0),
            concat_padding_mask=False,  # True resizes the mask with torchvision, absent here
            extra_pos_embed_type="learnable",
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    sigma_data = EDMEulerScheduler().config.sigma_data

    def inputs(x, t):
        sigma = torch.exp(4 * t)  # EDMEulerScheduler.precondition_noise: t = 0.25 * log(sigma)
        c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
        n = x.shape[0]
        return dict(
            hidden_states=x * c_in,
            timestep=_b(x, t),
            encoder_hidden_states=text[:n],
            fps=30,
        )

    return Case(
        "cosmos",
        m,
        inputs=inputs,
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g) * 80.0,  # init_noise_sigma
        scheduler=_edm_euler,
        batch=B,
    )


def latte_case(B=2) -> Case:
    """LatteTransformer3DModel: spatial and temporal block lists called alternately; learned
    sigma (8 output channels): the sampler keeps the first 4 (epsilon)."""
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        LatteTransformer3DModel(
            sample_size=8,
            num_layers=3,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=8,
            in_channels=4,
            cross_attention_dim=16,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            video_length=2,
        )
    )
    text = torch.randn(B, 6, 8, generator=_gen(3))
    return Case(
        "latte",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=_b(x, t),
            encoder_hidden_states=text[: x.shape[0]],
            enable_temporal_attentions=True,
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=DDIMScheduler,
        output=lambda o: o.sample.chunk(2, dim=1)[0],
        batch=B,
    )


def easyanimate_case(B=2) -> Case:
    """EasyAnimateTransformer3DModel (MMDiT-style joint blocks on [text; video] tokens)."""
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    m = _finish(
        EasyAnimateTransformer3DModel(
            attention_head_dim=16,
            num_attention_heads=2,
            in_channels=4,
            mmdit_layers=3,
            num_layers=3,
            out_channels=4,
            patch_size=2,
            sample_height=60,
            sample_width=90,
            text_embed_dim=16,
            time_embed_dim=8,
            time_position_encoding_type="3d_rope",
            timestep_activation_fn="silu",
        )
    )
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "easyanimate",
        m,
        inputs=lambda x, t: dict(hidden_states=x, timestep=_b(x, t), encoder_hidden_states=text[: x.shape[0]]),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def kandinsky5_case(B=2) -> Case:
    """Kandinsky5Transformer3DModel: text encoder blocks, then visual decoder blocks; latents
    channels-last (B, F, H, W, C); rope positions as the pipeline builds them."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    m = _finish(
        Kandinsky5Transformer3DModel(
            in_visual_dim=4,
            in_text_dim=16,
            in_text_dim2=12,
            time_dim=16,
            out_visual_dim=4,
            patch_size=(1, 2, 2),
            model_dim=16,
            ff_dim=32,
            num_text_blocks=2,
            num_visual_blocks=3,
            axes_dims=(1, 1, 2),
            visual_cond=False,
            attention_type="regular",
        )
    )
    F, H, W = 2, 8, 8
    text = torch.randn(B, 6, 16, generator=_gen(3))
    pooled = torch.randn(B, 12, generator=_gen(4))
    visual_rope_pos = [torch.arange(F), torch.arange(H // 2), torch.arange(W // 2)]
    return Case(
        "kandinsky5",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_b(x, t),
            pooled_projections=pooled[: x.shape[0]],
            visual_rope_pos=visual_rope_pos,
            text_rope_pos=torch.arange(6),
            scale_factor=(1.0, 1.0, 1.0),
            sparse_params=None,
        ),
        latents=lambda g: torch.randn(B, F, H, W, 4, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


CASES_VIDEO = {
    "wanvace": wan_vace_case,
    "skyreelsv2": skyreels_v2_case,
    "chronoedit": chronoedit_case,
    "hunyuanvideo": hunyuan_video_case,
    "hunyuanvideo15": hunyuan_video15_case,
    "hunyuanvideoframepack": hunyuan_video_framepack_case,
    "ltx": ltx_case,
    "ltx2": ltx2_case,
    "cogvideox": cogvideox_case,
    "sanavideo": sana_video_case,
    "mochi": mochi_case,
    "allegro": allegro_case,
    "cosmos": cosmos_case,
    "latte": latte_case,
    "easyanimate": easyanimate_case,
    "kandinsky5": kandinsky5_case,
}
