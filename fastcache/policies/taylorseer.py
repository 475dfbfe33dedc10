"""TaylorSeer on the block interior (Liu et al., arXiv 2503.06923; docs/methods.md section 8).

The cached feature is each slot's pre-gate branch output ``f`` (slot = (block, branch,
stream), as FORA caches it; docs/methods.md section 8 gives the measurement that chose
it over the whole-stack residual). Per context and slot the device holds the history
``H[k] = D^k`` at the last computed step, ``(order+1, *f.shape)``:

* computed step ``s`` (previous computed step ``s_p``): the blocks run; then, for every
  slot, :func:`fastcache.ops.taylor_update` with ``dx = s - s_p`` (Eq. TS1). The number
  of valid orders ``valid`` (device, reset to 0 at step 0 of a run) keeps orders that
  could not be differenced yet at 0, as diffusers' hook does;
* forecast step ``s``: ``f_hat = taylor_forecast(H, s - s_c)`` (Eq. TS2), then
  ``x <- x + gate_s * f_hat`` through :func:`fastcache.interior.apply_cached`, the gates
  recomputed from this step's conditioning (FORA's skipped branch with ``f_hat``).

Where the step is decided (the schedule is static: :meth:`TaylorSeerConfig.computes`):

* eager with the step index given (pipeline ``cache_context(name, step_index=i)`` or
  ``fastcache.context(model, name, step_index=i)``): on the host, no device read; ``dx``
  goes to the device as a value, never read back;
* otherwise the step counter lives on the device (:func:`~fastcache.policies.steps.timestep_guard`
  + :func:`fastcache.ops.cache_decision`, as FORA: new runs and repeated timesteps are
  detected there); the periodic schedule is FORA's decision (``threshold=inf``,
  ``max_skips=interval-1``), explicit ``compute_steps`` index a device mask with the
  device step. Eager reads the one flag per step; under torch.compile one ``torch.cond``
  around the stack, the forecast computed before it and the history updated after it,
  gated by the device ``store`` flag, with ``dx`` a device tensor (nothing per-step is
  baked into the graph).

A repeated call (same timestep as the previous call) is computed and leaves the history
untouched (the runtime's hardening, as every policy).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_int, _set, config_type
from ..interior import run_blocks
from ..ops.reference import STEP
from ..tracing import static_floats
from .base import StepInfo, is_tracing, register_policy
from .interior_engine import InteriorCachePolicy, InteriorState, StepExecutor, TraceExecutor
from .steps import timestep_guard


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer (Liu et al., arXiv 2503.06923; docs/methods.md section 8): on computed
    steps every block's attention / MLP outputs (before the AdaLN gate, one per (block,
    branch, stream) slot) update their finite differences up to ``order`` (Eq. TS1); on
    the other steps they are forecast by the Taylor series (Eq. TS2) and go through the
    same gated residual as FORA, with the gates recomputed every step.

    Schedule (the step index ``s`` is 0-based): ``compute_steps`` when given, else step
    ``s`` is computed iff ``s < warmup_steps`` or ``(s - warmup_steps + 1) % interval ==
    0`` (warm-up 3, interval 5: steps 0, 1, 2, 7, 12, ...); with ``num_steps`` known the
    last step is computed too. ``interval=1`` computes every step (bitwise the unpatched
    model); ``order=0`` is FORA on the same schedule.

    Args:
        interval: N >= 1, steps between computed steps after the warm-up (diffusers and
            the paper: 5; paper range 5-7).
        order: m >= 0, the highest finite difference kept (paper 1-2; diffusers 1).
        warmup_steps: leading steps always computed (>= 1; diffusers computes 3).
        num_steps: steps per run when known: the last step is computed (device schedules
            and explicit ``compute_steps`` included); runs of another length are flagged.
        compute_steps: explicit computed steps (e.g. from a schedule search), increasing,
            starting at 0; every other step is forecast. Overrides ``interval`` and
            ``warmup_steps`` (leave them at their defaults).
        history: steps of decision timeline kept for ``fastcache.stats``.

    Memory: ``(order + 1) x`` the branch outputs of one step (every slot), per cache
    context, in the model's dtype (``stats()["cache_bytes"]``).
    """

    kind: ClassVar[str] = "taylorseer"

    interval: int = 5
    order: int = 1
    warmup_steps: int = 3
    num_steps: int | None = None
    compute_steps: tuple[int, ...] | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "order", _check_int("order", self.order, 0, " (0 = reuse, as FORA)"))
        if self.order > 4:
            raise ValueError(
                f"order must be <= 4, got {self.order}: higher finite differences of a few sampled steps "
                "amplify noise (the paper uses 1-2)"
            )
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))
        cs = self.compute_steps
        if cs is not None:
            if isinstance(cs, (str, bytes)) or not hasattr(cs, "__iter__"):
                raise ValueError(f"compute_steps must be a sequence of step indices, got {cs!r}")
            cs = tuple(cs)
            if not cs or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in cs):
                raise ValueError(f"compute_steps must be a non-empty sequence of integers, got {self.compute_steps!r}")
            cs = tuple(int(s) for s in cs)
            if cs[0] != 0 or any(b <= a for a, b in zip(cs, cs[1:])):
                raise ValueError(
                    f"compute_steps must be strictly increasing and start at 0 (step 0 has no cache), got {cs}"
                )
            if self.num_steps is not None and cs[-1] >= self.num_steps:
                raise ValueError(f"compute_steps holds step {cs[-1]} but num_steps={self.num_steps}")
            if (self.interval, self.warmup_steps) != (5, 3):
                raise ValueError(
                    "compute_steps replaces interval and warmup_steps; give either compute_steps or "
                    f"interval/warmup_steps, got interval={self.interval}, warmup_steps={self.warmup_steps}"
                )
            _set(self, "compute_steps", cs)

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        """The host schedule: is step ``step`` computed? (``num_steps`` defaults to the config's.)"""
        n = self.num_steps if num_steps is None else num_steps
        if n is not None and step == n - 1:
            return True
        if self.compute_steps is not None:
            return step in self.compute_steps
        w = self.warmup_steps
        return step < w or (step - w + 1) % self.interval == 0


# --- MagCache ---


# --------------------------------------------------------------------------- policy
class TaylorState(InteriorState):
    """:class:`InteriorState` plus the Taylor history per slot and the valid-order count."""

    def __init__(self, history: int):
        super().__init__(history)
        self.hist: list[torch.Tensor] | None = None  # per slot: (order+1, *f.shape)
        self.valid: torch.Tensor | None = None  # (1,) fp32: orders the history holds
        self.flags: torch.Tensor | None = None  # (history,) fp32: explicit schedules' device timeline
        self.hist_views: dict[int, list[torch.Tensor]] = {}  # order k -> hist[:k+1] views (hist_upto)
        self.hist_views_of: list[torch.Tensor] | None = None  # the hist list those views are of

    def nbytes(self) -> int:
        ts = [self.valid, self.flags, *(self.hist or [])]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in ts if t is not None)


@register_policy(TaylorSeerConfig)
class TaylorSeerPolicy(InteriorCachePolicy):
    """TaylorSeer: see the module docstring and :class:`fastcache.TaylorSeerConfig`."""

    decides_from_data = False  # a static schedule: identical on every rank of a process group

    def __init__(self, config: TaylorSeerConfig, spec, model):
        super().__init__(config, spec, model)
        self.order = config.order
        self._mask: dict[torch.device, torch.Tensor] = {}

    def new_state(self) -> TaylorState:
        return TaylorState(self.config.history)

    def reset_state(self, st: TaylorState) -> None:
        super().reset_state(st)
        st.hist = None
        st.valid = None

    def set_num_steps(self, num_steps: int | None) -> None:
        super().set_num_steps(num_steps)
        self._mask.clear()  # the explicit schedule's mask holds the forced last step

    # -- schedule -------------------------------------------------------------------
    def host_compute(self, step: StepInfo) -> bool:
        return self.config.computes(step.index, step.num_steps or self.num_steps or None)

    def allocate(self, st: TaylorState, streams, dev) -> None:
        st.coeffs = torch.zeros(0, dtype=torch.float32, device=dev)
        st.sums = torch.tensor(((0.0, 1.0),), dtype=torch.float32, device=dev)  # ratio 0: the schedule decides
        st.valid = torch.zeros(1, dtype=torch.float32, device=dev)
        st.flags = torch.zeros(st.history, dtype=torch.float32, device=dev)
        st.hist = None

    def _device_mask(self, dev) -> torch.Tensor:
        m = self._mask.get(dev)
        if m is None:
            cs = self.config.compute_steps
            n = max(self.config.history, cs[-1] + 1, self.num_steps or 0)
            flags = [self.config.computes(s, self.num_steps or None) for s in range(n)]
            m = self._mask[dev] = torch.tensor(flags + [False], dtype=torch.bool, device=dev)
        return m

    def device_decision(self, st, call, t_op, hold):
        cfg = self.config
        if cfg.compute_steps is None:
            n = cfg.interval
            thr = 0.0 if n == 1 else math.inf
            return ops.cache_decision(
                st.sums, t_op, st.coeffs, st.state, thr, cfg.warmup_steps, n - 1, self.num_steps, hold=hold
            )
        # Explicit steps: the decision op counts steps (threshold 0: it always "computes");
        # the flag is the mask at the device step (past its end: forecast).
        ops.cache_decision(st.sums, t_op, st.coeffs, st.state, 0.0, 1, 0, 0, hold=hold)
        mask = self._device_mask(t_op.device)
        s_raw = (st.state[STEP : STEP + 1] - 1).clamp(min=0).to(torch.long)
        flag = mask.index_select(0, s_raw.clamp(max=mask.numel() - 1))[0]
        # the device timeline (the decision op's own says "computed" at every step); a
        # repeated call leaves it as it was
        i = s_raw.clamp(max=st.history - 1)
        st.flags.index_copy_(0, i, torch.where(hold, st.flags.index_select(0, i), flag.to(torch.float32)))
        return flag | hold

    # -- the Taylor state -----------------------------------------------------------
    def _alloc_hist(self, st: TaylorState, fs: list[torch.Tensor]) -> None:
        m = self.order
        st.hist = [torch.zeros((m + 1, *f.shape), dtype=f.dtype, device=f.device) for f in fs]

    def _update(self, st: TaylorState, fs, dx: torch.Tensor, first: torch.Tensor, store: torch.Tensor) -> None:
        """Eq. TS1 for every slot, gated by ``store``; ``first``: (1,) bool, step 0 of a
        run (the history's orders are stale: ``valid`` counts from 0 again). Eager: every
        slot in one op (:func:`fastcache.ops.taylor_update_slots`); traced: one op per slot."""
        valid = torch.where(first, torch.zeros_like(st.valid), st.valid)
        if is_tracing():
            for h, f in zip(st.hist, fs):
                ops.taylor_update(h, f, dx, valid, store)
        else:
            ops.taylor_update_slots(st.hist, fs, dx, valid, store)
        new_valid = (valid + 1.0).clamp(max=float(self.order + 1))
        st.valid.copy_(torch.where(store, new_valid, st.valid))

    def _forecast_sources(self, st: TaylorState, dx: torch.Tensor) -> list[torch.Tensor]:
        """What :meth:`forecast_run` forecasts from: the histories themselves (the fused op
        forecasts them), or, where a subclass overrides :meth:`_forecast` (ScheduleConfig's
        per-step order and EOC correction on the device path), its forecast features."""
        if type(self)._forecast is TaylorSeerPolicy._forecast:
            return st.hist
        return self._forecast(st, dx)

    def hist_upto(self, st: TaylorState, k: int) -> list[torch.Tensor]:
        """Every slot's history up to order ``k`` (views of ``st.hist``, made once per
        history buffer: a forecast of order ``k`` with no per-step slicing ops)."""
        if k >= self.order:
            return st.hist
        if st.hist_views_of is not st.hist:
            st.hist_views, st.hist_views_of = {}, st.hist
        views = st.hist_views.get(k)
        if views is None:
            views = st.hist_views[k] = [h[: k + 1] for h in st.hist]
        return views

    def _forecast(self, st: TaylorState, dx: torch.Tensor) -> list[torch.Tensor]:
        return [ops.taylor_forecast(h, dx) for h in st.hist]

    # -- the step -------------------------------------------------------------------
    @static_floats
    def run_stack(self, st: TaylorState, runner, head, call, timestep):
        streams = {n: call.get(n) for n in self.spec.streams}
        self._ensure(st, streams)
        if not is_tracing() and st.step is not None and st.step.index is not None:
            return self._host_taylor_step(st, call, streams, st.step.index)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, self.num_steps)
        flag = self.device_decision(st, call, t_op, rep)
        s_idx = (st.state[STEP : STEP + 1] - 1).clamp(min=0).to(torch.long)
        store = flag & ~rep
        compute = flag | rep
        cf = compute.to(torch.float32)
        zero = torch.zeros_like(cf)
        st.counts.add_(torch.stack([cf, 1.0 - cf, zero, zero, cf * self.layout.num_blocks]))
        dx = (s_idx - st.last[:1]).to(torch.float32)
        first = s_idx == 0
        if is_tracing():
            return self._traced_taylor_step(st, call, streams, compute, store, s_idx, dx, first)
        code = int((compute.to(torch.int8) + 2 * store.to(torch.int8)).item())  # host-read-ok: the one eager read
        L = self.layout.num_blocks
        if code & 1:
            st.cache = [None] * self.K
            out = run_blocks(self.layout, call, streams, StepExecutor(self, st, [True] * L, True, None, 0.0))
            fs, st.cache = st.cache, None
            if code & 2:
                if st.hist is None:
                    self._alloc_hist(st, fs)
                self._update(st, fs, dx, first, store)
                st.last.copy_(s_idx.expand(self.K))
            return out
        if st.hist is None:
            raise RuntimeError("fastcache: internal error, a forecast step before any computed step")
        return self.forecast_run(call, streams, self._forecast_sources(st, dx), dx)

    def _host_taylor_step(self, st: TaylorState, call, streams, s: int):
        compute = bool(self.host_compute(st.step)) or st.hist is None  # nothing cached yet: compute
        L = self.layout.num_blocks
        dev = st.counts.device
        st.counts.add_(torch.tensor([float(compute), float(not compute), 0.0, 1.0, L * float(compute)], device=dev))
        st.host_timeline.append(compute)
        dx = torch.tensor([float(s - st.host_last[0])], device=dev)
        st.cache = [None] * self.K
        if compute:
            out = run_blocks(self.layout, call, streams, StepExecutor(self, st, [True] * L, True, None, 0.0))
            fs = st.cache
            if st.hist is None:
                self._alloc_hist(st, fs)
            first = torch.tensor([s == 0], device=dev)
            self._update(st, fs, dx, first, torch.ones((), dtype=torch.bool, device=dev))
            st.host_last = [s] * self.K
            st.last.fill_(s)
        else:
            out = self.forecast_run(call, streams, self._forecast_sources(st, dx), dx)
        st.cache = None
        return out

    def _traced_taylor_step(self, st: TaylorState, call, streams, compute, store, s_idx, dx, first):
        from ..tracing import skip_cond

        names = [n for n in self.spec.streams if streams[n] is not None]
        k = len(names)
        if st.hist is None:
            # First traced call of this shape: a fresh decision state, so a forced compute.
            ex = TraceExecutor(self, True, None, None, 0.0)
            out = run_blocks(self.layout, call, dict(streams), ex)
            fs = [ex.outputs[i] for i in range(self.K)]
            self._alloc_hist(st, fs)
            self._update(st, fs, dx, first, store)
            st.last.copy_(s_idx.expand(self.K))
            return out
        returned = [n for n in self.spec.returns if streams.get(n) is not None and n not in self.spec.dropped_streams]

        def run(compute_all, operands):
            ins = dict(streams)
            ins.update(zip(names, operands[:k]))
            cache = list(operands[k : k + self.K])
            ex = TraceExecutor(self, compute_all, cache, None, 0.0)
            outs = run_blocks(self.layout, call, ins, ex)
            new = [ex.outputs[i] for i in range(self.K)] if compute_all else cache
            return (
                *(outs[n].clone(memory_format=torch.contiguous_format) for n in returned),
                *(f.clone(memory_format=torch.contiguous_format) for f in new),
            )

        # The forecast runs before the cond on every step (cheap next to the blocks); on a
        # computed step the compute branch ignores it.
        forecast = self._forecast(st, dx)
        operands = (*[streams[n] for n in names], *forecast)
        shapes = [streams[n].shape for n in returned] + [f.shape for f in forecast]
        outs = skip_cond(compute, lambda *o: run(True, o), lambda *o: run(False, o), operands, shapes)
        result = dict(streams)
        result.update(zip(returned, outs[: len(returned)]))
        self._update(st, list(outs[len(returned) :]), dx, first, store)
        torch.where(store, s_idx.expand(self.K), st.last, out=st.last)
        return result

    # -- stats ----------------------------------------------------------------------
    def state_stats(self, st: TaylorState) -> dict:
        out = super().state_stats(st)
        if self.config.compute_steps is not None and st.flags is not None and not st.host_timeline:
            # explicit steps on the device: the decision op saw "compute" at every step; the
            # flags the mask gave were recorded on the device
            f = st.flags.detach().cpu()  # host-read-ok: stats are read off the step path
            out["timeline"] = [bool(v) for v in f[: len(out["timeline"])]]
        out["order"] = self.order
        return out
