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
  :func:`~fastcache.policies.stack_engine.residual_cond`), the table a constant device tensor,
  so nothing recompiles across steps.

Computed step: the stack runs and ``R <- out - in`` per cached stream (stored unless the
call repeats the previous timestep); skipped step: ``out = in + R`` (as TeaCache, T8).
A step beyond the schedule (a longer run than ``num_steps``) is computed and flagged in
``stats``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_float, _check_int, _set, config_type, nearest_interp
from ..ops.reference import PREV_T, STEP
from ..tracing import static_floats
from ..tuning.profile import load_profile
from .base import Policy, StackRunner, StepInfo, is_tracing, register_policy
from .stack_engine import DecisionState, skipped_stack, store_residuals, traced_stack
from .steps import timestep_guard


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache (Ma et al., arXiv 2506.09045; docs/methods.md section 9): skip the whole
    block stack and reuse its residual (as TeaCache) while the error accumulated from the
    calibrated magnitude-ratio curve gamma stays small. Per step s >= the retention steps
    (M2-M3, diffusers' ``MagCacheConfig`` hook exactly)::

        rho <- rho * gamma_s ;  k <- k + 1 ;  eps <- eps + |1 - rho|
        skip iff s > 0 and eps <= threshold and k <= max_skips, else compute and rho, eps, k <- 1, 0, 0

    The decision uses gamma only, never the current data, so the schedule is computed on
    the host once (:meth:`schedule`): with a host step index no device value is read.

    Args:
        threshold: on the accumulated error eps (diffusers 0.06; Wan2.1 1.3B 0.12). ``0``
            disables skipping (every step computed, bitwise the unpatched model; diffusers
            would still skip where gamma is exactly 1).
        max_skips: K, the most consecutive skipped steps (diffusers ``max_skip_steps`` 3;
            0 = never skip).
        retention_ratio: r; the first ``int(r * num_steps + 0.5)`` steps are always computed
            (diffusers 0.2).
        retention_steps: that number of steps directly (overrides ``retention_ratio``).
        num_steps: steps per run the schedule is made for; default the length of the curve.
            A curve of another length is resampled by nearest index (as diffusers does).
            ``handle.set_num_steps`` / a pipeline's ``num_inference_steps`` re-resample it.
        mag_ratios: gamma per step, gamma_0 first (e.g. diffusers' ``FLUX_MAG_RATIOS``), or
        profile: a :class:`fastcache.Profile` (or its path) whose ``mag_ratios`` curve
            :func:`fastcache.calibrate` recorded. Exactly one of the two.
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "magcache"

    threshold: float = 0.06
    max_skips: int = 3
    retention_ratio: float = 0.2
    retention_steps: int | None = None
    num_steps: int | None = None
    mag_ratios: tuple[float, ...] | None = None
    profile: Any = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        _set(self, "max_skips", _check_int("max_skips", self.max_skips, 0, " (0 = never skip)"))
        r = _check_float("retention_ratio", self.retention_ratio, 0, " and <= 1")
        if r > 1:
            raise ValueError(f"retention_ratio must be a finite number >= 0 and <= 1, got {self.retention_ratio!r}")
        _set(self, "retention_ratio", r)
        if self.retention_steps is not None:
            _set(self, "retention_steps", _check_int("retention_steps", self.retention_steps, 0, " or None"))
        if (self.mag_ratios is None) == (self.profile is None):
            raise ValueError(
                "MagCacheConfig needs exactly one of mag_ratios (a gamma per step) and profile (a fastcache.Profile "
                "from fastcache.calibrate(model, run)); got " + ("both" if self.mag_ratios is not None else "neither")
            )
        if self.profile is not None:
            prof = load_profile(self.profile, "MagCacheConfig")
            _set(self, "profile", prof)
            curve = prof.require("mag_ratios", "MagCacheConfig").tolist()  # host-read-ok: config construction
        else:
            curve = self.mag_ratios
            if hasattr(curve, "tolist"):
                curve = curve.tolist()  # host-read-ok: a config argument, not the step path
            if isinstance(curve, (str, bytes)) or not hasattr(curve, "__iter__"):
                raise ValueError(f"mag_ratios must be a sequence of positive numbers, got {self.mag_ratios!r}")
            curve = list(curve)
        ok = all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) and c > 0 for c in curve)
        if not curve or not ok:
            raise ValueError(f"mag_ratios must hold one finite number > 0 per step, got {curve!r}")
        _set(self, "mag_ratios", tuple(float(c) for c in curve))
        n = len(curve) if self.num_steps is None else self.num_steps
        _set(self, "num_steps", _check_int("num_steps", n, 1, " or None (the curve's length)"))
        _set(self, "history", _check_int("history", self.history, 1))

    def retention(self, num_steps: int | None = None) -> int:
        """Leading steps always computed (M4): ``retention_steps`` or ``int(r * S + 0.5)``."""
        n = self.num_steps if num_steps is None else num_steps
        return self.retention_steps if self.retention_steps is not None else int(self.retention_ratio * n + 0.5)

    def ratios(self, num_steps: int | None = None) -> tuple[float, ...]:
        """gamma resampled to ``num_steps`` (default the config's) by nearest index."""
        return nearest_interp(self.mag_ratios, self.num_steps if num_steps is None else num_steps)

    def schedule(self, num_steps: int | None = None) -> tuple[bool, ...]:
        """The host schedule, True = compute, one entry per step (M2-M4). The arithmetic is
        diffusers' own: fp32 tensor scalars for rho and eps, the comparison in fp32, so the
        decisions are the same bit for bit."""
        import torch

        n = self.num_steps if num_steps is None else num_steps
        g = torch.tensor(self.ratios(n), dtype=torch.float32)
        keep = self.retention(n)
        out: list[bool] = []
        rho, eps, k = 1.0, 0.0, 0
        for s in range(n):
            if s < keep or self.threshold == 0:
                out.append(True)
                continue
            rho = rho * g[s]
            k += 1
            eps = eps + abs(1.0 - rho)
            if s > 0 and bool(eps <= self.threshold) and k <= self.max_skips:  # host-read-ok: config time, CPU
                out.append(False)
            else:
                out.append(True)
                rho, eps, k = 1.0, 0.0, 0
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kind"] = self.kind
        d["mag_ratios"] = list(self.mag_ratios)
        d["profile"] = None if self.profile is None else self.profile.describe()
        return d


# --- Block Caching ---


# --------------------------------------------------------------------------- policy
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
    @static_floats
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
