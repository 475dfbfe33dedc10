"""diffusers' ``HunyuanImageTransformer2DModel`` (HunyuanImage 2.1): dual-stream blocks,
then single-stream blocks, both lists called alike (3 positional arguments, the mask and
``image_rotary_emb`` by keyword). Its blocks are HunyuanVideo's line for line (the dual
block: AdaLayerNormZero per stream, joint attention, one gated MLP per stream; the single
block: video and text concatenated, attention and MLP in parallel under one gate), so the
programs and the TeaCache indicator are :mod:`.hunyuan_video`'s.

The timestep-conditioned text refiner (and, with ByT5, the per-sample re-ordering of the
text tokens) runs before the first list, uncached; the model reads only the image tokens
after the stack. The TeaCache authors published no polynomial for HunyuanImage 2.1: TeaCache
uses the raw relative L1 distance."""

from __future__ import annotations

from ..interior.base import program_for, register_program
from ..specs import ModelSpec
from .hunyuan_video import E, H, HunyuanDualProgram, HunyuanSingleProgram
from .hunyuan_video import _indicator as hunyuan_indicator


def register_programs() -> None:
    m = "diffusers.models.transformers.transformer_hunyuanimage."
    register_program(m + "HunyuanImageTransformerBlock", lambda b: HunyuanDualProgram())
    register_program(m + "HunyuanImageSingleTransformerBlock", lambda b: HunyuanSingleProgram())


SPEC = ModelSpec(
    name="diffusers-hunyuanimage",
    model_types="diffusers.models.transformers.transformer_hunyuanimage.HunyuanImageTransformer2DModel",
    segments=("transformer_blocks", "single_transformer_blocks"),
    streams=(H, E),
    returns=(H, E),
    # norm_out reads the image tokens only: the text stream passes through on a skipped step
    cached_streams=(H,),
    dropped_streams=(E,),
    # the first dual block's image-stream modulation (norm1's shift and scale), as for HunyuanVideo
    modulation=hunyuan_indicator,
    interior=program_for,
)
