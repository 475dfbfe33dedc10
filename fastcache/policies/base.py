"""The policy interface and the pieces every policy shares.

A policy decides, per denoising step and per cache context, what of the block stack
runs and what is reused. The runtime gives it three things:

* :class:`StackRunner` — runs the original blocks of every segment in order
  (the stack-level policies: TeaCache, First-Block Cache, Δ-DiT's block ranges are a
  runner over a slice of blocks);
* the bound arguments of the first block's call (``call``) and the model-level
  timestep of the current step;
* a per-context state object it creates itself (:meth:`Policy.new_state`), holding
  device tensors that only fused ops update.

Branch-level policies (FORA, EOC, TaylorSeer, ScheduleConfig, T-GATE, Block Caching) are
stack policies too: they run the blocks through their block programs
(:mod:`fastcache.policies.interior_engine`). ``granularity = "block"`` is the extension
point for a policy that needs each block's own call (:meth:`Policy.block_forward`, with
the block's original forward; tests/runtime/test_policy_interface.py); no shipped policy
uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..ops.reference import PREV_T
from ..specs import ModelSpec
from ..tracing import force_cond, is_tracing, skip_cond, warm_signatures  # noqa: F401  (the policies import them from here)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Where the sampling loop is, as known on the host without reading the device.

    ``index``: step index within the current run when the caller gives it (the pipeline's
    ``step_index`` in ``cache_context``, or ``fastcache.context(..., step_index=i)``), else
    None (never guessed from a call count: repeated evaluations would shift it);
    ``num_steps``: steps per run if known; ``call``: model calls in this context since
    the last reset. Static schedules (FORA, Δ-DiT, ...) place themselves by ``index``.

    Eager only: under torch.compile / CUDA-graph capture ``index`` and ``call`` are None
    (a host integer that changes every step would be guarded on and recompile every
    step), so compiled policies count steps on the device."""

    index: int | None
    num_steps: int | None
    call: int | None
    #: the run's length as announced by the sampler (``fastcache.announce_steps``) or given by
    #: the caller, else ``num_steps``: for checks and host planning only (ScheduleConfig's run
    #: length, MagCache's schedule). Announcing a run never changes what a policy computes:
    #: the forced last step and the other run-length semantics follow ``num_steps`` (the
    #: config, ``handle.set_num_steps`` or ``fastcache.context(..., num_steps=n)``).
    run_steps: int | None = None
    #: ``(frames, tokens_per_frame)`` of this call's video tokens, from the family's
    #: ``ModelSpec.frame_layout``, for policies that ask (``Policy.needs_frame_layout``); shapes only
    frame_layout: tuple[int, int] | None = None


#: Key of a block call's extra positional arguments, for a block ``forward(..., *args)``
#: called with more positional arguments than it names (HunyuanVideo's blocks get 7, name 5):
#: ``(named positional parameters of the first block, the extra values)``. Such a call is
#: replayed positionally, as the model makes it (the stack's segments may name a parameter
#: differently at the same position: HunyuanVideo's ``freqs_cis`` / ``image_rotary_emb``).
VARARGS = "*args"


def call_block(fwd: Callable, kwargs: dict):
    """Call one original block forward with a bound call (``VARARGS``: positionally)."""
    varargs = kwargs.get(VARARGS)
    if varargs is None:
        return fwd(**kwargs)
    names, extra = varargs
    rest = {k: v for k, v in kwargs.items() if k != VARARGS and k not in names}
    return fwd(*(kwargs[n] for n in names), *extra, **rest)


class StackRunner:
    """Runs the unpatched blocks of every segment, threading the hidden-state streams.

    ``compiled``: when set (by :func:`fastcache.cuda_graphs.compile_stack`), eager calls of
    :meth:`run` go through it — the same blocks compiled as one graph of their own — while
    torch.compile tracing of the whole model still inlines the plain blocks.
    """

    def __init__(self, spec: ModelSpec, segments: list[list[Callable]]):
        self.spec = spec
        self.segments = segments  # original bound forwards, segment by segment
        self.compiled: Callable | None = None

    def run(self, call: dict, streams: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        if self.compiled is not None and not torch.compiler.is_compiling():
            return self.compiled(call, streams)
        return self.run_blocks(call, streams)

    def run_blocks(self, call: dict, streams: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """The blocks in order, uncompiled (what :attr:`compiled` compiles)."""
        kwargs = dict(call)
        for seg in self.segments:
            for fwd in seg:
                kwargs.update(streams)
                streams = self.spec.unpack(call_block(fwd, kwargs))
        return streams

    @property
    def num_blocks(self) -> int:
        """Blocks in the whole stack, all segments together."""
        return sum(len(seg) for seg in self.segments)

    def run_range(
        self, call: dict, streams: dict[str, torch.Tensor | None], start: int, stop: int
    ) -> dict[str, torch.Tensor | None]:
        """Blocks ``start .. stop-1`` of the stack, counted across segments in run order
        (Flux: the dual-stream blocks, then the single-stream ones), uncompiled. Used by
        the policies that run part of the stack (First-Block Cache / DBCache: the first
        ``Fn`` blocks, the cached middle, the last ``Bn`` blocks)."""
        if not 0 <= start <= stop <= self.num_blocks:
            raise ValueError(f"block range [{start}, {stop}) is outside the stack of {self.num_blocks} blocks")
        kwargs = dict(call)
        i = 0
        for seg in self.segments:
            for fwd in seg:
                if start <= i < stop:
                    kwargs.update(streams)
                    streams = self.spec.unpack(call_block(fwd, kwargs))
                i += 1
        return streams


class Policy:
    """Base policy.

    ``granularity = "stack"``: the runtime hands the first block's call to
    :meth:`run_stack` and makes every other block a pass-through (every shipped
    policy). ``granularity = "block"``: every block's call goes through
    :meth:`block_forward` with the block's original forward (an extension point).
    :meth:`begin_step` runs at the start of every model call, in both cases.
    """

    granularity: ClassVar[str] = "stack"
    #: Multi-device runs (``fastcache.patch(..., process_group=group)``, :mod:`fastcache.distributed`):
    #: True = the decisions read the hidden states, and the policy passes its indicator sums
    #: through :meth:`reduce_sums` before deciding; False = a static schedule (the step
    #: alone decides), identical on every rank by construction; None = not declared, refused
    #: on a group of more than one rank.
    decides_from_data: ClassVar[bool | None] = None
    #: True: the runtime reads the call's frame layout (``ModelSpec.frame_layout``) into
    #: ``StepInfo.frame_layout`` before :meth:`begin_step` (AdaCache's MoReg)
    needs_frame_layout: bool = False

    def __init__(self, config, spec: ModelSpec, model: nn.Module):
        self.config = config
        self.spec = spec
        self.model = model
        self.group = None  # a fastcache.distributed.DecisionGroup, set by the runtime

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Indicator sums ``(B, 2)`` -> the sums every rank of the process group decides
        from (:meth:`fastcache.distributed.DecisionGroup.reduce`); unchanged without a group."""
        group = self.group
        return sums if group is None else group.reduce(sums)

    # -- state --------------------------------------------------------------------
    def new_state(self):
        raise NotImplementedError

    def reset_state(self, state) -> None:
        raise NotImplementedError

    def state_stats(self, state) -> dict:
        raise NotImplementedError

    def invalidate(self, state) -> None:
        """The model ran uncached outside the policy (autograd bypass): whatever is
        cached must not be reused by the next call. Default: forget everything."""
        self.reset_state(state)

    def new_run(self, state) -> None:
        """The host knows that the next call starts a new sampling run (the sampler's
        ``set_timesteps``, an announced step 0; the runtime's ``Patch.begin_run``): the
        device decision state is told so (``PREV_T = -inf``: the next call is step 0 of a
        new run whatever its timestep, so it computes and refills every cache). An in-place
        write: no Python state changes, so a compiled model does not recompile for it. Host
        paths need nothing more: every config computes step 0 (validated)."""
        s = getattr(state, "state", None)
        if isinstance(s, torch.Tensor) and s.numel() > PREV_T:
            s[PREV_T : PREV_T + 1].fill_(-math.inf)

    def set_num_steps(self, num_steps: int | None) -> None:
        """Steps per sampling run changed (``handle.set_num_steps``)."""
        self.num_steps = num_steps or 0

    # -- the step -----------------------------------------------------------------
    def plan_step(self, state, step: StepInfo | None) -> None:
        """The caller announced the step (``fastcache.context(model, name, step_index=i)``
        or ``cache_context(name, step_index=i)``), on the host and outside any compiled
        region; ``None`` when that context ends. Static schedules prepare the step here so
        their compiled step needs no device decision (:class:`fastcache.ScheduleConfig`)."""

    def begin_step(self, state, timestep: torch.Tensor, step: StepInfo) -> None:
        """Called once per model call, before any block runs (no host reads here)."""

    def end_step(self, state) -> None:
        """Called once per model call, after the model's forward returned (eager and traced)."""

    def block_forward(self, state, index: tuple[int, int], forward: Callable, call: dict, timestep: torch.Tensor):
        """One block's call (``granularity = "block"``); ``index`` = (segment, block).
        Returns what the block returns; ``forward(**call)`` runs the original block."""
        raise NotImplementedError

    def run_stack(
        self, state, runner: StackRunner, head: nn.Module, call: dict, timestep: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError

    # -- the automatic path (granularity "block", raw calls) ----------------------------
    #: True: block calls reach :meth:`block_call` with the call's own (args, kwargs)
    raw_block_calls: ClassVar[bool] = False

    def block_call(self, state, index: tuple[int, int], forward: Callable, args: tuple, kwargs: dict, timestep):
        """One block's call as the model made it (``raw_block_calls``)."""
        raise NotImplementedError

    def submodules(self) -> list[nn.Module]:
        """Modules inside the blocks whose calls the policy takes (:meth:`sub_call`), in a
        fixed order (a module's position is its index); the runtime patches and restores
        their ``forward`` as it does the blocks'."""
        return []

    def sub_call(self, state, index: int, forward: Callable, args: tuple, kwargs: dict, timestep):
        """A call of ``submodules()[index]``, inside a patched model's call."""
        raise NotImplementedError


_POLICIES: dict[type, type[Policy]] = {}
_AUTO_POLICIES: dict[type, type[Policy]] = {}


def register_policy(config_type: type, auto: bool = False):
    """Class decorator: ``@register_policy(MyConfig) class MyPolicy(Policy): ...``;
    ``auto=True``: the policy of ``config_type`` on the automatic path (models no family
    file describes: :mod:`fastcache.families.auto`)."""

    def deco(cls):
        (_AUTO_POLICIES if auto else _POLICIES)[config_type] = cls
        return cls

    return deco


def policy_for(config, spec: ModelSpec | None = None) -> type[Policy]:
    if spec is not None and spec.auto:
        cls = _AUTO_POLICIES.get(type(config))
        if cls is not None:
            return cls
        model = spec.name.split(":", 1)[-1].rsplit(".", 1)[-1]
        known = ", ".join(sorted(c.__name__ for c in _AUTO_POLICIES)) or "none"
        raise TypeError(
            f"fastcache: {type(config).__name__} needs what a model family file describes (the block program "
            f"or the modulation of {model}), and no family file describes {model}: it runs on the automatic "
            f"path, where these configs work: {known}. To use {type(config).__name__}, register a "
            f"fastcache.ModelSpec for {model} (fastcache/families/ holds one file per family as examples)."
        )
    try:
        return _POLICIES[type(config)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _POLICIES))
        raise TypeError(f"no policy runs {type(config).__name__}; configs with a policy: {known}") from None
