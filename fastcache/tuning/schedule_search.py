"""Budgeted schedule search: for K computed steps, where to compute and how to fill the rest.

A user says "I can afford K full steps" (or a speedup, K = ceil(S / speedup)) and gets the
static :class:`fastcache.ScheduleConfig` that does best on their model — found offline,
run with no decision at all (docs/methods.md section 12)::

    runs = [lambda k=k: sample(model, seed=k) for k in range(2)]   # each: one run -> tensor
    res = fastcache.search_schedule(model, runs, budget=17)
    print(res)                                  # timeline, calibration PSNR, cost
    fastcache.patch(model, res.config)          # e.g. ScheduleConfig(plan="CCC1C11C...")

How (two stages, both over the same calibration runs):

1. **Proxy, exact dynamic programming** (:mod:`fastcache.tuning.schedule_proxy`).
   :func:`fastcache.calibrate` records, per slot k
   (block, branch, stream), the Gram ``G_k[i, j] = <F_k(i), F_k(j)>`` of the uncached
   branch outputs at steps i and j. A forecast of step s with order m from the last
   computed steps ``(c'', c', c)`` is a linear combination ``sum_j a_j F(c_j)`` whose
   coefficients follow from TaylorSeer's update and forecast (the same finite
   differences the ops compute), so its error ``||sum_j a_j F_k(c_j) - F_k(s)||^2 /
   ||F_k(s)||^2`` is a quadratic form in ``G_k`` — every (history, step, order) costs
   O(1), with no model call. A dynamic program over the last three computed steps
   (state ``(c'', c', c)``, O(S^4) work, one pass for every budget at once) returns the
   placement and per-step order of least summed error for each K, exactly for this
   proxy. The proxy is teacher-forced (it forecasts the uncached features), so it
   ignores how an error early in the run moves the later steps.
2. **End-to-end refinement.** The proxy's plans (two weightings of the slots),
   TaylorSeer's fixed-interval placement and evenly spaced plans after other warm-up
   patterns (steps 0, 2 / 0, 2, 4 / 0, 1) run on the calibration runs and are scored by
   PSNR against the uncached outputs; then a local search moves one computed step by one
   or two steps, or changes the order of one gap of forecast steps (or of all), trying the
   neighbours in order of their proxy cost and keeping a move when the measured PSNR
   rises, up to ``max_evals`` evaluations.

Cost: one calibration pass (R runs x S model calls, all steps computed) plus
``max_evals`` (default 40) evaluations of R runs with K of S steps computed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..policies.schedule import ScheduleConfig
from ..runtime import patch
from .calibration import CalibrationConfig, calibrate
from .evaluation import Progress, as_runs, check_max_evals, psnr, run_all
from .profile import Profile
from .schedule_proxy import (
    FIT_CODE,
    START_HEADS,
    WEIGHTINGS,
    FitSettings,
    check_budget,
    fillers,
    fit_plan,
    fixed_interval_plan,
    from_proxy,
    plan_config,
    plan_cost,
    plan_timeline,
    proxy_dp,
    schedule_from_profile,
    spaced_plan,
    step_weights,
)

__all__ = ["PlanScore", "ScheduleSearchResult", "evaluate_schedule", "search_schedule"]


@dataclasses.dataclass(frozen=True)
class PlanScore:
    plan: str
    psnr_db: float
    proxy: float
    source: str  # "dp-relative", "dp-absolute", "move", ...
    timelines_match: bool  # the computed steps were exactly the plan's


def evaluate_schedule(
    model: nn.Module,
    config: ScheduleConfig,
    runs: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    refs: Sequence[torch.Tensor] | None = None,
    *,
    data_range: float = 2.0,
    spec=None,
) -> tuple[float, bool]:
    """(PSNR in dB of ``runs`` under ``config`` against ``refs`` — the same runs uncached,
    computed here when not given — and whether every run computed exactly the plan's
    steps)."""
    runs = as_runs(runs, "evaluate_schedule")
    if refs is None:
        refs = run_all(runs, "evaluate_schedule").outputs
    h = patch(model, config, spec)
    try:
        got = run_all(runs, "evaluate_schedule", handle=h)
    finally:
        h.remove()
    want = [c == "C" for c in config.plan]
    ok = all(
        list(ctx["timeline"]) == want
        for stats in got.stats
        for ctx in stats["contexts"].values()
        if ctx.get("computed", 0) + ctx.get("skipped", 0)
    )
    return psnr(got.outputs, refs, data_range), ok


@dataclasses.dataclass
class ScheduleSearchResult:
    """What :func:`search_schedule` found; ``config`` is the schedule to run."""

    budget: int
    num_steps: int
    config: ScheduleConfig
    chosen: PlanScore
    trace: list[PlanScore]
    methods: tuple[str, ...]
    model_calls: int
    computed_calls: int  # model calls whose blocks ran (the rest were forecast)
    seconds: float
    proxy_seconds: float
    fit_settings: FitSettings | None = None

    @property
    def plan(self) -> str:
        return self.config.plan

    @property
    def calibration_psnr(self) -> float:
        return self.chosen.psnr_db

    def store(self, profile: Profile) -> Profile:
        """Keep this schedule in ``profile.schedules[budget]`` (saved with the profile)."""
        if profile.num_steps != self.num_steps:
            raise ValueError(f"the profile is for {profile.num_steps} steps; this schedule plans {self.num_steps}")
        profile.schedules[self.budget] = {
            "plan": self.plan,
            "calibration_psnr_db": round(self.chosen.psnr_db, 4),
            "proxy": self.chosen.proxy,
            "source": self.chosen.source,
            "methods": list(self.methods),
            "evaluations": len(self.trace),
            "model_calls": self.model_calls,
            "seconds": round(self.seconds, 2),
        }
        if self.config.fit is not None:  # format 4: the fitted steps' coefficients
            from ..policies.schedule import fit_to_json

            profile.schedules[self.budget]["fit"] = fit_to_json(self.config.fit)
            profile.schedules[self.budget]["fit_settings"] = (self.fit_settings or FitSettings()).as_dict()
        return profile

    def __str__(self) -> str:
        lines = [
            f"schedule search: {self.budget} of {self.num_steps} steps computed, methods {', '.join(self.methods)}",
            plan_timeline(self.plan),
            "  evaluated (calibration runs):",
            "    PSNR dB     proxy  source       plan",
        ]
        for e in self.trace:
            mark = "  <- chosen" if e is self.chosen else ""
            lines.append(f"    {e.psnr_db:7.2f}  {e.proxy:8.4f}  {e.source:<11}  {e.plan}{mark}")
        lines.append(
            f"  cost: {self.model_calls} model calls ({self.computed_calls} with the blocks run), "
            f"{self.seconds:.1f} s (proxy DP {self.proxy_seconds:.2f} s)"
        )
        return "\n".join(lines)


def _neighbours(plan: str, codes: Sequence[str]) -> list[str]:
    """Plans one move away: a computed step (not step 0) moved by one or two steps, one
    gap of forecast steps given another filler (``codes``: "0", "1", "2", "E"), or every
    forecast step given one filler."""
    out = set()
    p = list(plan)
    S = len(p)
    for k in codes:
        out.add("".join(c if c == "C" else k for c in p))
    for s in range(1, S):
        if p[s] != "C":
            continue
        for t in (s - 1, s + 1, s - 2, s + 2):
            if 0 < t < S and p[t] != "C":
                q = p.copy()
                q[s], q[t] = p[t], "C"
                out.add("".join(q))
    s = 0
    while s < S:
        if p[s] == "C":
            s += 1
            continue
        e = s
        while e < S and p[e] != "C":
            e += 1
        for k in codes:
            if any(p[i] != k for i in range(s, e)):
                q = p.copy()
                q[s:e] = [k] * (e - s)
                out.add("".join(q))
        s = e
    out.discard(plan)
    return sorted(out)


def _steps_per_run(model, runs, who: str, spec=None):
    """The runs' outputs, step counts and timesteps, recorded as :func:`fastcache.calibrate`
    records them (a rising timestep starts a run), so they compare with a profile's."""
    h = patch(model, CalibrationConfig(), spec)
    try:
        outs = run_all(runs, who).outputs
        states = [st for st in h.contexts.values() if st.step >= 0]
        lengths = [n for st in states for n in st.run_lengths + [st.step + 1]]
        timesteps = [ts for st in states for ts in st.timesteps]
    finally:
        h.remove()
    return outs, lengths, timesteps


def search_schedule(
    model: nn.Module | Profile,
    runs: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]] | None = None,
    budget: int | None = None,
    *,
    speedup: float | None = None,
    methods=("reuse", "taylor1", "taylor2"),
    profile: Profile | None = None,
    max_evals: int = 40,
    data_range: float = 2.0,
    spec=None,
    progress: bool = True,
    fit: FitSettings | None = None,
) -> ScheduleSearchResult:
    """The schedule of ``budget`` computed steps (or ``ceil(S / speedup)``) with the best
    PSNR on the calibration ``runs`` (see the module docstring).

    Args:
        model: the transformer (unpatched; patched per evaluation and restored), or a
            :class:`fastcache.Profile` with a step Gram for the proxy stage alone (then
            ``runs`` must be None; use :func:`schedule_from_profile` for the config).
        runs: one callable, or several, each ONE seeded sampling run of ``model``
            returning its output (e.g. the final images); all with the same step count.
        budget: computed steps K, 1 <= K <= S (step 0 is always one of them).
        speedup: instead of ``budget``: K = ceil(S / speedup) (block work; the measured
            speedup is lower by the per-step overhead and the parts outside the blocks).
        methods: what may fill a cached step: "reuse", "taylor1", "taylor2", "eoc" (reuse
            corrected by EOC's trend, ``f * (1 + (P[s] - P[c]))`` from the profile's prior;
            the proxy counts it as the reuse it corrects, so only the end-to-end stage
            places it).
        profile: a profile of these runs with a step Gram (skips the calibration pass;
            the uncached outputs are then computed by running ``runs``).
        max_evals: end-to-end evaluations (each = every run once, patched) at most, >= 1.
        data_range: of the outputs, for PSNR (2 for images in [-1, 1]).
        fit: how the "fit" filler solves its coefficients (default ``FitSettings()``).
    """
    t_start = time.perf_counter()
    orders, codes, names = fillers(methods)
    fs = (fit or FitSettings()) if "fit" in names else None
    if isinstance(model, Profile):
        if runs is not None:
            raise ValueError("search_schedule: with a profile (no model) there is nothing to run; pass runs=None")
        cfg, cost = schedule_from_profile(model, budget, speedup=speedup, methods=methods, fit_settings=fs)
        score = PlanScore(cfg.plan, math.nan, cost, "dp-relative", True)
        return ScheduleSearchResult(cfg.budget, cfg.num_steps, cfg, score, [score], names, 0, 0, 0.0, 0.0, fs)
    if runs is None:
        raise ValueError("search_schedule: runs is required with a model (each one seeded sampling run)")
    runs = as_runs(runs, "search_schedule")
    check_max_evals("search_schedule", max_evals, 1)
    check_budget(budget, speedup, None)  # before the calibration pass: what does not need the step count

    refs: list[torch.Tensor] = []
    calls = computed = 0
    if profile is None or getattr(profile, "step_gram", None) is None:
        if profile is not None:
            raise ValueError(
                "search_schedule: the profile has no step_gram (profile format < 3, or gram_dim=0); calibrate again "
                "or pass profile=None to calibrate here"
            )
        record = lambda: refs.extend(run_all(runs, "search_schedule").outputs)  # the uncached outputs too
        profile = calibrate(model, record, spec=spec, progress=progress)
    else:
        profile.validate()
        profile.check_fits(model, uses_prior="eoc" in names, method="search_schedule")
        refs, lengths, timesteps = _steps_per_run(model, runs, "search_schedule", spec)
        if set(lengths) != {profile.num_steps}:
            raise ValueError(
                f"search_schedule: the runs have {sorted(set(lengths))} steps but the profile was recorded over "
                f"{profile.num_steps}-step runs, so no plan of it can replay on them; give runs with "
                f"{profile.num_steps} steps, or profile=None to calibrate these runs"
            )
        for ts in timesteps:  # the step Gram is indexed by step: other timesteps are warned about (once)
            profile.check_fits(timesteps=ts, method="search_schedule")
    S = profile.num_steps
    calls += S * len(runs)
    computed += S * len(runs)
    K = check_budget(budget, speedup, S)

    t0 = time.perf_counter()
    gram = profile.step_gram.numpy()  # host-read-ok: offline search
    Ws = {w: step_weights(gram, w) for w in WEIGHTINGS}
    starts = []
    for w in WEIGHTINGS:
        fw = None if fs is None else dataclasses.replace(fs, weighting=w)
        starts.append((proxy_dp(Ws[w], orders, K, fw)(K)[0], f"dp-{w}"))
    for k in orders:
        if k > 0 or len(orders) == 1:
            starts.append((fixed_interval_plan(K, S, k), f"interval-o{k}"))
    for head in START_HEADS:
        starts.append((spaced_plan(head, K, S, orders[-1] if orders else 0), "head-" + "".join(map(str, head))))
    if fs is not None:  # the hand-made placements with every forecast fitted
        fitted = [("".join(c if c == "C" else FIT_CODE for c in p), src + "-fit") for p, src in starts[2:]]
        starts = starts[:2] + fitted + starts[2:]
        if not orders:
            starts = starts[: 2 + len(fitted)]
    starts = [(from_proxy(p, codes), src) for p, src in starts]
    starts = list({p: (p, src) for p, src in reversed(starts)}.values())[::-1]  # unique, first source kept
    proxy_s = time.perf_counter() - t0
    W = Ws["relative"]

    def cost(plan: str) -> float:
        if FIT_CODE not in plan:
            return plan_cost(W, plan)
        return plan_cost(W, plan, fit_plan(plan, gram, fs), gram=gram)

    bar = Progress(f"fastcache.search_schedule(K={K})", progress)
    trace: list[PlanScore] = []
    seen: dict[str, PlanScore] = {}

    def evaluate(plan: str, source: str) -> PlanScore:
        nonlocal calls, computed
        psnr, ok = evaluate_schedule(
            model, plan_config(plan, profile, fs), runs, refs, data_range=data_range, spec=spec
        )
        calls += S * len(runs)
        computed += plan.count("C") * len(runs)
        bar()
        e = PlanScore(plan, psnr, cost(plan), source, ok)
        if not ok:
            raise RuntimeError(
                f"fastcache: internal error, the schedule {plan!r} did not replay (the computed steps differ); "
                "check that every run has exactly the profile's step count"
            )
        trace.append(e)
        seen[plan] = e
        return e

    try:
        for plan, src in starts:
            if len(trace) < max_evals:
                evaluate(plan, src)
        best = max(trace, key=lambda e: e.psnr_db)
        improved = True
        while improved and len(trace) < max_evals:
            improved = False
            cands = [q for q in _neighbours(best.plan, codes) if q not in seen]
            cands.sort(key=cost)
            for q in cands:
                if len(trace) >= max_evals:
                    break
                e = evaluate(q, "move")
                if e.psnr_db > best.psnr_db:
                    best, improved = e, True
                    break
    finally:
        bar.close()
    total_s = time.perf_counter() - t_start
    cfg = plan_config(best.plan, profile, fs)
    return ScheduleSearchResult(K, S, cfg, best, trace, names, calls, computed, total_s, proxy_s, fs)
