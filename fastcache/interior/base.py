"""Interior API: branches, block programs, executors, the model's slot layout.

Shapes: streams are ``(B, N, D)``; a gate is broadcastable to them (``(B, 1, D)``) or
None for an ungated residual (PixArt's cross-attention); a branch output ``f`` has its
stream's shape. A *slot* is one (block, branch, stream) triple: the unit a policy
caches (FORA: the pre-gate ``f``), profiles (EOC's prior) or corrects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from ..specs import qualified_name

BranchFn = Callable[[], tuple[torch.Tensor, ...]]


@dataclasses.dataclass(frozen=True)
class Branch:
    """One residual branch of a block: ``name`` ("attn", "cross", "mlp", "attn2",
    "parallel"), the ``streams`` it adds to (in the order ``fn`` returns them) and
    whether the residual is gated by the modulation."""

    name: str
    streams: tuple[str, ...]
    gated: bool = True


@dataclasses.dataclass(frozen=True)
class Slot:
    """A (block, branch, stream) triple; ``block`` counts over all segments in order."""

    block: int
    branch: str
    stream: str

    def key(self) -> str:
        return f"{self.block}.{self.branch}.{self.stream}"


class Executor:
    """Decides what happens to each branch. ``begin_block(l)`` precedes block ``l``;
    ``residual`` returns the updated streams (one per entry of ``xs``)."""

    def begin_block(self, block: int) -> None:
        self.block = block

    def residual(
        self, name: str, fn: BranchFn, xs: tuple[torch.Tensor, ...], gates: tuple[torch.Tensor | None, ...]
    ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def combine(x: torch.Tensor, gate: torch.Tensor | None, f: torch.Tensor) -> torch.Tensor:
    """The block's own residual arithmetic, ``x + gate * f`` (or ``x + f``): bitwise what
    every supported block computes (IEEE addition and multiplication commute). Written
    ``gate * f + x`` so the result takes the branch output's (dense) layout, as the
    blocks' ``attn_output + hidden_states`` does: a stream that enters the stack as a
    transposed view (PixArt's patch embedding) would otherwise keep that layout through
    every block, and each next linear would copy it first (one clone + an unfused matmul
    per block on a computed step)."""
    return f + x if gate is None else gate * f + x


def apply_cached(
    x: torch.Tensor, gate: torch.Tensor | None, f: torch.Tensor, trend: torch.Tensor | None = None, w: float = 0.0
) -> torch.Tensor:
    """A reused branch: ``x + gate * f * (1 + w * trend)`` through the fused op.

    The single call site of :func:`fastcache.ops.gated_residual` /
    :func:`fastcache.ops.apply_residual` for every interior policy (FORA's skipped step
    when ``trend`` is None; EOC Eq. 7 otherwise; see docs/methods.md), so switching to
    the ops' ``out=`` forms is a change here only. Ungated branches use a gate of ones
    when a trend applies (``1 * f`` is exact)."""
    if trend is None or w == 0.0:
        if gate is None:
            return ops.apply_residual(x, f)
        return ops.gated_residual(x, gate, f)
    if gate is None:
        gate = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return ops.gated_residual(x, gate, f, trend, w)


class ComputeExecutor(Executor):
    """Runs every branch exactly as the block does. With ``record`` it appends each
    computed ``f`` (in slot order) to ``self.outputs``."""

    def __init__(self, record: bool = False):
        self.record = record
        self.outputs: list[torch.Tensor] = []

    def residual(self, name, fn, xs, gates):
        fs = fn()
        if self.record:
            self.outputs.extend(fs)
        return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fs))


class BlockProgram:
    """One block family's forward with its residual updates routed through an executor.

    ``branches(block)``: the block's branches in execution order (may depend on the
    instance, e.g. SD3's last block has no context MLP). ``run(block, call, streams,
    ex)``: ``call`` = the block call's bound arguments, ``streams`` = the current
    hidden-state streams by name; returns the new streams (same names)."""

    family: ClassVar[str] = "base"

    def branches(self, block: nn.Module) -> tuple[Branch, ...]:
        raise NotImplementedError

    def run(self, block: nn.Module, call: dict, streams: dict, ex: Executor) -> dict:
        raise NotImplementedError

    def outputs(self, block: nn.Module, inputs: tuple[str, ...]) -> tuple[str, ...]:
        """The streams ``run`` returns as tensors (not None), given the non-None input
        streams; known without running the block (a ``torch.cond`` needs it up front)."""
        return inputs


_PROGRAMS: dict[type | str, Callable[[nn.Module], BlockProgram]] = {}


def register_program(block_type: type | str, factory: Callable[[nn.Module], BlockProgram]) -> None:
    """``factory(block) -> BlockProgram`` for instances of ``block_type`` (a class, or its
    name ``"module.QualName"``, matched without importing it; exact class first, then the
    MRO)."""
    _PROGRAMS[block_type] = factory


def program_for(block: nn.Module) -> BlockProgram:
    for cls in type(block).__mro__:
        factory = _PROGRAMS.get(cls) or _PROGRAMS.get(qualified_name(cls))
        if factory is not None:
            return factory(block)
    known = ", ".join(sorted(c.rsplit(".", 1)[-1] if isinstance(c, str) else c.__name__ for c in _PROGRAMS))
    raise TypeError(
        f"fastcache: no block interior program for {type(block).__name__}; branch-level caching (FORA, EOC) "
        f"needs one. Known block classes: {known}. Describe yours with fastcache.interior.register_program "
        "(see fastcache/families/reference_dit.py for a 20-line example)."
    )


@dataclasses.dataclass
class _Entry:
    index: tuple[int, int]  # (segment, block in segment)
    module: nn.Module
    program: BlockProgram


class InteriorLayout:
    """Every block of a model's stack with its program, and the slot numbering.

    ``slots[k]`` is a :class:`Slot`; ``slot_ids[(l, branch)]`` the slot indices of
    block ``l``'s branch, in the branch's stream order; ``block_of_slot[k]`` = l."""

    def __init__(self, segments: Sequence[nn.ModuleList], program: Callable[[nn.Module], BlockProgram] | None = None):
        program = program or program_for
        self.entries: list[_Entry] = []
        self.slots: list[Slot] = []
        self.slot_ids: dict[tuple[int, str], tuple[int, ...]] = {}
        for i, seg in enumerate(segments):
            for j, blk in enumerate(seg):
                prog = program(blk)
                li = len(self.entries)
                self.entries.append(_Entry((i, j), blk, prog))
                for br in prog.branches(blk):
                    ids = []
                    for s in br.streams:
                        ids.append(len(self.slots))
                        self.slots.append(Slot(li, br.name, s))
                    self.slot_ids[(li, br.name)] = tuple(ids)
        self.block_of_slot = [s.block for s in self.slots]

    @property
    def num_blocks(self) -> int:
        return len(self.entries)

    def describe(self) -> list[str]:
        return [s.key() for s in self.slots]


def layout_for(spec, model: nn.Module) -> InteriorLayout:
    """The interior layout of ``model`` as its spec describes it (``spec.interior``)."""
    if spec.interior is None:
        raise TypeError(
            f"fastcache: the model spec {spec.name!r} describes no block interior (ModelSpec.interior is None), "
            "so branch-level caching (FORA, EOC) cannot run on it; set interior= to a function block -> "
            "fastcache.interior.BlockProgram, or use a stack-level policy (TeaCacheConfig)."
        )
    return InteriorLayout(spec.blocks(model), spec.interior)


def run_blocks(
    layout: InteriorLayout, call: dict, streams: dict, ex: Executor, start: int = 0, stop: int | None = None
) -> dict:
    """Run blocks ``start..stop-1`` of the stack through their programs with ``ex``
    (a block range: Δ-DiT / First-Block Cache run a slice)."""
    stop = layout.num_blocks if stop is None else stop
    for li in range(start, stop):
        e = layout.entries[li]
        ex.begin_block(li)
        streams = e.program.run(e.module, call, streams, ex)
    return streams


# ----------------------------------------------------------------------------- whole-stack forecast
#: Block programs whose streams change only through ``ex.residual`` (nothing else reads or
#: rewrites a stream between residuals: no clip, no concatenation of streams, gates from the
#: conditioning only), so a stack whose every branch is reused or forecast is
#: ``x + sum_slots gate * f`` per stream: :func:`forecast_stack` runs it as one fused op
#: per stream. Keyed by ``BlockProgram.family``; a family is added here once its program is
#: checked against that rule (tests/runtime/test_step_floor.py compares it with the
#: per-block path). Flux (stream concatenation, fp16 clips) and the rest keep the per-block path.
ADDITIVE_FAMILIES = frozenset({"diffusers-basic-ada-norm-zero", "diffusers-basic-ada-norm-single", "fastcache-dit"})


class GatherExecutor(Executor):
    """Runs each block's program for its modulation only: every residual is recorded
    (slot ids and gates) and returns the streams unchanged; no branch runs."""

    def __init__(self, layout: InteriorLayout):
        self.layout = layout
        self.gates: dict[int, torch.Tensor | None] = {}

    def residual(self, name, fn, xs, gates):
        for k, g in zip(self.layout.slot_ids[(self.block, name)], gates):
            self.gates[k] = g
        return xs


def fusable(layout: InteriorLayout) -> bool:
    """Whether :func:`forecast_stack` may run ``layout``'s stack (every program additive)."""
    f = getattr(layout, "_fusable", None)
    if f is None:
        f = layout._fusable = bool(layout.entries) and all(
            e.program.family in ADDITIVE_FAMILIES for e in layout.entries
        )
    return f


def forecast_stack(
    layout: InteriorLayout, call: dict, streams: dict, sources: Sequence[torch.Tensor], dx: torch.Tensor
) -> dict | None:
    """A stack whose every branch is reused or forecast, at its floor: each block's program
    runs for its modulation (the gates; :class:`GatherExecutor`), then per stream ONE
    :func:`fastcache.ops.forecast_residual` over its slots in slot order, ``sources[k]`` the
    slot's cached feature (FORA) or Taylor history (``(m+1, *shape)``, forecast at ``dx``).
    Bitwise the per-block path (the op rounds as the per-slot ops do). None when the
    layout's programs are not all additive (:data:`ADDITIVE_FAMILIES`): run the blocks."""
    if not fusable(layout) or any(v is not None and v.dim() != 3 for v in streams.values()):
        return None
    ex = GatherExecutor(layout)
    out = run_blocks(layout, call, dict(streams), ex)
    for n, v in out.items():
        if v is not streams.get(n):
            raise RuntimeError(
                f"fastcache: the block program of family {layout.entries[0].program.family!r} changed stream "
                f"{n!r} outside its residuals, so it is not additive; remove it from "
                "fastcache.interior.base.ADDITIVE_FAMILIES (its stacks then run block by block)."
            )
    result = dict(streams)
    by_stream: dict[str, list[int]] = {}
    for k, s in enumerate(layout.slots):
        by_stream.setdefault(s.stream, []).append(k)
    for n, ks in by_stream.items():
        result[n] = ops.forecast_residual(streams[n], [ex.gates[k] for k in ks], [sources[k] for k in ks], dx)
    return result


class SlotForecastExecutor(Executor):
    """The per-block path of a forecast / reused step (mixed programs, e.g. Flux): each
    branch's residual as one :func:`fastcache.ops.forecast_residual` of one slot (the
    forecast and the gated residual fused), ``sources`` as in :func:`forecast_stack`."""

    def __init__(self, layout: InteriorLayout, sources: Sequence[torch.Tensor], dx: torch.Tensor):
        self.layout, self.sources, self.dx = layout, sources, dx

    def residual(self, name, fn, xs, gates):
        ids = self.layout.slot_ids[(self.block, name)]
        return tuple(ops.forecast_residual(x, [g], [self.sources[k]], self.dx) for k, x, g in zip(ids, xs, gates))
