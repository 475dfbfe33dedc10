"""The schedule search's proxy: stage 1 of :func:`fastcache.search_schedule`, no model call.

:func:`fastcache.calibrate` records, per slot k (block, branch, stream), the Gram
``G_k[i, j] = <F_k(i), F_k(j)>`` of the uncached branch outputs at steps i and j. A
forecast of step s with order m from the last computed steps ``(c'', c', c)`` is a linear
combination ``sum_j a_j F(c_j)`` whose coefficients follow from TaylorSeer's update and
forecast (the same finite differences the ops compute), so its error ``||sum_j a_j F_k(c_j)
- F_k(s)||^2 / ||F_k(s)||^2`` is a quadratic form in ``G_k`` — every (history, step, order)
costs O(1). A dynamic program over the last three computed steps (state ``(c'', c', c)``,
O(S^4) work, one pass for every budget at once) returns the placement and per-step order of
least summed error for each K, exactly for this proxy (:func:`proxy_dp`,
:func:`schedule_from_profile`). The proxy is teacher-forced (it forecasts the uncached
features), so it ignores how an error early in the run moves the later steps: the
end-to-end stage (:mod:`fastcache.tuning.schedule_search`) measures that.

Also here: the hand-made placements the end-to-end stage starts from
(:func:`fixed_interval_plan`, :func:`spaced_plan`), the methods that may fill a cached
step (:func:`fillers`) and the budget checks shared with the command line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ..policies.schedule import ScheduleConfig
from .profile import Profile

__all__ = [
    "FIT_CODE",
    "FitSettings",
    "METHODS",
    "START_HEADS",
    "WEIGHTINGS",
    "check_budget",
    "fillers",
    "fit_coefficients",
    "fit_plan",
    "fixed_interval_plan",
    "from_proxy",
    "plan_config",
    "plan_cost",
    "plan_timeline",
    "proxy_dp",
    "schedule_from_profile",
    "spaced_plan",
    "step_weights",
]

METHODS = {"reuse": 0, "taylor1": 1, "taylor2": 2}  # method -> Taylor order of its forecast
WEIGHTINGS = ("relative", "absolute")
FIT_CODE = "F"  # plan code of a fitted step (docs/methods.md section 12, "Fitted filler")
_FIT_ARG = 9  # the DP's filler index of a fitted step (orders are 0-4)


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """How the fitted filler solves its coefficients (docs/methods.md section 12).

    points: how many of the last computed steps the forecast combines (2 or 3; fewer
    where fewer have been computed); ridge: lambda of the pull toward TaylorSeer's
    coefficients of the same points, relative to the mean of ``W[c, c]``'s diagonal;
    per_slot: one set of coefficients per slot (each from its own Gram) instead of one
    shared set (from the step Gram of ``weighting``)."""

    points: int = 3
    ridge: float = 0.3
    per_slot: bool = False
    weighting: str = "relative"

    def __post_init__(self):
        if isinstance(self.points, bool) or self.points not in (1, 2, 3):
            raise ValueError(f"FitSettings.points must be 1, 2 or 3 (computed steps combined), got {self.points!r}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"FitSettings.ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"FitSettings.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _solve3(M, r):
    """Batched 3x3 solve ``M a = r`` by the adjugate (M: (..., 3, 3) as nested lists of
    broadcast arrays, r: 3 arrays)."""
    (a, b, c), (d, e, f), (g, h, i) = M
    A = e * i - f * h
    B = -(d * i - f * g)
    C = d * h - e * g
    det = a * A + b * B + c * C
    inv = [
        [A, -(b * i - c * h), b * f - c * e],
        [B, a * i - c * g, -(a * f - c * d)],
        [C, -(a * h - b * g), a * e - b * d],
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        return [(inv[j][0] * r[0] + inv[j][1] * r[1] + inv[j][2] * r[2]) / det for j in range(3)]


def fit_coefficients(W_s, s, steps, points: int = 3, ridge: float = 0.3):
    """The fitted forecast of step ``s`` from the last computed steps ``steps = (c'', c',
    c)`` (arrays or scalars, -1 = none): coefficients ``a = (a'', a', a)`` on their
    features minimising ``a^T W[c, c] a - 2 a^T W[c, s] + lam ||a - a_T||^2`` over the
    last ``points`` available steps (the others get 0), ``a_T`` TaylorSeer's coefficients
    of the same steps (order = points used - 1), ``lam = ridge * mean(diag W[c, c])``::

        a* = (W[c, c] + lam I)^-1 (W[c, s] + lam a_T)

    Returns (coefficients, teacher-forced error ``e_s(a*)`` without the ridge term)."""
    cpp, cp, cl = (np.asarray(c) for c in steps)
    cpp = np.where(points >= 3, cpp, -1)
    cp = np.where(points >= 2, cp, -1)
    cpp = np.where(cp >= 0, cpp, -1)
    use = [cpp >= 0, cp >= 0, np.ones_like(cl, dtype=bool)]
    n_used = use[0].astype(int) + use[1].astype(int) + 1
    x = s - cl
    t2 = _coefficients(cpp, cp, cl, x, 2)
    t1 = _coefficients(cpp, cp, cl, x, 1)
    aT = [np.where(n_used >= 3, t2[j], t1[j]) for j in range(3)]
    idx = [np.maximum(c, 0) for c in (cpp, cp, cl)]
    diag = [np.where(use[j], W_s[idx[j], idx[j]], 0.0) for j in range(3)]
    lam = ridge * (diag[0] + diag[1] + diag[2]) / n_used
    M = [[None] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            v = np.where(use[i] & use[j], W_s[idx[i], idx[j]], 0.0)
            if i == j:
                v = np.where(use[i], v + lam, 1.0)
            M[i][j] = v
    r = [np.where(use[j], W_s[idx[j], s] + lam * aT[j], 0.0) for j in range(3)]
    a = _solve3(M, r)
    a = [np.where(use[j], a[j], 0.0) for j in range(3)]
    return tuple(a), _error(W_s, s, (cpp, cp, cl), a)


def _last_three(comp: list[int]) -> list[int]:
    return ([-1, -1] + comp)[-3:]


def slot_weights(gram: np.ndarray, weighting: str = "relative") -> np.ndarray:
    """``w[k, s]``: slot k's weight in the error of step s (:func:`step_weights`)."""
    g = np.asarray(gram, dtype=np.float64)
    diag = np.einsum("kss->ks", g)
    if weighting == "relative":
        return np.where(diag > 0, 1.0 / np.maximum(diag, 1e-300), 0.0) / g.shape[0]
    if weighting == "absolute":
        tot = diag.sum(axis=0, keepdims=True)
        return np.where(tot > 0, 1.0 / np.maximum(tot, 1e-300), 0.0) * np.ones_like(diag)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _as_triple(coeffs) -> list[float]:
    """Newest-first coefficients (a_c, a_c', a_c'') as the (a'', a', a) triple of :func:`_error`."""
    c = [float(v) for v in coeffs] + [0.0] * (3 - len(coeffs))
    return [c[2], c[1], c[0]]


def fit_plan(plan: str, gram: np.ndarray, settings: FitSettings | None = None) -> dict[int, tuple]:
    """The fitted coefficients of every ``F`` step of ``plan`` from the profile's step Gram
    ``gram`` (K, S, S): ``{step: (a_c, a_c', ...)}`` newest computed step first, shared
    across slots, or ``{step: ((a_c, ...) per slot)}`` with ``settings.per_slot``."""
    st = settings or FitSettings()
    g = np.asarray(gram, dtype=np.float64)
    W = step_weights(g, st.weighting)
    comp: list[int] = []
    out: dict[int, tuple] = {}
    for s, c in enumerate(plan):
        if c == "C":
            comp.append(s)
            continue
        if c != FIT_CODE:
            continue
        last = _last_three(comp)
        n = min(st.points, len(comp))
        if st.per_slot:
            rows = []
            for k in range(g.shape[0]):
                d = g[k, s, s]
                Wk = g[k] / d if d > 0 else g[k]
                a, _ = fit_coefficients(Wk, s, last, st.points, st.ridge)
                rows.append(tuple(float(v) for v in (a[2], a[1], a[0])[:n]))
            out[s] = tuple(rows)
        else:
            a, _ = fit_coefficients(W[s], s, last, st.points, st.ridge)
            out[s] = tuple(float(v) for v in (a[2], a[1], a[0])[:n])
    return out


def plan_cost(
    W: np.ndarray, plan: str, fit: dict | None = None, gram: np.ndarray | None = None, weighting: str = "relative"
) -> float:
    """The proxy error of ``plan`` (the sum over its forecast steps). ``F`` steps use the
    coefficients ``fit`` gives (``{step: newest-first coefficients}``, shared or per slot;
    per slot needs ``gram``), else those :func:`fit_plan` solves with default settings."""
    comp: list[int] = []
    total = 0.0
    if fit is None and FIT_CODE in plan:
        if gram is None:
            fit = {}
            for s, c in enumerate(plan):  # shared coefficients from W itself
                if c == FIT_CODE:
                    cs = [i for i in range(s) if plan[i] == "C"]
                    a, _ = fit_coefficients(W[s], s, _last_three(cs), FitSettings().points, FitSettings().ridge)
                    fit[s] = (a[2], a[1], a[0])[: min(FitSettings().points, len(cs))]
        else:
            fit = fit_plan(plan, gram)
    wk = None
    for s, c in enumerate(plan):
        if c == "C":
            comp.append(s)
            continue
        last = _last_three(comp)
        if c == FIT_CODE:
            co = fit[s]
            if co and isinstance(co[0], (tuple, list)):  # per slot
                if gram is None:
                    raise ValueError("plan_cost: per-slot fit coefficients need the step Gram (gram=)")
                g = np.asarray(gram, dtype=np.float64)
                wk = slot_weights(g, weighting) if wk is None else wk
                total += sum(wk[k, s] * float(_error(g[k], s, last, _as_triple(co[k]))) for k in range(g.shape[0]))
            else:
                total += float(_error(W[s], s, last, _as_triple(co)))
            continue
        k = 0 if c == "E" else int(c)  # EOC's correction is not modelled: counted as the reuse it corrects
        a = _coefficients(np.float64(last[0]), np.float64(last[1]), np.float64(last[2]), float(s - last[2]), k)
        total += float(_error(W[s], s, last, a))
    return total


def proxy_dp(W: np.ndarray, orders: Sequence[int], max_budget: int, fit: FitSettings | None = None):
    """Exact DP of the proxy over states (c'', c', c) (shifted: 0 = none, else step + 1).
    With ``fit``, the fitted filler (shared coefficients from ``W``) is a candidate at
    every forecast step beside the Taylor ``orders``. Returns a function budget -> (plan,
    proxy cost)."""
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
        if fit is not None:
            steps = (cpp.astype(int), cp.astype(int), cl.astype(int))
            _, e = fit_coefficients(W[s], s, steps, fit.points, fit.ridge)
            e = np.where((cl >= 0) & (cl < s) & np.isfinite(e), e, np.inf)
            e = np.broadcast_to(e, (n, n, n))
            better = e < best[..., s]
            best[..., s] = np.where(better, e, best[..., s])
            arg[..., s] = np.where(better, _FIT_ARG, arg[..., s])
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
                k = int(arg[a, b, c, s])
                plan[s] = FIT_CODE if k == _FIT_ARG else str(k)
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


def fillers(methods) -> tuple[list[int], list[str], tuple[str, ...]]:
    """(Taylor orders the proxy solves with, plan codes the search may place, method names).
    With "eoc" and no plain reuse, order 0 stands in for the EOC-corrected reuse in the
    proxy (which does not model the correction): see :func:`from_proxy`. "fit" (plan code
    ``F``) is solved by the proxy itself (:func:`proxy_dp` with ``fit=``)."""
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    known = [*METHODS, "eoc", "fit"]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(
            f"search_schedule: unknown method {unknown[0]!r}; the methods that fill a cached step are "
            f"{sorted(known)} (reuse = the last computed step's outputs, taylorN = TaylorSeer's "
            "forecast of order N, eoc = reuse corrected by EOC's trend from the profile's prior, fit = a linear "
            "forecast from the last computed steps fitted to the profile's step Gram)"
        )
    if not names:
        raise ValueError("search_schedule: methods is empty; give at least one of " + ", ".join(known))
    orders = sorted({METHODS[m] for m in names if m in METHODS})
    codes = [str(k) for k in orders] + (["E"] if "eoc" in names else []) + ([FIT_CODE] if "fit" in names else [])
    if not orders and "eoc" in names:
        orders = [0]
    return orders, codes, tuple(m for m in known if m in names)


def from_proxy(plan: str, codes: Sequence[str]) -> str:
    """A proxy plan in the allowed codes (order 0 stood in for "E" when reuse is not allowed)."""
    return plan if "0" in codes else plan.replace("0", "E")


def plan_config(plan: str, profile: Profile | None, fit: FitSettings | None = None) -> ScheduleConfig:
    """The config of ``plan``; the profile rides along only where EOC's correction ("E") needs its prior;
    ``F`` steps get their coefficients solved from the profile's step Gram (:func:`fit_plan`)."""
    coeffs = None
    if FIT_CODE in plan:
        if profile is None or getattr(profile, "step_gram", None) is None:
            raise ValueError(
                "a plan with fitted steps ('F') needs the profile's step_gram to solve their coefficients; "
                "calibrate: profile = fastcache.calibrate(model, run)"
            )
        coeffs = fit_plan(plan, profile.step_gram.numpy(), fit)  # host-read-ok: offline search
    return ScheduleConfig(plan=plan, profile=profile if "E" in plan else None, fit=coeffs)


def check_budget(budget, speedup, S: int | None) -> int | None:
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


def schedule_from_profile(
    profile: Profile,
    budget: int | None = None,
    *,
    speedup: float | None = None,
    methods=("reuse", "taylor1", "taylor2"),
    weighting: str = "relative",
    fit_settings: FitSettings | None = None,
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
    K = check_budget(budget, speedup, S)
    W = step_weights(gram.numpy(), weighting)  # host-read-ok: offline search
    orders, codes, names = fillers(methods)
    fit = None
    if "fit" in names:
        fit = fit_settings if fit_settings is not None else FitSettings(weighting=weighting)
    plan, cost = proxy_dp(W, orders, K, fit)(K)
    return plan_config(from_proxy(plan, codes), profile, fit), cost
