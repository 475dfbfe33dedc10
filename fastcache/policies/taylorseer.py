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

import math

import torch

from .. import ops
from ..config import TaylorSeerConfig
from ..interior import run_blocks
from ..ops.reference import STEP
from .base import StepInfo, is_tracing, register_policy
from .fora import InteriorCachePolicy, InteriorState, _StepExecutor, _TraceExecutor
from .steps import static_floats, timestep_guard


class TaylorState(InteriorState):
    """:class:`InteriorState` plus the Taylor history per slot and the valid-order count."""

    def __init__(self, history: int):
        super().__init__(history)
        self.hist: list[torch.Tensor] | None = None  # per slot: (order+1, *f.shape)
        self.valid: torch.Tensor | None = None  # (1,) fp32: orders the history holds
        self.flags: torch.Tensor | None = None  # (history,) fp32: explicit schedules' device timeline

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
        run (the history's orders are stale: ``valid`` counts from 0 again)."""
        valid = torch.where(first, torch.zeros_like(st.valid), st.valid)
        for h, f in zip(st.hist, fs):
            ops.taylor_update(h, f, dx, valid, store)
        new_valid = (valid + 1.0).clamp(max=float(self.order + 1))
        st.valid.copy_(torch.where(store, new_valid, st.valid))

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
            out = run_blocks(self.layout, call, streams, _StepExecutor(self, st, [True] * L, True, None, 0.0))
            fs, st.cache = st.cache, None
            if code & 2:
                if st.hist is None:
                    self._alloc_hist(st, fs)
                self._update(st, fs, dx, first, store)
                st.last.copy_(s_idx.expand(self.K))
            return out
        if st.hist is None:
            raise RuntimeError("fastcache: internal error, a forecast step before any computed step")
        st.cache = self._forecast(st, dx)
        out = run_blocks(self.layout, call, streams, _StepExecutor(self, st, [False] * L, False, None, 0.0))
        st.cache = None
        return out

    def _host_taylor_step(self, st: TaylorState, call, streams, s: int):
        compute = bool(self.host_compute(st.step)) or st.hist is None  # nothing cached yet: compute
        L = self.layout.num_blocks
        dev = st.counts.device
        st.counts.add_(torch.tensor([float(compute), float(not compute), 0.0, 1.0, L * float(compute)], device=dev))
        st.host_timeline.append(compute)
        dx = torch.tensor([float(s - st.host_last[0])], device=dev)
        st.cache = [None] * self.K
        if compute:
            out = run_blocks(self.layout, call, streams, _StepExecutor(self, st, [True] * L, True, None, 0.0))
            fs = st.cache
            if st.hist is None:
                self._alloc_hist(st, fs)
            first = torch.tensor([s == 0], device=dev)
            self._update(st, fs, dx, first, torch.ones((), dtype=torch.bool, device=dev))
            st.host_last = [s] * self.K
            st.last.fill_(s)
        else:
            st.cache = self._forecast(st, dx)
            out = run_blocks(self.layout, call, streams, _StepExecutor(self, st, [False] * L, False, None, 0.0))
        st.cache = None
        return out

    def _traced_taylor_step(self, st: TaylorState, call, streams, compute, store, s_idx, dx, first):
        from ..graphs import skip_cond

        names = [n for n in self.spec.streams if streams[n] is not None]
        k = len(names)
        if st.hist is None:
            # First traced call of this shape: a fresh decision state, so a forced compute.
            ex = _TraceExecutor(self, True, None, None, 0.0)
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
            ex = _TraceExecutor(self, compute_all, cache, None, 0.0)
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
