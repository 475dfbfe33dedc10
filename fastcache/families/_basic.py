"""diffusers' ``BasicTransformerBlock``, shared by the DiT (``ada_norm_zero``) and PixArt
(``ada_norm_single``) families: the branches and the pieces of its forward both programs
use. Each family registers the program of its ``norm_type`` (:func:`register_norm`)."""

from __future__ import annotations

from torch import nn

from ..interior.base import BlockProgram, Branch, register_program

H = "hidden_states"
_ATTN_H = Branch("attn", (H,))
_CROSS_H = Branch("cross", (H,), gated=False)
_MLP_H = Branch("mlp", (H,))


def _check_basic(block: nn.Module, call: dict) -> dict:
    cak = call.get("cross_attention_kwargs")
    cak = dict(cak) if cak is not None else {}
    if "gligen" in cak:
        raise ValueError(
            "fastcache: GLIGEN inputs (cross_attention_kwargs['gligen']) add a fuser between branches, which the "
            "interior program does not model; remove the cache for this call."
        )
    return cak


def _feed_forward(block: nn.Module, h):
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, h, block._chunk_dim, block._chunk_size)
    return block.ff(h)


def _squeeze4(h):
    return h.squeeze(1) if h.ndim == 4 else h


class _BasicProgram(BlockProgram):
    def branches(self, block):
        return (_ATTN_H, _CROSS_H, _MLP_H) if block.attn2 is not None else (_ATTN_H, _MLP_H)

    def _cross(self, block, call, x, cak, ex, norm):
        if block.attn2 is None:
            return x

        def cross():
            h = norm(x)
            if block.pos_embed is not None and block.norm_type != "ada_norm_single":
                h = block.pos_embed(h)
            return (
                block.attn2(
                    h,
                    encoder_hidden_states=call.get("encoder_hidden_states"),
                    attention_mask=call.get("encoder_attention_mask"),
                    **cak,
                ),
            )

        (x,) = ex.residual("cross", cross, (x,), (None,))
        return x

    def _self_attn(self, block, call, x, cak, norm_mod, gate, ex):
        def attn():
            h = norm_mod(x)
            if block.pos_embed is not None:
                h = block.pos_embed(h)
            enc = call.get("encoder_hidden_states") if block.only_cross_attention else None
            return (block.attn1(h, encoder_hidden_states=enc, attention_mask=call.get("attention_mask"), **cak),)

        (x,) = ex.residual("attn", attn, (x,), (gate,))
        return _squeeze4(x)


_BY_NORM: dict[str, type[BlockProgram]] = {}


def _factory(block):
    cls = _BY_NORM.get(block.norm_type)
    if cls is None:
        raise TypeError(
            f"fastcache: BasicTransformerBlock(norm_type={block.norm_type!r}) has no AdaLN gates to reuse a branch "
            f"under; interior programs exist for norm_type in {sorted(_BY_NORM)}."
        )
    return cls()


def register_norm(norm_type: str, program: type[BlockProgram]) -> None:
    """The program of ``BasicTransformerBlock(norm_type=norm_type)``."""
    _BY_NORM[norm_type] = program
    register_program("diffusers.models.attention.BasicTransformerBlock", _factory)
