"""Tiny instances of every supported model (the real classes, small configs) and a
real diffusers sampling loop for each: DDIM for DiT / PixArt / the reference DiT,
flow-matching Euler for Flux / SD3."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)


@dataclasses.dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: Callable[[torch.Tensor, torch.Tensor], dict]  # (latents, t) -> model kwargs
    latents: Callable[[torch.Generator], torch.Tensor]
    scheduler: Callable[[], object]
    output: Callable[[object], torch.Tensor] = lambda o: o.sample  # noqa: E731
    batch: int = 2
    stream: str = "hidden_states"  # the model argument carrying the latents

    def sample(
        self, model=None, steps: int = 20, seed: int = 1, latents=None, per_step=None, context=None, after_call=None
    ) -> torch.Tensor:
        """Run a full sampling loop; returns the final latents. ``context(i)``: a context
        manager around step i's call (e.g. ``fastcache.context(m, name, step_index=i)``);
        ``after_call(i, out, kwargs)``: right after step i's call, in the same context."""
        import contextlib

        model = self.model if model is None else model
        sch = self.scheduler()
        sch.set_timesteps(steps)
        x = self.latents(torch.Generator().manual_seed(seed)) if latents is None else latents
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps):
                kw = self.inputs(x, t)
                with context(i) if context is not None else contextlib.nullcontext():
                    out = self.output(model(**kw))
                    if after_call is not None:
                        after_call(i, out, kw)
                if per_step is not None:
                    per_step(i, out)
                x = sch.step(out, t, x).prev_sample
        return x


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dit_case(B=2, **config) -> Case:
    """``config`` overrides the tiny defaults (e.g. a DiT-S-sized model for a benchmark)."""
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    cfg.update(config)
    m = DiTTransformer2DModel(**cfg).eval()
    _randomize_zero_init(m)
    labels = torch.arange(B) % 10
    n = cfg["sample_size"]
    return Case(
        "diffusers-dit",
        m,
        inputs=lambda x, t: dict(hidden_states=x, timestep=t.expand(x.shape[0]), class_labels=labels[: x.shape[0]]),
        latents=lambda g: torch.randn(B, 4, n, n, generator=g),
        scheduler=DDIMScheduler,
        batch=B,
    )


#: the tiny PixArt transformer (the zoo's case and support.pipelines' PixArt-Sigma pipeline)
PIXART_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=3,
    sample_size=8,
    patch_size=2,
    cross_attention_dim=32,
    caption_channels=24,
    use_additional_conditions=False,
)


def pixart_case(B=2, **config) -> Case:
    """``config`` overrides PIXART_CONFIG (e.g. fewer layers for a compile test)."""
    torch.manual_seed(0)
    m = PixArtTransformer2DModel(**{**PIXART_CONFIG, **config}).eval()
    _randomize_zero_init(m)
    text = torch.randn(B, 5, 24, generator=_gen(3))
    return Case(
        "diffusers-pixart",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            timestep=t.expand(x.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=DDIMScheduler,
        output=lambda o: o.sample.chunk(2, dim=1)[0],  # learned sigma: keep epsilon
        batch=B,
    )


#: the tiny Flux.1 transformer (the zoo's case and support.pipelines' Flux pipeline: 2 latent
#: channels packed 2x2)
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)


def flux_case(B=2) -> Case:
    torch.manual_seed(0)
    m = FluxTransformer2DModel(**FLUX_CONFIG).eval()
    _randomize_zero_init(m)
    N, T = 16, 6
    text = torch.randn(B, T, 24, generator=_gen(3))
    pooled = torch.randn(B, 16, generator=_gen(4))
    img_ids = torch.zeros(N, 3)
    img_ids[:, 1] = torch.arange(N) // 4
    img_ids[:, 2] = torch.arange(N) % 4
    txt_ids = torch.zeros(T, 3)
    return Case(
        "diffusers-flux",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            pooled_projections=pooled[: x.shape[0]],
            timestep=(t / 1000).expand(x.shape[0]),
            img_ids=img_ids,
            txt_ids=txt_ids,
        ),
        latents=lambda g: torch.randn(B, N, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


#: the tiny SD3 transformer (the zoo's case and support.pipelines' SD3 pipeline)
SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=16,
)


def sd3_case(B=2, **config) -> Case:
    """``config`` overrides SD3_CONFIG (the last of the ``num_layers`` blocks is SD3's
    context-pre-only block)."""
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**{**SD3_CONFIG, **config}).eval()
    _randomize_zero_init(m)
    text = torch.randn(B, 6, 24, generator=_gen(3))
    pooled = torch.randn(B, 16, generator=_gen(4))
    return Case(
        "diffusers-sd3",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x,
            encoder_hidden_states=text[: x.shape[0]],
            pooled_projections=pooled[: x.shape[0]],
            timestep=t.expand(x.shape[0]),
        ),
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


#: Wan 2.1's tiny config (diffusers' own test config), shared by the Wan-block classes of the zoo
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=3,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def wan_case(B=2, **config) -> Case:
    """Wan 2.1's class at a tiny size (diffusers' own test config): 2 frames of 8x8 latents;
    ``config`` overrides it."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(**{**WAN_CONFIG, **config}).eval()
    _randomize_zero_init(m)
    text = torch.randn(B, 6, 16, generator=_gen(3))
    return Case(
        "diffusers-wan",
        m,
        inputs=lambda x, t: dict(
            hidden_states=x, encoder_hidden_states=text[: x.shape[0]], timestep=t.expand(x.shape[0])
        ),
        latents=lambda g: torch.randn(B, 4, 2, 8, 8, generator=g),
        scheduler=FlowMatchEulerDiscreteScheduler,
        batch=B,
    )


def _reach(name: str, builder: str, module: str = "reach_image") -> Callable[..., Case]:
    """The reach zoo's builder ``builder`` (tests/support/reach_image.py or reach_video.py)
    under the family's name; imported when called (those modules import this one)."""

    def build(B=2) -> Case:
        import importlib

        return dataclasses.replace(getattr(importlib.import_module(f"support.{module}"), builder)(B), name=name)

    return build


class _TensorList(list):
    """Z-Image takes its latents as a list of per-sample tensors; scaling the list scales
    each (the suites perturb a call's latents as ``kw[case.stream] * 0.5``)."""

    def __mul__(self, k):
        return _TensorList(t * k for t in self)

    __rmul__ = __mul__


def zimage_case(B=2) -> Case:
    case = _reach("diffusers-zimage", "zimage_case")(B)
    base = case.inputs

    def inputs(x, t):
        kw = base(x, t)
        kw["x"] = _TensorList(kw["x"])
        return kw

    return dataclasses.replace(case, inputs=inputs)


def reference_dit_case(B=2, depth=3) -> Case:
    from fastcache.models import DiT

    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_classes=10).eval()
    _randomize_zero_init(m)
    labels = torch.arange(B) % 10
    return Case(
        "fastcache-dit",
        m,
        inputs=lambda x, t: dict(x=x, t=t.expand(x.shape[0]), y=labels[: x.shape[0]]),
        stream="x",
        latents=lambda g: torch.randn(B, 4, 8, 8, generator=g),
        scheduler=DDIMScheduler,
        output=lambda o: o,
        batch=B,
    )


class ToyDualStreamBlock(torch.nn.Module):
    """A user-style block with two streams: ``a`` modulated by ``emb`` (the indicator's
    shift/scale come from ``mod``), ``b`` updated on its own; returns (a, b)."""

    def __init__(self, d):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mod = torch.nn.Linear(d, 2 * d)
        self.fa, self.fb = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, a, b, emb):
        shift, scale = self.mod(emb).chunk(2, 1)
        h = self.norm1(a) * (1 + scale[:, None]) + shift[:, None]
        return a + torch.tanh(self.fa(h)), b + torch.tanh(self.fb(b)) * 0.5


def _randomize_zero_init(m: torch.nn.Module) -> None:
    """adaLN-Zero / zero-init output layers make an untrained model's blocks the
    identity, which would make every cache test trivial: give every zero-initialised
    parameter small random values (seeded)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


CASES = {
    "diffusers-dit": dit_case,
    "diffusers-pixart": pixart_case,
    "diffusers-flux": flux_case,
    "diffusers-sd3": sd3_case,
    "diffusers-wan": wan_case,
    "fastcache-dit": reference_dit_case,
}
CASES["diffusers-qwenimage"] = _reach("diffusers-qwenimage", "qwenimage_case")
CASES["diffusers-flux2"] = _reach("diffusers-flux2", "flux2_case")
CASES["diffusers-zimage"] = zimage_case
CASES["diffusers-hunyuanvideo"] = _reach("diffusers-hunyuanvideo", "hunyuan_video_case", "reach_video")
CASES["diffusers-ltx"] = _reach("diffusers-ltx", "ltx_case", "reach_video")
CASES["diffusers-cogvideox"] = _reach("diffusers-cogvideox", "cogvideox_case", "reach_video")
CASES["diffusers-mochi"] = _reach("diffusers-mochi", "mochi_case", "reach_video")
CASES["diffusers-chronoedit"] = _reach("diffusers-chronoedit", "chronoedit_case", "reach_video")
CASES["diffusers-skyreelsv2"] = _reach("diffusers-skyreelsv2", "skyreels_v2_case", "reach_video")
CASES["diffusers-sana"] = _reach("diffusers-sana", "sana_case")
CASES["diffusers-lumina2"] = _reach("diffusers-lumina2", "lumina2_case")
CASES["diffusers-hunyuanvideo15"] = _reach("diffusers-hunyuanvideo15", "hunyuan_video15_case", "reach_video")
CASES["diffusers-hunyuanimage"] = _reach("diffusers-hunyuanimage", "hunyuanimage_case")
#: cases whose model's own forward breaks a torch.compile(fullgraph=True) graph, unpatched:
#: the reason (tests/runtime/test_compile.py checks it still does; the other fullgraph tests skip them)
MODEL_GRAPH_BREAKS = {"diffusers-hunyuanvideo15": "its forward branches on torch.all(image_embeds == 0) (is_t2v)"}

#: the families the per-method runtime files (tests/runtime/test_<method>.py) go deep on: one
#: of each kind of block (DiT's and PixArt's BasicTransformerBlock, Flux's dual + single
#: streams, SD3's joint blocks, Wan's video blocks, the reference DiT). Every family of
#: CASES gets every method's contracts (tests/contracts), the README cells, the block
#: program's bitwise check, TeaCache parity and fullgraph compile.
CORE = {
    k: CASES[k]
    for k in ("diffusers-dit", "diffusers-pixart", "diffusers-flux", "diffusers-sd3", "diffusers-wan", "fastcache-dit")
}


def two_block_case(name: str) -> Case:
    """The core family ``name`` with two blocks in each block list (Flux: its two dual-stream
    and two single-stream blocks, as in ``CASES``; SD3: a joint block and the last,
    context-pre-only one): the fewest that still chain one block into the next, for the
    compile tests, where a third block of the same kind adds trace time and nothing else."""
    if name == "fastcache-dit":
        return reference_dit_case(depth=2)
    if name == "diffusers-flux":
        return flux_case()
    return CORE[name](num_layers=2)


#: TeaCache thresholds at which every zoo model skips a good share of a 10-20 step run with its
#: own coefficients (test_teacache_parity, test_compile)
TEACACHE_THRESHOLDS = {
    name: 0.2
    for name in (
        "diffusers-flux",
        "diffusers-wan",
        "diffusers-qwenimage",
        "diffusers-flux2",
        "diffusers-hunyuanvideo",
        "diffusers-ltx",
        "diffusers-cogvideox",
        "diffusers-mochi",
        "diffusers-chronoedit",
        "diffusers-skyreelsv2",
        "diffusers-sana",
        "diffusers-hunyuanvideo15",
        "diffusers-hunyuanimage",
    )
}
TEACACHE_THRESHOLDS.update({"diffusers-dit": 0.3, "diffusers-pixart": 0.3, "fastcache-dit": 0.3, "diffusers-sd3": 0.1})
TEACACHE_THRESHOLDS.update({"diffusers-zimage": 0.5, "diffusers-lumina2": 0.5})
