"""The interior engine: what every branch-level policy shares (FORA, EOC, TaylorSeer,
ScheduleConfig, T-GATE, Block Caching).

The blocks run through their block programs (:mod:`fastcache.interior`); per step the
AdaLN modulation of every block is recomputed; on a computed step every branch runs and
its pre-gate output ``f`` (per slot = (block, branch, stream)) is kept; on a reused step
``x <- x + gate * f_cached`` through the fused :func:`fastcache.ops.gated_residual`
(:func:`fastcache.interior.apply_cached`), the subclass hook
:meth:`InteriorCachePolicy.trend` optionally correcting ``f`` (EOC).

A subclass says where the step is decided: on the host (:meth:`InteriorCachePolicy.host_compute`,
when the step index is known: no device read) or on the device
(:meth:`InteriorCachePolicy.device_decision`: eager reads that one flag per step; under
``torch.compile`` / CUDA-graph capture one ``torch.cond`` around the stack, or one per
block for per-block schedules (:meth:`InteriorCachePolicy.device_block_flags`), the
cache updated outside the cond, gated by the device flag). A repeated call (same
timestep as the previous call) is computed and leaves the cache untouched.

Executors: :class:`StepExecutor` (eager: per block computed or reused) and
:class:`TraceExecutor` (inside a cond branch: compute all, or reuse all, functionally).
"""

from __future__ import annotations

import torch

from .. import ops
from ..interior import Executor, SlotForecastExecutor, apply_cached, forecast_stack, layout_for, run_blocks
from ..interior.base import combine
from ..ops.reference import N_RUNS, STATE_HEADER, STEP
from ..tracing import static_floats
from .base import Policy, StepInfo, is_tracing, warm_signatures
from .steps import AUX_JITTER, AUX_LAST_RUN_STEPS, AUX_REPEATS, AUX_RUN_LENGTH_MISMATCHES, AUX_SIZE, timestep_guard


class InteriorState:
    """Device tensors of one cache context (``signature`` guards shape/dtype/device)."""

    def __init__(self, history: int):
        self.history = history
        self.signature = None
        self.cache: list[torch.Tensor] | None = None  # pre-gate branch output per slot
        self.state: torch.Tensor | None = None  # device decision state (ops layout)
        self.aux: torch.Tensor | None = None
        self.coeffs: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None  # TeaCache indicator (interior TeaCache base)
        self.sums: torch.Tensor | None = None  # constant rel-L1 sums of the FORA device schedule
        self.last: torch.Tensor | None = None  # (K,) long: step whose output each slot holds
        self.counts: torch.Tensor | None = (
            None  # computed, skipped, corrected (block, step) pairs, host steps, blocks run
        )
        self.host_last: list[int] | None = None  # the same as `last`, host schedules
        self.host_timeline: list[bool] = []
        self.step: StepInfo | None = None
        self.dx0: torch.Tensor | None = None  # (1,) fp32 zero: the forecast offset of a plain reuse

    def nbytes(self) -> int:
        ts = [self.state, self.aux, self.coeffs, self.prev, self.sums, self.last, self.counts, *(self.cache or [])]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class StepExecutor(Executor):
    """Eager: per block computed (``compute[l]``) or reused (with ``trend`` rows, weight w)."""

    def __init__(self, policy, st: InteriorState, compute: list[bool], store: bool, trend, w: float):
        self.p, self.st, self.compute, self.store, self.trend, self.w = policy, st, compute, store, trend, w

    def residual(self, name, fn, xs, gates):
        ids = self.p.layout.slot_ids[(self.block, name)]
        if self.compute[self.block]:
            fs = fn()
            if self.store:
                for k, f in zip(ids, fs):
                    self.st.cache[k] = f  # a fresh tensor: keep the reference, no copy
            return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fs))
        tr = self.trend
        return tuple(
            apply_cached(x, g, self.st.cache[k], None if tr is None else tr[k], self.w)
            for k, x, g in zip(ids, xs, gates)
        )


class TraceExecutor(Executor):
    """Inside a cond branch: compute all (collecting outputs) or reuse all (functional)."""

    def __init__(self, policy, compute: bool, cache, trend, w: float):
        self.p, self.compute, self.cache, self.trend, self.w = policy, compute, cache, trend, w
        self.outputs: dict[int, torch.Tensor] = {}

    def residual(self, name, fn, xs, gates):
        ids = self.p.layout.slot_ids[(self.block, name)]
        if self.compute:
            fs = fn()
            self.outputs.update(zip(ids, fs))
            return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fs))
        tr = self.trend
        return tuple(
            apply_cached(x, g, self.cache[k], None if tr is None else tr[k], self.w) for k, x, g in zip(ids, xs, gates)
        )


class InteriorCachePolicy(Policy):
    """Stack granularity (one decision, one cond per step around the stack); the blocks
    run through their interior programs. Subclasses set the schedule hooks."""

    granularity = "stack"
    weight = 0.0

    def __init__(self, config, spec, model):
        super().__init__(config, spec, model)
        self.layout = layout_for(spec, model)
        self.K = len(self.layout.slots)
        self.num_steps = getattr(config, "num_steps", None) or 0

    # -- schedule hooks -----------------------------------------------------------------
    def host_compute(self, step: StepInfo) -> bool | None:
        """The host decision for this step (True = compute), or None if it needs the device."""
        return None

    def device_decision(self, st: InteriorState, call: dict, t_op: torch.Tensor, hold: torch.Tensor) -> torch.Tensor:
        """Device decision (updates ``st.state`` unless ``hold``: a repeated call, which
        must compute and leave every state as it was); returns a 0-dim bool, True = compute."""
        raise NotImplementedError

    def device_block_flags(self, st: InteriorState, s_idx: torch.Tensor) -> torch.Tensor | None:
        """Per-block compute flags ``(L,)`` bool on the device for schedules that differ
        between blocks (static masks under torch.compile); None = one flag for the stack."""
        return None

    def trend(self, st: InteriorState, s_idx: torch.Tensor, last: torch.Tensor, reused: torch.Tensor | None = None):
        """``(K, ...)`` trend rows for a reused step (or None) and the number of corrected
        blocks (0-dim fp32); ``s_idx``: (1,) long step index; ``last``: (K,) long;
        ``reused``: (L,) bool, the blocks reused at this step (None = all)."""
        return None, None

    # -- state --------------------------------------------------------------------------
    def new_state(self) -> InteriorState:
        return InteriorState(self.config.history)

    def _ensure(self, st: InteriorState, streams: dict) -> None:
        sig = tuple((n, None if v is None else (tuple(v.shape), v.dtype, v.device)) for n, v in streams.items())
        if sig == st.signature:
            return
        dev = streams[self.spec.streams[0]].device
        st.cache = None
        st.state = ops.new_state(st.history, device=dev)
        st.aux = torch.zeros(AUX_SIZE, dtype=torch.float32, device=dev)
        st.last = torch.zeros(self.K, dtype=torch.long, device=dev)
        if st.counts is None or st.counts.device != dev:
            st.counts = torch.zeros(5, dtype=torch.float32, device=dev)
        st.host_last = [0] * self.K
        st.prev = None
        st.dx0 = torch.zeros(1, dtype=torch.float32, device=dev)
        self.allocate(st, streams, dev)
        st.signature = sig

    def allocate(self, st: InteriorState, streams: dict, dev) -> None:
        """Extra per-context buffers of a schedule (subclasses)."""

    def reset_state(self, st: InteriorState) -> None:
        st.signature = None
        st.cache = None
        st.host_timeline = []
        if st.counts is not None:
            st.counts.zero_()

    def invalidate(self, st: InteriorState) -> None:
        # Fresh buffers at the next call, which computes and refills them; the statistics,
        # counted over all runs, are kept.
        st.signature = None

    def begin_step(self, st: InteriorState, timestep, step: StepInfo) -> None:
        st.step = step

    def forecast_run(self, call, streams, sources, dx: torch.Tensor) -> dict:
        """A step whose every branch is reused (``sources[k]``: slot k's cached feature) or
        forecast (``sources[k]``: its ``(m+1, ...)`` Taylor history, at ``dx``): at the
        floor, one fused op per stream after the blocks' modulations
        (:func:`fastcache.interior.forecast_stack`), or, for programs that are not
        additive, block by block with one fused op per slot. Eager only."""
        out = forecast_stack(self.layout, call, streams, sources, dx)
        if out is None:
            out = run_blocks(self.layout, call, dict(streams), SlotForecastExecutor(self.layout, sources, dx))
        return out

    # -- the step -----------------------------------------------------------------------
    @static_floats
    def run_stack(self, st: InteriorState, runner, head, call, timestep):
        streams = {n: call.get(n) for n in self.spec.streams}
        self._ensure(st, streams)
        if not is_tracing():
            hc = self.host_compute(st.step) if st.step is not None and st.step.index is not None else None
            if hc is not None:
                return self._host_step(st, call, streams, st.step.index, hc)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, self.num_steps)
        # rep: a repeated call; the ops hold the decision state (and an indicator) as they were
        flag = self.device_decision(st, call, t_op, rep)
        s_idx = (st.state[STEP : STEP + 1] - 1).clamp(min=0).to(torch.long)
        store = flag & ~rep
        compute = flag | rep
        skip_f = (~compute).to(torch.float32)
        if is_tracing():
            flags = self.device_block_flags(st, s_idx)
            if flags is not None and st.cache is not None:
                return self._traced_blocks(st, call, streams, flags, rep, s_idx)
            trend, n_corr = self.trend(st, s_idx, st.last)
            corr = skip_f * (0.0 if n_corr is None else n_corr)
            cf = compute.to(torch.float32)
            st.counts.add_(torch.stack([cf, skip_f, corr, torch.zeros_like(cf), cf * self.layout.num_blocks]))
            return self._traced_step(st, call, streams, compute, store, s_idx, trend)
        res = self.eager_schedule_step(st, call, streams, s_idx, rep)
        if res is not None:
            return res
        cf = compute.to(torch.float32)
        st.counts.add_(
            torch.stack([cf, skip_f, torch.zeros_like(cf), torch.zeros_like(cf), cf * self.layout.num_blocks])
        )
        code = int((compute.to(torch.int8) + 2 * store.to(torch.int8)).item())  # host-read-ok: the one eager read
        trend = None
        if not code & 1:
            if st.cache is None:
                raise RuntimeError("fastcache: internal error, a reused step before any computed step")
            trend, n_corr = self.trend(st, s_idx, st.last)
            if n_corr is not None:
                st.counts[2:3].add_(n_corr.reshape(1))
        if code & 2:
            st.last.copy_(s_idx.expand(self.K))
        if not code & 1 and (trend is None or self.weight == 0.0):
            return self.forecast_run(call, streams, st.cache, st.dx0)  # every branch reused
        if st.cache is None:
            st.cache = [None] * self.K
        ex = StepExecutor(self, st, [bool(code & 1)] * self.layout.num_blocks, bool(code & 2), trend, self.weight)
        return run_blocks(self.layout, call, streams, ex)

    def eager_schedule_step(self, st: InteriorState, call, streams, s_idx, rep):
        """Eager, no host step index: a per-block schedule read from the device in one
        read (EOC on a static mask). None = the whole-stack flag path."""
        return None

    def _host_step(self, st: InteriorState, call, streams, s: int, hc):
        L = self.layout.num_blocks
        compute = list(hc) if isinstance(hc, (list, tuple)) else [bool(hc)] * L
        if st.cache is None and not all(compute):
            compute = [True] * L  # nothing cached yet for this shape: compute (counted as computed)
        trend = None
        if not all(compute):
            dev = st.counts.device
            s_idx = torch.tensor([s], dtype=torch.long, device=dev)
            last = torch.tensor(st.host_last, dtype=torch.long, device=dev)
            reused = torch.tensor([not c for c in compute], dtype=torch.bool, device=dev)
            trend, n_corr = self.trend(st, s_idx, last, reused)
            if n_corr is not None:
                st.counts[2:3].add_(n_corr.reshape(1))
        n = sum(compute)
        st.counts.add_(torch.tensor([float(n == L), float(n < L), 0.0, 1.0, float(n)], device=st.counts.device))
        st.host_timeline.append(compute[0] if n in (0, L) else compute)
        for k, li in enumerate(self.layout.block_of_slot):
            if compute[li]:
                st.host_last[k] = s
        if n == 0 and (trend is None or self.weight == 0.0):
            return self.forecast_run(call, streams, st.cache, st.dx0)  # every branch reused
        if st.cache is None:
            st.cache = [None] * self.K
        ex = StepExecutor(self, st, compute, True, trend, self.weight)
        return run_blocks(self.layout, call, streams, ex)

    def _traced_step(self, st, call, streams, compute, store, s_idx, trend):
        from ..tracing import skip_cond

        names = [n for n in self.spec.streams if streams[n] is not None]
        k = len(names)
        if st.cache is None:
            # First traced call of this shape: the decision is a forced compute (new run).
            ex = TraceExecutor(self, True, None, None, 0.0)
            out = run_blocks(self.layout, call, dict(streams), ex)
            st.cache = [ex.outputs[i].detach().clone(memory_format=torch.contiguous_format) for i in range(self.K)]
            st.last.copy_(s_idx.expand(self.K))
            return out
        returned = [n for n in self.spec.returns if streams.get(n) is not None and n not in self.spec.dropped_streams]
        w = self.weight

        def run(compute_all, operands):
            ins = dict(streams)
            ins.update(zip(names, operands[:k]))
            cache = list(operands[k : k + self.K])
            tr = operands[k + self.K] if len(operands) > k + self.K else None
            ex = TraceExecutor(self, compute_all, cache, tr, w)
            outs = run_blocks(self.layout, call, ins, ex)
            new = [ex.outputs[i] for i in range(self.K)] if compute_all else cache
            return (
                *(outs[n].clone(memory_format=torch.contiguous_format) for n in returned),
                *(f.clone(memory_format=torch.contiguous_format) for f in new),
            )

        operands = (*[streams[n] for n in names], *st.cache)
        if trend is not None:
            operands = (*operands, trend)
        shapes = [streams[n].shape for n in returned] + [c.shape for c in st.cache]
        outs = skip_cond(compute, lambda *o: run(True, o), lambda *o: run(False, o), operands, shapes)
        result = dict(streams)
        result.update(zip(returned, outs[: len(returned)]))
        for c, f in zip(st.cache, outs[len(returned) :]):
            c.copy_(torch.where(store, f, c))
        torch.where(store, s_idx.expand(self.K), st.last, out=st.last)
        return result

    def _traced_blocks(self, st, call, streams, flags, rep, s_idx):
        """Per-block schedules under tracing: one ``torch.cond`` per block on its device
        flag (static masks), the cache of each block updated outside its cond."""
        L = self.layout.num_blocks
        compute_l = flags | rep
        store_l = flags & ~rep
        trend, n_corr = self.trend(st, s_idx, st.last, ~compute_l)
        cf = compute_l.to(torch.float32)
        all_c = cf.min()  # a step counts as computed when every block is (as on the host path)
        corr = torch.zeros_like(all_c) if n_corr is None else n_corr
        st.counts.add_(torch.stack([all_c, 1.0 - all_c, corr, torch.zeros_like(all_c), cf.sum()]))
        streams = dict(streams)
        warm_signatures(e.module for e in self.layout.entries)  # one cond per block: see warm_signatures
        for li in range(L):
            streams = self._traced_block(st, call, streams, li, compute_l[li], store_l[li], s_idx, trend)
        return streams

    def _traced_block(self, st, call, streams, li, compute, store, s_idx, trend):
        """Block ``li`` under its own ``torch.cond`` (see :meth:`_traced_blocks`)."""
        from ..tracing import skip_cond

        entry = self.layout.entries[li]
        ids = [k for k, b in enumerate(self.layout.block_of_slot) if b == li]
        names = [n for n in self.spec.streams if streams.get(n) is not None]
        nn_, ni = len(names), len(ids)
        pattern = entry.program.outputs(entry.module, tuple(names))
        w = self.weight

        def run(compute_one, operands):
            ins = dict(streams)
            ins.update(zip(names, operands[:nn_]))
            cache = dict(zip(ids, operands[nn_ : nn_ + ni]))
            tr = dict(zip(ids, operands[nn_ + ni].unbind(0))) if len(operands) > nn_ + ni else None
            ex = TraceExecutor(self, compute_one, cache, tr, w)
            ex.begin_block(li)
            outs = entry.program.run(entry.module, call, ins, ex)
            new = [ex.outputs[k] for k in ids] if compute_one else [cache[k] for k in ids]
            return (
                *(outs[n].clone(memory_format=torch.contiguous_format) for n in pattern),
                *(f.clone(memory_format=torch.contiguous_format) for f in new),
            )

        idx = torch.tensor(ids, device=st.last.device)
        operands = (*[streams[n] for n in names], *[st.cache[k] for k in ids])
        if trend is not None:  # one fresh tensor: cond operands must not alias each other
            operands = (*operands, trend.index_select(0, idx))
        shapes = [streams[n].shape for n in pattern] + [st.cache[k].shape for k in ids]
        outs = skip_cond(compute, lambda *o: run(True, o), lambda *o: run(False, o), operands, shapes)
        result = {n: None for n in self.spec.streams}
        result.update(zip(pattern, outs[: len(pattern)]))
        for k, f in zip(ids, outs[len(pattern) :]):
            st.cache[k].copy_(torch.where(store, f, st.cache[k]))
        st.last.index_copy_(0, idx, torch.where(store, s_idx.expand(ni), st.last.index_select(0, idx)))
        return result

    # -- stats --------------------------------------------------------------------------
    def state_stats(self, st: InteriorState) -> dict:
        """computed / skipped steps, corrected (block, step) pairs (EOC) and the computed
        fraction of block evaluations, counted since the patch or the last reset (over
        all runs, unlike TeaCache's per-run counts); the timeline: every host-placed step since then, or
        the current run for device decisions."""
        out = {"steps": 0, "computed": 0, "skipped": 0, "corrected": 0, "timeline": [], "cache_bytes": st.nbytes()}
        if st.counts is None:
            return out
        c = st.counts.detach().cpu()  # host-read-ok: stats are read off the step path
        out.update(computed=int(c[0]), skipped=int(c[1]), corrected=int(c[2]))
        out["steps"] = out["computed"] + out["skipped"]
        L = self.layout.num_blocks
        out["computed_fraction"] = float(c[4]) / (out["steps"] * L) if out["steps"] else 1.0
        warn = []
        if int(c[3]):
            out["timeline"] = list(st.host_timeline)
        elif st.state is not None:
            s = st.state.detach().cpu()  # host-read-ok: stats
            aux = st.aux.detach().cpu()  # host-read-ok: stats
            H = st.history
            n = min(int(s[STEP]), H)
            out["timeline"] = [bool(f) for f in s[STATE_HEADER + 2 * H : STATE_HEADER + 2 * H + n]]
            out["runs"] = int(s[N_RUNS])
            out["repeated_timestep_calls"] = int(aux[AUX_REPEATS])
            out["timestep_jitter_calls"] = int(aux[AUX_JITTER])
            out["last_run_steps"] = int(aux[AUX_LAST_RUN_STEPS])
            if self.num_steps and (int(aux[AUX_RUN_LENGTH_MISMATCHES]) or int(s[STEP]) > self.num_steps):
                warn.append(
                    f"num_steps={self.num_steps} but a run had another length; the schedule (and EOC's trend) "
                    "assumes num_steps. Set it to the sampler's number of steps."
                )
        out["warnings"] = warn
        return out


SUMS_ZERO_CHANGE = ((0.0, 1.0),)  # a constant indicator: ratio 0, so only the schedule decides
