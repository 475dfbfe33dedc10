"""diffusers' ``HunyuanVideo15Transformer3DModel`` (HunyuanVideo 1.5, text/image-to-video):
one list of dual-stream blocks, called with 5 positional arguments. Its block,
``HunyuanVideo15TransformerBlock``, is HunyuanVideo's dual-stream block line for line
(AdaLayerNormZero per stream, joint attention, one gated MLP per stream; only the
attention processor class differs, and the program calls ``block.attn`` as the block
does), so the program and the TeaCache indicator are :mod:`.hunyuan_video`'s.

Before the list the model refines the text, embeds the ByT5 and image tokens, and
re-orders them per sample (valid tokens first) into one text stream with its mask: all
before the first block, uncached. The model reads only the video tokens after the list.
The TeaCache authors published no polynomial for HunyuanVideo 1.5 (TeaCache4HunyuanVideo's
is fitted to HunyuanVideo's weights): TeaCache uses the raw relative L1 distance."""

from __future__ import annotations

from ..interior.base import program_for, register_program
from ..specs import ModelSpec
from .hunyuan_video import E, H, HunyuanDualProgram, frame_layout
from .hunyuan_video import _indicator as hunyuan_indicator


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_hunyuan_video15.HunyuanVideo15TransformerBlock",
        lambda b: HunyuanDualProgram(),
    )


SPEC = ModelSpec(
    name="diffusers-hunyuanvideo15",
    model_types="diffusers.models.transformers.transformer_hunyuan_video15.HunyuanVideo15Transformer3DModel",
    segments=("transformer_blocks",),
    streams=(H, E),
    returns=(H, E),
    # norm_out reads the video tokens only: the text stream passes through on a skipped step
    cached_streams=(H,),
    dropped_streams=(E,),
    # the first block's video-stream modulation, as for HunyuanVideo (norm1's shift and scale)
    modulation=hunyuan_indicator,
    interior=program_for,
    frame_layout=frame_layout,
)
