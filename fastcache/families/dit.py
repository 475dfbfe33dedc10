"""diffusers' ``DiTTransformer2DModel``: ``BasicTransformerBlock(norm_type="ada_norm_zero")``
blocks, each embedding the timestep and class label itself. Its spec and its program."""

from __future__ import annotations

from ..interior.base import program_for
from ..specs import ModelSpec
from ._basic import H, _BasicProgram, _check_basic, _feed_forward, _squeeze4, register_norm


def _modulation(block, call, x):
    """``norm1.emb(t, y)`` and ``norm1.linear(silu(emb))`` (six chunks: shift/scale/gate of
    attention, then of the MLP)."""
    n = block.norm1
    emb = n.emb(call["timestep"], call["class_labels"], hidden_dtype=x.dtype) if n.emb is not None else None
    return emb, n.linear(n.silu(emb))


def _indicator(block, call):
    x = call["hidden_states"]
    n = block.norm1
    emb, out = _modulation(block, call, x)
    shift, scale = out.chunk(6, dim=1)[:2]
    # the block calls norm1.emb(timestep, class_labels, ...) and norm1.linear(silu(emb))
    return x, shift, scale, n.norm.eps, ((n.emb, emb, (call["timestep"], call["class_labels"])), (n.linear, out))


class AdaNormZeroProgram(_BasicProgram):
    """``BasicTransformerBlock(norm_type="ada_norm_zero")`` (diffusers DiT): the
    modulation is ``norm1.linear(silu(norm1.emb(t, y)))`` in six chunks; the MLP input
    is ``norm3(x) * (1 + scale_mlp) + shift_mlp``."""

    family = "diffusers-basic-ada-norm-zero"

    def run(self, block, call, streams, ex):
        x = streams[H]
        cak = _check_basic(block, call)
        n = block.norm1
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, call, x)[1].chunk(6, dim=1)

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


def register_programs() -> None:
    register_norm("ada_norm_zero", AdaNormZeroProgram)


SPEC = ModelSpec(
    name="diffusers-dit",
    model_types="diffusers.models.transformers.dit_transformer_2d.DiTTransformer2DModel",
    segments=("transformer_blocks",),
    streams=("hidden_states",),
    returns=("hidden_states",),
    modulation=_indicator,
    interior=program_for,
)
