"""diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2 video DiTs): one stream of video
tokens; each block modulates with ``scale_shift_table + temb`` (six chunks: shift, scale,
gate of self-attention, then of the MLP), an ungated cross-attention to the text sits
between. Residual sums are taken in fp32 and cast back, as the block does.

Two copies of the model share this description: ``ChronoEditTransformer3DModel`` (its block
class is a line-for-line copy of Wan's) and ``SkyReelsV2Transformer3DModel`` (its block adds
the self-attention mask of diffusion forcing and lays a per-token ``temb`` out as
``(B, 6, N, D)``). ``WanVACETransformer3DModel`` is not described: it adds each VACE hint to
the hidden states between two main blocks, which a cached stack run as one cannot honour."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec
from ._frames import patched_layout

H = "hidden_states"
_ATTN = Branch("attn", (H,))
_CROSS = Branch("cross", (H,), gated=False)
_MLP = Branch("mlp", (H,))


def _modulation(block, temb, skyreels=False):
    """The six chunks, each ``(B, 1, D)`` (or ``(B, N, D)`` for Wan 2.2 TI2V's per-token
    ``temb`` of shape ``(B, N, 6, D)``, SkyReels-V2's of shape ``(B, 6, N, D)``), in fp32."""
    if temb.ndim == 4 and skyreels:
        return tuple(c.squeeze(1) for c in (block.scale_shift_table.unsqueeze(2) + temb.float()).chunk(6, dim=1))
    if temb.ndim == 4:
        return tuple(c.squeeze(2) for c in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2))
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _indicator(block, call):
    temb = call["temb"]
    if temb.ndim == 4:
        raise ValueError(
            "fastcache: this Wan model modulates every token separately (Wan 2.2 TI2V, SkyReels-V2 diffusion "
            "forcing); the TeaCache / "
            "First-Block indicator reads one modulation per sample. Use a branch-level method "
            "(FORA, TaylorSeer, ScheduleConfig) for it."
        )
    shift, scale = _modulation(block, temb)[:2]
    return call[H], shift.squeeze(1), scale.squeeze(1), block.norm1.eps


def _frame_layout(model, call):
    """``hidden_states (B, C, F, H, W)``, Conv3d patches ``config.patch_size = (pt, ph, pw)``
    flattened frame-major: ``F / pt`` frames of ``(H / ph) (W / pw)`` tokens."""
    pt, ph, pw = model.config.patch_size
    return patched_layout(call.get(H), pt, ph, pw)


class WanProgram(BlockProgram):
    """diffusers ``WanTransformerBlock``: self-attention (gated), cross-attention (ungated),
    MLP (gated)."""

    family = "diffusers-wan"
    skyreels = False  # SkyReels-V2's block: the self-attention mask, its per-token temb layout

    def branches(self, block):
        return (_ATTN, _CROSS, _MLP)

    def run(self, block, call, streams, ex: Executor):
        x = streams[H]
        temb = call["temb"]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = _modulation(block, temb, self.skyreels)

        def attn():
            n = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
            return (block.attn1(n, None, call["attention_mask"] if self.skyreels else None, call["rotary_emb"]),)

        (y,) = ex.residual("attn", attn, (x,), (gate_msa,))
        x = y.type_as(x)

        def cross():
            n = block.norm2(x.float()).type_as(x)
            return (block.attn2(n, call["encoder_hidden_states"], None, None),)

        (x,) = ex.residual("cross", cross, (x,), (None,))

        def mlp():
            n = (block.norm3(x.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(x)
            return (block.ffn(n),)

        (y,) = ex.residual("mlp", mlp, (x,), (c_gate_msa,))
        return {H: y.type_as(x)}


class SkyReelsV2Program(WanProgram):
    """diffusers ``SkyReelsV2TransformerBlock``: Wan's block with a self-attention mask."""

    skyreels = True


_T = "diffusers.models.transformers."


def register_programs() -> None:
    register_program(_T + "transformer_wan.WanTransformerBlock", lambda b: WanProgram())
    register_program(_T + "transformer_chronoedit.WanTransformerBlock", lambda b: WanProgram())
    register_program(_T + "transformer_skyreels_v2.SkyReelsV2TransformerBlock", lambda b: SkyReelsV2Program())


SPEC = ModelSpec(
    name="diffusers-wan",
    model_types=(
        _T + "transformer_wan.WanTransformer3DModel",
        _T + "transformer_chronoedit.ChronoEditTransformer3DModel",
        _T + "transformer_skyreels_v2.SkyReelsV2Transformer3DModel",
    ),
    segments=("blocks",),
    streams=(H,),
    returns=(H,),
    modulation=_indicator,
    interior=program_for,
    frame_layout=_frame_layout,
)
