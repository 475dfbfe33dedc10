"""fastcache's reference DiT (``fastcache.models.DiT``, the DiT paper's adaLN-Zero blocks):
its spec and its block program. Matched by class name, so the core never imports the
model (the demo's)."""

from __future__ import annotations

from ..interior.base import BlockProgram, Branch, Executor, program_for, register_program
from ..specs import ModelSpec

ATTN = Branch("attn", ("x",))
MLP = Branch("mlp", ("x",))
BLOCK = "fastcache.models.dit.DiTBlock"


def _modulation(block, call):
    """``adaLN_modulation(c)``: the six chunks shift/scale/gate for attention, then the MLP."""
    return block.adaLN_modulation(call["c"])


def _indicator(block, call):
    out = _modulation(block, call)
    shift, scale = out.chunk(6, dim=1)[:2]
    return call["x"], shift, scale, block.norm1.eps, ((block.adaLN_modulation, out, (call["c"],)),)


class ReferenceDiTProgram(BlockProgram):
    """``fastcache.models.DiTBlock`` (DiT paper Sec. 3.2, adaLN-Zero): six chunks of
    ``adaLN_modulation(c)`` = shift/scale/gate for attention, then for the MLP."""

    family = "fastcache-dit"

    def branches(self, block):
        return (ATTN, MLP)

    def run(self, block, call, streams, ex: Executor):
        from ..models.dit import modulate

        x = streams["x"]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, call).chunk(6, 1)

        def attn():
            return (block.attn(modulate(block.norm1(x), shift_msa, scale_msa)),)

        (x,) = ex.residual("attn", attn, (x,), (gate_msa.unsqueeze(1),))

        def mlp():
            return (block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp)),)

        (x,) = ex.residual("mlp", mlp, (x,), (gate_mlp.unsqueeze(1),))
        return {"x": x}


def register_programs() -> None:
    register_program(BLOCK, lambda b: ReferenceDiTProgram())


SPEC = ModelSpec(
    name="fastcache-dit",
    model_types="fastcache.models.dit.DiT",
    segments=("blocks",),
    streams=("x",),
    returns=("x",),
    modulation=_indicator,
    interior=program_for,
    timestep_arg="t",
)
