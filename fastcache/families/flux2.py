"""diffusers' ``Flux2Transformer2DModel`` (FLUX.2 dev, klein): dual-stream blocks, then
single-stream blocks on ``cat([text, image])``. The modulation is computed once per step
at model level (``double_stream_modulation_img/_txt``, ``single_stream_modulation``) and
the same tensor is handed to every block of a list.

The stack is the single-stream list alone. The two lists take different arguments (the
dual blocks ``temb_mod_img`` / ``temb_mod_txt`` and two streams; the single blocks
``temb_mod`` and the concatenated stream, made by the model between the lists), so one
block call cannot drive both; within the single list every block gets the same
arguments. The dual blocks run uncached before it (FLUX.2 dev: 8 of 56 blocks). The
TeaCache indicator is the first single block's modulated normed input (text and image
tokens)."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._adaln import clip16

H = "hidden_states"
_PARALLEL = Branch("parallel", (H,))


def _split(temb_mod):
    """``Flux2Modulation.split(temb_mod, 1)[0]``: shift, scale, gate, each ``(B, 1, D)``."""
    mod = temb_mod.unsqueeze(1) if temb_mod.ndim == 2 else temb_mod
    return mod.chunk(3, dim=-1)


def _indicator(block, call):
    shift, scale = _split(call["temb_mod"])[:2]
    return call[H], shift.squeeze(1), scale.squeeze(1), block.norm.eps


class Flux2SingleProgram(BlockProgram):
    """diffusers ``Flux2SingleTransformerBlock`` as the model calls it (text tokens already
    concatenated in front, ``encoder_hidden_states=None``): attention and MLP fused in
    one module (``Flux2ParallelSelfAttention``) under one gate, so one branch."""

    family = "diffusers-flux2-single"

    def branches(self, block):
        return (_PARALLEL,)

    def run(self, block, call, streams, ex: Executor):
        if call.get("encoder_hidden_states") is not None or call.get("split_hidden_states"):
            raise ValueError(
                "fastcache: Flux2SingleTransformerBlock called with encoder_hidden_states / split_hidden_states "
                "(text concatenated inside the block); the Flux.2 program models the call Flux2Transformer2DModel "
                "makes (text already in hidden_states, encoder_hidden_states=None)."
            )
        x = streams[H]
        shift, scale, gate = _split(call["temb_mod"])
        kw = call.get("joint_attention_kwargs") or {}

        def parallel():
            n = (1 + scale) * block.norm(x) + shift
            return (block.attn(hidden_states=n, image_rotary_emb=call.get("image_rotary_emb"), **kw),)

        (x,) = ex.residual("parallel", parallel, (x,), (gate,))
        return {H: clip16(x)}


def register_programs() -> None:
    register_program(
        "diffusers.models.transformers.transformer_flux2.Flux2SingleTransformerBlock", lambda b: Flux2SingleProgram()
    )


SPEC = ModelSpec(
    name="diffusers-flux2",
    model_types="diffusers.models.transformers.transformer_flux2.Flux2Transformer2DModel",
    segments=("single_transformer_blocks",),
    streams=(H,),
    returns=(H,),
    modulation=_indicator,
    interior=program_for,
    # the reference-image KV cache hands every block its own layer cache (a dict mutated between block calls)
    refuse_args=("kv_cache", "kv_cache_mode"),
)
