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

MoReg (video, ``moreg=True``): on a computed step inside ``moreg_steps`` the metric residual's
motion score ``m = mean over strides i of ||r[f + i] - r[f]||_1 / (||r[f + i]||_1 + ||r[f]||_1)``
(frame-major tokens, ``S`` per frame: ``r[f]`` is frame ``f``'s tokens, every frame pair and
the whole batch summed) becomes ``m = ((m / 0.385) ** 8) / 1`` (1 outside the window); with the
motion gradient ``g = 10 (m - m_prev) / (s - p)`` it multiplies the distance,
``c_s <- c_s (m + |g|)``, before the codebook lookup (the official Open-Sora code's
definition, docs/methods.md section 10).

Steps in between reuse ``R``: ``out = in + R``. The first step, the second-to-last and the
last step of a run always compute (the last two when ``num_steps`` is known).

Everything of the decision lives on the device: the step index within the run (the shared
timestep guard and the fused decision op count it, as MagCache's device path does), the
countdown (``NEXT``, the index of the next computed step), the distance and the codebook
lookup (a device table). The "is this step due" bit feeds :func:`fastcache.ops.cache_decision`
as its distance (1 due, 0 not, threshold 0.5, no accumulation), so its run detection,
forced first and last steps, repeated-call ``hold``, counters and timeline apply unchanged.
Eager reads that one flag per step; under ``torch.compile`` / CUDA-graph capture the skip
is one ``torch.cond`` whose compute branch also returns the metric residual (and MoReg's
frame sums), and every update (residuals, metric, motion score, countdown) sits outside it,
gated by the device flag.

Choices (docs/methods.md section 10): the residual is cached for the whole stack (the paper
caches each block's residual; with one shared schedule the two differ only in what is
stored, not in what is skipped); MoReg needs the family's frame layout
(``ModelSpec.frame_layout``: Wan, HunyuanVideo (1.5), CogVideoX, LTX-Video, Mochi) and is
refused at patch time elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_float, _check_int, _set, config_type
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


#: MoReg's published window (the paper's code numbers steps from 1, both ends inclusive):
#: reference step count -> (first, last) step where the motion score applies
MOREG_STEPS: dict[int, tuple[int, int]] = {30: (4, 26), 100: (10, 90)}
#: the window of a codebook you pass: the 100-step one, scaled to the run
MOREG_REF_CUSTOM = 100
#: MoReg's defaults as published (the official code's moreg_hyp = (0.385, 8, 1, ...), mograd_mul = 10)
MOREG_DEFAULTS = {
    "moreg_steps": None,
    "moreg_strides": (1,),
    "moreg_norm": 0.385,
    "moreg_exponent": 8.0,
    "moreg_divisor": 1.0,
    "mograd_mul": 10.0,
}


def scale_window(window: tuple[int, int], ref_steps: int, num_steps: int) -> tuple[int, int]:
    """A MoReg window made for ``ref_steps``-step runs, for ``num_steps``-step runs: each end
    at the same fraction of the trajectory, rounded half up (as :func:`scale_codebook`
    scales intervals), at least step 1. Unchanged when the step counts agree or
    ``num_steps`` is unknown (0)."""
    if not num_steps or num_steps == ref_steps:
        return tuple(window)
    lo, hi = (max(1, int(v * num_steps / ref_steps + 0.5)) for v in window)
    return lo, max(lo, hi)


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
        moreg: the paper's motion regularisation for video (MoReg): on a computed step in
            ``moreg_steps`` the distance is multiplied by the motion score of the metric
            residual (the difference between consecutive frames' tokens) plus its gradient
            since the previous computed step, so motion shortens the skips. Needs a family
            that knows its frame layout (Wan, HunyuanVideo, CogVideoX, LTX-Video, Mochi);
            refused at ``patch`` time elsewhere.
        moreg_steps: ``(first, last)``: the steps where the motion score applies, numbered
            from 1 as in the paper's code, both inclusive, used as given; default (None) the
            published window, ``(4, 26)`` for the 30-step presets and ``(10, 90)`` for the
            100-step one and your own codebook, scaled to ``num_steps``
            (:func:`scale_window`). Outside it the score is 1 (the gradient still counts).
        moreg_strides: frame strides the motion is measured at (averaged); published ``(1,)``.
        moreg_norm, moreg_exponent, moreg_divisor: the score ``((m / norm) ** exponent) /
            divisor``; published 0.385, 8, 1.
        mograd_mul: the motion gradient's weight; published 10.
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "adacache"

    preset: str | None = None
    codebook: Any = None
    num_steps: int | None = None
    metric_block: int | None = None
    moreg: bool = False
    history: int = 1024
    moreg_steps: tuple[int, int] | None = None
    moreg_strides: tuple[int, ...] = (1,)
    moreg_norm: float = 0.385
    moreg_exponent: float = 8.0
    moreg_divisor: float = 1.0
    mograd_mul: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.moreg, bool):
            raise ValueError(f"AdaCacheConfig.moreg must be True or False, got {self.moreg!r}")
        self._check_moreg()
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

    def _check_moreg(self) -> None:
        if not self.moreg:
            for name, default in MOREG_DEFAULTS.items():
                v = getattr(self, name)
                if v != default and not (isinstance(v, list) and tuple(v) == default):
                    raise ValueError(
                        f"AdaCacheConfig.{name}={v!r} has no effect with moreg=False; set moreg=True to use MoReg, "
                        f"or leave {name} at its default"
                    )
        if self.moreg_steps is not None:
            w = self.moreg_steps
            if isinstance(w, (str, bytes)) or not hasattr(w, "__len__") or len(w) != 2:
                raise ValueError(
                    f"AdaCacheConfig.moreg_steps must be (first, last) steps numbered from 1, or None (the published "
                    f"window), got {w!r}"
                )
            lo = _check_int("moreg_steps[0]", w[0], 1, " (steps are numbered from 1, as in the paper)")
            hi = _check_int("moreg_steps[1]", w[1], lo, " (the window's first step)")
            _set(self, "moreg_steps", (lo, hi))
        st = self.moreg_strides
        if isinstance(st, (str, bytes)) or not hasattr(st, "__iter__") or not len(st):
            raise ValueError(f"AdaCacheConfig.moreg_strides must be a non-empty tuple of frame strides, got {st!r}")
        _set(self, "moreg_strides", tuple(_check_int("moreg_strides[i]", i, 1, " (frames)") for i in st))
        for name in ("moreg_norm", "moreg_exponent", "moreg_divisor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"AdaCacheConfig.{name} must be a finite number > 0, got {v!r}")
            _set(self, name, float(v))
        _set(self, "mograd_mul", _check_float("mograd_mul", self.mograd_mul, 0.0))

    def moreg_window(self, num_steps: int | None = None) -> tuple[int, int]:
        """MoReg's ``(first, last)`` step (numbered from 1, inclusive) for ``num_steps``-step
        runs (default the config's; 0 / None = unknown: as published)."""
        if self.moreg_steps is not None:
            return self.moreg_steps
        n = self.num_steps if num_steps is None else num_steps
        ref = PRESETS[self.preset][0] if self.codebook is None else MOREG_REF_CUSTOM
        return scale_window(MOREG_STEPS[ref], ref, n or 0)

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
        d["moreg_strides"] = list(self.moreg_strides)
        if self.moreg_steps is not None:
            d["moreg_steps"] = list(self.moreg_steps)
        return d


# --------------------------------------------------------------------------- policy
# the countdown vector (AdaCacheState.ada)
NEXT, LAST, HAVE, DIST, INTERVAL, MPREV = range(6)
ADA_SIZE = 6


class AdaCacheState(DecisionState):
    """One cache context: ``prev`` the metric block's residual at the last computed step,
    ``residuals`` the stack residual per cached stream, ``ada`` the countdown (``NEXT``:
    the index of the next computed step; ``LAST``: the last computed step's; ``HAVE``: 1
    when ``prev`` holds this run's metric residual; ``DIST``, ``INTERVAL``: the last
    decision's; ``MPREV``: MoReg's motion score at the last measured step), ``trace``
    ``(history, 3)``: distance, interval and MoReg factor per step (NaN: skipped or not
    measured); ``layout``: this call's ``(frames, tokens_per_frame)`` (MoReg; host ints)."""

    def __init__(self, history: int):
        super().__init__(history)
        self.ada: torch.Tensor | None = None
        self.trace: torch.Tensor | None = None
        self.layout: tuple[int, int] | None = None

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
        self.needs_frame_layout = config.moreg
        if config.moreg and spec.frame_layout is None:
            raise ValueError(
                f"AdaCacheConfig(moreg=True): fastcache knows no frame layout for {type(model).__name__} (spec "
                f"{spec.name!r}). MoReg measures motion as the difference between consecutive frames' tokens, so it "
                "needs frame-major video tokens and the family's frame count and tokens per frame "
                "(ModelSpec.frame_layout; known for Wan, HunyuanVideo, CogVideoX, LTX-Video, Mochi). Use "
                "AdaCacheConfig(moreg=False) for this model, or register a ModelSpec with frame_layout=... for your "
                "video model."
            )

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
            st.trace = torch.full((st.history, 3), math.nan, dtype=torch.float32, device=dev)

    def begin_step(self, st: AdaCacheState, timestep, step) -> None:
        st.num_steps = step.num_steps or 0
        st.layout = step.frame_layout

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
    def _layout(self, st: AdaCacheState, x: torch.Tensor) -> tuple[int, int] | None:
        """MoReg's ``(frames, tokens_per_frame)`` for this call, checked against the first
        cached stream ``x`` (host ints from shapes; None without MoReg)."""
        if not self.config.moreg:
            return None
        name, c0 = type(self.model).__name__, self.spec.cached_streams[0]
        if st.layout is None:
            raise ValueError(
                f"AdaCache MoReg: {name}'s frame layout could not be read from this call (spec {self.spec.name!r}: "
                "ModelSpec.frame_layout returned None, e.g. no 5-D latents or no num_frames/height/width); pass the "
                "inputs the family describes, or use AdaCacheConfig(moreg=False)"
            )
        frames, per_frame = st.layout
        if x.dim() < 3 or x.shape[1] != frames * per_frame:
            raise ValueError(
                f"AdaCache MoReg: {name}'s stream {c0!r} has shape {tuple(x.shape)}, not (B, frames x tokens per "
                f"frame = {frames} x {per_frame}, ...) as the call's frame layout says; its tokens are not the "
                "frame-major video tokens MoReg compares (a sequence-parallel shard holds part of them). Use "
                "AdaCacheConfig(moreg=False) here"
            )
        need = max(self.config.moreg_strides) + 1
        if frames < need:
            raise ValueError(
                f"AdaCache MoReg: this call of {name} has {frames} frame(s) of video tokens; MoReg compares frames "
                f"{max(self.config.moreg_strides)} apart (moreg_strides={self.config.moreg_strides}), so it needs "
                f"at least {need}. Use AdaCacheConfig(moreg=False) for single-frame / short generation"
            )
        return frames, per_frame

    def _motion_sums(self, r: torch.Tensor, per_frame: int) -> torch.Tensor:
        """MoReg's sums on this rank, ``(len(moreg_strides), 2)`` fp32 (fp64 for fp64): per
        stride ``i``, ``[sum|r[f+i] - r[f]|, sum|r[f+i]| + sum|r[f]|]`` over frames ``f`` and the
        batch (``r[f]`` = frame ``f``'s tokens). The fused rel-L1 op on contiguous slices: no
        temporaries, no host read."""
        r = r.contiguous()
        rows = []
        for i in self.config.moreg_strides:
            off = i * per_frame
            parts = []
            for b in range(r.shape[0]):  # a sample's slices are contiguous, as the op's prev must be
                later, earlier = r[b : b + 1, off:], r[b : b + 1, :-off]
                fwd = ops.rel_l1_sums(later, earlier, write_prev=False)  # [|later - earlier|, |earlier|]
                back = ops.rel_l1_sums(earlier, later, write_prev=False)  # [.., |later|]
                parts.append(torch.stack([fwd[0, 0], fwd[0, 1] + back[0, 1]]))
            rows.append(torch.stack(parts).sum(0))
        return torch.stack(rows)

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

    def _moreg(self, st: AdaCacheState, msums: torch.Tensor, idx, k, measured, n: int):
        """MoReg on the device: ``(factor, m)``: the distance's factor ``m + |g|`` and the
        motion score ``m`` (1 outside the window) this step leaves as ``MPREV``."""
        cfg = self.config
        m = None
        for i in range(msums.shape[0]):  # one reduction per stride, outside any cond
            s = self.reduce_sums(msums[i : i + 1])
            num, den = s[:, 0].sum(), s[:, 1].sum()
            ratio = (num / den).to(torch.float32).reshape(1)  # 0 / 0 (no signal): NaN, so tau = 1
            m = ratio if m is None else m + ratio
        m = m / msums.shape[0]
        score = torch.pow(m / cfg.moreg_norm, cfg.moreg_exponent) / cfg.moreg_divisor
        lo, hi = cfg.moreg_window(n)
        inside = (idx + 1 >= lo) & (idx + 1 <= hi)  # the paper's steps count from 1
        m = torch.where(inside, score, 1.0)
        # the first measured step of a run (or after invalidate) compares with 1
        m_prev = torch.where(measured, st.ada[MPREV : MPREV + 1], 1.0)
        grad = cfg.mograd_mul * (m - m_prev) / k
        return m + grad.abs(), m

    def _update(self, st: AdaCacheState, r, idx, store, n: int, msums=None) -> None:
        """A3 on the device, every write gated by ``store``: the distance against the last
        computed step's metric residual (times MoReg's factor), the codebook's interval, the
        countdown, ``prev <- r``."""
        thr, iv = self._table(st.ada.device, n)
        sums = self.reduce_sums(ops.rel_l1_sums(r, st.prev, write_prev=False))
        num, den = sums[:, 0].sum(), sums[:, 1].sum()
        k = (idx - st.ada[LAST : LAST + 1]).clamp(min=1.0)
        c = num / torch.where(den > 0, den, 1.0) / k  # (1,)
        measured = (st.ada[HAVE : HAVE + 1] > 0) & (idx > 0)  # r_p of this run exists
        factor = m_new = torch.full_like(c, math.nan)
        if msums is not None:
            factor, m = self._moreg(st, msums, idx, k, measured, n)
            c = c * factor
            # MPREV: this step's score where measured (kept where it is not finite), 1 on a fresh start
            m_new = torch.where(measured, torch.where(torch.isfinite(m), m, st.ada[MPREV : MPREV + 1]), 1.0)
        valid = measured & (den > 0) & torch.isfinite(c)
        j = (thr <= c).sum().reshape(1)  # the first threshold > c (K: none)
        interval = torch.where(valid, iv.index_select(0, j), 1.0)
        dist = torch.where(valid, c, math.nan)
        mprev = st.ada[MPREV : MPREV + 1] if msums is None else m_new
        new = torch.cat([idx + interval, idx, torch.ones_like(idx), dist, interval, mprev])
        st.ada.copy_(torch.where(store, new, st.ada))
        row = idx.clamp(max=st.history - 1).to(torch.long)
        keep = store & (idx < st.history)
        rec = torch.stack([dist, interval, torch.where(valid, factor, math.nan)], 1)
        st.trace.index_copy_(0, row, torch.where(keep, rec, st.trace.index_select(0, row)))
        st.prev.copy_(torch.where(store, r, st.prev))

    @static_floats
    def run_stack(self, st: AdaCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        c0 = spec.cached_streams[0]
        streams = {n: call[n] for n in spec.streams}
        self._ensure(st, streams, streams[c0])
        layout = self._layout(st, streams[c0])
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
            result, r, msums = self._traced(runner, call, streams, flag, residuals, st.prev, layout)
            store_residuals(result, streams, residuals, store)
            self._update(st, r, idx, store, n, msums)
            return result

        if flag.item():  # host-read-ok: the single eager decision read per step
            result, r = self._run_measured(runner, call, streams)
            msums = None if layout is None else self._motion_sums(r, layout[1])
            store_residuals(result, streams, residuals, store)
            self._update(st, r, idx, store, n, msums)
            return result
        return skipped_stack(st, streams, residuals)

    def _traced(self, runner, call, streams, flag, residuals: dict, prev: torch.Tensor, layout=None):
        """The skip as one cond operator: the compute branch runs the stack and returns its
        streams and the metric residual (and, with MoReg, its motion sums); the skip branch
        ``x + R``, a copy of ``prev`` and zeros (unused: every update is gated by the flag).
        Returns ``(streams, r, motion sums or None)``."""
        spec = self.spec
        returned = [n for n in spec.returns if streams.get(n) is not None and n not in spec.dropped_streams]
        present = [n for n, v in streams.items() if v is not None]
        cached = list(residuals)
        k = len(present)
        dense = torch.contiguous_format

        # MoReg's sums come back from the compute branch (the frame differences are taken only
        # on computed steps); the reduction over a process group stays outside the cond
        acc = torch.float64 if prev.dtype == torch.float64 else torch.float32
        extra = [] if layout is None else [(len(self.config.moreg_strides), 2)]

        def compute(*operands):
            outs, r = self._run_measured(runner, call, dict(zip(present, operands[:k])))
            more = [] if layout is None else [self._motion_sums(r, layout[1])]
            return (*(outs[n].clone(memory_format=dense) for n in returned), r.clone(memory_format=dense), *more)

        def skip(*operands):
            xs = dict(zip(present, operands[:k]))
            res = dict(zip(cached, operands[k:-1]))
            outs = tuple(
                ops.apply_residual(xs[n], res[n]) if n in res else xs[n].clone(memory_format=dense) for n in returned
            )
            more = [operands[-1].new_zeros(s, dtype=acc) for s in extra]
            return (*outs, operands[-1].clone(memory_format=dense), *more)

        operands = (*[streams[n] for n in present], *residuals.values(), prev)
        shapes = [streams[n].shape for n in returned] + [prev.shape] + extra
        outs = skip_cond(flag, compute, skip, operands, shapes)
        result = dict(streams)
        result.update(zip(returned, outs[: len(returned)]))
        return result, outs[len(returned)], (outs[-1] if extra else None)

    # -- stats --------------------------------------------------------------------------
    def state_stats(self, st: AdaCacheState) -> dict:
        """TeaCache's counters and timeline; ``distance`` and ``interval`` per step (None on
        skipped steps and where no distance was measured), the codebook in use; with MoReg
        ``moreg`` (the factor ``m + |g|`` the distance was multiplied by, per step; None
        where none was), the window in use and the last call's frame layout."""
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
            if self.config.moreg:
                out["moreg"] = [None if math.isnan(v) else v for v in tr[:steps, 2].tolist()]  # host-read-ok: stats
        if self.config.moreg:
            out["moreg_steps"] = list(self.config.moreg_window(n))
            out["frame_layout"] = None if st.layout is None else [int(v) for v in st.layout]
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
