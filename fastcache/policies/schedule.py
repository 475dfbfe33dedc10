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
import math
from typing import Any, ClassVar

import numpy as np
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
FIT_K = 9  # the device order table's code of a fitted step ("F"; Taylor orders are 0-4)


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
    ``profile``'s prior and ``c`` the last computed step (section 4, Eq. E4); ``"F"``
    forecasts it with fitted coefficients on the last computed steps' outputs, ``fit =
    {step: (a_c, a_c', a_c'')}`` newest computed step first (one tuple shared by every
    slot, or one tuple per slot), usually solved from the profile's step Gram by
    :func:`fastcache.search_schedule` (section 12, "Fitted filler"). Example, 10
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
    fit: Any = None

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
        _set(self, "fit", _check_fit(p, self.fit))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "kind": self.kind,
            "plan": self.plan,
            "profile": None if self.profile is None else self.profile.describe(),
            "eoc_weight": self.eoc_weight,
            "history": self.history,
        }
        if self.fit is not None:
            d["fit"] = fit_to_json(self.fit)
        return d

    def fit_at(self, step: int) -> tuple | None:
        """The fitted coefficients of step ``step`` (newest computed step first; one tuple,
        or one per slot), None where the step is not an ``F`` step."""
        return None if self.fit is None else dict(self.fit).get(step)

    def fit_points(self, step: int) -> int:
        """How many computed steps the fitted forecast of ``step`` combines (0: not fitted)."""
        co = self.fit_at(step)
        if co is None:
            return 0
        return len(co[0]) if isinstance(co[0], tuple) else len(co)

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def compute_steps(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.plan) if c == "C")

    @property
    def order(self) -> int:
        """The highest forecast order the plan uses (the history kept; a fitted step over
        n computed steps needs the orders up to n - 1)."""
        taylor = max((int(c) for c in self.plan if c not in "CEF"), default=0)
        return max([taylor] + [self.fit_points(s) - 1 for s, c in enumerate(self.plan) if c == "F"])

    @property
    def budget(self) -> int:
        return self.plan.count("C")

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        """Is step ``step`` computed? Past the plan's end: yes."""
        return step >= len(self.plan) or self.plan[step] == "C"

    def order_at(self, step: int) -> int:
        """The forecast order of a cached step (0 for computed, EOC-corrected, fitted and past-the-end steps)."""
        return 0 if self.computes(step) or self.plan[step] in "EF" else int(self.plan[step])

    def fits(self, step: int) -> bool:
        """Is step ``step`` a fitted forecast?"""
        return step < len(self.plan) and self.plan[step] == "F"

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


def _check_fit(plan: str, fit) -> tuple | None:
    """``fit`` as a sorted tuple of (step, coefficients), checked against ``plan``: every
    ``F`` step has 1..min(3, computed steps before it) finite coefficients (one tuple, or
    one per slot, all of one length), and no other step has any."""
    where = "ScheduleConfig.fit"
    steps = [s for s, c in enumerate(plan) if c == "F"]
    if fit is None:
        if steps:
            raise ValueError(
                f"plan holds 'F' (fitted forecast) at steps {steps[:5]} but {where} is None; give the coefficients, "
                "e.g. from fastcache.search_schedule(..., methods=(..., 'fit')) or profile.schedule(budget)"
            )
        return None
    items = fit.items() if isinstance(fit, dict) else fit
    out = {}
    try:
        for s, co in items:
            s = int(s)
            if isinstance(co, (int, float)) or not len(co):
                raise TypeError
            if isinstance(co[0], (list, tuple)):
                co = tuple(tuple(float(v) for v in row) for row in co)
                lens = {len(r) for r in co}
            else:
                co = tuple(float(v) for v in co)
                lens = {len(co)}
            out[s] = (co, lens)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where} must map each 'F' step to its coefficients (a sequence of floats, or one per slot), got "
            f"{fit!r:.200}"
        ) from None
    extra = sorted(set(out) - set(steps))
    if extra:
        raise ValueError(
            f"{where} gives coefficients for steps {extra[:5]} that the plan does not fit ('F'); plan {plan!r}"
        )
    missing = [s for s in steps if s not in out]
    if missing:
        raise ValueError(f"{where} has no coefficients for the plan's 'F' steps {missing[:5]}; plan {plan!r}")
    res = []
    for s in steps:
        co, lens = out[s]
        have = plan[:s].count("C")
        flat = [v for r in co for v in (r if isinstance(r, tuple) else (r,))]
        if len(lens) != 1 or not 1 <= next(iter(lens)) <= min(3, have):
            raise ValueError(
                f"{where}[{s}] must hold 1..{min(3, have)} coefficients (the computed steps before step {s}, at most "
                f"3), the same number for every slot; got {co!r:.200}"
            )
        if not all(math.isfinite(v) for v in flat):
            raise ValueError(f"{where}[{s}] holds a non-finite coefficient: {co!r:.200}; solve the fit again")
        res.append((s, co))
    return tuple(res)


def fit_to_json(fit) -> dict[str, list]:
    """``ScheduleConfig.fit`` as JSON (``{"step": coefficients}``), as stored in a profile."""
    return {str(s): [list(r) for r in co] if isinstance(co[0], tuple) else list(co) for s, co in fit}


def fit_history_weights(config: ScheduleConfig, slots: int, rows: int | None = None) -> np.ndarray:
    """``(S, slots, rows)`` fp32: for every ``F`` step, the weights of the Taylor history's
    rows (``D^0 .. D^{rows-1}`` at the last computed step, as :func:`fastcache.ops.taylor_update`
    keeps them along the plan) whose combination (:func:`fastcache.ops.history_combine`)
    is the fitted combination of the computed steps' outputs; zeros elsewhere. Solved on
    the host by replaying the update on unit vectors (the same arithmetic as the op, in
    fp64), so the change of basis follows the plan's step gaps exactly."""
    plan = config.plan
    R = config.order + 1 if rows is None else int(rows)
    S = len(plan)
    out = np.zeros((S, slots, R), dtype=np.float32)
    T = np.zeros((R, 0))  # history rows as combinations of the computed steps' outputs
    valid, last = 0, None
    for s, c in enumerate(plan):
        if c == "C":
            n = T.shape[1] + 1
            T = np.concatenate([T, np.zeros((R, 1))], axis=1)
            d = np.zeros(n)
            d[-1] = 1.0
            v = 0 if s == 0 else valid
            dx = float(s - last) if last is not None else 1.0
            for k in range(R):
                old = T[k].copy()
                T[k] = d
                if k < R - 1:
                    d = (d - old) / dx if k < v else np.zeros(n)
            valid, last = min(v + 1, R), s
            continue
        if c != "F":
            continue
        co = config.fit_at(s)
        per_slot = isinstance(co[0], tuple)
        if per_slot and len(co) != slots:
            raise ValueError(
                f"ScheduleConfig.fit[{s}] holds coefficients for {len(co)} slots but the model has {slots}; solve the "
                "fit for this model (fastcache.search_schedule with its profile)"
            )
        for i in range(slots):
            a_new = co[i] if per_slot else co
            p = len(a_new)
            a = np.zeros(T.shape[1])
            a[T.shape[1] - p :] = a_new[::-1]  # newest first -> oldest first
            w, *_ = np.linalg.lstsq(T[:p].T, a, rcond=None)
            if not np.allclose(w @ T[:p], a, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(a).max()))):
                raise ValueError(
                    f"ScheduleConfig: the fitted step {s} combines {p} computed steps but the Taylor history holds "
                    f"fewer valid orders there; plan {plan!r}"
                )
            out[s, i, :p] = w
    return out


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
        self.forced = {"fresh_buffers": 0, "short_history": 0, "fit_history": 0}
        self.plan_fit = False  # the announced step is a fitted forecast ("F")
        self.host_comp: list[int] = []  # the last computed steps since step 0 or fresh buffers (host)
        self.timestep: torch.Tensor | None = None
        self.ts_rec: torch.Tensor | None = None


@register_policy(ScheduleConfig)
class SchedulePolicy(TaylorSeerPolicy):
    """Runs a :class:`fastcache.ScheduleConfig`; see the module docstring."""

    def __init__(self, config: ScheduleConfig, spec, model):
        super().__init__(config, spec, model)  # self.order = config.order: the history kept
        S = config.num_steps
        self.orders_used = sorted({config.order_at(s) for s in range(S) if not (config.computes(s) or config.fits(s))})
        # fitted steps ("F"): per step, the weights of the history's rows (host-solved, fp32)
        self.fitted = "F" in config.plan
        self._fit: dict[torch.device, torch.Tensor] = {}
        self._plan_comp = [[i for i in range(s) if config.plan[i] == "C"][-3:] for s in range(S + 1)]
        if self.fitted:
            self._fit_host = torch.from_numpy(fit_history_weights(config, self.K, self.order + 1))
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
            if self.fitted:
                self._device_fit(p.device)
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
        st.host_comp = []
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
        fit_p = self.config.fit_points(s)
        need = fit_p if fit_p else self.config.order_at(s) + 1
        if not compute and st.host_valid < min(need, self._computed_before[s]):
            # the history holds fewer computed steps than the plan's would here (fresh
            # buffers earlier in the run): the planned forecast cannot be made, so compute
            compute = True
            st.forced["short_history"] += 1
        if not compute and fit_p and st.host_comp[-fit_p:] != self._plan_comp[s][-fit_p:]:
            # the fitted weights were solved for the plan's computed steps; the history
            # holds others (fresh buffers moved them): compute rather than mis-weight
            compute = True
            st.forced["fit_history"] += 1
        if compute:
            st.host_valid = 1 if s == 0 else min(st.host_valid + 1, self.order + 1)
            st.host_comp = [s] if s == 0 else (st.host_comp + [s])[-3:]
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
        st.plan_fit = self.config.fits(s) and not compute
        st.plan_k.fill_(FIT_K if st.plan_fit else st.plan_order)
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
            cache = self._forecast_order(st, st.plan_dx, st.plan_k, st.plan_trend if self.eoc else None, st.plan_s_dev)
        elif st.plan_fit:  # eager, a fitted step: the host-solved weights of this step
            w = self._device_fit(st.plan_dx.device)[st.plan_s]
            cache = [ops.history_combine(h, w[i]) for i, h in enumerate(st.hist)]
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
        st.host_comp = [s]

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
            rows = [FIT_K if self.config.fits(s) else self.config.order_at(s) for s in range(self.config.num_steps)]
            o = self._orders[dev] = torch.tensor(rows + [0], dtype=torch.long, device=dev)
        return o

    def _device_fit(self, dev) -> torch.Tensor:
        """(S+1, K, rows) fp32: the history weights of every fitted step (zeros elsewhere)."""
        w = self._fit.get(dev)
        if w is None:
            host = self._fit_host
            w = self._fit[dev] = torch.cat([host, torch.zeros_like(host[:1])]).to(dev)
        return w

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
        return self._forecast_order(st, dx, table.index_select(0, s_raw), trend, s_raw)

    def _forecast_order(
        self,
        st: ScheduleState,
        dx: torch.Tensor,
        k_now: torch.Tensor,
        trend: torch.Tensor | None = None,
        s_idx: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Every slot's forecast with the order ``k_now`` ((1,) long, on the device): one
        forecast per order the plan uses, selected with ``torch.where`` (``FIT_K``: the
        fitted combination with step ``s_idx``'s weights); then, with ``trend`` ((K, ...)
        fp32, zero rows = no correction), EOC's ``f * (1 + w T)``."""
        out = []
        w = None
        if self.fitted:
            table = self._device_fit(dx.device)
            w = table.index_select(0, s_idx.reshape(1).clamp(max=table.shape[0] - 1))[0]
        for i, h in enumerate(st.hist):
            f = ops.taylor_forecast(h[: self.orders_used[-1] + 1 if self.orders_used else 1], dx)
            for k in self.orders_used[:-1]:
                f = torch.where(k_now == k, ops.taylor_forecast(h[: k + 1], dx), f)
            if w is not None:
                f = torch.where(k_now == FIT_K, ops.history_combine(h, w[i]), f)
            out.append(f)
        return out if trend is None else self._correct(out, trend)

    def _correct(self, fs: list[torch.Tensor], trend: torch.Tensor) -> list[torch.Tensor]:
        """EOC's Eq. E4 on every slot: ``f * (1 + w T)`` (a zero row leaves ``f`` as it is)."""
        return [(f * (1.0 + self.eoc_weight * t)).to(f.dtype) for f, t in zip(fs, trend)]

    def state_stats(self, st: ScheduleState) -> dict:
        out = super().state_stats(st)
        out["plan"] = self.config.plan
        if any(st.forced.values()):
            # "fit_history" only applies to a plan with fitted steps
            out["forced_computes"] = {k: v for k, v in st.forced.items() if k != "fit_history" or self.fitted}
            out["forced_computes_note"] = (
                "planned forecast steps that computed instead: 'fresh_buffers' = the inputs changed shape, batch, "
                "dtype or device within the run (nothing cached fits), 'short_history' = fewer computed steps in "
                "the history since then than the planned order needs, 'fit_history' = a fitted step ('F') whose "
                "history holds other computed steps than the plan's (its weights were solved for those)"
            )
        if self.eoc:
            n, msg = self.watch.report(st.ts_rec)
            if n:
                out["profile_timestep_mismatches"] = n
                out.setdefault("warnings", []).append(msg)
        return out
