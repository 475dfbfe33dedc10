"""The AdaLN block interior, described as data: one small block program per family.

A transformer block of an AdaLN DiT is a handful of *branches* (self-attention,
cross-attention, MLP, ...) each added to a hidden-state stream through a residual,
usually gated by a chunk of the block's timestep modulation::

    mod = modulation(block, call)                 # cheap: a linear of the conditioning
    x = x + gate_attn * attn(norm1(x) * (1 + scale_attn) + shift_attn)
    x = x + gate_mlp  * mlp(norm2(x) * (1 + scale_mlp) + shift_mlp)

A :class:`BlockProgram` writes that forward once per family, but routes every residual
update through an :class:`Executor`::

    x, = ex.residual("attn", lambda: (block.attn(...),), (x,), (gate,))

The executor decides, per (block, branch): run the branch (``fn()``) and add
``x + gate * f`` exactly as the block does, or reuse a cached ``f`` through the fused
:func:`fastcache.ops.gated_residual` (FORA; EOC's trend correction inside it), or
forecast it (TaylorSeer), or record it (calibration). The modulation is always
recomputed, so the gates follow the current step. Policies never see model classes:
they see branch names, streams, gates and the executor hook.

Families (``fastcache/families/``, one file each; ``program_for(block)``, a table keyed by
block class, never an if-chain over families):

=================================  ======================================  ==============
block                              program                                 branches
=================================  ======================================  ==============
``fastcache.models.DiTBlock``      ``families/reference_dit.py``           attn, mlp
diffusers ``BasicTransformerBlock``
  ``norm_type="ada_norm_zero"``    ``families/dit.py``                     attn, [cross], mlp
  ``norm_type="ada_norm_single"``  ``families/pixart.py``                  attn, [cross], mlp
diffusers ``FluxTransformerBlock`` ``families/flux.py`` (dual)             attn, mlp (2 streams each)
``FluxSingleTransformerBlock``     ``families/flux.py`` (single)           parallel (attn+mlp fused)
diffusers ``JointTransformerBlock`` ``families/sd3.py``                    attn, [attn2], mlp
=================================  ======================================  ==============

Computed with the default executor every program reproduces its block bitwise
(tests/interior). Designed for the next methods too: per-branch reuse (FORA, EOC,
T-GATE's cross-attention), block ranges (Δ-DiT, First-Block Cache: :func:`run_blocks`
over a slice) and forecasting (TaylorSeer: an executor that returns a forecast ``f``).
"""

from __future__ import annotations

from .base import (
    ADDITIVE_FAMILIES,
    Branch,
    ComputeExecutor,
    Executor,
    GatherExecutor,
    InteriorLayout,
    Slot,
    SlotForecastExecutor,
    apply_cached,
    forecast_stack,
    fusable,
    layout_for,
    program_for,
    register_program,
    run_blocks,
)

__all__ = [
    "ADDITIVE_FAMILIES",
    "Branch",
    "ComputeExecutor",
    "Executor",
    "GatherExecutor",
    "InteriorLayout",
    "Slot",
    "SlotForecastExecutor",
    "apply_cached",
    "forecast_stack",
    "fusable",
    "layout_for",
    "program_for",
    "register_program",
    "run_blocks",
]
