"""Error-Optimized Cache on the block interior (Qiu et al., arXiv 2501.19243;
docs/methods.md "EOC").

1. Prior (Eq. 4): ``P[s, k]``, the calibrated mean of slot k's pre-gate branch output
   at step s (:func:`fastcache.calibrate`, :class:`fastcache.Profile`).
2. Trend (Eq. 5): on a reused step s whose cache was computed at step ``s_prev``,
   ``T[k] = P[s, k] - P[s_prev, k]`` — gathered on the device from the step counter and
   the per-slot "last computed step" tensor, so any base schedule works, dynamic ones
   (TeaCache) included.
3. Cache-optimization determination (Eq. 6). The paper weighs the error magnitude
   against the step position with a regulation coefficient and a threshold; our
   concrete rule (choice documented here and tested): per block l,

       e_l      = mean over the block's slots of mean|T[k]|
       priority = (e_l / e_bar) * exp(-lambda * s / (S - 1))
       correct block l at step s  iff  s is a reused step and priority > tau

   ``e_bar`` = the mean of e_l over all blocks for adjacent steps (s_prev = s - 1) of
   the profile, so ``e_l / e_bar`` reads "how many adjacent-step errors this reuse
   is". ``exp(-lambda s/(S-1))`` makes early steps weigh more (the paper's finding:
   correct early steps only; correcting late steps blurs detail). Defaults lambda = 4,
   tau = 0.25 (:class:`fastcache.EOCConfig`).
4. Correction (Eq. 7): ``x + gate * f_cached * (1 + w * T)`` in the fused
   :func:`fastcache.ops.gated_residual`, attention and MLP (every branch of the block)
   together; blocks not selected get ``T = 0`` (exactly the base's ``x + gate * f``).

``base``: FORA (rule-based), TeaCache (its decision on the first block's modulated
input, branch-level reuse instead of the stack residual: the interior TeaCache
variant, so ``weight=0`` equals that variant bitwise, not the stack TeaCache) or a
static (steps x blocks) mask (training-based schedules such as Learning-to-Cache).
In eager mode a mask is placed on the host when the caller gives the step index (the
pipeline's ``step_index`` / ``fastcache.context(..., step_index=i)``: no read), else its
row for the device's step is read once per step; under torch.compile the mask is a device tensor
indexed by the device step counter and each block is its own ``torch.cond`` (this
compiles on the diffusers families too because the attention processors' signatures are
built outside the conds: :func:`fastcache.policies.base.warm_signatures`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _as_mask, _check_float, _check_int, _profile_steps, _set, config_type
from ..interior import run_blocks
from ..tuning.profile import TimestepWatch
from .base import StepInfo, register_policy
from .fora import FORAConfig, FORAPolicy
from .interior_engine import InteriorCachePolicy, InteriorState, StepExecutor
from .teacache import TeaCacheConfig


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class EOCConfig(CacheConfig):
    """Error-Optimized Cache (Qiu et al., arXiv 2501.19243; docs/methods.md "EOC") on a
    base caching schedule: a reused branch output becomes ``cached * (1 + w * T)``
    inside the gated residual (Eq. 7), attention and MLP together, where the trend
    ``T = P[s] - P[s_prev]`` comes from the calibrated prior (Eq. 4-5,
    :func:`fastcache.calibrate`), and only (block, step) pairs whose priority passes
    the threshold are corrected (Eq. 6, see :mod:`fastcache.policies.eoc`).

    Args:
        base: the schedule to correct: a :class:`FORAConfig`, a :class:`TeaCacheConfig`
            (its decision, with branch-level reuse: the interior TeaCache variant) or a
            static boolean ``(steps x blocks)`` mask, True = compute (a training-based
            schedule such as Learning-to-Cache's).
        weight: w; None = the paper's default, 0.01 on a rule-based base (FORA,
            TeaCache), 0.005 on a static mask. ``0`` equals ``base`` bitwise.
        profile: a :class:`fastcache.Profile` (or a path to one) for this model and
            step count.
        regulation: lambda of the priority's step-position weight ``exp(-lambda * s / (S-1))``.
        threshold: tau; a cached (block, step) is corrected iff its priority > tau.
            Defaults lambda = 4, tau = 0.25: on the digits DiT this corrects the reused
            blocks of the first ~15% of the steps (bench/bench_quality.py).
        num_steps: steps per run; default the profile's (it must match).
    """

    kind: ClassVar[str] = "eoc"

    base: Any = None
    weight: float | None = None
    profile: Any = None
    regulation: float = 4.0
    threshold: float = 0.25
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        from ..tuning.profile import Profile

        base = self.base
        if base is None:
            raise ValueError(
                "EOCConfig.base is required: a FORAConfig, a TeaCacheConfig or a (steps x blocks) bool mask"
            )
        if not isinstance(base, (FORAConfig, TeaCacheConfig)):
            mask = _as_mask(base)
            if mask is None:
                raise ValueError(
                    f"EOCConfig.base must be a FORAConfig, a TeaCacheConfig or a (steps x blocks) bool mask, "
                    f"got {type(base).__name__}"
                )
            _set(self, "base", mask)
        if self.weight is None:
            _set(self, "weight", 0.005 if isinstance(self.base, tuple) else 0.01)
        else:
            _set(self, "weight", _check_float("weight", self.weight, 0, " (0 = the base schedule unchanged)"))
        prof = self.profile
        if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
            prof = Profile.load(prof)
        if not isinstance(prof, Profile):
            raise ValueError(
                "EOCConfig.profile must be a fastcache.Profile (profile = fastcache.calibrate(model, run)) or a path "
                f"to a saved one, got {type(self.profile).__name__}"
            )
        _set(self, "profile", prof)
        _set(self, "regulation", _check_float("regulation", self.regulation, 0))
        _set(self, "threshold", _check_float("threshold", self.threshold, 0))
        n = _profile_steps(self, prof, "EOC")
        if isinstance(self.base, tuple) and len(self.base) != n:
            raise ValueError(f"EOCConfig.base: the static mask has {len(self.base)} rows (steps) but num_steps={n}")
        _set(self, "history", _check_int("history", self.history, 1))

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict() if isinstance(self.base, CacheConfig) else [list(r) for r in self.base]
        return {
            "kind": self.kind,
            "base": base,
            "weight": self.weight,
            "profile": self.profile.describe(),
            "regulation": self.regulation,
            "threshold": self.threshold,
            "num_steps": self.num_steps,
            "history": self.history,
        }


# --------------------------------------------------------------------------- policy
@register_policy(EOCConfig)
class EOCPolicy(InteriorCachePolicy):
    # True for the TeaCache base (its sums are reduced over a process group); the FORA and
    # mask bases are static and reduce nothing.
    decides_from_data = True

    def __init__(self, config: EOCConfig, spec, model):
        super().__init__(config, spec, model)
        prof = config.profile
        self.method = getattr(self, "method", "EOCConfig")
        # the prior's width (and, at the first call, its token count) matter only where it
        # corrects: Block Caching (weight 0) uses the profile's block_change curve alone
        self.uses_prior = float(config.weight) != 0.0
        prof.check_fits(model, slots=self.layout.describe(), uses_prior=self.uses_prior, method=self.method)
        self.watch = TimestepWatch(prof, self.method)
        self.base = config.base
        self.decides_from_data = isinstance(self.base, TeaCacheConfig)  # per instance: what stats report
        self.weight = float(config.weight)
        self.num_steps = config.num_steps
        if isinstance(self.base, tuple) and len(self.base[0]) != self.layout.num_blocks:
            raise ValueError(
                f"EOCConfig.base: the static mask has {len(self.base[0])} columns but the model has "
                f"{self.layout.num_blocks} blocks"
            )
        if isinstance(self.base, TeaCacheConfig):
            coeffs = self.base.coefficients
            if coeffs is None:
                coeffs = spec.teacache_coefficients or ()
            self.coefficients = tuple(coeffs)
        self._prior_cpu = prof.prior
        self._prior: dict[torch.device, tuple] = {}
        self._mask: dict[torch.device, torch.Tensor] = {}
        S = prof.num_steps
        # e_bar: the mean adjacent-step trend magnitude per block (see the module docstring).
        T = (self._prior_cpu[1:] - self._prior_cpu[:-1]).abs().flatten(2).mean(2)  # (S-1, K)
        e_blocks = self._block_mean(T)  # (S-1, L)
        self.e_bar = float(e_blocks.mean())  # host-read-ok: policy construction, off the step path
        if not self.e_bar > 0:
            raise ValueError("the profile's prior does not change between steps (e_bar = 0); calibrate again")
        self.S = S

    def _block_mean(self, e_k: torch.Tensor) -> torch.Tensor:
        """(..., K) per-slot values -> (..., L) per-block means."""
        L = self.layout.num_blocks
        idx = torch.tensor(self.layout.block_of_slot, device=e_k.device)
        out = torch.zeros((*e_k.shape[:-1], L), dtype=e_k.dtype, device=e_k.device)
        out.index_add_(-1, idx, e_k)
        n = torch.zeros(L, dtype=e_k.dtype, device=e_k.device).index_add_(0, idx, torch.ones_like(idx, dtype=e_k.dtype))
        return out / n

    def _device_prior(self, dev):
        got = self._prior.get(dev)
        if got is None:
            P = self._prior_cpu.to(dev)
            slot_block = torch.tensor(self.layout.block_of_slot, dtype=torch.long, device=dev)
            ar = torch.arange(self.K, device=dev)
            got = (P, slot_block, ar)
            self._prior[dev] = got
        return got

    def set_num_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps != self.S:
            raise ValueError(
                f"fastcache: num_steps={num_steps} but the EOC profile was recorded over {self.S}-step runs; "
                "calibrate a profile for this step count"
            )

    def begin_step(self, st, timestep, step: StepInfo) -> None:
        # the run's step count, where the caller announces it (a pipeline's
        # num_inference_steps, fastcache.context(..., num_steps=n)): refused before any work
        # when the profile was recorded over another one (its prior is indexed by step)
        n = step.run_steps or step.num_steps
        if n and n != self.S:
            self.config.profile.check_fits(num_steps=n, method=self.method)
        super().begin_step(st, timestep, step)
        st.timestep = timestep  # watched against the profile's where the trend is used (device ops)

    # -- schedule -----------------------------------------------------------------------
    def host_compute(self, step: StepInfo):
        if step.index >= self.S:
            raise ValueError(
                f"fastcache: step index {step.index} is beyond the EOC profile's {self.S} steps; sample with "
                f"{self.S} steps or calibrate a profile for this step count"
            )
        if isinstance(self.base, FORAConfig):
            return self.base.computes(step.index)
        if isinstance(self.base, tuple):
            if step.index >= len(self.base):
                raise ValueError(f"step {step.index} is beyond the static schedule's {len(self.base)} steps")
            return list(self.base[step.index])
        return None

    def allocate(self, st: InteriorState, streams, dev) -> None:
        # the first call of these shapes, before any work: the prior must fit the streams
        # it corrects (width; token count at token granularity)
        self.config.profile.check_fits(streams=streams, uses_prior=self.uses_prior, method=self.method)
        if getattr(st, "ts_rec", None) is None or st.ts_rec.device != dev:
            st.ts_rec = self.watch.new_record(dev) if self.uses_prior else None
        if isinstance(self.base, (FORAConfig, tuple)):
            FORAPolicy.allocate(self, st, streams, dev)
        elif isinstance(self.base, TeaCacheConfig):
            st.coeffs = torch.tensor(self.coefficients, dtype=torch.float32, device=dev)

    def eager_schedule_step(self, st, call, streams, s_idx, rep):
        if not isinstance(self.base, tuple):
            return None
        # Eager without a host step index: the mask row of the device's step and the
        # repeated-call flag, in one read.
        row = self.device_block_flags(st, s_idx).to(torch.long)
        vals = torch.cat([row, rep.reshape(1).to(torch.long), s_idx.reshape(1)])
        *flags, repeated, s = vals.tolist()  # host-read-ok: the one eager read
        if s >= self.S:
            raise ValueError(
                f"fastcache: step {s} is beyond the EOC profile's {self.S} steps; sample with {self.S} steps "
                "or calibrate a profile for this step count"
            )
        if repeated:  # computed in full, cache untouched (as every policy does)
            L = self.layout.num_blocks
            st.counts.add_(torch.tensor([1.0, 0.0, 0.0, 0.0, float(L)], device=st.counts.device))
            return run_blocks(self.layout, call, streams, StepExecutor(self, st, [True] * L, False, None, 0.0))
        return self._host_step(st, call, streams, s, [bool(f) for f in flags])

    def device_block_flags(self, st, s_idx):
        if not isinstance(self.base, tuple):
            return None
        mask = self._mask.get(s_idx.device)
        if mask is None:
            mask = self._mask[s_idx.device] = torch.tensor(self.base, dtype=torch.bool, device=s_idx.device)
        return mask.index_select(0, s_idx.clamp(max=self.S - 1))[0]

    def device_decision(self, st, call, t_op, hold):
        if isinstance(self.base, FORAConfig):
            n = self.base.interval
            thr = 0.0 if n == 1 else math.inf
            return ops.cache_decision(
                st.sums, t_op, st.coeffs, st.state, thr, self.base.warmup_steps, n - 1, 0, hold=hold
            )
        if isinstance(self.base, tuple):
            # The decision op only counts steps on the device (threshold 0: every call
            # "computes"); the mask gives each block its flag (device_block_flags).
            return ops.cache_decision(st.sums, t_op, st.coeffs, st.state, 0.0, 1, 0, 0, hold=hold)
        b = self.base
        head = self.layout.entries[0].module
        x, shift, scale, eps, *_ = self.spec.modulation(head, call)
        if st.prev is None:
            st.prev = torch.zeros_like(x, memory_format=torch.contiguous_format)
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev, eps, hold=hold)
        sums = self.reduce_sums(sums)  # multi-device: every rank decides from the group's sums
        return ops.cache_decision(
            sums,
            t_op,
            st.coeffs,
            st.state,
            b.threshold,
            b.warmup_steps,
            b.max_consecutive_skips,
            self.num_steps,
            hold=hold,
        )

    # -- correction ---------------------------------------------------------------------
    def trend(self, st, s_idx, last, reused=None):
        if self.weight == 0.0:
            return None, None
        P, slot_block, ar = self._device_prior(s_idx.device)
        self.watch.observe(getattr(st, "ts_rec", None), getattr(st, "timestep", None), s_idx)
        s_c = s_idx.clamp(max=self.S - 1)
        T = P.index_select(0, s_c)[0] - P[last.clamp(max=self.S - 1), ar]  # (K, D) or (K, N, D)
        e_k = T.abs().flatten(1).mean(1)
        L = self.layout.num_blocks
        e_l = torch.zeros(L, dtype=e_k.dtype, device=e_k.device).index_add_(0, slot_block, e_k)
        counts = torch.zeros(L, dtype=e_k.dtype, device=e_k.device).index_add_(0, slot_block, torch.ones_like(e_k))
        pos = torch.exp(s_c.to(torch.float32) * (-self.config.regulation / (self.S - 1)))
        priority = (e_l / counts) / self.e_bar * pos
        corr = priority > self.config.threshold
        if reused is not None:  # only cached positions count
            corr = corr & reused
        shape = (self.K,) + (1,) * (T.dim() - 1)
        T = T * corr.index_select(0, slot_block).to(T.dtype).reshape(shape)
        return T, corr.sum().to(torch.float32)

    def state_stats(self, st) -> dict:
        out = super().state_stats(st)
        n, msg = self.watch.report(getattr(st, "ts_rec", None))
        if n:
            out["profile_timestep_mismatches"] = n
            out.setdefault("warnings", []).append(msg)
        return out
