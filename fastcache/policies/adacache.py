"""AdaCache on fused, device-resident state (Kahatapitiya et al., "Adaptive Caching for
Faster Video Generation with Diffusion Transformers", arXiv 2411.02397; docs/methods.md
section 10).

Per computed step ``s`` (A1-A3), with ``p`` the previous computed step of the run:

1. the whole stack runs, in three block ranges so that the metric block's residual
   ``r_s = out_m - in_m`` (block ``m``, default the middle one, first cached stream) is
   seen; the stack residual ``R <- out - in`` is stored per cached stream (TeaCache's T7);
2. ``c_s = ||r_s - r_p||_1 / ||r_p||_1 / (s - p)`` (:func:`fastcache.ops.rel_l1_sums`,
   summed over the batch);
3. ``tau = codebook[first threshold > c_s]``; the next computed step is ``s + tau``.
   No valid distance (the first computed step of a run, after :meth:`invalidate`, a zero
   or non-finite ratio) or ``c_s`` at or above every threshold: ``tau = 1`` (compute the
   next step: a change the codebook does not cover is never skipped over).

Steps in between reuse ``R``: ``out = in + R``. The first step, the second-to-last and the
last step of a run always compute (the last two when ``num_steps`` is known).

Everything of the decision lives on the device: the step index within the run (the shared
timestep guard and the fused decision op count it, as MagCache's device path does), the
countdown (``NEXT``, the index of the next computed step), the distance and the codebook
lookup (a device table). The "is this step due" bit feeds :func:`fastcache.ops.cache_decision`
as its distance (1 due, 0 not, threshold 0.5, no accumulation), so its run detection,
forced first and last steps, repeated-call ``hold``, counters and timeline apply unchanged.
Eager reads that one flag per step; under ``torch.compile`` / CUDA-graph capture the skip
is one ``torch.cond`` whose compute branch also returns the metric residual, and every
update (residuals, metric, countdown) sits outside it, gated by the device flag.

Choices (docs/methods.md section 10): the residual is cached for the whole stack (the paper
caches each block's residual; with one shared schedule the two differ only in what is
stored, not in what is skipped); MoReg (the paper's motion regularisation for video) is
not implemented and ``moreg=True`` is refused.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_int, _set, config_type
from ..ops.reference import PREV_T, STEP
from ..tracing import skip_cond, static_floats
from .base import Policy, StackRunner, is_tracing, register_policy
from .stack_engine import DecisionState, skipped_stack, store_residuals
from .steps import timestep_guard

#: the published codebooks: preset -> (the step count it was made for, (threshold, interval) pairs)
PRESETS: dict[str, tuple[int, tuple[tuple[float, int], ...]]] = {
    # 30 steps (Open-Sora), "AdaCache-fast" and "AdaCache-slow"
    "fast": (30, ((0.08, 6), (0.16, 5), (0.24, 4), (0.32, 3), (0.40, 2), (1.00, 1))),
    "slow": (30, ((0.08, 3), (0.16, 2), (0.24, 1), (0.32, 1), (0.40, 1), (1.00, 1))),
    # 100 steps (Open-Sora-Plan, Latte)
    "100": (100, ((0.03, 12), (0.05, 10), (0.07, 8), (0.09, 6), (0.11, 4), (1.00, 3))),
}


def scale_codebook(book, ref_steps: int, num_steps: int) -> tuple[tuple[float, int], ...]:
    """A codebook made for ``ref_steps``-step runs, for ``num_steps``-step runs: a skip
    covers the same fraction of the trajectory (``interval * S / S_ref``, rounded half
    up, at least 1) and a threshold bounds the same change per unit of trajectory
    (``threshold * S_ref / S``: with fewer steps each step changes more). Unchanged when
    the step counts agree or ``num_steps`` is unknown (0)."""
    if not num_steps or num_steps == ref_steps:
        return tuple(book)
    return tuple((thr * ref_steps / num_steps, max(1, int(iv * num_steps / ref_steps + 0.5))) for thr, iv in book)


def _check_codebook(book) -> tuple[tuple[float, int], ...]:
    if isinstance(book, dict):
        book = sorted(book.items())
    bad = ValueError(
        "AdaCacheConfig.codebook must map thresholds to intervals, {threshold: steps, ...} or ((threshold, steps), "
        f"...): thresholds finite and > 0, strictly increasing, intervals integers >= 1; got {book!r}"
    )
    if isinstance(book, (str, bytes)) or not hasattr(book, "__iter__"):
        raise bad
    out = []
    for pair in book:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise bad
        thr, iv = pair
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not math.isfinite(thr) or thr <= 0:
            raise bad
        if isinstance(iv, bool) or not isinstance(iv, numbers.Integral) or iv < 1:
            raise bad
        out.append((float(thr), int(iv)))
    if not out or any(a[0] >= b[0] for a, b in zip(out, out[1:])):
        raise bad
    return tuple(out)


# --------------------------------------------------------------------------- config
@config_type
@dataclasses.dataclass(frozen=True)
class AdaCacheConfig(CacheConfig):
    """AdaCache (Kahatapitiya et al., arXiv 2411.02397; docs/methods.md section 10): after
    each computed step, the rate of change of the metric block's residual since the
    previous computed step picks from a codebook how many steps to reuse the stack residual
    before computing again.

    Args:
        preset: a published codebook: ``"fast"`` (default) or ``"slow"`` (made for 30
            steps), ``"100"`` (made for 100 steps). For another ``num_steps`` its
            intervals and thresholds are scaled (:func:`scale_codebook`). Not with
            ``codebook``.
        codebook: your own ``{threshold: interval}`` (or pairs), used as given at every
            step count: after a computed step with distance ``c``, the interval of the
            first threshold ``> c`` (1 if none). All intervals 1 = never skip (bitwise the
            unpatched model).
        num_steps: sampling steps per run; when known the second-to-last and last steps
            are always computed and a preset is scaled to it. Also set by a pipeline's
            ``num_inference_steps`` or ``handle.set_num_steps``.
        metric_block: the block whose residual (first cached stream) gives the distance;
            default the middle block of the stack (``num_blocks // 2``).
        moreg: the paper's motion regularisation; not implemented (refused).
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "adacache"

    preset: str | None = None
    codebook: Any = None
    num_steps: int | None = None
    metric_block: int | None = None
    moreg: bool = False
    history: int = 1024

    def __post_init__(self) -> None:
        if self.moreg is not False:
            raise ValueError(
                "AdaCacheConfig(moreg=True): the paper's motion regularisation (MoReg) is not implemented in "
                "fastcache; use moreg=False (the plain AdaCache schedule), or a slower codebook (preset='slow') "
                "for high-motion video"
            )
        if self.codebook is not None:
            if self.preset is not None:
                raise ValueError(
                    f"AdaCacheConfig: give either preset ({self.preset!r}) or codebook, not both; a codebook "
                    "replaces the preset"
                )
            _set(self, "codebook", _check_codebook(self.codebook))
        else:
            preset = "fast" if self.preset is None else self.preset
            if preset not in PRESETS:
                raise ValueError(
                    f"AdaCacheConfig.preset must be one of {sorted(PRESETS)} (the published codebooks) or None, "
                    f"got {self.preset!r}; pass codebook={{threshold: steps, ...}} for your own"
                )
            _set(self, "preset", preset)
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        if self.metric_block is not None:
            _set(self, "metric_block", _check_int("metric_block", self.metric_block, 0, " or None (the middle block)"))
        _set(self, "history", _check_int("history", self.history, 1))

    def codebook_for(self, num_steps: int | None = None) -> tuple[tuple[float, int], ...]:
        """The codebook a run of ``num_steps`` steps uses (default the config's; 0 / None =
        unknown: a preset as published)."""
        n = self.num_steps if num_steps is None else num_steps
        if self.codebook is not None:
            return self.codebook
        ref, book = PRESETS[self.preset]
        return scale_codebook(book, ref, n or 0)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kind"] = self.kind
        if self.codebook is not None:
            d["codebook"] = [list(p) for p in self.codebook]
        return d


# --------------------------------------------------------------------------- policy
# the countdown vector (AdaCacheState.ada)
NEXT, LAST, HAVE, DIST, INTERVAL = range(5)
ADA_SIZE = 5


class AdaCacheState(DecisionState):
    """One cache context: ``prev`` the metric block's residual at the last computed step,
    ``residuals`` the stack residual per cached stream, ``ada`` the countdown (``NEXT``:
    the index of the next computed step; ``LAST``: the last computed step's; ``HAVE``: 1
    when ``prev`` holds this run's metric residual; ``DIST``, ``INTERVAL``: the last
    decision's), ``trace`` ``(history, 2)``: distance and interval per step (NaN: skipped)."""

    def __init__(self, history: int):
        super().__init__(history)
        self.ada: torch.Tensor | None = None
        self.trace: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = [t for t in (self.ada, self.trace) if t is not None]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in extra)

    def reset_countdown(self) -> None:
        """The next step computes and has no previous metric residual to measure against."""
        self.ada.zero_()
        self.trace.fill_(math.nan)


@register_policy(AdaCacheConfig)
class AdaCachePolicy(Policy):
    decides_from_data = True  # the distance sums are reduced over a process group (fastcache.distributed)

    def __init__(self, config: AdaCacheConfig, spec, model):
        super().__init__(config, spec, model)
        n_blocks = sum(len(seg) for seg in spec.blocks(model))
        self.num_blocks = n_blocks
        m = n_blocks // 2 if config.metric_block is None else config.metric_block
        if not 0 <= m < n_blocks:
            raise ValueError(
                f"AdaCacheConfig.metric_block={config.metric_block} is outside {type(model).__name__}'s stack of "
                f"{n_blocks} blocks; choose 0 .. {n_blocks - 1} or None (the middle block)"
            )
        self.metric_block = m
        self.num_steps = config.num_steps or 0
        self._tables: dict = {}

    def _table(self, dev: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The codebook for ``n``-step runs on ``dev``: thresholds ``(K,)`` fp32 and
        intervals ``(K + 1,)`` fp32, the last 1 (a distance at or above every threshold)."""
        key = (dev, n)
        t = self._tables.get(key)
        if t is None:
            book = self.config.codebook_for(n)
            thr = torch.tensor([b[0] for b in book], dtype=torch.float32, device=dev)
            iv = torch.tensor([float(b[1]) for b in book] + [1.0], dtype=torch.float32, device=dev)
            t = self._tables[key] = (thr, iv)
        return t

    # -- state --------------------------------------------------------------------------
    def new_state(self) -> AdaCacheState:
        return AdaCacheState(self.config.history)

    def _ensure(self, st: AdaCacheState, streams: dict, metric_like: torch.Tensor) -> None:
        if st.ensure({n: streams[n] for n in self.spec.cached_streams}, indicator=metric_like):
            dev = st.state.device
            st.ada = torch.zeros(ADA_SIZE, dtype=torch.float32, device=dev)
            st.trace = torch.full((st.history, 2), math.nan, dtype=torch.float32, device=dev)

    def begin_step(self, st: AdaCacheState, timestep, step) -> None:
        st.num_steps = step.num_steps or 0

    def reset_state(self, st: AdaCacheState) -> None:
        st.reset()
        if st.ada is not None:
            st.reset_countdown()

    def invalidate(self, st: AdaCacheState) -> None:
        # NEXT = 0: the next step is due; HAVE = 0: it measures no distance (interval 1).
        # A device write, no read.
        if st.ada is not None:
            st.ada[NEXT : HAVE + 1].zero_()

    # -- the step -----------------------------------------------------------------------
    def _run_measured(self, runner: StackRunner, call: dict, ins: dict) -> tuple[dict, torch.Tensor]:
        """The whole stack in three block ranges; returns its outputs and the metric block's
        residual on the first cached stream."""
        m, c0 = self.metric_block, self.spec.cached_streams[0]
        before = runner.run_range(call, ins, 0, m)
        after = runner.run_range(call, before, m, m + 1)
        if after.get(c0) is None or after[c0].shape != before[c0].shape:
            raise RuntimeError(
                f"AdaCache: block {m} does not return stream {c0!r} in the shape it took, so its residual cannot "
                "be the distance metric; choose another AdaCacheConfig.metric_block"
            )
        r = _residual(after[c0], before[c0])
        return runner.run_range(call, after, m + 1, runner.num_blocks), r

    def _update(self, st: AdaCacheState, r: torch.Tensor, idx: torch.Tensor, store: torch.Tensor, n: int) -> None:
        """A3 on the device, every write gated by ``store``: the distance against the last
        computed step's metric residual, the codebook's interval, the countdown, ``prev <- r``."""
        thr, iv = self._table(st.ada.device, n)
        sums = self.reduce_sums(ops.rel_l1_sums(r, st.prev, write_prev=False))
        num, den = sums[:, 0].sum(), sums[:, 1].sum()
        k = (idx - st.ada[LAST : LAST + 1]).clamp(min=1.0)
        c = num / torch.where(den > 0, den, 1.0) / k  # (1,)
        valid = (st.ada[HAVE : HAVE + 1] > 0) & (idx > 0) & (den > 0) & torch.isfinite(c)
        j = (thr <= c).sum().reshape(1)  # the first threshold > c (K: none)
        interval = torch.where(valid, iv.index_select(0, j), 1.0)
        dist = torch.where(valid, c, math.nan)
        new = torch.cat([idx + interval, idx, torch.ones_like(idx), dist, interval])
        st.ada.copy_(torch.where(store, new, st.ada))
        row = idx.clamp(max=st.history - 1).to(torch.long)
        keep = store & (idx < st.history)
        st.trace.index_copy_(0, row, torch.where(keep, torch.stack([dist, interval], 1), st.trace.index_select(0, row)))
        st.prev.copy_(torch.where(store, r, st.prev))

    @static_floats
    def run_stack(self, st: AdaCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        c0 = spec.cached_streams[0]
        streams = {n: call[n] for n in spec.streams}
        self._ensure(st, streams, streams[c0])
        n = st.num_steps
        t_op, rep = timestep_guard(st.state, st.aux, timestep, n)
        # this call's step within the run, on the device (a rise of the timestep starts a run)
        idx = torch.where(t_op > st.state[PREV_T : PREV_T + 1], 0.0, st.state[STEP : STEP + 1])
        due = idx >= st.ada[NEXT : NEXT + 1]
        if n >= 2:
            due = due | (idx >= n - 2)  # the second-to-last step (the op forces the last)
        sums = torch.stack([due.to(torch.float32), torch.ones_like(idx)], dim=1)
        flag = ops.cache_decision(sums, t_op, st.coeffs, st.state, 0.5, 1, 0, n, hold=rep, accumulate=False)
        store = flag & ~rep
        residuals = {name: st.residuals[name] for name in spec.cached_streams}

        if is_tracing():
            result, r = self._traced(runner, call, streams, flag, residuals, st.prev)
            store_residuals(result, streams, residuals, store)
            self._update(st, r, idx, store, n)
            return result

        if flag.item():  # host-read-ok: the single eager decision read per step
            result, r = self._run_measured(runner, call, streams)
            store_residuals(result, streams, residuals, store)
            self._update(st, r, idx, store, n)
            return result
        return skipped_stack(st, streams, residuals)

    def _traced(self, runner, call, streams, flag, residuals: dict, prev: torch.Tensor):
        """The skip as one cond operator: the compute branch runs the stack and returns its
        streams and the metric residual; the skip branch ``x + R`` and a copy of ``prev``
        (unused: every update is gated by the flag)."""
        spec = self.spec
        returned = [n for n in spec.returns if streams.get(n) is not None and n not in spec.dropped_streams]
        present = [n for n, v in streams.items() if v is not None]
        cached = list(residuals)
        k = len(present)
        dense = torch.contiguous_format

        def compute(*operands):
            outs, r = self._run_measured(runner, call, dict(zip(present, operands[:k])))
            return (*(outs[n].clone(memory_format=dense) for n in returned), r.clone(memory_format=dense))

        def skip(*operands):
            xs = dict(zip(present, operands[:k]))
            res = dict(zip(cached, operands[k:-1]))
            outs = tuple(
                ops.apply_residual(xs[n], res[n]) if n in res else xs[n].clone(memory_format=dense) for n in returned
            )
            return (*outs, operands[-1].clone(memory_format=dense))

        operands = (*[streams[n] for n in present], *residuals.values(), prev)
        shapes = [streams[n].shape for n in returned] + [prev.shape]
        outs = skip_cond(flag, compute, skip, operands, shapes)
        result = dict(streams)
        result.update(zip(returned, outs[:-1]))
        return result, outs[-1]

    # -- stats --------------------------------------------------------------------------
    def state_stats(self, st: AdaCacheState) -> dict:
        """TeaCache's counters and timeline; ``distance`` and ``interval`` per step (None on
        skipped steps and where no distance was measured), the codebook in use."""
        out = st.stats(repeat_hint=".")
        out.pop("rel_l1", None)  # the op's "distance" here is only the due bit
        n = st.num_steps or self.num_steps
        out["codebook"] = [list(p) for p in self.config.codebook_for(n)]
        out["metric_block"] = self.metric_block
        if st.ada is not None:
            tr = st.trace.detach().cpu()  # host-read-ok: stats are read off the step path
            steps = len(out["timeline"])
            out["distance"] = [None if math.isnan(v) else v for v in tr[:steps, 0].tolist()]  # host-read-ok: stats
            out["interval"] = [None if math.isnan(v) else int(v) for v in tr[:steps, 1].tolist()]  # host-read-ok
        if not n:
            out.setdefault("warnings", []).append(
                "num_steps is unknown: the second-to-last and last steps were not forced and a preset codebook "
                "was not scaled to the run; set AdaCacheConfig.num_steps or handle.set_num_steps"
            )
        return out


def _residual(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """``out - x_in`` in fp32 math (fp64 for fp64), in ``out``'s dtype (as the stack residual)."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    return (out.to(acc) - x_in.to(acc)).to(out.dtype)
