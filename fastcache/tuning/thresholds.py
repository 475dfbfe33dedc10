"""Which threshold for MY model? A search that answers it on the user's own calibration runs.

The decision-driven policies (TeaCache, First-Block Cache, and any other config with a
``threshold`` field) trade speed for quality through one number whose good value depends
on the model, the sampler and the step count. :func:`search_threshold` finds, for a target
computed fraction (block work) or a target measured speedup, the smallest threshold that
meets it on the calibration runs — the smallest because quality falls as the threshold
grows — and reports its measured quality (PSNR against the same runs uncached).

    runs = [lambda k=k: sample(model, seed=k) for k in range(2)]   # each: one sampling run -> tensor
    res = fastcache.search_threshold(model, runs, "teacache", target_fraction=0.4, profile=profile)
    print(res)                                   # the trace, and the chosen setting
    fastcache.patch(model, res.config)

Search: start at the method's usual threshold, double (or halve) it until the target is
met (or no longer met), then bisect geometrically between the last threshold that missed
and the first that met, up to ``max_evals`` evaluations in all (one evaluation = every
calibration run, patched). The computed fraction is not strictly monotone in the threshold
(a skipped step changes the trajectory the later decisions see), so the result is the
evaluated setting that meets the target with the best PSNR, not the bisection's last point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import CacheConfig
from ..policies.first_block import FirstBlockCacheConfig
from ..policies.teacache import TeaCacheConfig
from ..runtime import patch
from .evaluation import Progress, as_runs, check_max_evals, psnr, run_all

__all__ = ["Evaluation", "SearchResult", "search_threshold", "SEARCH_METHODS"]


def _teacache(threshold: float, profile, kw: dict) -> CacheConfig:
    kw = dict(kw)
    if profile is not None and "coefficients" not in kw:
        kw["coefficients"] = profile.fit_teacache(4)
    return TeaCacheConfig(threshold=threshold, **kw)


def _first_block(threshold: float, profile, kw: dict) -> CacheConfig:
    return FirstBlockCacheConfig(threshold=threshold, **kw)


# method -> (config factory(threshold, profile, fixed kwargs), first threshold tried)
SEARCH_METHODS: dict[str, tuple[Callable[[float, object, dict], CacheConfig], float]] = {
    "teacache": (_teacache, 0.1),
    "first_block": (_first_block, 0.05),
}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One threshold over all calibration runs: mean computed fraction (block work),
    PSNR of the outputs vs uncached (dB, over all runs), speedup in process CPU time."""

    threshold: float
    computed_fraction: float
    psnr_db: float
    speedup: float
    seconds: float


@dataclasses.dataclass
class SearchResult:
    method: str
    target: str  # "computed_fraction <= x" or "speedup >= x"
    config: CacheConfig
    chosen: Evaluation
    trace: list[Evaluation]
    baseline_seconds: float

    def __str__(self) -> str:
        lines = [f"threshold search, {self.method}, target {self.target}:"]
        lines.append("  threshold  computed  speedup   PSNR dB")
        for e in self.trace:
            mark = "  <- chosen" if e is self.chosen else ""
            lines.append(f"  {e.threshold:9.4g}  {e.computed_fraction:8.3f}  {e.speedup:6.2f}x  {e.psnr_db:8.2f}{mark}")
        return "\n".join(lines)


def search_threshold(
    model: nn.Module,
    runs: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    method: str = "teacache",
    *,
    target_fraction: float | None = None,
    target_speedup: float | None = None,
    profile=None,
    spec=None,
    max_evals: int = 10,
    rtol: float = 0.05,
    data_range: float = 2.0,
    progress: bool = True,
    **config_kwargs,
) -> SearchResult:
    """The smallest threshold of ``method`` whose computed fraction is at most
    ``target_fraction`` (or whose measured speedup is at least ``target_speedup``) on the
    calibration ``runs``.

    Args:
        model: the transformer (unpatched; it is patched for each evaluation and restored).
        runs: one callable, or several, each performing ONE seeded sampling run of ``model``
            and returning its output tensor (e.g. the final images); the same runs
            unpatched give the reference for PSNR.
        method: a key of :data:`SEARCH_METHODS` ("teacache", "first_block").
        target_fraction: block work computed, in (0, 1] (0.4 = 40 % of the block evaluations).
        target_speedup: measured speedup in process CPU time vs the uncached runs (> 1);
            subject to timing noise on a busy machine, unlike ``target_fraction``.
        profile: a :class:`fastcache.Profile` of these runs; TeaCache then uses its fitted
            polynomial (``profile.fit_teacache(4)``) unless ``coefficients`` is given.
        max_evals: evaluations (each = all ``runs``) at most; rtol: stop bisecting when the
            bracketing thresholds are within this relative distance.
        data_range: of the outputs, for PSNR (2 for images in [-1, 1]).
        **config_kwargs: other fields of the method's config (``num_steps``, ``fn``, ...).
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"search_threshold: unknown method {method!r}; known: {sorted(SEARCH_METHODS)}")
    if (target_fraction is None) == (target_speedup is None):
        raise ValueError(
            "search_threshold: give exactly one of target_fraction (e.g. 0.4) or target_speedup (e.g. 2.0)"
        )
    if target_fraction is not None and not 0.0 < float(target_fraction) <= 1.0:
        raise ValueError(f"search_threshold: target_fraction={target_fraction!r} must be in (0, 1]")
    if target_speedup is not None and not float(target_speedup) > 1.0:
        raise ValueError(f"search_threshold: target_speedup={target_speedup!r} must be > 1")
    check_max_evals("search_threshold", max_evals, 2)
    runs = as_runs(runs, "search_threshold")
    make, t0 = SEARCH_METHODS[method]
    make(t0, profile, config_kwargs)  # validate the fixed fields before any run

    bar = Progress(f"fastcache.search_threshold({method})", progress)
    try:
        base = run_all(runs, "search_threshold", tick=bar)
        refs, base_s = base.outputs, base.seconds
        trace: list[Evaluation] = []

        def evaluate(t: float) -> Evaluation:
            h = patch(model, make(t, profile, config_kwargs), spec)
            try:
                got = run_all(runs, "search_threshold", handle=h, tick=bar)
            finally:
                h.remove()
            speedup = base_s / max(got.seconds, 1e-12)
            e = Evaluation(t, got.computed_fraction(), psnr(got.outputs, refs, data_range), speedup, got.seconds)
            trace.append(e)
            return e

        def meets(e: Evaluation) -> bool:
            if target_fraction is not None:
                return e.computed_fraction <= target_fraction
            return e.speedup >= target_speedup

        # bracket: lo misses the target, hi meets it
        lo, hi = None, None
        t = t0
        while len(trace) < max_evals:
            e = evaluate(t)
            if meets(e):
                hi = t
                if lo is not None:
                    break
                t /= 2
            else:
                lo = t
                if hi is not None:
                    break
                t *= 2
            if t > 1e6 or t < 1e-6:
                break
        while lo is not None and hi is not None and len(trace) < max_evals and hi / lo > 1 + rtol:
            mid = math.sqrt(lo * hi)
            if meets(evaluate(mid)):
                hi = mid
            else:
                lo = mid
    finally:
        bar.close()
    ok = [e for e in trace if meets(e)]
    target = (
        f"computed_fraction <= {target_fraction:g}" if target_fraction is not None else f"speedup >= {target_speedup:g}"
    )
    if not ok:
        best = min(trace, key=lambda e: e.computed_fraction)
        raise ValueError(
            f"search_threshold: no {method} threshold tried meets {target} on these runs; the best was threshold "
            f"{best.threshold:.4g} (computed fraction {best.computed_fraction:.3f}, speedup {best.speedup:.2f}x). "
            "Lower the target, raise max_evals, or check max_consecutive_skips / warmup_steps in the config."
        )
    chosen = max(ok, key=lambda e: (e.psnr_db, -e.threshold))
    return SearchResult(method, target, make(chosen.threshold, profile, config_kwargs), chosen, trace, base_s)
