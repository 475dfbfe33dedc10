"""Block programs of the single-stream AdaLN DiTs: fastcache's reference DiT and
diffusers' ``BasicTransformerBlock`` with ``ada_norm_zero`` (DiT) or
``ada_norm_single`` (PixArt-α/Σ). Each mirrors its block's forward line by line."""

from __future__ import annotations

from torch import nn

from .base import BlockProgram, Branch, Executor

ATTN = Branch("attn", ("x",))
MLP = Branch("mlp", ("x",))


class ReferenceDiTProgram(BlockProgram):
    """``fastcache.models.DiTBlock`` (DiT paper Sec. 3.2, adaLN-Zero): six chunks of
    ``adaLN_modulation(c)`` = shift/scale/gate for attention, then for the MLP."""

    family = "fastcache-dit"

    def branches(self, block):
        return (ATTN, MLP)

    def run(self, block, call, streams, ex: Executor):
        from ..models.dit import modulate

        x = streams["x"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(call["c"]).chunk(6, 1)

        def attn():
            return (block.attn(modulate(block.norm1(x), shift_msa, scale_msa)),)

        (x,) = ex.residual("attn", attn, (x,), (gate_msa.unsqueeze(1),))

        def mlp():
            return (block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp)),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp.unsqueeze(1),))
        return {"x": x}


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


class AdaNormZeroProgram(_BasicProgram):
    """``BasicTransformerBlock(norm_type="ada_norm_zero")`` (diffusers DiT): the
    modulation is ``norm1.linear(silu(norm1.emb(t, y)))`` in six chunks; the MLP input
    is ``norm3(x) * (1 + scale_mlp) + shift_mlp``."""

    family = "diffusers-basic-ada-norm-zero"

    def run(self, block, call, streams, ex):
        x = streams[H]
        cak = _check_basic(block, call)
        n = block.norm1
        emb = n.emb(call["timestep"], call["class_labels"], hidden_dtype=x.dtype) if n.emb is not None else None
        emb = n.linear(n.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)

        def norm_mod1(h):
            return n.norm(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]

        x = self._self_attn(block, call, x, cak, norm_mod1, gate_msa.unsqueeze(1), ex)
        x = self._cross(block, call, x, cak, ex, block.norm2)

        def mlp():
            h = block.norm3(x)
            h = h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            return (_feed_forward(block, h),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp.unsqueeze(1),))
        return {H: _squeeze4(x)}


class AdaNormSingleProgram(_BasicProgram):
    """``BasicTransformerBlock(norm_type="ada_norm_single")`` (PixArt): the modulation
    is ``scale_shift_table + timestep.reshape(B, 6, D)`` (the model embeds the timestep
    once); cross-attention sees the un-normalised stream and is not gated."""

    family = "diffusers-basic-ada-norm-single"

    def run(self, block, call, streams, ex):
        x = streams[H]
        cak = _check_basic(block, call)
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + call["timestep"].reshape(B, 6, -1)
        ).chunk(6, dim=1)

        def norm_mod1(h):
            return block.norm1(h) * (1 + scale_msa) + shift_msa

        x = self._self_attn(block, call, x, cak, norm_mod1, gate_msa, ex)
        x = self._cross(block, call, x, cak, ex, lambda h: h)

        def mlp():
            h = block.norm2(x) * (1 + scale_mlp) + shift_mlp
            return (_feed_forward(block, h),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp,))
        return {H: _squeeze4(x)}


_BASIC_BY_NORM = {"ada_norm_zero": AdaNormZeroProgram, "ada_norm_single": AdaNormSingleProgram}


def _basic_factory(block):
    cls = _BASIC_BY_NORM.get(block.norm_type)
    if cls is None:
        raise TypeError(
            f"fastcache: BasicTransformerBlock(norm_type={block.norm_type!r}) has no AdaLN gates to reuse a branch "
            f"under; interior programs exist for norm_type in {sorted(_BASIC_BY_NORM)}."
        )
    return cls()


def register() -> None:
    from .base import register_program

    try:
        from ..models.dit import DiTBlock

        register_program(DiTBlock, lambda b: ReferenceDiTProgram())
    except ImportError:  # pragma: no cover - the reference model ships with fastcache
        pass
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:
        return
    register_program(BasicTransformerBlock, _basic_factory)
