"""Tiny instances of diffusers 0.42.1 image transformer classes (the "reach zoo", image
share) and the real sampling loop for each (``support.zoo.Case``). Configs follow
diffusers' own model tests (tests/models/transformers/test_models_transformer_*.py),
widened to >= 2 blocks per block list; inputs follow each class's pipeline call
(timestep scale, id layouts, sign of the prediction)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from support.zoo import Case, _randomize_zero_init


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _build(cls, **cfg):
    torch.manual_seed(0)
    m = cls(**cfg).eval()
    _randomize_zero_init(m)
    return m


def _grid_ids(h, w, lead=(0,), tail=()):
    """(h*w, len(lead)+2+len(tail)) position ids: constant lead/tail columns, rows/cols in between."""
    n = h * w
    cols = [torch.full((n,), float(v)) for v in lead]
    cols += [torch.arange(n).div(w, rounding_mode="floor").float(), (torch.arange(n) % w).float()]
    cols += [torch.full((n,), float(v)) for v in tail]
    return torch.stack(cols, dim=1)


def _flow_t(t, x):
    """Flux-family pipelines pass ``t / 1000`` (sigma in [0, 1]) to the model."""
    return (t / 1000).expand(x.shape[0])


def flux2_case(B=2) -> Case:
    from diffusers import Flux2Transformer2DModel

    m = _build(
        Flux2Transformer2DModel,
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    h = w = 4
    T = 6
    text = torch.randn(B, T, 32, generator=_gen(3))
    img_ids = _grid_ids(h, w, lead=(0,), tail=(0,))  # (t, h, w, l)
    txt_ids = torch.stack([torch.zeros(T), torch.zeros(T), torch.zeros(T), torch.arange(T).float()], 1)
    guidance = torch.full((B,), 4.0)
    return Case(
        "flux2",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_flow_t(t, x),
            img_ids=img_ids.expand(x.shape[0], -1, -1),
            txt_ids=txt_ids.expand(x.shape[0], -1, -1),
            guidance=guidance[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, h * w, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def flux3_case(B=2) -> Case:
    """No pipeline ships with diffusers 0.42.1 for Flux.3; the forward's docstring gives
    the layouts: timestep in [0, 1], ids (seq, 4) shared by the batch."""
    from diffusers.models.transformers.transformer_flux3 import Flux3Transformer2DModel

    m = _build(
        Flux3Transformer2DModel,
        in_channels=8,
        cond_in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    h = w = 4
    T = 6
    text = torch.randn(B, T, 32, generator=_gen(3))
    img_ids = _grid_ids(h, w, lead=(0,), tail=(0,))
    txt_ids = torch.stack([torch.zeros(T), torch.zeros(T), torch.zeros(T), torch.arange(T).float()], 1)
    return Case(
        "flux3",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_flow_t(t, x),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ),
        latents=lambda g: torch.randn(B, h * w, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def chroma_case(B=2) -> Case:
    from diffusers import ChromaTransformer2DModel

    m = _build(
        ChromaTransformer2DModel,
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )
    h = w = 4
    T = 6
    text = torch.randn(B, T, 32, generator=_gen(3))
    img_ids = _grid_ids(h, w)
    txt_ids = torch.zeros(T, 3)
    mask = torch.ones(B, T + h * w, dtype=torch.bool)
    mask[1:, T - 2 : T] = False  # second prompt is 2 tokens shorter (padding masked, like the pipeline)
    return Case(
        "chroma",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_flow_t(t, x),
            img_ids=img_ids,
            txt_ids=txt_ids,
            attention_mask=mask[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, h * w, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def bria_case(B=2) -> Case:
    """BriaPipeline passes the scheduler timestep unscaled (0..1000)."""
    from diffusers import BriaTransformer2DModel

    m = _build(
        BriaTransformer2DModel,
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=None,
        axes_dims_rope=(0, 4, 4),
    )
    h = w = 4
    T = 6
    text = torch.randn(B, T, 32, generator=_gen(3))
    img_ids = _grid_ids(h, w)
    txt_ids = torch.zeros(T, 3)
    return Case(
        "bria",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=t.expand(x.shape[0]),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ),
        latents=lambda g: torch.randn(B, h * w, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def longcat_image_case(B=2) -> Case:
    from diffusers import LongCatImageTransformer2DModel

    m = _build(
        LongCatImageTransformer2DModel,
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    h = w = 4
    T = 6
    text = torch.randn(B, T, 32, generator=_gen(3))
    # pipeline's prepare_pos_ids: text (modality 0, i, i); image (modality 1, row + T, col + T)
    txt_ids = torch.stack([torch.zeros(T), torch.arange(T).float(), torch.arange(T).float()], 1)
    img_ids = _grid_ids(h, w, lead=(1,))
    img_ids[:, 1:] += T
    return Case(
        "longcat_image",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=_flow_t(t, x),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ),
        latents=lambda g: torch.randn(B, h * w, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def qwenimage_case(B=2) -> Case:
    from diffusers import QwenImageTransformer2DModel

    m = _build(
        QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    h = w = 4  # packed 2x2 patches of an 8x8 latent
    T = 6
    text = torch.randn(B, T, 16, generator=_gen(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, T - 2 :] = 0
    return Case(
        "qwenimage",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            encoder_hidden_states_mask=mask[: x.shape[0]],
            timestep=_flow_t(t, x),
            img_shapes=[[(1, h, w)]] * x.shape[0],
        ),
        latents=lambda g: torch.randn(B, h * w, 16, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def hunyuanimage_case(B=2) -> Case:
    """HunyuanImage 2.1: the pipeline passes the scheduler timestep (0..1000) and 4-D latents."""
    from diffusers import HunyuanImageTransformer2DModel

    m = _build(
        HunyuanImageTransformer2DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=3,
        num_refiner_layers=2,
        patch_size=(1, 1),
        text_embed_dim=16,
        rope_axes_dim=(8, 8),
    )
    T = 6
    text = torch.randn(B, T, 16, generator=_gen(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, T - 2 :] = 0
    return Case(
        "hunyuanimage",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=mask[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 4, 4, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def cogview4_case(B=2) -> Case:
    from diffusers import CogView4Transformer2DModel

    m = _build(
        CogView4Transformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=4,
        rope_axes_dim=(8, 8),
    )
    T = 8
    text = torch.randn(B, T, 8, generator=_gen(3))
    size = torch.tensor([[64.0, 64.0]]).repeat(B, 1)
    crop = torch.zeros(B, 2)
    return Case(
        "cogview4",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=t.expand(x.shape[0]),
            original_size=size[: x.shape[0]],
            target_size=size[: x.shape[0]],
            crop_coords=crop[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: o.sample,
        batch=B,
    )


def sana_case(B=2) -> Case:
    """SanaPipeline uses DPM-Solver++ in flow mode; flow-matching Euler runs the same
    flow-prediction model here (timestep 0..1000, ``timestep_scale`` 1)."""
    from diffusers import SanaTransformer2DModel

    m = _build(
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=8,
        sample_size=8,
    )
    T = 6
    text = torch.randn(B, T, 8, generator=_gen(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, T - 2 :] = 0
    return Case(
        "sana",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=mask[: x.shape[0]],
            timestep=t.expand(x.shape[0]),
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def lumina2_case(B=2) -> Case:
    """Lumina2Pipeline: timestep ``1 - t / 1000`` (t=0 is noise) and the prediction negated."""
    from diffusers import Lumina2Transformer2DModel

    m = _build(
        Lumina2Transformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=3,
        num_refiner_layers=2,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=2,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128),
        cap_feat_dim=16,
    )
    T = 6
    text = torch.randn(B, T, 16, generator=_gen(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1:, T - 2 :] = False
    return Case(
        "lumina2",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=(1 - t / 1000).expand(x.shape[0]),
            encoder_hidden_states=text[: x.shape[0]],
            encoder_attention_mask=mask[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: -o.sample,
        batch=B,
    )


def zimage_case(B=2) -> Case:
    """ZImagePipeline: lists of per-sample tensors (x: (C, 1, H, W), cap_feats: (S, D)),
    positional; timestep ``(1000 - t) / 1000``; the prediction negated."""
    from diffusers import ZImageTransformer2DModel

    m = _build(
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=3,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    T = 8
    text = torch.randn(B, T, 16, generator=_gen(3))
    return Case(
        "zimage",
        m,
        inputs=lambda x, t: dict(
            x=list(x.unsqueeze(2).unbind(0)),
            t=((1000 - t) / 1000).expand(x.shape[0]),
            cap_feats=list(text[: x.shape[0]].unbind(0)),
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: -torch.stack(o.sample).squeeze(2),
        batch=B,
        stream="x",
    )


def hidream_case(B=2) -> Case:
    """HiDreamImagePipeline: ``timesteps`` (0..1000), one Llama hidden state per block
    (``llama_layers`` indexes the stacked ``encoder_hidden_states_llama3``); the prediction negated."""
    from diffusers import HiDreamImageTransformer2DModel

    n_double, n_single = 2, 3
    m = _build(
        HiDreamImageTransformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=n_double,
        num_single_layers=n_single,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=tuple(range(n_double + n_single)),
        force_inference_output=True,
    )
    T = 6
    t5 = torch.randn(B, T, 8, generator=_gen(3))
    llama = torch.randn(n_double + n_single, B, T, 4, generator=_gen(4))
    pooled = torch.randn(B, 8, generator=_gen(5))
    return Case(
        "hidream",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timesteps=t.expand(x.shape[0]),
            encoder_hidden_states_t5=t5[: x.shape[0]],
            encoder_hidden_states_llama3=llama[:, : x.shape[0]],
            pooled_embeds=pooled[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        output=lambda o: -o.sample,
        batch=B,
    )


def auraflow_case(B=2) -> Case:
    """AuraFlowPipeline passes ``t / 1000``."""
    from diffusers import AuraFlowTransformer2DModel

    m = _build(
        AuraFlowTransformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    T = 8
    text = torch.randn(B, T, 32, generator=_gen(3))
    return Case(
        "auraflow",
        m,
        inputs=lambda x, t: dict(hidden_states=x, encoder_hidden_states=text[: x.shape[0]], timestep=_flow_t(t, x)),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def hunyuandit_case(B=2) -> Case:
    """HunyuanDiTPipeline (DDPM, epsilon, learned sigma): timestep positional, 2-D RoPE
    from the pipeline's helper, image meta sizes and style ids."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    m = _build(
        HunyuanDiT2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=6,  # even: blocks 4, 5 take the skips of blocks 0, 1 (the real model: 40 layers)
        attention_head_dim=16,
        num_attention_heads=2,
        cross_attention_dim=8,
        cross_attention_dim_t5=8,
        pooled_projection_dim=4,
        hidden_size=32,
        text_len=4,
        text_len_t5=6,
        activation_fn="gelu-approximate",
    )
    text = torch.randn(B, 4, 8, generator=_gen(3))
    t5 = torch.randn(B, 6, 8, generator=_gen(4))
    mask, mask_t5 = torch.ones(B, 4), torch.ones(B, 6)
    mask_t5[1:, -2:] = 0
    meta = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]).repeat(B, 1)
    style = torch.zeros(B, dtype=torch.long)
    grid, base = 8 // 2, 512 // 8 // 2
    # the pipeline's get_resize_crop_region_for_grid for a square grid is ((0, 0), (base, base)); its
    # module imports transformers (not installed here), so the square case is written out
    rope = get_2d_rotary_pos_embed(32 // 2, ((0, 0), (base, base)), (grid, grid), output_type="pt")
    return Case(
        "hunyuandit",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=t.expand(x.shape[0]).float(),
            encoder_hidden_states=text[: x.shape[0]],
            text_embedding_mask=mask[: x.shape[0]],
            encoder_hidden_states_t5=t5[: x.shape[0]],
            text_embedding_mask_t5=mask_t5[: x.shape[0]],
            image_meta_size=meta[: x.shape[0]],
            style=style[: x.shape[0]],
            image_rotary_emb=rope,
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=DDIMScheduler,
        output=lambda o: o.sample.chunk(2, dim=1)[0],  # learned sigma: keep epsilon
        batch=B,
    )


def omnigen_case(B=2) -> Case:
    """OmniGenPipeline, text-to-image (no input images): the token sequence is the prompt
    ids, one time token, then the image tokens; a causal mask over the prompt."""
    from diffusers import OmniGenTransformer2DModel

    m = _build(
        OmniGenTransformer2DModel,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=32,
        num_layers=3,
        pad_token_id=0,
        vocab_size=100,
        in_channels=4,
        time_step_dim=4,
        rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))},
    )
    S, N = 6, 16  # prompt tokens, image tokens (8x8 latent, patch 2)
    ids = torch.randint(1, 100, (B, S), generator=_gen(3))
    L = S + 1 + N
    mask = torch.tril(torch.ones(L, L))
    mask[:, -(N + 1) :] = 1  # the time token and image tokens attend to everything
    mask = mask[None].repeat(B, 1, 1)
    pos = torch.arange(L)[None].repeat(B, 1)
    return Case(
        "omnigen",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            input_ids=ids[: x.shape[0]],
            input_img_latents=[],
            input_image_sizes={},
            attention_mask=mask[: x.shape[0]],
            position_ids=pos[: x.shape[0]],
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


CASES_IMAGE = {
    "flux2": flux2_case,
    "flux3": flux3_case,
    "chroma": chroma_case,
    "bria": bria_case,
    "longcat_image": longcat_image_case,
    "qwenimage": qwenimage_case,
    "hunyuanimage": hunyuanimage_case,
    "cogview4": cogview4_case,
    "sana": sana_case,
    "lumina2": lumina2_case,
    "zimage": zimage_case,
    "hidream": hidream_case,
    "auraflow": auraflow_case,
    "hunyuandit": hunyuandit_case,
    "omnigen": omnigen_case,
}
