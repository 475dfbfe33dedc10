"""First-Block Cache / DBCache on fused, device-resident state (docs/methods.md, section 7).

No paper: ParaAttention's First-Block Cache (diffusers ``FirstBlockCacheConfig``) and its
"dual block" generalisation DBCache (cache-dit). Per step, with ``L`` blocks in the stack
(all segments in run order: Flux's dual-stream blocks, then its single-stream ones):

1. the first ``fn`` blocks always run: ``h = F_{1..fn}(x)``; the indicator is their
   residual on the first cached stream, ``q = h - x`` (FB1);
2. ``d = sum|q - q_last| / sum|q_last|`` (FB2; :func:`fastcache.ops.rel_l1_sums` with
   ``write_prev=False``), then TeaCache's fused decision without accumulation
   (:func:`fastcache.ops.cache_decision` with ``accumulate=False``): compute iff
   ``d >= threshold`` or the step is forced (warm-up, the last step when ``num_steps`` is
   known, ``max_consecutive_skips``, or no valid ratio: ``q_last`` is all zeros on the
   first step and after :meth:`invalidate`);
3. computed step: run blocks ``fn .. L-bn-1``; ``R <- out - h`` per cached stream and
   ``q_last <- q``, both writes gated by the device flag (FB4: ``q_last`` moves on
   computed steps only, so ``d`` measures against the last computed step);
   skipped step: middle output ``= h + R`` (FB3);
4. the last ``bn`` blocks always run on the middle's output (DBCache's ``Bn``).

Which streams get a residual: with ``bn = 0`` the model's cached streams (the streams it
reads after the stack; Flux's and SD3's text tokens are dropped); with ``bn > 0`` every
stream the middle passes on, since the trailing blocks read them all.

Repeated timesteps, run starts and the eager/compiled split are TeaCache's
(:mod:`fastcache.policies.teacache`): the shared timestep guard's ``hold`` leaves
``q_last``, the residuals and the decision state untouched on a repeated call, which is
computed; eager mode reads the decision flag once per step; under ``torch.compile`` or
CUDA-graph capture the middle is a cond operator with functional branches, with the
stores outside, gated by the device flag.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .. import ops
from ..config import CacheConfig, _check_decision_fields, _check_float, _check_int, _set, config_type
from ..tracing import static_floats
from .base import Policy, StackRunner, is_tracing, register_policy
from .stack_engine import DecisionState, residual_cond
from .steps import timestep_guard


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    """First-Block Cache (ParaAttention, diffusers ``FirstBlockCacheConfig``) and its DBCache
    generalisation (cache-dit): run the first ``fn`` blocks every step; skip the middle
    blocks when the relative-L1 change of the first blocks' residual since the last
    computed step stays below ``threshold`` and reuse the middle blocks' residual instead;
    the last ``bn`` blocks always run (docs/methods.md section 7, FB1-FB4).

    Args:
        threshold: relative-L1 threshold on ``d_s`` (diffusers 0.05; 0.08 for FLUX). ``0``
            disables skipping (every step computed, output identical to the unpatched model).
        fn: leading blocks that always run and give the indicator (>= 1; FBCache 1, DBCache 8).
        bn: trailing blocks that always run (>= 0; DBCache's ``Bn``).
        warmup_steps: initial steps always computed (>= 1: step 0 has no cache).
        max_consecutive_skips: compute after this many skips in a row (0 = no limit).
        num_steps: sampling steps per run; when given, the last step is always computed.
            Can also be set later with ``handle.set_num_steps``.
        history: steps of decision timeline kept on device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "first_block"

    threshold: float = 0.05
    fn: int = 1
    bn: int = 0
    warmup_steps: int = 1
    max_consecutive_skips: int = 0
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        _set(self, "fn", _check_int("fn", self.fn, 1, " (the indicator needs at least one leading block)"))
        _set(self, "bn", _check_int("bn", self.bn, 0))
        _check_decision_fields(self)


# --- Δ-DiT ---


# --------------------------------------------------------------------------- policy
class FirstBlockCacheState(DecisionState):
    """One cache context: ``prev`` is ``q_last`` (the first blocks' residual at the last
    computed step), ``residuals`` the middle residual per stream, ``coeffs`` empty (no
    rescaling; see :class:`~fastcache.policies.stack_engine.DecisionState`)."""


def first_block_decision(policy, st, q, timestep, h, x):
    """First-Block Cache's decision on the device (FB2-FB4, docs/methods.md section 7), shared
    by the curated policy and the automatic path's: the relative L1 change of the first
    blocks' residual ``q`` against the last computed step's (reduced over the process group),
    the fused decision, and ``q_last <- h - x`` on computed steps only. A repeated call
    (``rep``) computes and leaves q_last, the residuals and the state as they were. Returns
    ``(flag, store, rep)``: compute, store the residuals, repeated call (0-dim bools)."""
    cfg = policy.config
    t_op, rep = timestep_guard(st.state, st.aux, timestep, st.num_steps)
    sums = policy.reduce_sums(ops.rel_l1_sums(q, st.prev, write_prev=False, hold=rep))  # FB2
    flag = ops.cache_decision(
        sums,
        t_op,
        st.coeffs,
        st.state,
        cfg.threshold,
        cfg.warmup_steps,
        cfg.max_consecutive_skips,
        st.num_steps,
        hold=rep,
        accumulate=False,
    )
    store = flag & ~rep
    ops.store_residual(h, x, store, st.prev)  # FB4
    return flag, store, rep


@register_policy(FirstBlockCacheConfig)
class FirstBlockCachePolicy(Policy):
    decides_from_data = True  # the indicator sums are reduced over a process group (fastcache.distributed)

    def __init__(self, config: FirstBlockCacheConfig, spec, model):
        super().__init__(config, spec, model)
        n_blocks = sum(len(seg) for seg in spec.blocks(model))
        self.num_blocks = n_blocks
        if config.fn + config.bn >= n_blocks:
            raise ValueError(
                f"FirstBlockCacheConfig: fn={config.fn} + bn={config.bn} leaves no block to cache in "
                f"{type(model).__name__}'s stack of {n_blocks} blocks; fn + bn must be < {n_blocks}"
            )
        self.num_steps = config.num_steps or 0

    def new_state(self) -> FirstBlockCacheState:
        return FirstBlockCacheState(self.config.history)

    def _residual_streams(self, h: dict) -> list[str]:
        if self.config.bn == 0:
            return list(self.spec.cached_streams)
        return [n for n in self.spec.streams if h.get(n) is not None]

    def begin_step(self, st: FirstBlockCacheState, timestep, step) -> None:
        st.num_steps = step.num_steps or 0

    def reset_state(self, st: FirstBlockCacheState) -> None:
        st.reset()

    def invalidate(self, st: FirstBlockCacheState) -> None:
        # q_last = 0 gives the next decision no valid ratio (sum|q_last| = 0): it computes
        # and stores afresh. (TeaCache's infinite accumulator would not do: this decision
        # does not accumulate.) A device write, no read.
        if st.prev is not None:
            st.prev.zero_()

    @static_floats
    def run_stack(self, st: FirstBlockCacheState, runner: StackRunner, head, call, timestep):
        spec, cfg = self.spec, self.config
        n_blocks = runner.num_blocks
        fn, stop = cfg.fn, n_blocks - cfg.bn
        streams = {n: call[n] for n in spec.streams}
        h = runner.run_range(call, streams, 0, fn)  # FB1: the first fn blocks always run
        c0 = spec.cached_streams[0]
        q = h[c0] - streams[c0]
        names = self._residual_streams(h)
        st.ensure({n: h[n] for n in names}, indicator=q)  # new buffers: q_last = 0, so the next step computes
        flag, store, rep = first_block_decision(self, st, q, timestep, h[c0], streams[c0])
        residuals = [st.residuals[n] for n in names]

        if is_tracing():
            returned = [n for n in spec.streams if h.get(n) is not None]
            if cfg.bn == 0:
                returned = [n for n in spec.returns if h.get(n) is not None and n not in spec.dropped_streams]
            mid = dict(h)
            mid.update(
                residual_cond(
                    flag,
                    lambda ins: runner.run_range(call, ins, fn, stop),
                    h,
                    returned,
                    dict(zip(names, residuals)),
                )
            )
            for n, r in zip(names, residuals):
                ops.store_residual(mid[n], h[n], store, r)
        elif flag.item():  # host-read-ok: the single eager decision read per step
            mid = runner.run_range(call, h, fn, stop)
            for n, r in zip(names, residuals):
                if mid.get(n) is None:
                    raise RuntimeError(
                        f"FirstBlockCache: block {stop - 1} returned None for stream {n!r}, which the trailing "
                        f"bn={cfg.bn} blocks need; choose bn so that the block that drops it is among them"
                    )
                ops.store_residual(mid[n], h[n], store, r)
        else:
            mid = dict(h)
            for n, r in zip(names, residuals):  # FB3
                mid[n] = ops.apply_residual(h[n], r, out=st.output_buffer(n, r))
        if cfg.bn:
            return runner.run_range(call, mid, stop, n_blocks)
        return mid

    def state_stats(self, st: FirstBlockCacheState) -> dict:
        out = st.stats(repeat_hint=".")
        if st.state is not None:
            out.update(fn=self.config.fn, bn=self.config.bn)
            # block work: the first fn and last bn blocks run on every step
            n = out["computed"] + out["skipped"]
            if n and self.num_blocks:
                # one division of integer block counts: exactly 1.0 when every step computed
                # (0.2 + 0.8 * 1 is not, for a 5-block stack)
                always = self.config.fn + self.config.bn
                rest = self.num_blocks - always
                out["computed_fraction"] = (always * n + rest * out["computed"]) / (self.num_blocks * n)
        return out
