"""Tiny diffusers pipelines (the real pipeline classes, tiny components), built offline and
deterministically, for tests that drive a whole ``pipe(...)`` call (``fastcache.enable``,
the pipeline CLI).

* ``dit``: DiTPipeline, class-conditional (batched CFG), labels by name (``id2label``).
* ``pixart``: PixArtSigmaPipeline, a T5 encoder (batched CFG).
* ``flux``: FluxPipeline, CLIP + T5 encoders; true CFG (``true_cfg_scale`` + a negative
  prompt): separate ``cache_context("cond" / "uncond")`` calls.
* ``wan22``: WanPipeline with two experts (``transformer`` for the high-noise steps,
  ``transformer_2`` below ``boundary_ratio``: Wan 2.2 A14B's layout), AutoencoderKLWan, a
  UMT5 encoder; CFG as separate ``cond`` / ``uncond`` calls.
* ``sd3`` (optional, not in :data:`NAMES`): StableDiffusion3Pipeline, two CLIP + T5.

The transformers use the zoo's tiny configs (tests/support/zoo.py) with its zero-init
randomisation, so their blocks are not the identity. Tokenizers are byte-level BPE with no
merges (every UTF-8 byte one token), built with ``tokenizers`` and wrapped in transformers'
fast tokenizer: different prompts give different ids, hence different embeddings.

Build with :func:`build` (in memory) or :func:`save` (``save_pretrained``, reloadable with
``DiffusionPipeline.from_pretrained(folder)``); call with ``pipe(**call_kwargs(name, steps))``
and read the result with :func:`output`. Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .zoo import FLUX_CONFIG, PIXART_CONFIG, SD3_CONFIG, WAN_CONFIG, _randomize_zero_init

NAMES = ("dit", "pixart", "flux", "wan22")
#: every pipeline :func:`build` knows (``sd3`` optional: three text encoders, a little slower)
ALL = NAMES + ("sd3",)

#: the tokenizers' maximum length (T5 / UMT5 / CLIP alike)
MAX_TOKENS = 32
#: DiT's tiny ImageNet-style class names (``pipe.get_label_ids(["umbrella"])``); the rest of
#: the 1000 classes (DiT's pipeline feeds class 1000 as the null label) have no name
DIT_LABELS = {0: "tench, Tinca tinca", 1: "goldfish", 2: "white shark", 3: "umbrella", 4: "vase", 5: "white wolf"}
#: name -> class id, as DiTPipeline maps them (``pipe.labels``)
DIT_IDS = {n.strip(): k for k, v in DIT_LABELS.items() for n in v.split(",")}
#: Wan 2.2 A14B's text-to-video boundary: steps with t >= 0.875 * 1000 go to ``transformer``
WAN22_BOUNDARY = 0.875

_SPECIALS = ("<pad>", "</s>", "<unk>", "<s>")  # ids 0, 1, 2, 3; then the 256 bytes
PAD, EOS, UNK, BOS = range(4)
VOCAB = len(_SPECIALS) + 256


def tokenizer(bos: bool = False, max_length: int = MAX_TOKENS):
    """A byte-level tokenizer (no merges: one token per UTF-8 byte) that appends ``</s>``
    (T5 style), or wraps in ``<s> ... </s>`` with ``bos`` (CLIP style); pads with ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    vocab.update({c: len(_SPECIALS) + i for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        post = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
        )
    else:
        post = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)])
    tok.post_processor = post
    specials = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if bos:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, padding_side="right", **specials)


def _t5(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(
        vocab_size=VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    torch.manual_seed(0)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**cfg)).eval()
    return T5EncoderModel(T5Config(**cfg)).eval()


def _clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection or hidden,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,  # not 2: the pooled output is read at the first </s>
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int, **extra):
    """A one-level AutoencoderKL (scale factor 1: latents are the image's size)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
    )
    cfg.update(extra)
    return AutoencoderKL(**cfg).eval()


def _seeded(cls, **cfg):
    torch.manual_seed(0)
    m = cls(**cfg).eval()
    _randomize_zero_init(m)
    return m


def _dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    # the zoo's DiT (tests/support/zoo.py dit_case), with ImageNet's 1000 classes: the
    # pipeline's null class (CFG) is label 1000
    transformer = _seeded(
        DiTTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma, like DiT-XL-2
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    pipe = DiTPipeline(transformer=transformer, vae=_vae(4), scheduler=DDIMScheduler(), id2label=DIT_LABELS)
    # DiTPipeline does not record id2label in its config: register it so save_pretrained
    # writes it to model_index.json and from_pretrained passes it back
    pipe.register_to_config(id2label={str(k): v for k, v in DIT_LABELS.items()})
    return pipe


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = _seeded(PixArtTransformer2DModel, **PIXART_CONFIG)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer(),
        text_encoder=_t5(24),
        vae=_vae(4),
        transformer=transformer,
        # thresholding bounds the untrained model's x0 predictions (without it the latents grow ~150x)
        scheduler=DPMSolverMultistepScheduler(thresholding=True),
    )


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = _seeded(FluxTransformer2DModel, **FLUX_CONFIG)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(2, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(16),
        tokenizer=tokenizer(bos=True),
        text_encoder_2=_t5(24),
        tokenizer_2=tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _wan22():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    # the zoo's Wan config (one fastcache's Wan family takes); the two experts differ
    high = _seeded(WanTransformer3DModel, **WAN_CONFIG)
    torch.manual_seed(1)
    low = WanTransformer3DModel(**WAN_CONFIG).eval()
    _randomize_zero_init(low)
    z = WAN_CONFIG["in_channels"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
    ).eval()
    return WanPipeline(
        tokenizer=tokenizer(),
        text_encoder=_t5(WAN_CONFIG["text_dim"], umt5=True),
        vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=high,
        transformer_2=low,
        boundary_ratio=WAN22_BOUNDARY,
    )


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(SD3Transformer2DModel, **SD3_CONFIG)
    # the two CLIPs' penultimate states (8 + 16 wide) are concatenated and padded to the
    # T5's 24; their projections (8 + 8) are the pooled 16
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(8, projection=8),
        tokenizer=tokenizer(bos=True),
        text_encoder_2=_clip(16, projection=8),
        tokenizer_2=tokenizer(bos=True),
        text_encoder_3=_t5(24),
        tokenizer_3=tokenizer(),
        transformer=transformer,
    )


_BUILDERS = {"dit": _dit, "pixart": _pixart, "flux": _flux, "wan22": _wan22, "sd3": _sd3}


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise KeyError(f"tests/support/pipelines.py: no tiny pipeline {name!r}; one of {ALL}")


def build(name: str):
    """The tiny pipeline ``name`` in memory (on the CPU, float32, progress bar off);
    the same weights on every call."""
    _check(name)
    pipe = _BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(name: str, root: Path) -> Path:
    """``save_pretrained`` of :func:`build`'s pipeline into ``root / name``; returns that folder."""
    folder = Path(root) / name
    build(name).save_pretrained(folder)
    return folder


def load(folder: Path):
    """``DiffusionPipeline.from_pretrained(folder)`` (offline), progress bar off.

    diffusers 0.42.1 loads a model whose class keeps modules in float32
    (``_keep_in_fp32_modules``: WanTransformer3DModel, so ``wan22``) only with ``accelerate``
    installed (without it: "`low_cpu_mem_usage` cannot be False when `keep_in_fp32_modules`
    is True"); :func:`needs_accelerate` says which pipelines."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def needs_accelerate(folder: Path) -> bool:
    """Whether :func:`load` of a saved pipeline needs the ``accelerate`` package: one of its
    diffusers models keeps modules in float32 (diffusers 0.42.1 loads those only through it)."""
    import json

    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return any(
        isinstance(v, list)
        and v[0] == "diffusers"
        and getattr(getattr(diffusers, v[1], None), "_keep_in_fp32_modules", None)
        for v in index.values()
    )


def realign(pipe):
    """Give every parameter and buffer of ``pipe``'s models its own fresh allocation, in place;
    returns ``pipe``. ``from_pretrained`` leaves the weights as views into the safetensors
    buffer, at offsets that are not 64-byte aligned, and the CPU GEMM rounds some products
    differently on unaligned operands (measured: a Linear's output off by ~1e-7, the tiny
    ``wan22`` / ``sd3`` runs by ~1e-6): realigned, a loaded pipeline computes bitwise what
    the in-memory build does."""
    with torch.no_grad():
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                for t in list(m.parameters()) + list(m.buffers()):
                    t.data = t.data.clone()
    return pipe


#: the default prompt / class label of each pipeline
PROMPT = "a photo of a cat"
LABEL = "umbrella"


def call_kwargs(name: str, steps: int, seed: int = 0, prompt=None, output_type: str | None = None) -> dict:
    """The keyword arguments of ``pipe(**kw)`` for a tiny, CFG-on call of ``steps`` steps.

    ``prompt``: the text; for ``dit`` class ids or names of :data:`DIT_LABELS` (one or a
    list). ``output_type``: ``"latent"`` by default (``"pt"`` for ``dit``, whose pipeline
    always decodes); ``"pt"`` decodes with the tiny VAE. Prompts are byte-tokenized: only
    their first :data:`MAX_TOKENS` - 2 bytes count."""
    _check(name)
    gen = torch.Generator().manual_seed(seed)
    if name == "dit":
        labels = LABEL if prompt is None else prompt
        labels = [labels] if isinstance(labels, (int, str)) else list(labels)
        labels = [DIT_IDS[x] if isinstance(x, str) else x for x in labels]
        return dict(
            class_labels=labels,
            guidance_scale=4.0,
            num_inference_steps=steps,
            generator=gen,
            output_type=output_type or "pt",
        )
    kw = dict(
        prompt=PROMPT if prompt is None else prompt,
        num_inference_steps=steps,
        generator=gen,
        output_type=output_type or "latent",
        max_sequence_length=MAX_TOKENS,
    )
    if name == "pixart":
        kw.update(height=8, width=8, guidance_scale=4.5, clean_caption=False, use_resolution_binning=False)
    elif name == "flux":
        # Flux is guidance-distilled: true CFG (a negative prompt and true_cfg_scale > 1) runs
        # the cond and uncond branches as separate calls
        kw.update(height=8, width=8, negative_prompt="blurry", true_cfg_scale=4.0)
    elif name == "wan22":
        kw.update(height=64, width=64, num_frames=5, negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=3.0)
    elif name == "sd3":
        kw.update(height=8, width=8, negative_prompt="blurry", guidance_scale=4.5)
    return kw


def output(name: str, result) -> torch.Tensor:
    """The tensor a pipeline call returned: ``frames`` (video) or ``images`` (latents when
    ``output_type="latent"``)."""
    _check(name)
    out = result.frames if name == "wan22" else result.images
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: the pipeline returned {type(out).__name__}, not a tensor; call with output_type 'pt'")
    return out


def denoisers(name: str) -> tuple[str, ...]:
    """The pipeline attributes holding its denoising transformers (two experts for ``wan22``)."""
    _check(name)
    return ("transformer", "transformer_2") if name == "wan22" else ("transformer",)


def cfg_calls(name: str) -> int:
    """Transformer calls per step: 2 where CFG runs as separate cond / uncond calls, 1 where
    the pipeline batches it (DiT, PixArt, SD3)."""
    _check(name)
    return 2 if name in ("flux", "wan22") else 1
