"""TeaCache on fused, device-resident state (Liu et al., arXiv 2411.19108).

Per step (docs/methods.md, section 1, Eq. T1-T9):

1. indicator ``I_s = LN(x) * (1 + scale_msa) + shift_msa`` of the first block, its
   relative-L1 distance to ``I_{s-1}`` and ``I_{s-1} <- I_s`` — one fused op
   (:func:`fastcache.ops.modulated_rel_l1_sums`), every step;
2. polynomial rescale, accumulate, threshold, forced first/last step, reset on
   compute — one fused op on a device state vector (:func:`fastcache.ops.cache_decision`);
3. computed step: run the whole stack, ``R <- out - in`` per cached stream;
   skipped step: ``out = in + R``.

Timesteps (all on the device, no host read): a new sampling run starts when the
timestep rises by more than a relative tolerance (:data:`TIMESTEP_RTOL`; float jitter
such as KDPM2-ancestral's 554.9999 -> 555.0 stays in the run). A call whose timestep
repeats the previous call's (Heun's and PNDM's repeated evaluations, or classifier-free
guidance run as two calls without a context) is computed in full and leaves the cache
untouched: it neither reuses nor overwrites the other call's residual, indicator or
accumulator, and it is counted in ``stats`` (``repeated_timestep_calls``).

Eager mode reads the decision flag once per step and branches in Python. Under
``torch.compile`` or CUDA-graph capture the branch is a cond operator with functional
branches (``StackRunner.cond``; host reads per mode in docs/modes.md); the residual
store sits outside and is gated by the device flag.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

from .. import ops
from ..config import CacheConfig, _check_decision_fields, _check_float, _set, config_type
from ..ops.reference import ACC, MAX_COEFFS, STATE_HEADER
from ..tracing import static_floats
from .base import Policy, StackRunner, is_tracing, register_policy
from .memo import reuse_outputs
from .stack_engine import DecisionState, skipped_stack, store_residuals, traced_stack
from .steps import timestep_guard


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache (Liu et al., arXiv 2411.19108): skip the whole block stack when the
    accumulated, polynomial-rescaled relative-L1 change of the first block's modulated
    input stays below ``threshold``; reuse the stack residual instead.

    Args:
        threshold: accumulated-distance threshold (paper/reference: FLUX 0.25 / 0.4 /
            0.6 / 0.8 for ~1.5x / 1.8x / 2.0x / 2.25x). ``0`` disables skipping (every
            step is computed, output identical to the unpatched model).
        coefficients: rescaling polynomial, highest power first (``numpy.poly1d``
            order), at most 8 values. ``None`` takes the model's published coefficients
            (FLUX) and otherwise the identity ``poly(x) = x`` — the raw relative-L1, a
            sound default for models without published fits (DiT, PixArt, SD3); fit your
            own with ``numpy.polyfit`` as the authors do (docs/methods.md, TeaCache).
        warmup_steps: initial steps always computed (>= 1: step 0 has no cache).
        max_consecutive_skips: compute after this many skips in a row (0 = no limit).
        num_steps: sampling steps per run; when given, the last step is always computed
            (as in the reference). Can also be set later with ``handle.set_num_steps``.
        history: steps of decision timeline kept on device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "teacache"

    threshold: float = 0.1
    coefficients: tuple[float, ...] | None = None
    warmup_steps: int = 1
    max_consecutive_skips: int = 0
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        if self.coefficients is not None:
            cs = self.coefficients
            if isinstance(cs, (str, bytes)) or not hasattr(cs, "__iter__"):
                raise ValueError(
                    f"coefficients must be a sequence of numbers (numpy.poly1d order), got {self.coefficients!r}"
                )
            cs = tuple(cs)
            if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in cs):
                raise ValueError(
                    f"coefficients must be a sequence of numbers (numpy.poly1d order), got {self.coefficients!r}"
                )
            cs = tuple(float(c) for c in cs)
            if not 1 <= len(cs) <= MAX_COEFFS or not all(math.isfinite(c) for c in cs):
                raise ValueError(
                    f"coefficients must hold 1..{MAX_COEFFS} finite numbers (highest power first), got {cs}"
                )
            _set(self, "coefficients", cs)
        _check_decision_fields(self)


# --------------------------------------------------------------------------- policy
class TeaCacheState(DecisionState):
    """One cache context: ``prev`` is the previous modulated input (B, N, D), ``residuals``
    the stack residual per cached stream (see :class:`~fastcache.policies.stack_engine.DecisionState`)."""


@register_policy(TeaCacheConfig)
class TeaCachePolicy(Policy):
    decides_from_data = True  # the indicator sums are reduced over a process group (fastcache.distributed)

    def __init__(self, config: TeaCacheConfig, spec, model):
        super().__init__(config, spec, model)
        coeffs = config.coefficients
        if coeffs is None:
            coeffs = spec.teacache_coefficients or ()
        self.coefficients: tuple[float, ...] = tuple(coeffs)
        self.num_steps = config.num_steps or 0

    def new_state(self) -> TeaCacheState:
        return TeaCacheState(self.config.history)

    def begin_step(self, st: TeaCacheState, timestep, step) -> None:
        # diffusers' cache_context(num_inference_steps=...) or the configured num_steps
        st.num_steps = step.num_steps or 0

    def reset_state(self, st: TeaCacheState) -> None:
        st.reset()

    def invalidate(self, st: TeaCacheState) -> None:
        # An infinite accumulator forces the next decision to compute (then resets to 0);
        # the step count of the run is kept. A host-to-device write, no read.
        if st.state is not None:
            st.state[ACC : ACC + 1].fill_(math.inf)

    @static_floats
    def run_stack(self, st: TeaCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        x, shift, scale, eps, *memo = spec.modulation(head, call)
        streams = {n: call[n] for n in spec.streams}
        st.ensure({n: streams[n] for n in spec.cached_streams}, self.coefficients, indicator=x)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, st.num_steps)
        # A repeated call (rep) must leave the cache as it found it (see the module
        # docstring): the ops hold prev and the decision state, and the decision says compute.
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev, eps, hold=rep)
        sums = self.reduce_sums(sums)  # multi-device: every rank decides from the group's sums
        flag = ops.cache_decision(
            sums,
            t_op,
            st.coeffs,
            st.state,
            self.config.threshold,
            self.config.warmup_steps,
            self.config.max_consecutive_skips,
            st.num_steps,
            hold=rep,
        )
        store = flag & ~rep
        residuals = {n: st.residuals[n] for n in spec.cached_streams}

        if is_tracing():
            return traced_stack(runner, call, streams, spec, flag, store, residuals)

        if flag.item():  # host-read-ok: the single eager decision read per step
            # The first block gets the modulation computed for the indicator (no second
            # embedding MLP / AdaLN linear on a computed step). Not into a compiled stack
            # (graphs.compile_stack): dynamo would guard on, and capture, the handed output.
            with reuse_outputs(memo[0] if memo and runner.compiled is None else ()):
                result = runner.run(call, streams)
            store_residuals(result, streams, residuals, store)
            return result
        return skipped_stack(st, streams, residuals)

    def state_stats(self, st: TeaCacheState) -> dict:
        out = st.stats(
            repeat_hint=" (diffusers pipelines do); Heun/PNDM-style repeated evaluations are expected to run uncached."
        )
        if st.state is not None:
            s = st.state.detach().cpu()  # host-read-ok: stats are read off the step path
            H, steps = st.history, len(out["timeline"])
            out["accumulator"] = float(s[ACC])
            out["accumulated"] = s[STATE_HEADER + H : STATE_HEADER + H + steps].tolist()  # host-read-ok: stats
        return out
