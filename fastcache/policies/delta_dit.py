"""Δ-DiT's block-range Δ-cache on fused, device-resident state (Chen et al., arXiv
2406.01125; docs/methods.md section 3, Eq. D1-D5).

With ``L`` blocks in the stack (all segments in run order: Flux's dual-stream blocks, then
its single-stream ones) and ``N_c = num_cached``:

* the rear range is blocks ``L-N_c .. L-1`` (cached in the outline stage, steps ``< b``),
  the front range blocks ``0 .. N_c-1`` (cached in the detail stage, steps ``>= b``) (D1);
* a refresh step runs every block and stores ``Δ = F_range(h) - h`` with ``h`` the hidden
  states entering the range (D2, :func:`fastcache.ops.store_residual`, gated by the device
  flag); any other step outputs ``h + Δ`` for the range (D3,
  :func:`fastcache.ops.apply_residual`) and runs the blocks outside it.

Parts. The stack is cut at ``{0, N_c, L-N_c, L}`` into at most three parts, each one in
the front range, the rear range, both (when ``2 N_c > L`` the ranges overlap) or neither.
Every part that belongs to a range keeps its own Δ, all refreshed on the same steps; a
range's Δ is the sum of its parts' (D4: at a refresh step the parts are consecutive, so
``F_range(h) - h`` telescopes into the parts' differences). This gives the skip a static
structure under torch.compile: one cond per cached part, whose predicate (refresh, or the
part is outside this stage's range) lives on the device, instead of a stage-dependent
block layout. Outputs equal the single-Δ form up to fp32 rounding.

Which streams get a Δ: for a part that ends the stack, the model's cached streams (Flux's
and SD3's text tokens, dropped after the stack, pass through a skipped part unchanged, as in
TeaCache); for any other part every stream entering it, since the following blocks read
them all (a part whose last block returns None for such a stream raises).

Schedule (:meth:`fastcache.DeltaDiTConfig.computes`, D5): warm-up steps and the stage
boundary ``b`` are forced refreshes (at ``b`` the front range has no Δ yet; not forced when
``N_c = L``, the ranges then being the same), then every ``N``-th step after the last
forced one. Where it is decided:

* eager, step index given by the caller (the pipeline's ``cache_context(name,
  step_index=i)`` or ``fastcache.context(model, name, step_index=i)``): on the host, no
  device read; a call repeating the previous call's index computes and stores nothing;
* otherwise on the device, as FORA's device schedule: the shared timestep guard, then
  :func:`fastcache.ops.cache_decision` with ``threshold=inf, max_skips=N-1`` ("every N-th
  step"; ``threshold=0``, every step, when ``N = 1`` or ``N_c = 0``); the boundary (and the step after
  :meth:`DeltaDiTPolicy.invalidate`) is forced through the indicator sums: a zero
  denominator is an invalid ratio, which the op always computes. The stage is ``STEP >= b``
  from the same state. Eager mode reads one value per step (flag and stage packed);
  under torch.compile / CUDA-graph capture each cached part is a cond operator with
  functional branches and the Δ stores sit outside, gated by the device flag.

A repeated call (same timestep as the previous call: Heun, or CFG branches run as two
calls without a context) computes and leaves Δ and the decision state untouched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_int, _set, config_type
from ..ops.reference import STEP
from ..tracing import static_floats
from .base import Policy, StackRunner, StepInfo, is_tracing, register_policy, warm_signatures
from .stack_engine import DecisionState, residual_cond
from .steps import timestep_guard


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class DeltaDiTConfig(CacheConfig):
    """Δ-DiT (Chen et al., arXiv 2406.01125; docs/methods.md section 3, D1-D5): cache the
    change ``Δ = F_range(h) - h`` a contiguous range of ``num_cached`` blocks makes to its
    input ``h``; refresh it every ``interval`` steps and otherwise output ``h + Δ`` for the
    range. Steps before ``boundary`` (outline stage) cache the last ``num_cached`` blocks,
    steps from ``boundary`` on (detail stage) the first ``num_cached``; blocks outside the
    range always run. Blocks are counted across segments in run order (Flux: dual-stream,
    then single-stream), so a range may cross them.

    Schedule (static, step index ``s`` within the run, 0-based): ``s`` refreshes (runs every
    block) iff ``(s - a) % interval == 0``, where ``a`` is the latest forced step ``<= s``;
    forced steps are ``0 .. warmup_steps-1`` and ``boundary`` (the detail stage's range has
    no Δ yet; not forced when ``num_cached`` covers the whole stack, the two ranges then
    being the same). See :meth:`computes` and :meth:`stage_of`.

    Args:
        interval: N >= 1, steps between refreshes (1 = every step computed, the output
            bitwise the unpatched model's). Required: the paper tunes it per model.
        num_cached: N_c >= 0 blocks in the cached range (0 = nothing cached, bitwise the
            unpatched model); at most the stack's depth (checked when patching). Required.
        boundary: b >= 0, the first step of the detail stage (front range). ``0`` caches the
            front range throughout, ``b >= num_steps`` the rear range throughout. The paper's
            PixArt-alpha setting is b = 12 of 20 DPM-Solver steps. Required.
        warmup_steps: leading steps always computed (>= 1: step 0 has no Δ).
        num_steps: steps per run, when known: runs of another length are flagged in stats.
            Eager calls given the step index (``cache_context(name, step_index=i)`` or
            ``fastcache.context(model, name, step_index=i)``) follow :meth:`computes` on the
            host with no device read; otherwise one flag is read per step.
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "delta_dit"

    interval: int | None = None
    num_cached: int | None = None
    boundary: int | None = None
    warmup_steps: int = 1
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        for name, hint in (
            ("interval", " (steps between refreshes of Δ; 1 = never cache)"),
            ("num_cached", " (blocks in the cached range; 0 = never cache)"),
            ("boundary", " (first step of the detail stage; the paper uses 12 of 20 steps on PixArt-alpha)"),
        ):
            if getattr(self, name) is None:
                raise ValueError(f"DeltaDiTConfig.{name} is required{hint}")
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "num_cached", _check_int("num_cached", self.num_cached, 0, " (0 = cache nothing)"))
        _set(self, "boundary", _check_int("boundary", self.boundary, 0))
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))

    @property
    def never_caches(self) -> bool:
        """True when no step can reuse Δ (``interval == 1`` or ``num_cached == 0``)."""
        return self.interval == 1 or self.num_cached == 0

    def stage_of(self, step: int) -> str:
        """``"rear"`` (outline stage, the last ``num_cached`` blocks cached) for ``step <
        boundary``, else ``"front"`` (detail stage, the first ``num_cached`` blocks)."""
        return "rear" if step < self.boundary else "front"

    def computes(self, step: int, num_blocks: int | None = None) -> bool:
        """The host schedule: does step ``step`` refresh Δ (run every block)?
        ``num_blocks``: the stack's depth (the boundary is not forced when ``num_cached``
        covers it); None = assume it does not."""
        if self.never_caches:
            return True
        switch = num_blocks is None or self.num_cached < num_blocks
        forced = list(range(min(self.warmup_steps, step + 1)))
        if switch and self.boundary <= step:
            forced.append(self.boundary)
        return (step - max(forced)) % self.interval == 0


# --- T-GATE ---


# --------------------------------------------------------------------------- policy
@dataclasses.dataclass(frozen=True)
class Part:
    """Blocks ``start .. stop-1`` of the stack; cached in the ``front`` and/or ``rear`` range."""

    start: int
    stop: int
    front: bool
    rear: bool

    @property
    def cached(self) -> bool:
        return self.front or self.rear

    def cached_in(self, front_stage: bool) -> bool:
        return self.front if front_stage else self.rear


def split_parts(num_blocks: int, num_cached: int) -> list[Part]:
    """The stack cut at ``{0, N_c, L-N_c, L}`` (see the module docstring), in run order."""
    L, nc = num_blocks, num_cached
    cuts = sorted({0, min(nc, L - nc), max(nc, L - nc), L})
    return [Part(a, b, b <= nc, a >= L - nc) for a, b in zip(cuts, cuts[1:]) if b > a]


class DeltaDiTState(DecisionState):
    """One cache context: ``residuals`` holds Δ per ``"<part>:<stream>"``; ``force`` (1,)
    fp32 is 1 when the next decision must refresh (after :meth:`DeltaDiTPolicy.invalidate`
    or a shape change); ``prev`` is unused (the schedule has no indicator). The host
    fields serve the host schedule (step index given by the caller)."""

    def __init__(self, history: int):
        super().__init__(history)
        self.force: torch.Tensor | None = None
        self.true: torch.Tensor | None = None  # constant store flag of the host schedule
        self.step: StepInfo | None = None
        self.host_last: int | None = None  # step index of the previous host-scheduled call
        self.host_valid = False  # Δ stored for the current signature (host schedule)
        self.host_force = False
        self.host_timeline: list[bool] = []
        self.host_ranges: list[str] = []
        self.host_counts = [0, 0, 0]  # computed steps, skipped steps, blocks run

    def nbytes(self) -> int:
        extra = [self.force, self.true]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in extra if t is not None)

    def reset(self) -> None:
        if self.state is not None:
            self.state.copy_(ops.new_state(self.history, device=self.state.device))
            self.aux.zero_()
            self.force.zero_()
            for r in self.residuals.values():
                r.zero_()
        self.host_last = None
        self.host_valid = False
        self.host_force = False
        self.host_timeline = []
        self.host_ranges = []
        self.host_counts = [0, 0, 0]


@register_policy(DeltaDiTConfig)
class DeltaDiTPolicy(Policy):
    decides_from_data = False  # a static schedule: identical on every rank of a process group
    """Δ-DiT: see the module docstring and :class:`fastcache.DeltaDiTConfig`."""

    def __init__(self, config: DeltaDiTConfig, spec, model):
        super().__init__(config, spec, model)
        L = sum(len(seg) for seg in spec.blocks(model))
        if config.num_cached > L:
            raise ValueError(
                f"DeltaDiTConfig: num_cached={config.num_cached} exceeds the {L} blocks of "
                f"{type(model).__name__}'s stack; choose num_cached <= {L}"
            )
        self.num_blocks = L
        self.parts = split_parts(L, config.num_cached)
        # the boundary forces a refresh only when the two ranges differ
        self.switch = config.num_cached < L
        self.num_steps = config.num_steps or 0
        self._blocks = [blk for seg in spec.blocks(model) for blk in seg]  # for warm_signatures

    # -- state ----------------------------------------------------------------------------
    def new_state(self) -> DeltaDiTState:
        return DeltaDiTState(self.config.history)

    def _names(self, part: Part, streams: dict) -> list[str]:
        if part.stop == self.num_blocks:
            return list(self.spec.cached_streams)
        return [n for n in self.spec.streams if streams.get(n) is not None]

    def _ensure(self, st: DeltaDiTState, streams: dict) -> None:
        sig = tuple((n, None if v is None else (tuple(v.shape), v.dtype, v.device)) for n, v in streams.items())
        if sig == st.signature:
            return
        dev = streams[self.spec.streams[0]].device
        if st.state is None or st.state.device != dev:
            st.state = ops.new_state(st.history, device=dev)
            st.aux = ops.new_aux(device=dev)
            st.force = torch.zeros(1, dtype=torch.float32, device=dev)
            st.coeffs = torch.zeros(0, dtype=torch.float32, device=dev)
            st.true = torch.ones((), dtype=torch.bool, device=dev)
        else:
            # Same device, new shapes: keep the run's step count (the stage depends on it)
            # and refresh on the next decision, since no Δ of this shape exists.
            st.force.fill_(1.0)
        st.residuals = {
            f"{p}:{n}": torch.zeros_like(streams[n], memory_format=torch.contiguous_format)
            for p, part in enumerate(self.parts)
            if part.cached
            for n in self._names(part, streams)
        }
        st.out = {}
        st.host_valid = False
        st.signature = sig

    def reset_state(self, st: DeltaDiTState) -> None:
        st.reset()

    def invalidate(self, st: DeltaDiTState) -> None:
        # The next call refreshes; the run's step count (and so the stage) is kept. Device
        # and host writes only, no read.
        if st.force is not None:
            st.force.fill_(1.0)
        st.host_force = True

    def begin_step(self, st: DeltaDiTState, timestep, step: StepInfo) -> None:
        st.step = step
        st.num_steps = step.num_steps or 0

    # -- the step -------------------------------------------------------------------------
    @static_floats
    def run_stack(self, st: DeltaDiTState, runner: StackRunner, head, call, timestep):
        cfg = self.config
        streams = {n: call.get(n) for n in self.spec.streams}
        self._ensure(st, streams)
        if not is_tracing() and st.step is not None and st.step.index is not None:
            return self._host_step(st, runner, call, streams, st.step.index)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, st.num_steps)
        # The indicator sums are constant (ratio 0: only the schedule decides), except a
        # zero denominator (invalid ratio -> forced refresh) at the boundary step and after
        # invalidate. STEP before the decision is this step's index (at a new run's first
        # call it is the old run's length, but step 0 is forced anyway).
        den = 1.0 - st.force
        if self.switch:
            den = den * (st.state[STEP : STEP + 1] != cfg.boundary).to(torch.float32)
        sums = torch.stack([torch.zeros_like(den), den], dim=1)
        n = cfg.interval
        flag = ops.cache_decision(
            sums,
            t_op,
            st.coeffs,
            st.state,
            0.0 if cfg.never_caches else math.inf,  # 0: every step computes (nothing to reuse)
            cfg.warmup_steps,
            n - 1,
            0,
            hold=rep,
        )
        st.force.mul_(rep.to(torch.float32))  # a repeated call leaves the request pending
        front = (st.state[STEP] - 1).clamp(min=0) >= cfg.boundary  # this step's stage
        store = flag & ~rep
        if is_tracing():
            return self._traced(st, runner, call, streams, flag, front, store)
        code = int((flag.to(torch.int8) + 2 * front.to(torch.int8)).item())  # host-read-ok: the one eager read
        compute = bool(code & 1)
        return self._eager(st, runner, call, streams, compute, bool(code & 2), store if compute else None)

    def _host_step(self, st: DeltaDiTState, runner, call, streams, s: int):
        cfg = self.config
        rep = s == st.host_last
        compute = rep or cfg.computes(s, self.num_blocks) or not st.host_valid or st.host_force
        store = compute and not rep
        front = s >= cfg.boundary
        out = self._eager(st, runner, call, streams, compute, front, st.true if store else None)
        if store:
            st.host_valid, st.host_force = True, False
        if not rep:
            st.host_last = s
            st.host_timeline.append(compute)
            st.host_ranges.append("front" if front else "rear")
            st.host_counts[0 if compute else 1] += 1
            st.host_counts[2] += self.num_blocks if compute else self.num_blocks - cfg.num_cached
        return out

    def _eager(self, st: DeltaDiTState, runner, call, streams, compute: bool, front: bool, store):
        """One step with the decision on the host: ``store`` is the device flag gating the
        Δ writes (None: no write at all)."""
        h = streams
        for p, part in enumerate(self.parts):
            names = self._names(part, h) if part.cached else []
            if part.cached_in(front) and not compute:  # D3
                out = dict(h)
                for n in names:
                    r = st.residuals[f"{p}:{n}"]
                    out[n] = ops.apply_residual(h[n], r, out=st.output_buffer(f"{p}:{n}", r))
            else:
                out = runner.run_range(call, h, part.start, part.stop)
                if part.cached and store is not None:  # D2
                    for n in names:
                        if out.get(n) is None:
                            raise RuntimeError(
                                f"DeltaDiT: block {part.stop - 1} returned None for stream {n!r}, which the blocks "
                                f"after it read; a cached range cannot end there in {type(self.model).__name__}"
                            )
                        ops.store_residual(out[n], h[n], store, st.residuals[f"{p}:{n}"])
            h = out
        return h

    def _traced(self, st: DeltaDiTState, runner, call, streams, flag, front, store):
        """Under tracing / capture: one cond per cached part, predicate "refresh, or this
        part is outside the stage's range"; the Δ stores outside the conds."""
        spec = self.spec
        warm_signatures(self._blocks)  # several conds per step: see base.warm_signatures
        h = dict(streams)
        for p, part in enumerate(self.parts):
            if not part.cached:
                h = runner.run_range(call, h, part.start, part.stop)
                continue
            if part.front and part.rear:
                pred = flag
            elif part.front:
                pred = flag | ~front
            else:
                pred = flag | front
            names = self._names(part, h)
            if part.stop == self.num_blocks:
                returned = [n for n in spec.returns if h.get(n) is not None and n not in spec.dropped_streams]
            else:
                returned = [n for n in spec.streams if h.get(n) is not None]
            residuals = {n: st.residuals[f"{p}:{n}"] for n in names}
            a, b = part.start, part.stop
            out = dict(h)
            out.update(
                residual_cond(pred, lambda ins, a=a, b=b: runner.run_range(call, ins, a, b), h, returned, residuals)
            )
            for n, r in residuals.items():
                ops.store_residual(out[n], h[n], store, r)
            h = out
        return h

    # -- stats ----------------------------------------------------------------------------
    def state_stats(self, st: DeltaDiTState) -> dict:
        """Steps computed / skipped, the timeline and the range cached at each step
        (``ranges``: "rear" or "front"), the computed fraction of block evaluations, and
        ``cache_bytes``. Host-scheduled steps: every step since the patch or the last reset;
        device-decided steps: the current run (reads the device state: off the step path)."""
        cfg, L = self.config, self.num_blocks
        extra = {"interval": cfg.interval, "num_cached": cfg.num_cached, "boundary": cfg.boundary, "num_blocks": L}
        if st.host_timeline:
            c, k, blocks = st.host_counts
            out = {
                "steps": c + k,
                "computed": c,
                "skipped": k,
                "timeline": list(st.host_timeline),
                "ranges": list(st.host_ranges),
                "computed_fraction": blocks / ((c + k) * L),
                "cache_bytes": st.nbytes(),
                "warnings": [],
            }
        else:
            out = st.stats(repeat_hint=".")
            out.pop("rel_l1", None)  # the schedule has no indicator
            c, k = out["computed"], out["skipped"]
            out["ranges"] = [cfg.stage_of(i) for i in range(len(out["timeline"]))]
            out["computed_fraction"] = (c * L + k * (L - cfg.num_cached)) / ((c + k) * L) if c + k else 1.0
        out.update(extra)
        return out
