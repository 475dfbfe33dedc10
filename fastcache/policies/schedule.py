"""A searched static schedule on TaylorSeer's machinery (docs/methods.md section 12).

:class:`fastcache.ScheduleConfig` names, for every step of the run, whether the blocks run
(``"C"``) or which Taylor order fills the step from the cached branch outputs (``"0"``
reuse, ``"1"``, ``"2"``, ...). The history is kept to the plan's highest order; a step
forecast with a lower order uses the leading rows of the same history (the lower
finite differences do not depend on the higher ones), so every order of the plan shares
one history and one :func:`fastcache.ops.taylor_update` per computed step.

Where the step is decided (nothing here reads a value the model computed):

* the caller announces the step (``fastcache.context(model, name, step_index=i)`` or
  ``cache_context(name, step_index=i)``): :meth:`SchedulePolicy.plan_step` decides it on
  the host at context entry and writes the step's ``dx``, order and flags into small
  device tensors; the call branches on a Python bool. Eager: 0 reads. torch.compile
  (any backend, fullgraph): the bool is a guard, so there are two graphs — compute and
  forecast — with no cond, no graph break and no host read; inductor's CUDA graphs
  (``mode="reduce-overhead"``) are not disabled by a cond because there is none;
* otherwise the device step counter indexes two device tables, the compute mask and the
  per-step order (TaylorSeer's explicit-schedule path): eager reads the one flag per
  step; under torch.compile one cond per step (1 read under inductor, a conditional node
  under CUDA-graph capture); the forecast of each order the plan uses is computed before
  the cond and the step's order is selected with ``torch.where``.

Past the plan's end every step is computed (never forecast from a schedule that did not
plan it); a run announcing another step count is refused.

Inputs that change shape, batch, dtype or device within an announced run get fresh
buffers: that call computes (nothing cached fits it) and the plan continues from there. A
later forecast whose planned order needs more computed steps than the history holds since
then (``min(order + 1, the plan's computed steps so far)``) computes too, so nothing stale
or short is ever forecast from; ``stats`` counts both (``forced_computes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .. import ops
from ..config import SCHEDULE_CODES, CacheConfig, _check_float, _check_int, _set, config_type
from ..interior import run_blocks
from ..ops.reference import STEP
from ..tuning.profile import TimestepWatch
from .base import StepInfo, is_tracing, register_policy
from .interior_engine import TraceExecutor
from .taylorseer import TaylorSeerPolicy, TaylorState

# --------------------------------------------------------------------------- config


@config_type
@dataclasses.dataclass(frozen=True)
class ScheduleConfig(CacheConfig):
    """A static per-step schedule (docs/methods.md section 12), usually found by
    :func:`fastcache.search_schedule`: which steps run the blocks, and how each other step
    is filled from the cached branch outputs (TaylorSeer's forecast, section 8, with a
    per-step order; order 0 is FORA's reuse).

    ``plan`` has one character per step of the run: ``"C"`` computes the step; a digit
    ``k`` forecasts it with the Taylor series to order ``k`` from the history of the last
    computed steps (``"0"`` = reuse the last computed step's outputs); ``"E"`` reuses them
    corrected by EOC's trend, ``f * (1 + eoc_weight * (P[s] - P[c]))`` with ``P`` the
    ``profile``'s prior and ``c`` the last computed step (section 4, Eq. E4). Example, 10
    steps, 4 computed: ``"CC11C1E2C1"``.

    The run length is ``len(plan)``; a pipeline announcing another step count is refused,
    and steps past the plan's end are computed. The schedule never reads the model's
    values: with the step index given by the caller (``cache_context(name,
    step_index=i)`` / ``fastcache.context(model, name, step_index=i)``) nothing is read to
    the host in eager mode or under torch.compile (see the policy's docstring).

    Memory: ``(max order + 1) x`` the branch outputs of one step (every slot), per cache
    context, as TaylorSeer.
    """

    kind: ClassVar[str] = "schedule"

    plan: str = ""
    profile: Any = None
    eoc_weight: float = 1.0
    history: int = 1024

    def __post_init__(self) -> None:
        from ..tuning.profile import Profile

        p = self.plan
        if not isinstance(p, str) or not p:
            raise ValueError(
                f"plan must be a non-empty string, one character per step ('C' computed, '0'-'4' forecast order), "
                f"got {p!r}"
            )
        p = p.upper()
        bad = sorted({c for c in p if c not in SCHEDULE_CODES})
        if bad:
            raise ValueError(
                f"plan holds {''.join(bad)!r}; use 'C' for a computed step, a digit 0-4 for the forecast order "
                f"of a cached step (0 = reuse) and 'E' for an EOC-corrected reuse, got {self.plan!r}"
            )
        if p[0] != "C":
            raise ValueError(f"plan must start with 'C': step 0 has nothing cached, got {self.plan!r}")
        _set(self, "plan", p)
        _set(self, "history", _check_int("history", self.history, 1))
        _set(self, "eoc_weight", _check_float("eoc_weight", self.eoc_weight, 0))
        prof = self.profile
        if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
            prof = Profile.load(prof)
        if prof is not None and not isinstance(prof, Profile):
            raise ValueError(
                f"ScheduleConfig.profile must be a fastcache.Profile or a path to one, got {type(prof).__name__}"
            )
        if "E" in p:
            if prof is None:
                raise ValueError(
                    "plan holds 'E' (EOC-corrected reuse): give the model's profile, ScheduleConfig(plan=..., "
                    "profile=fastcache.calibrate(model, run)), whose prior gives the trend"
                )
            if prof.num_steps != len(p):
                raise ValueError(
                    f"ScheduleConfig: the plan has {len(p)} steps but the profile was recorded over "
                    f"{prof.num_steps}-step runs; calibrate with {len(p)}-step runs"
                )
        _set(self, "profile", prof)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "plan": self.plan,
            "profile": None if self.profile is None else self.profile.describe(),
            "eoc_weight": self.eoc_weight,
            "history": self.history,
        }

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def compute_steps(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.plan) if c == "C")

    @property
    def order(self) -> int:
        """The highest forecast order the plan uses (the history kept)."""
        return max((int(c) for c in self.plan if c not in "CE"), default=0)

    @property
    def budget(self) -> int:
        return self.plan.count("C")

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        """Is step ``step`` computed? Past the plan's end: yes."""
        return step >= len(self.plan) or self.plan[step] == "C"

    def order_at(self, step: int) -> int:
        """The forecast order of a cached step (0 for computed, EOC-corrected and past-the-end steps)."""
        return 0 if self.computes(step) or self.plan[step] == "E" else int(self.plan[step])

    def corrects(self, step: int) -> bool:
        """Is step ``step`` an EOC-corrected reuse?"""
        return step < len(self.plan) and self.plan[step] == "E"

    @classmethod
    def from_steps(cls, compute_steps, num_steps: int, order: int = 1, **kw) -> ScheduleConfig:
        """A plan computing ``compute_steps`` (must hold 0) and forecasting every other step
        of ``num_steps`` with ``order`` (e.g. a fixed-interval TaylorSeer or FORA schedule)."""
        n = _check_int("num_steps", num_steps, 1)
        o = _check_int("order", order, 0)
        cs = {int(s) for s in compute_steps}
        if any(s < 0 or s >= n for s in cs):
            raise ValueError(f"compute_steps {sorted(cs)} must lie in [0, {n})")
        if o > 4:
            raise ValueError(f"order must be <= 4, got {o}")
        return cls(plan="".join("C" if s in cs else str(o) for s in range(n)), **kw)


# --------------------------------------------------------------------------- policy
class ScheduleState(TaylorState):
    def __init__(self, history: int):
        super().__init__(history)
        # a step announced by the caller (plan_step): the host's decision, and the device
        # values the step needs (written by the host; never read back)
        self.planned: bool | None = None
        self.plan_dx: torch.Tensor | None = None  # (1,) fp32: steps since the last computed step
        self.plan_first: torch.Tensor | None = None  # (1,) bool: step 0 of a run
        self.plan_k: torch.Tensor | None = None  # (1,) long: the forecast order
        self.plan_store: torch.Tensor | None = None  # () bool: a computed step updates the history once
        self.plan_trend: torch.Tensor | None = None  # (K, ...) EOC trend of the step (zeros: none)
        self.plan_rows: torch.Tensor | None = None  # (2, 5) fp32: the counts row of a forecast / computed step
        self.plan_order = 0  # the same order and correction on the host, for eager calls
        self.plan_corrects = False
        self.plan_s = 0  # the announced step (host) and, for the timestep watch, on the device
        self.plan_s_dev: torch.Tensor | None = None
        self.host_valid = 0  # computed steps in the history since step 0 or fresh buffers (capped)
        # announced forecast steps computed instead: fresh buffers (the inputs changed shape,
        # batch, dtype or device within the run) / a history too short for the planned order
        self.forced = {"fresh_buffers": 0, "short_history": 0}
        self.timestep: torch.Tensor | None = None
        self.ts_rec: torch.Tensor | None = None


@register_policy(ScheduleConfig)
class SchedulePolicy(TaylorSeerPolicy):
    """Runs a :class:`fastcache.ScheduleConfig`; see the module docstring."""

    def __init__(self, config: ScheduleConfig, spec, model):
        super().__init__(config, spec, model)  # self.order = config.order: the history kept
        S = config.num_steps
        self.orders_used = sorted({config.order_at(s) for s in range(S) if not config.computes(s)})
        self._orders: dict[torch.device, torch.Tensor] = {}
        # EOC-corrected steps ("E"): the profile's prior P (S, K, D) gives the trend
        self.eoc = "E" in config.plan
        self.eoc_weight = float(config.eoc_weight)
        self._prior: dict[torch.device, tuple] = {}
        # the plan's computed steps before each step: what an uninterrupted run's history holds
        self._computed_before = [config.plan[:s].count("C") for s in range(S + 1)]
        self.method = "ScheduleConfig (plan steps 'E')"
        if self.eoc:
            config.profile.check_fits(model, slots=self.layout.describe(), num_steps=S, method=self.method)
            self.watch = TimestepWatch(config.profile, self.method)
        # the device tables for the model's device now, not lazily inside a traced call
        # (a table created there is a dict miss dynamo guards on: one recompilation more)
        p = next(iter(model.parameters()), None)
        if p is not None:
            self._device_mask(p.device)
            self._device_orders(p.device)
            if self.eoc:
                self._device_prior(p.device)

    def new_state(self) -> ScheduleState:
        return ScheduleState(self.config.history)

    def _check_steps(self, n: int | None) -> None:
        if n and n != self.config.num_steps:
            raise ValueError(
                f"fastcache: the schedule plans {self.config.num_steps} steps but the run has {n}; search a "
                f"schedule for {n} steps (fastcache.search_schedule) or sample with {self.config.num_steps} steps"
            )

    def set_num_steps(self, num_steps: int | None) -> None:
        self._check_steps(num_steps)
        # the plan fixes the run length: the device tables stay valid (TaylorSeer's own
        # set_num_steps rebuilds its mask for the forced last step)
        super(TaylorSeerPolicy, self).set_num_steps(num_steps or self.config.num_steps)

    def reset_state(self, st: ScheduleState) -> None:
        super().reset_state(st)
        st.planned = None
        st.host_valid = 0
        st.forced = {k: 0 for k in st.forced}

    def begin_step(self, st: ScheduleState, timestep, step: StepInfo) -> None:
        self._check_steps(step.run_steps or step.num_steps)
        super().begin_step(st, timestep, step)
        st.timestep = timestep

    def allocate(self, st: ScheduleState, streams, dev) -> None:
        if self.eoc:  # the first call of these shapes, before any work: the prior must fit the streams
            self.config.profile.check_fits(streams=streams, method=self.method)
            if st.ts_rec is None or st.ts_rec.device != dev:
                st.ts_rec = self.watch.new_record(dev)
        super().allocate(st, streams, dev)

    # -- a step announced by the caller: planned on the host, no decision in the call ----
    def plan_step(self, st: ScheduleState, step: StepInfo | None) -> None:
        """Host side, outside any compiled region: decide the announced step and write
        what it needs into small device tensors (host -> device writes only). The call
        then branches on the Python bool ``st.planned``: under torch.compile that is a
        guard with two values — a compute graph and a forecast graph, no cond and no
        host read, every step reusing them (plus the first call's, which allocates)."""
        if step is None or step.index is None:
            st.planned = None
            return
        self._check_steps(step.run_steps or step.num_steps)
        s = step.index
        compute = self.config.computes(s) or st.hist is None  # nothing cached yet: compute
        if not compute and st.host_valid < min(self.config.order_at(s) + 1, self._computed_before[s]):
            # the history holds fewer computed steps than the plan's would here (fresh
            # buffers earlier in the run): the planned forecast cannot be made, so compute
            compute = True
            st.forced["short_history"] += 1
        if compute:
            st.host_valid = 1 if s == 0 else min(st.host_valid + 1, self.order + 1)
        dev = next(iter(self.model.parameters())).device if st.counts is None else st.counts.device
        if st.plan_dx is None or st.plan_dx.device != dev:
            st.plan_dx = torch.zeros(1, dtype=torch.float32, device=dev)
            st.plan_first = torch.zeros(1, dtype=torch.bool, device=dev)
            st.plan_k = torch.zeros(1, dtype=torch.long, device=dev)
            st.plan_store = torch.zeros((), dtype=torch.bool, device=dev)
            st.plan_s_dev = torch.zeros(1, dtype=torch.long, device=dev)
            # the step's counts row, indexed by the host bool in the call: no host data inside the
            # step (a torch.tensor(...) there is a blocking copy, refused under CUDA-graph capture)
            L = float(self.layout.num_blocks)
            st.plan_rows = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0, L]], device=dev)
        last = st.host_last[0] if st.host_last else 0
        st.plan_s = s
        st.plan_s_dev.fill_(s)
        st.plan_dx.fill_(float(s - last))
        st.plan_first.fill_(s == 0)
        st.plan_order = self.config.order_at(s)
        st.plan_corrects = self.config.corrects(s) and not compute
        st.plan_k.fill_(st.plan_order)
        st.plan_store.fill_(compute)
        if self.eoc:
            P = self._device_prior(dev)[0]
            if st.plan_trend is None or st.plan_trend.device != dev:
                st.plan_trend = torch.zeros_like(P[0])
            if st.plan_corrects:
                torch.sub(P[s], P[last], out=st.plan_trend)  # device ops outside any traced region; no read
            else:
                st.plan_trend.zero_()
        st.host_timeline.append(compute)
        if compute:
            st.host_last = [s] * self.K
        st.planned = compute

    def run_stack(self, st: ScheduleState, runner, head, call, timestep):
        if st.planned is None:
            return super().run_stack(st, runner, head, call, timestep)
        streams = {n: call.get(n) for n in self.spec.streams}
        sig = st.signature
        self._ensure(st, streams)
        if st.signature != sig:
            # Fresh buffers (the first call, or the inputs changed shape, batch, dtype or
            # device within the run): nothing cached fits this call, so it computes and the
            # plan continues from here (a Python branch: under torch.compile a new signature
            # is a new graph anyway). A planned forecast computed instead says so in stats.
            self._fresh(st)
        if self.eoc:  # the prior is indexed by step: the run's timesteps against the profile's (device ops)
            self.watch.observe(st.ts_rec, st.timestep, st.plan_s_dev)
        st.counts.add_(st.plan_rows[int(st.planned)])
        if st.planned:
            ex = TraceExecutor(self, True, None, None, 0.0)
            out = run_blocks(self.layout, call, dict(streams), ex)
            fs = [ex.outputs[i] for i in range(self.K)]
            if st.hist is None:
                self._alloc_hist(st, fs)
            # a second call inside the same announced step (e.g. a Heun corrector) computes
            # again but leaves the history as it is (plan_store cleared by the first)
            self._update(st, fs, st.plan_dx, st.plan_first, st.plan_store)
            st.plan_store.fill_(False)
            return out
        if st.hist is None:
            raise RuntimeError("fastcache: internal error, a planned forecast with nothing cached")
        if is_tracing():  # order and correction as device values: one graph for every forecast step
            cache = self._forecast_order(st, st.plan_dx, st.plan_k, st.plan_trend if self.eoc else None)
        else:  # eager: the host knows the step's order, so one forecast per slot
            k = st.plan_order
            if not st.plan_corrects:  # at the floor: one fused op per stream (interior_engine.forecast_run)
                return self.forecast_run(call, streams, self.hist_upto(st, k), st.plan_dx)
            cache = [ops.taylor_forecast(h[: k + 1], st.plan_dx) for h in st.hist]
            if st.plan_corrects:
                cache = self._correct(cache, st.plan_trend)
        return run_blocks(self.layout, call, dict(streams), TraceExecutor(self, False, cache, None, 0.0))

    def _fresh(self, st: ScheduleState) -> None:
        """After fresh buffers the announced step computes and starts the history again
        (host state and device flags written here; the call then branches on the bool)."""
        s = st.plan_s
        if not st.planned:
            st.forced["fresh_buffers"] += 1
            st.planned = True
            st.plan_corrects = False
            if st.host_timeline:
                st.host_timeline[-1] = True
        st.plan_store.fill_(True)  # the history is new: this step is its first entry
        st.plan_dx.fill_(1.0)  # unused: a fresh history has no order to difference
        st.host_last = [s] * self.K
        st.host_valid = 1

    def host_compute(self, step: StepInfo) -> bool:
        self._check_steps(step.run_steps or step.num_steps)
        return self.config.computes(step.index)

    # -- device tables --------------------------------------------------------------
    def _device_mask(self, dev) -> torch.Tensor:
        m = self._mask.get(dev)
        if m is None:
            flags = [self.config.computes(s) for s in range(self.config.num_steps)]
            m = self._mask[dev] = torch.tensor(flags + [True], dtype=torch.bool, device=dev)  # past the end: compute
        return m

    def _device_orders(self, dev) -> torch.Tensor:
        o = self._orders.get(dev)
        if o is None:
            rows = [self.config.order_at(s) for s in range(self.config.num_steps)]
            o = self._orders[dev] = torch.tensor(rows + [0], dtype=torch.long, device=dev)
        return o

    def _device_prior(self, dev):
        """(P (S, K, ...), EOC-step mask (S+1,) fp32, slot index (K,)) on ``dev``."""
        got = self._prior.get(dev)
        if got is None:
            P = self.config.profile.prior.to(dev)
            rows = [float(self.config.corrects(s)) for s in range(self.config.num_steps)]
            got = self._prior[dev] = (P, torch.tensor(rows + [0.0], device=dev), torch.arange(self.K, device=dev))
        return got

    def _forecast(self, st: ScheduleState, dx: torch.Tensor) -> list[torch.Tensor]:
        # device step (the decision op has counted this call): its order from the table
        table = self._device_orders(dx.device)
        s_raw = (st.state[STEP : STEP + 1] - 1).clamp(min=0, max=table.numel() - 1).to(torch.long)
        trend = None
        if self.eoc:  # EOC's trend from each slot's last computed step (as the EOC policy)
            P, is_e, ar = self._device_prior(dx.device)
            self.watch.observe(st.ts_rec, st.timestep, s_raw)
            s_c = s_raw.clamp(max=P.shape[0] - 1)
            T = P.index_select(0, s_c)[0] - P[st.last.clamp(max=P.shape[0] - 1), ar]
            trend = T * is_e.index_select(0, s_raw).reshape((1,) * T.dim())
        return self._forecast_order(st, dx, table.index_select(0, s_raw), trend)

    def _forecast_order(
        self, st: ScheduleState, dx: torch.Tensor, k_now: torch.Tensor, trend: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Every slot's forecast with the order ``k_now`` ((1,) long, on the device): one
        forecast per order the plan uses, selected with ``torch.where``; then, with
        ``trend`` ((K, ...) fp32, zero rows = no correction), EOC's ``f * (1 + w T)``."""
        out = []
        for h in st.hist:
            f = ops.taylor_forecast(h[: self.orders_used[-1] + 1 if self.orders_used else 1], dx)
            for k in self.orders_used[:-1]:
                f = torch.where(k_now == k, ops.taylor_forecast(h[: k + 1], dx), f)
            out.append(f)
        return out if trend is None else self._correct(out, trend)

    def _correct(self, fs: list[torch.Tensor], trend: torch.Tensor) -> list[torch.Tensor]:
        """EOC's Eq. E4 on every slot: ``f * (1 + w T)`` (a zero row leaves ``f`` as it is)."""
        return [(f * (1.0 + self.eoc_weight * t)).to(f.dtype) for f, t in zip(fs, trend)]

    def state_stats(self, st: ScheduleState) -> dict:
        out = super().state_stats(st)
        out["plan"] = self.config.plan
        if any(st.forced.values()):
            out["forced_computes"] = dict(st.forced)
            out["forced_computes_note"] = (
                "planned forecast steps that computed instead: 'fresh_buffers' = the inputs changed shape, batch, "
                "dtype or device within the run (nothing cached fits), 'short_history' = fewer computed steps in "
                "the history since then than the planned order needs"
            )
        if self.eoc:
            n, msg = self.watch.report(st.ts_rec)
            if n:
                out["profile_timestep_mismatches"] = n
                out.setdefault("warnings", []).append(msg)
        return out
