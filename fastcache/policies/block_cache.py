"""Block Caching on the block interior (Wimbauer et al., "Cache Me if You Can",
arXiv 2312.03209, CVPR 2024; docs/methods.md section 6).

1. Profile (B1): ``Delta_i(s) = ||o_i(s) - o_i(s-1)||_1 / ||o_i(s)||_1``, block i's
   output streams on uncached runs, averaged over the calibration runs
   (:func:`fastcache.calibrate`, ``Profile.block_change``).
2. Schedule (B2), once, at config time (:func:`fastcache.config.block_schedule`): block
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

from ..config import BlockCacheConfig, EOCConfig
from .base import StepInfo, register_policy
from .eoc import EOCPolicy


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
