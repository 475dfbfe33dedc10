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
    every supported block computes (IEEE addition and multiplication commute)."""
    return x + f if gate is None else x + gate * f


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
