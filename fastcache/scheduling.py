"""Budgeted schedule search: for K computed steps, where to compute and how to fill the rest.

A user says "I can afford K full steps" (or a speedup, K = ceil(S / speedup)) and gets the
static :class:`fastcache.ScheduleConfig` that does best on their model — found offline,
run with no decision at all (docs/methods.md section 12)::

    runs = [lambda k=k: sample(model, seed=k) for k in range(2)]   # each: one run -> tensor
    res = fastcache.search_schedule(model, runs, budget=17)
    print(res)                                  # timeline, calibration PSNR, cost
    fastcache.patch(model, res.config)          # e.g. ScheduleConfig(plan="CCC1C11C...")

How (two stages, both over the same calibration runs):

1. **Proxy, exact dynamic programming.** :func:`fastcache.calibrate` records, per slot k
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

import numpy as np
import torch
from torch import nn

from .policies.schedule import ScheduleConfig
from .profile import Profile
from .runtime import patch
from .search import _psnr

__all__ = [
    "METHODS",
    "ScheduleSearchResult",
    "evaluate_schedule",
    "fixed_interval_plan",
    "spaced_plan",
    "plan_timeline",
    "schedule_from_profile",
    "search_schedule",
]

METHODS = {"reuse": 0, "taylor1": 1, "taylor2": 2}
WEIGHTINGS = ("relative", "absolute")


# -- the proxy ----------------------------------------------------------------------------
def step_weights(gram: np.ndarray, weighting: str = "relative") -> np.ndarray:
    """``W[s, i, j] = sum_k w_k(s) G_k[i, j]``: the Gram the error of step s is measured
    in. ``"relative"``: every slot's error relative to its own norm at step s, averaged
    over slots; ``"absolute"``: summed over slots, relative to the total norm."""
    g = np.asarray(gram, dtype=np.float64)
    diag = np.einsum("kss->ks", g)  # (K, S)
    if weighting == "relative":
        w = np.where(diag > 0, 1.0 / np.maximum(diag, 1e-300), 0.0) / g.shape[0]
    elif weighting == "absolute":
        tot = diag.sum(axis=0, keepdims=True)
        w = np.where(tot > 0, 1.0 / np.maximum(tot, 1e-300), 0.0) * np.ones_like(diag)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return np.einsum("kij,ks->sij", g, w)


def _coefficients(cpp, cp, cl, x, order):
    """TaylorSeer's forecast at ``x`` steps after computed step ``cl`` as coefficients on
    the features of ``(cpp, cp, cl)`` (-1 = no such step; its coefficient is 0). Works on
    scalars or broadcast arrays; mirrors ops.taylor_update / ops.taylor_forecast."""
    with np.errstate(divide="ignore", invalid="ignore"):
        has_p = cp >= 0
        has_pp = cpp >= 0
        h1 = np.where(has_p, cl - cp, 1.0)
        h2 = np.where(has_pp, cp - cpp, 1.0)
        a_l = np.ones_like(np.asarray(x, dtype=np.float64) + 0.0 * cl)
        a_p = np.zeros_like(a_l)
        a_pp = np.zeros_like(a_l)
        if order >= 1:
            c1 = np.where(has_p, x / h1, 0.0)
            a_l = a_l + c1
            a_p = a_p - c1
        if order >= 2:
            c2 = np.where(has_pp, x * x / 2.0 / h1, 0.0)
            a_l = a_l + c2 / h1
            a_p = a_p - c2 * (1.0 / h1 + 1.0 / h2)
            a_pp = a_pp + c2 / h2
    return a_pp, a_p, a_l


def _error(W_s, s, steps, coeffs):
    """``a^T W[c, c] a - 2 a^T W[c, s] + W[s, s]`` for ``c = steps`` (arrays of indices,
    -1 mapped anywhere: its coefficient is 0)."""
    idx = [np.maximum(c, 0) for c in steps]
    with np.errstate(invalid="ignore", over="ignore"):  # unreachable states (NaN / inf) are masked by the caller
        e = W_s[s, s] + 0.0 * coeffs[0]
        for i in range(3):
            e = e - 2.0 * coeffs[i] * W_s[idx[i], s]
            for j in range(3):
                e = e + coeffs[i] * coeffs[j] * W_s[idx[i], idx[j]]
    return e


def plan_cost(W: np.ndarray, plan: str) -> float:
    """The proxy error of ``plan`` (the sum over its forecast steps)."""
    comp: list[int] = []
    total = 0.0
    for s, c in enumerate(plan):
        if c == "C":
            comp.append(s)
            continue
        last = ([-1, -1] + comp)[-3:]
        k = 0 if c == "E" else int(c)  # EOC's correction is not modelled: counted as the reuse it corrects
        a = _coefficients(np.float64(last[0]), np.float64(last[1]), np.float64(last[2]), float(s - last[2]), k)
        total += float(_error(W[s], s, last, a))
    return total


def _dp(W: np.ndarray, orders: Sequence[int], max_budget: int):
    """Exact DP of the proxy over states (c'', c', c) (shifted: 0 = none, else step + 1).
    Returns a function budget -> (plan, proxy cost)."""
    S = W.shape[0]
    n = S + 1
    ar = np.arange(n, dtype=np.float64) - 1.0  # shifted index -> step (-1 = none)
    cpp = ar[:, None, None]
    cp = ar[None, :, None]
    cl = ar[None, None, :]
    best = np.full((n, n, n, S), np.inf)
    arg = np.zeros((n, n, n, S), dtype=np.int8)
    for s in range(1, S):
        x = s - cl
        for k in orders:
            a = _coefficients(cpp, cp, cl, x, k)
            e = _error(W[s], s, (cpp.astype(int), cp.astype(int), cl.astype(int)), a)
            e = np.where((cl >= 0) & (cl < s), e, np.inf)
            e = np.broadcast_to(e, (n, n, n))
            better = e < best[..., s]
            best[..., s] = np.where(better, e, best[..., s])
            arg[..., s] = np.where(better, k, arg[..., s])
    # gap cost: steps cl < s < cn are forecast; best = 0 for s <= cl (not forecast)
    valid = np.arange(S)[None, None, None, :] > cl[..., None]
    contrib = np.where(valid, best, 0.0)
    contrib = np.where(np.isfinite(contrib), contrib, 1e30)  # unreachable states
    cum = np.cumsum(contrib, axis=-1)  # cum[..., s] = sum_{s' <= s}
    # T[p2, p1, l, ln]: next computed step cn = ln - 1 > cl; cost of steps cl+1 .. cn-1
    T = np.full((n, n, n, n), np.inf)
    T[..., 2:] = cum[..., : S - 1]
    T[..., 1] = 0.0
    ln = np.arange(n)[None, None, None, :]
    l_idx = np.arange(n)[None, None, :, None]
    T = np.where(ln > l_idx, T, np.inf)
    V = np.full((n, n, n), np.inf)
    V[0, 0, 1] = 0.0  # step 0 computed
    layers = [V]
    backs = [None]
    for _ in range(1, max_budget):
        tmp = V[:, :, :, None] + T  # (p2, p1, l, ln)
        bp = np.argmin(tmp, axis=0)  # (p1, l, ln)
        V = np.take_along_axis(tmp, bp[None], axis=0)[0]
        layers.append(V)
        backs.append(bp)
    tail = cum[..., S - 1]

    def solve(K: int) -> tuple[str, float]:
        tot = layers[K - 1] + tail
        p2, p1, last = np.unravel_index(int(np.argmin(tot)), tot.shape)
        cost = float(tot[p2, p1, last])
        if not math.isfinite(cost) or cost >= 1e29:
            raise ValueError(
                f"schedule search: no schedule with {K} computed steps of {S} has a finite proxy cost (the profile's "
                "step_gram gives no reachable plan); calibrate again: profile = fastcache.calibrate(model, run)"
            )
        states = [(p2, p1, last)]
        for layer in range(K - 1, 0, -1):
            a, b, c = states[-1]
            states.append((int(backs[layer][a, b, c]), a, b))
        states.reverse()
        plan = ["C" if s in {st[2] - 1 for st in states} else "?" for s in range(S)]
        for j, (a, b, c) in enumerate(states):
            end = states[j + 1][2] - 1 if j + 1 < len(states) else S
            for s in range(c, end):  # steps c-1+1 .. end-1 (c is shifted)
                plan[s] = str(int(arg[a, b, c, s]))
        return "".join(plan), cost

    return solve


def fixed_interval_plan(budget: int, num_steps: int, order: int = 1, warmup: int = 3) -> str:
    """TaylorSeer's usual placement at exactly ``budget`` computed steps: the first
    ``warmup`` steps, then the rest spread evenly up to the last step (which computes)."""
    return spaced_plan(tuple(range(max(1, min(int(warmup), int(budget))))), budget, num_steps, order)


def spaced_plan(head: Sequence[int], budget: int, num_steps: int, order: int = 1) -> str:
    """``budget`` computed steps: the steps in ``head`` (must hold 0), then the rest spread
    evenly from the last of them to the last step; every other step forecast with
    ``order``."""
    K, S = int(budget), int(num_steps)
    head = sorted({int(h) for h in head})[:K]
    rest = K - len(head)
    pts = sorted({int(round(v)) for v in np.linspace(head[-1], S - 1, rest + 1)[1:]}) if rest else []
    cs = set(head) | set(pts)
    for s in range(S - 1, -1, -1):  # rounding collisions (tiny S): fill from the end
        if len(cs) >= K:
            break
        cs.add(s)
    return "".join("C" if s in cs else str(order) for s in range(S))


# warm-up patterns tried as starts besides TaylorSeer's (0, 1, 2): where the first computed
# steps fall moves PSNR by several dB at the same budget (docs/methods.md section 8)
START_HEADS = ((0, 2), (0, 2, 4), (0, 1))


def plan_timeline(plan: str, width: int = 100) -> str:
    """``plan`` as a printed timeline with a step ruler (``C`` computed, digits: order)."""
    lines = []
    for start in range(0, len(plan), width):
        chunk = plan[start : start + width]
        ruler = "".join(f"{s:<10d}"[:10] for s in range(start, start + len(chunk), 10))[: len(chunk)]
        lines.append(f"  step {ruler}")
        lines.append(f"  plan {chunk}")
    n = plan.count("C")
    lines.append(f"  {n} of {len(plan)} steps computed (C); others forecast with the Taylor order shown (0 = reuse)")
    return "\n".join(lines)


def _fillers(methods) -> tuple[list[int], list[str], tuple[str, ...]]:
    """(Taylor orders the proxy solves with, plan codes the search may place, method names).
    With "eoc" and no plain reuse, order 0 stands in for the EOC-corrected reuse in the
    proxy (which does not model the correction): see :func:`_from_proxy`."""
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in names if m not in METHODS and m != "eoc"]
    if unknown:
        raise ValueError(
            f"search_schedule: unknown method {unknown[0]!r}; the methods that fill a cached step are "
            f"{sorted(METHODS) + ['eoc']} (reuse = the last computed step's outputs, taylorN = TaylorSeer's "
            "forecast of order N, eoc = reuse corrected by EOC's trend from the profile's prior)"
        )
    if not names:
        raise ValueError("search_schedule: methods is empty; give at least one of " + ", ".join([*METHODS, "eoc"]))
    orders = sorted({METHODS[m] for m in names if m in METHODS})
    codes = [str(k) for k in orders] + (["E"] if "eoc" in names else [])
    return orders or [0], codes, tuple(m for m in [*METHODS, "eoc"] if m in names)


def _from_proxy(plan: str, codes: Sequence[str]) -> str:
    """A proxy plan in the allowed codes (order 0 stood in for "E" when reuse is not allowed)."""
    return plan if "0" in codes else plan.replace("0", "E")


def _config(plan: str, profile: Profile | None) -> ScheduleConfig:
    return ScheduleConfig(plan=plan, profile=profile if "E" in plan else None)


def _check_budget(budget, speedup, S: int | None) -> int | None:
    """The budget for ``S`` steps; with ``S`` None (not known yet: before calibrating) the
    checks that do not need it, so a bad argument is refused before any work."""
    if (budget is None) == (speedup is None):
        raise ValueError("search_schedule: give exactly one of budget (computed steps, e.g. 17) or speedup (e.g. 2.5)")
    if speedup is not None:
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup >= 1.0:
            raise ValueError(f"search_schedule: speedup={speedup!r} must be a number >= 1")
        if S is None:
            return None
        budget = max(1, math.ceil(S / float(speedup)))
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or int(budget) < 1:
        raise ValueError(f"search_schedule: budget={budget!r} must be an integer >= 1 (computed steps, step 0 counts)")
    if S is not None and int(budget) > S:
        raise ValueError(f"search_schedule: budget={budget!r} must be an integer in [1, {S}] (computed steps of {S})")
    return int(budget)


def _steps_per_run(model, runs, who: str, spec=None):
    """The runs' outputs, step counts and timesteps, recorded as :func:`fastcache.calibrate`
    records them (a rising timestep starts a run), so they compare with a profile's."""
    from .calibration import CalibrationConfig

    h = patch(model, CalibrationConfig(), spec)
    try:
        outs = _run_all(runs, who)
        states = [st for st in h.contexts.values() if st.step >= 0]
        lengths = [n for st in states for n in st.run_lengths + [st.step + 1]]
        timesteps = [ts for st in states for ts in st.timesteps]
    finally:
        h.remove()
    return outs, lengths, timesteps


def schedule_from_profile(
    profile: Profile,
    budget: int | None = None,
    *,
    speedup: float | None = None,
    methods=("reuse", "taylor1", "taylor2"),
    weighting: str = "relative",
) -> tuple[ScheduleConfig, float]:
    """Stage 1 alone (no model call): the proxy-optimal schedule for ``budget`` computed
    steps from a profile's step Gram; returns (config, proxy cost)."""
    gram = getattr(profile, "step_gram", None)
    if gram is None:
        raise ValueError(
            "schedule search: this profile has no step_gram (made by an older fastcache, profile format < 3, or "
            "with gram_dim=0); calibrate again: profile = fastcache.calibrate(model, run)"
        )
    profile.validate()  # a step_gram edited since the load: refused naming the field, not a failed DP
    S = int(gram.shape[1])
    K = _check_budget(budget, speedup, S)
    W = step_weights(gram.numpy(), weighting)  # host-read-ok: offline search
    orders, codes, _ = _fillers(methods)
    plan, cost = _dp(W, orders, K)(K)
    return _config(_from_proxy(plan, codes), profile), cost


# -- end-to-end evaluation ----------------------------------------------------------------
def _run_all(runs, who: str, tick=None) -> list[torch.Tensor]:
    outs = []
    for r in runs:
        with torch.no_grad():
            out = r()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{who}: each run must return its output tensor, got {type(out).__name__}")
        outs.append(out.detach())
        if tick is not None:
            tick()
    return outs


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
    runs = [runs] if callable(runs) else list(runs)
    if refs is None:
        refs = _run_all(runs, "evaluate_schedule")
    h = patch(model, config, spec)
    want = [c == "C" for c in config.plan]
    ok = True
    try:
        outs = []
        for r in runs:
            h.reset()
            outs += _run_all([r], "evaluate_schedule")
            for ctx in h.stats()["contexts"].values():  # off the step path: between runs
                if ctx.get("computed", 0) + ctx.get("skipped", 0):
                    ok = ok and list(ctx["timeline"]) == want
    finally:
        h.remove()
    return _psnr(outs, refs, data_range), ok


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
    """
    t_start = time.perf_counter()
    orders, codes, names = _fillers(methods)
    if isinstance(model, Profile):
        if runs is not None:
            raise ValueError("search_schedule: with a profile (no model) there is nothing to run; pass runs=None")
        cfg, cost = schedule_from_profile(model, budget, speedup=speedup, methods=methods)
        score = PlanScore(cfg.plan, math.nan, cost, "dp-relative", True)
        return ScheduleSearchResult(cfg.budget, cfg.num_steps, cfg, score, [score], names, 0, 0, 0.0, 0.0)
    if runs is None:
        raise ValueError("search_schedule: runs is required with a model (each one seeded sampling run)")
    runs = [runs] if callable(runs) else list(runs)
    if not runs or not all(callable(r) for r in runs):
        raise TypeError("search_schedule: runs must be a callable or a non-empty sequence of callables")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"search_schedule: max_evals={max_evals!r} must be an integer >= 1")
    _check_budget(budget, speedup, None)  # before the calibration pass: what does not need the step count

    from .calibration import _Progress, calibrate

    refs: list[torch.Tensor] = []
    calls = computed = 0
    if profile is None or getattr(profile, "step_gram", None) is None:
        if profile is not None:
            raise ValueError(
                "search_schedule: the profile has no step_gram (profile format < 3, or gram_dim=0); calibrate again "
                "or pass profile=None to calibrate here"
            )
        profile = calibrate(model, lambda: refs.extend(_run_all(runs, "search_schedule")), spec=spec, progress=progress)
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
    K = _check_budget(budget, speedup, S)

    t0 = time.perf_counter()
    gram = profile.step_gram.numpy()  # host-read-ok: offline search
    Ws = {w: step_weights(gram, w) for w in WEIGHTINGS}
    starts = []
    for w in WEIGHTINGS:
        starts.append((_dp(Ws[w], orders, K)(K)[0], f"dp-{w}"))
    for k in orders:
        if k > 0 or len(orders) == 1:
            starts.append((fixed_interval_plan(K, S, k), f"interval-o{k}"))
    for head in START_HEADS:
        starts.append((spaced_plan(head, K, S, orders[-1]), "head-" + "".join(map(str, head))))
    starts = [(_from_proxy(p, codes), src) for p, src in starts]
    starts = list({p: (p, src) for p, src in reversed(starts)}.values())[::-1]  # unique, first source kept
    proxy_s = time.perf_counter() - t0
    W = Ws["relative"]

    bar = _Progress(f"fastcache.search_schedule(K={K})", progress)
    trace: list[PlanScore] = []
    seen: dict[str, PlanScore] = {}

    def evaluate(plan: str, source: str) -> PlanScore:
        nonlocal calls, computed
        psnr, ok = evaluate_schedule(model, _config(plan, profile), runs, refs, data_range=data_range, spec=spec)
        calls += S * len(runs)
        computed += plan.count("C") * len(runs)
        bar()
        e = PlanScore(plan, psnr, plan_cost(W, plan), source, ok)
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
            cands.sort(key=lambda q: plan_cost(W, q))
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
    cfg = _config(best.plan, profile)
    return ScheduleSearchResult(K, S, cfg, best, trace, names, calls, computed, total_s, proxy_s)
