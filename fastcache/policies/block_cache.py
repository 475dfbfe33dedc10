"""Block Caching on the block interior (Wimbauer et al., "Cache Me if You Can",
arXiv 2312.03209, CVPR 2024; docs/methods.md section 6).

1. Profile (B1): ``Delta_i(s) = ||o_i(s) - o_i(s-1)||_1 / ||o_i(s)||_1``, block i's
   output streams on uncached runs, averaged over the calibration runs
   (:func:`fastcache.calibrate`, ``Profile.block_change``).
2. Schedule (B2), once, at config time (:func:`block_schedule` below): block
   i is refreshed at step s when ``sum_{s'=last_i+1}^{s} Delta_i(s') >= delta``; step 0
   refreshes every block. A static ``(steps x blocks)`` mask, True = compute
   (:attr:`fastcache.BlockCacheConfig.mask`).
3. A reused block: every branch of the block (attention, cross-attention, MLP, per
   stream) takes its cached pre-gate output through the fused gated residual, with the
   gates recomputed from the current step's modulation. This is our choice for a
   transformer block, whose output is its input plus gated branch outputs: reusing the
   branches keeps the current residual stream and the current gates, where reusing the
   block's whole output would discard the change of its input. The recomputed gates play
   the role of the paper's learned scale-shift alignment (B3), which needs training.

The mask runs exactly as EOC runs a static mask (this policy is
:class:`~fastcache.policies.eoc.EOCPolicy` on the mask with weight 0): eager with a host
step index, no device read; eager without one, the mask row of the device's step in one
read; under ``torch.compile`` the mask is a device tensor indexed by the device step
counter, one ``torch.cond`` per block (same known limit as EOC's mask: dynamo cannot
trace diffusers' ``Attention.forward`` inside per-block conds, so compiled Block Caching
runs on ``fastcache.models.DiT``, and fails to compile, never silently, on the diffusers
families). EOC's correction composes: ``EOCConfig(base=cfg.mask, profile=cfg.profile)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..config import CacheConfig, _check_float, _check_int, _profile_steps, _set, config_type
from ..tuning.profile import load_profile
from .base import StepInfo, register_policy
from .eoc import EOCConfig, EOCPolicy


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class BlockCacheConfig(CacheConfig):
    """Block Caching (Wimbauer et al., arXiv 2312.03209, CVPR 2024; docs/methods.md
    section 6): a static per-block refresh schedule from the calibrated per-block change
    curves ``Delta_i(s)`` (B1, :func:`fastcache.calibrate`). Block i is refreshed at step s
    when its change accumulated since its last refresh reaches ``delta`` (B2); otherwise
    every branch of the block is reused, its gates recomputed (the fused gated residual;
    it stands in for the paper's learned scale-shift B3). Step 0 computes every block.

    The ``(steps x blocks)`` mask is computed here, once (:attr:`mask`, True = compute);
    EOC's correction composes with it: ``EOCConfig(base=cfg.mask, profile=cfg.profile)``.

    Args:
        delta: the refresh threshold on the accumulated relative change. ``0`` refreshes
            every block every step (bitwise the unpatched model).
        profile: a :class:`fastcache.Profile` (or its path) with the ``block_change`` curves.
        num_steps: steps per run; default (and it must be) the profile's.
        history: steps of decision timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "block_cache"

    delta: float = 0.1
    profile: Any = None
    num_steps: int | None = None
    history: int = 1024
    mask: tuple[tuple[bool, ...], ...] = dataclasses.field(init=False, default=(), compare=False)

    def __post_init__(self) -> None:
        _set(self, "delta", _check_float("delta", self.delta, 0, " (0 = refresh every block every step)"))
        prof = load_profile(self.profile, "BlockCacheConfig")
        _set(self, "profile", prof)
        change = prof.require("block_change", "BlockCacheConfig").tolist()  # host-read-ok: config construction
        _profile_steps(self, prof, "Block Caching")
        _set(self, "history", _check_int("history", self.history, 1))
        _set(self, "mask", block_schedule(change, self.delta))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "delta": self.delta,
            "profile": self.profile.describe(),
            "num_steps": self.num_steps,
            "history": self.history,
            "computed_fraction": sum(map(sum, self.mask)) / (len(self.mask) * len(self.mask[0])),
        }


def block_schedule(change, delta: float) -> tuple[tuple[bool, ...], ...]:
    """B2 on the host: ``change[s][i] = Delta_i(s)``; block i computes at step s iff s == 0
    or ``sum_{s'=last_i+1}^{s} Delta_i(s') >= delta`` (then ``last_i = s``). Python floats
    (fp64), summed in step order."""
    L = len(change[0])
    acc = [0.0] * L
    rows = [tuple([True] * L)]
    for s in range(1, len(change)):
        row = []
        for i in range(L):
            acc[i] += float(change[s][i])
            hit = acc[i] >= delta
            if hit:
                acc[i] = 0.0
            row.append(hit)
        rows.append(tuple(row))
    return tuple(rows)


# --------------------------------------------------------------------------- policy
@register_policy(BlockCacheConfig)
class BlockCachePolicy(EOCPolicy):
    """EOC's static-mask machinery with no correction (weight 0: the trend is never
    computed), on the mask :class:`fastcache.BlockCacheConfig` computed from the profile."""

    decides_from_data = False  # a schedule fixed by the profile: identical on every rank of a process group

    def __init__(self, config: BlockCacheConfig, spec, model):
        self.method = "BlockCacheConfig"
        eoc = EOCConfig(
            base=config.mask, weight=0.0, profile=config.profile, num_steps=config.num_steps, history=config.history
        )
        super().__init__(eoc, spec, model)
        self.block_config = config

    def host_compute(self, step: StepInfo):
        if step.index >= self.S:
            raise ValueError(
                f"fastcache: step index {step.index} is beyond the Block Caching schedule's {self.S} steps (its "
                f"profile's); sample with {self.S} steps or calibrate a profile for this step count"
            )
        return super().host_compute(step)

    def state_stats(self, st) -> dict:
        out = super().state_stats(st)
        out.pop("corrected", None)  # never corrects (EOC's counter)
        return out
