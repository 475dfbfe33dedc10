"""FORA on the block interior (Selvaraju et al., arXiv 2407.01425; docs/methods.md "FORA"),
on the engine every branch-level policy shares
(:class:`~fastcache.policies.interior_engine.InteriorCachePolicy`).

Per step: the AdaLN modulation of every block is recomputed; on a computed step every
branch's pre-gate output ``f`` is kept; on a reused step ``x <- x + gate * f_cached``.

Where the step is decided:

* eager, FORA, step index given by the caller (the pipeline's ``cache_context(name,
  step_index=i)`` or ``fastcache.context(model, name, step_index=i)``): the host schedule
  :meth:`FORAConfig.computes` — no device read;
* otherwise on the device: :func:`~fastcache.policies.steps.timestep_guard` then
  :func:`fastcache.ops.cache_decision` with ``threshold=inf, max_skips=interval-1,
  warmup`` (exactly "compute every N-th step", with device-side new-run detection);
  eager reads that one flag per step (together with the repeated-timestep flag, in one
  read); under ``torch.compile`` / CUDA-graph capture one ``torch.cond`` around the
  stack: the compute branch returns the new streams and the new branch outputs, the
  reuse branch recomputes the modulations and applies the cached outputs; the cache is
  updated outside the cond, gated by the device flag.

A repeated call (same timestep as the previous call) is computed and leaves the cache
untouched, as in TeaCache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_int, _set, config_type
from .base import StepInfo, register_policy
from .interior_engine import SUMS_ZERO_CHANGE, InteriorCachePolicy


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class FORAConfig(CacheConfig):
    """FORA (Selvaraju et al., arXiv 2407.01425; docs/methods.md "FORA"): every block's
    attention and MLP outputs (before gating) are computed on the first ``warmup_steps``
    steps and then every ``interval``-th step, and reused in between; the AdaLN
    modulation, and so every gate, is recomputed each step.

    Schedule: step ``s`` (0-based) is computed iff ``s < warmup_steps`` or
    ``(s - warmup_steps + 1) % interval == 0`` (warmup 1: steps 0, N, 2N, ... as in the
    paper). ``interval=1`` computes every step (bitwise the unpatched model).

    Args:
        interval: N >= 1 (paper default 3).
        warmup_steps: leading steps always computed (>= 1: step 0 has no cache).
        num_steps: steps per run, when known: flags runs of another length in stats.
            The eager path places steps on the host (no device read at all) when the caller
            gives the step index (``cache_context(name, step_index=i)`` or
            ``fastcache.context(model, name, step_index=i)``); otherwise it reads one flag
            per step.
        history: steps of decision timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "fora"

    interval: int = 3
    warmup_steps: int = 1
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))

    def computes(self, step: int) -> bool:
        """The host schedule: is step ``step`` computed?"""
        w, n = self.warmup_steps, self.interval
        return step < w or (step - w + 1) % n == 0


@register_policy(FORAConfig)
class FORAPolicy(InteriorCachePolicy):
    """FORA: see the module docstring and :class:`fastcache.FORAConfig`."""

    decides_from_data = False  # a static schedule: identical on every rank of a process group

    def host_compute(self, step: StepInfo) -> bool | None:
        return self.config.computes(step.index)

    def allocate(self, st, streams, dev) -> None:
        st.coeffs = torch.zeros(0, dtype=torch.float32, device=dev)
        st.sums = torch.tensor(SUMS_ZERO_CHANGE, dtype=torch.float32, device=dev)

    def device_decision(self, st, call, t_op, hold):
        n = self.config.interval
        # interval 1: threshold 0 forces every step; else inf never fires and max_skips
        # = interval - 1 forces the compute after every run of N-1 skips.
        thr = 0.0 if n == 1 else math.inf
        return ops.cache_decision(
            st.sums, t_op, st.coeffs, st.state, thr, self.config.warmup_steps, n - 1, 0, hold=hold
        )
