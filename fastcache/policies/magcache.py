"""MagCache on a static, host-computed schedule (Ma et al., arXiv 2506.09045;
docs/methods.md section 9).

The decision (M2-M4) depends only on the calibrated magnitude-ratio curve gamma
(:func:`fastcache.calibrate` records it in the :class:`fastcache.Profile`, or pass
diffusers-style ``mag_ratios``), never on the current data. So the whole schedule,
True = compute, is computed once on the host (:meth:`fastcache.MagCacheConfig.schedule`,
diffusers' arithmetic) and the policy only has to know where it is in the run:

* eager, step index given by the caller (the pipeline's ``cache_context(name,
  step_index=i)`` or ``fastcache.context(model, name, step_index=i)``): the host
  schedule; no device value is read;
* otherwise the step index is the device's: :func:`~fastcache.policies.steps.timestep_guard`
  (jitter, repeated timesteps, run starts) and the fused decision op count the steps, and
  the schedule is a device table the decision op reads by that index (the row's
  "distance" is 1 for a computed step, 0 for a skipped one, against a threshold of 0.5
  without accumulation: the op's own timeline, counters and repeated-call ``hold`` then
  apply unchanged). Eager reads that one flag per step; under ``torch.compile`` /
  CUDA-graph capture the skip is one ``torch.cond`` (TeaCache's functional
  :func:`~fastcache.policies.steps.residual_cond`), the table a constant device tensor,
  so nothing recompiles across steps.

Computed step: the stack runs and ``R <- out - in`` per cached stream (stored unless the
call repeats the previous timestep); skipped step: ``out = in + R`` (as TeaCache, T8).
A step beyond the schedule (a longer run than ``num_steps``) is computed and flagged in
``stats``.
"""

from __future__ import annotations

import torch

from .. import ops
from ..config import MagCacheConfig
from ..ops.reference import PREV_T, STEP
from .base import Policy, StackRunner, StepInfo, is_tracing, register_policy
from .steps import DecisionState, skipped_stack, store_residuals, timestep_guard, traced_stack


class MagCacheState(DecisionState):
    """One cache context: ``residuals`` the stack residual per cached stream; ``force`` a
    ``(1, 2)`` row added to the schedule row (1 after :meth:`MagCachePolicy.invalidate`:
    the next device decision computes); host-placed steps are recorded on the host."""

    def __init__(self, history: int):
        super().__init__(history)
        self.force: torch.Tensor | None = None
        self.step: StepInfo | None = None
        self.filled = False  # host path: a residual has been stored for this signature
        self.host_timeline: list[bool] = []
        self.host_steps = 0  # steps placed on the host since the last reset
        self.beyond = 0  # host-placed steps past the schedule (computed)

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.force is None else self.force.numel() * self.force.element_size())


@register_policy(MagCacheConfig)
class MagCachePolicy(Policy):
    decides_from_data = False  # a schedule fixed by the profile: identical on every rank of a process group

    def __init__(self, config: MagCacheConfig, spec, model):
        super().__init__(config, spec, model)
        if config.profile is not None:
            config.profile.check_fits(model, uses_prior=False, method="MagCacheConfig")
        self._set_schedule(config.num_steps)

    def _set_schedule(self, n: int) -> None:
        self.S = n
        self.num_steps = n
        self.schedule = self.config.schedule(n)
        self._tables: dict[torch.device, torch.Tensor] = {}

    def set_num_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps != self.S:
            self._set_schedule(num_steps)  # gamma resampled to the new length, as diffusers does

    def _table(self, dev: torch.device) -> torch.Tensor:
        """``(S + 1, 1, 2)`` fp32 decision-op sums per step: ``(1, 1)`` compute, ``(0, 1)``
        skip; row S (any step past the schedule) computes."""
        t = self._tables.get(dev)
        if t is None:
            rows = [(1.0 if c else 0.0, 1.0) for c in self.schedule] + [(1.0, 1.0)]
            t = self._tables[dev] = torch.tensor(rows, dtype=torch.float32, device=dev).reshape(-1, 1, 2)
        return t

    # -- state --------------------------------------------------------------------------
    def new_state(self) -> MagCacheState:
        return MagCacheState(self.config.history)

    def _ensure(self, st: MagCacheState, streams: dict) -> None:
        if st.ensure({n: streams[n] for n in self.spec.cached_streams}):
            st.force = torch.zeros(1, 2, dtype=torch.float32, device=st.state.device)
            st.filled = False

    def begin_step(self, st: MagCacheState, timestep, step: StepInfo) -> None:
        st.step = step
        n = step.run_steps or step.num_steps
        if n and n != self.S and not is_tracing():
            self._set_schedule(n)  # the pipeline's num_inference_steps (announced or given)
        st.num_steps = self.S

    def reset_state(self, st: MagCacheState) -> None:
        st.reset()
        st.filled = False
        st.host_timeline, st.host_steps, st.beyond = [], 0, 0
        if st.force is not None:
            st.force.zero_()

    def invalidate(self, st: MagCacheState) -> None:
        # The next decision computes (and stores afresh): a device write, no read.
        st.filled = False
        if st.force is not None:
            st.force[0, 0] = 1.0

    # -- the step -----------------------------------------------------------------------
    def run_stack(self, st: MagCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        streams = {n: call[n] for n in spec.streams}
        self._ensure(st, streams)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, self.S)
        # This call's step within the run, on the device: the decision op starts a new run
        # when t_op rises above the previous timestep.
        idx = torch.where(t_op > st.state[PREV_T : PREV_T + 1], 0.0, st.state[STEP : STEP + 1])
        idx = idx.clamp(max=self.S).to(torch.long)
        sums = self._table(t_op.device).index_select(0, idx)[0] + st.force
        flag = ops.cache_decision(sums, t_op, st.coeffs, st.state, 0.5, 1, 0, 0, hold=rep, accumulate=False)
        st.force.zero_()
        store = flag & ~rep
        residuals = {n: st.residuals[n] for n in spec.cached_streams}

        if is_tracing():
            return traced_stack(runner, call, streams, spec, flag, store, residuals)

        s = st.step.index if st.step is not None else None
        if s is not None:  # the host schedule: no device read
            compute = s >= self.S or self.schedule[s] or not st.filled
            store = ~rep  # the host decided: store on every computed step but a repeated call
            if s == 0:
                st.host_timeline = []
            st.host_timeline.append(compute)
            st.host_steps += 1
            st.beyond += s >= self.S
        else:
            compute = bool(flag.item())  # host-read-ok: the single eager decision read per step
        if compute:
            result = runner.run(call, streams)
            store_residuals(result, streams, residuals, store)
            st.filled = True
            return result
        return skipped_stack(st, streams, residuals)

    # -- stats --------------------------------------------------------------------------
    def state_stats(self, st: MagCacheState) -> dict:
        """The device decision state's counters (TeaCache's, per run); for host-placed
        steps the timeline, computed and skipped counts of the current run as placed on
        the host. ``schedule``: the host schedule for ``num_steps``."""
        out = st.stats(repeat_hint=".")
        out.pop("rel_l1", None)  # the op's "distance" here is only the schedule row
        out["warnings"] = [
            w.replace("the forced last step is misplaced", f"the schedule was made for {self.S} steps")
            for w in out.get("warnings", [])
        ]
        out["schedule"] = list(self.schedule)
        out["num_steps"] = self.S
        if st.host_steps:
            tl = list(st.host_timeline)
            out.update(timeline=tl, computed=sum(tl), skipped=len(tl) - sum(tl), steps=len(tl))
            out["host_placed_steps"] = st.host_steps
            if st.beyond:
                out.setdefault("warnings", []).append(
                    f"{st.beyond} step(s) had a step index beyond the schedule's {self.S} steps and were computed; "
                    "set num_steps to the sampler's number of steps"
                )
        return out
