"""SmoothCache (Liu et al., arXiv 2411.10510; docs/methods.md "SmoothCache"): a static
schedule from calibrated representation errors, run as a :class:`fastcache.ScheduleConfig`.

1. Calibration (:func:`fastcache.calibrate`, ``Profile.step_gram``): per slot k (a
   (block, branch, stream) output) the Gram ``G_k[i, j] = <F_k(i), F_k(j)>`` of its branch
   outputs over the steps of uncached runs.
2. The error of reusing step ``j``'s outputs at step ``s``, averaged over the slots:
   ``e(s, j) = mean_k ||F_k(s) - F_k(j)||_2 / ||F_k(s)||_2``, with
   ``||F_k(s) - F_k(j)||^2 = G_k[s, s] - 2 G_k[s, j] + G_k[j, j]``.
3. The schedule, once, at config time (:func:`smooth_plan`): step 0 computes; step s
   reuses the last computed step c while ``e(s, c) < alpha``, else it computes (c = s).

The paper measures the error with the relative L1 norm per layer type and caches each type
on its own schedule; this implementation uses the relative L2 norm the Gram gives exactly,
and one schedule for every branch (one decision per step, as the interior engine runs it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from ..config import CacheConfig, _check_float, _profile_steps, _set, config_type
from ..tuning.profile import load_profile
from .base import register_policy
from .schedule import ScheduleConfig, SchedulePolicy


@config_type
@dataclasses.dataclass(frozen=True)
class SmoothCacheConfig(CacheConfig):
    """SmoothCache (Liu et al., arXiv 2411.10510): reuse every branch output of the last
    computed step while its calibrated relative error stays under ``alpha``.

    Args:
        alpha: the error threshold (mean relative L2 error of the reused branch outputs).
            ``0`` computes every step (bitwise the unpatched model); larger skips more.
        profile: a :class:`fastcache.Profile` (or its path) with the ``step_gram``
            (``fastcache.calibrate(model, run)``, format 3).
        num_steps: steps per run; default (and it must be) the profile's.

    :attr:`plan` is the schedule (``"C"`` computed, ``"0"`` reused), run exactly as
    ``ScheduleConfig(plan=cfg.plan)``: with the steps announced, nothing is read to the host.
    """

    kind: ClassVar[str] = "smoothcache"

    alpha: float = 0.1
    profile: Any = None
    num_steps: int | None = None
    plan: str = dataclasses.field(init=False, default="", compare=False)

    def __post_init__(self) -> None:
        _set(self, "alpha", _check_float("alpha", self.alpha, 0, " (0 = compute every step)"))
        prof = load_profile(self.profile, "SmoothCacheConfig")
        _set(self, "profile", prof)
        gram = prof.require("step_gram", "SmoothCacheConfig")
        _profile_steps(self, prof, "SmoothCache")
        _set(self, "plan", smooth_plan(gram.tolist(), self.alpha))  # host-read-ok: config construction

    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(plan=self.plan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "alpha": self.alpha,
            "profile": self.profile.describe(),
            "num_steps": self.num_steps,
            "plan": self.plan,
        }


def reuse_error(gram, s: int, j: int) -> float:
    """``e(s, j)``: the mean over slots of ``||F_k(s) - F_k(j)|| / ||F_k(s)||`` from the Grams
    ``gram[k][i][j]`` (Python floats, fp64)."""
    errs = []
    for g in gram:
        ss = g[s][s]
        d2 = max(ss - 2.0 * g[s][j] + g[j][j], 0.0)
        errs.append(math.sqrt(d2 / ss) if ss > 0 else 0.0)
    return sum(errs) / len(errs)


def smooth_plan(gram, alpha: float) -> str:
    """The greedy schedule: step 0 computes; step s reuses the last computed step c while
    ``reuse_error(gram, s, c) < alpha``. ``alpha == 0`` computes every step."""
    S = len(gram[0])
    plan, c = ["C"], 0
    for s in range(1, S):
        if reuse_error(gram, s, c) < alpha:
            plan.append("0")
        else:
            plan.append("C")
            c = s
    return "".join(plan)


@register_policy(SmoothCacheConfig)
class SmoothCachePolicy(SchedulePolicy):
    """:class:`~fastcache.policies.schedule.SchedulePolicy` on the plan the config computed."""

    decides_from_data = False  # a schedule fixed by the profile: identical on every rank

    def __init__(self, config: SmoothCacheConfig, spec, model):
        super().__init__(config.schedule(), spec, model)
        self.smooth_config = config
