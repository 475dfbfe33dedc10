"""Fit TeaCache coefficients for a model without published ones (DiT, PixArt, SD3, yours).

The authors' recipe (docs/methods.md, TeaCache): on uncached runs, pair each step's
relative-L1 change of the indicator (the first block's modulated input) with the
relative-L1 change of the block stack's output, over all steps of many prompts or
classes, and fit ``numpy.polyfit(x=input_rel_l1, y=output_rel_l1, deg=4)``. The fitted
polynomial maps the cheap indicator change to the change the cache would miss.

Example::

    with fastcache.tuning.calibration.recording(model) as rec:
        for labels in batches:
            sample(model, labels)                   # ordinary uncached sampling runs
    coeffs = rec.fit(degree=4)
    fastcache.patch(model, fastcache.TeaCacheConfig(threshold=0.1, coefficients=coeffs))

The same recorder also extracts EOC's prior (Qiu et al., arXiv 2501.19243, Eq. 4;
docs/methods.md "EOC"): :func:`calibrate` runs every block through its interior
program (bitwise the unpatched block) and averages each (block, branch, stream) output
per step over the runs, returning a :class:`fastcache.Profile` that also holds the
TeaCache pairs, MagCache's magnitude-ratio curve (docs/methods.md section 9, M1) and
Block Caching's per-block change curves (section 6, B1)::

    profile = fastcache.calibrate(model, lambda: [sample(model, c) for c in classes])
    profile.save("dit.profile.safetensors")
    cfg = fastcache.EOCConfig(base=fastcache.FORAConfig(interval=3), profile=profile)

Calibration reads values to the host at every step: it is an offline tool, not a step
path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch

from .. import ops
from ..config import CacheConfig, _check_int, config_type
from ..interior import ComputeExecutor, layout_for, run_blocks
from ..policies.base import Policy, register_policy
from ..runtime import patch
from .evaluation import Progress
from .profile import GRANULARITIES, Profile, model_fingerprint


@config_type
@dataclasses.dataclass(frozen=True)
class CalibrationConfig(CacheConfig):
    """Records (input rel-L1, output rel-L1) pairs and, with ``priors``, the per-step
    means of every branch output (EOC's prior); never skips."""

    kind: ClassVar[str] = "calibration"

    priors: bool = False
    granularity: str = "channel"
    gram_dim: int = 8192

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _check_int("gram_dim", self.gram_dim, 0, " (0 = no step Gram)")


class _Recorder:
    def __init__(self):
        self.prev_in: torch.Tensor | None = None
        self.prev_out: dict[str, torch.Tensor] | None = None
        self.prev_t = float("inf")
        self.pairs: list[tuple[float, float]] = []
        self.step = -1  # step index within the current run
        self.sums: list[list[torch.Tensor]] = []  # [step][slot] summed means over runs
        self.counts: list[int] = []
        self.run_lengths: list[int] = []
        self.timesteps: list[list[float]] = []
        # MagCache (M1): the previous step's stack residual (first cached stream) of this
        # run, and per step the sum over runs of gamma_s and the number of runs
        self.prev_res: torch.Tensor | None = None
        self.mag_sums: list[float] = []
        # Block Caching (B1): the previous step's output streams of every block, and per
        # step the sum over runs of Delta_i(s) (a list of L floats)
        self.prev_blocks: list[list[torch.Tensor]] | None = None
        self.change_sums: list[list[float]] = []
        # Schedule search (docs/methods.md section 12): this run's sketched branch outputs
        # per step and slot, folded into the per-slot step Gram at the end of every run
        self.feats: list[list[torch.Tensor]] = []
        self.gram: torch.Tensor | None = None  # (K, S, S) fp64, summed over runs

    def fold(self) -> None:
        """Add this run's ``<F_k(i), F_k(j)>`` to the Gram (at the end of a run)."""
        if not self.feats:
            return
        per_slot = (torch.stack([row[k] for row in self.feats]).double() for k in range(len(self.feats[0])))
        g = torch.stack([F @ F.T for F in per_slot]).cpu()  # host-read-ok: calibration is offline
        if self.gram is None:
            self.gram = g
        elif self.gram.shape != g.shape:
            raise ValueError("calibrate: the runs had different numbers of steps; calibrate each step count separately")
        else:
            self.gram += g
        self.feats = []


@register_policy(CalibrationConfig)
class CalibrationPolicy(Policy):
    def __init__(self, config, spec, model):
        super().__init__(config, spec, model)
        self.layout = layout_for(spec, model) if config.priors else None
        self.progress = None  # called once per recorded step (calibrate's progress bar)
        self._hashes: dict = {}  # (numel, device) -> CountSketch bucket and sign

    def new_state(self):
        return _Recorder()

    def reset_state(self, st):
        st.__init__()

    def state_stats(self, st):
        return {"pairs": len(st.pairs)}

    def run_stack(self, st: _Recorder, runner, head, call, timestep):
        x, shift, scale, eps, *_ = self.spec.modulation(head, call)
        t = float(timestep.reshape(-1)[0])  # host-read-ok: calibration is offline
        if t > st.prev_t or st.prev_in is None or st.prev_in.shape != x.shape:
            st.prev_in, st.prev_out = (
                torch.zeros_like(x, memory_format=torch.contiguous_format),
                None,
            )  # a new run: no pair for step 0
            if st.step >= 0:
                st.run_lengths.append(st.step + 1)
                st.fold()
            st.step = -1
            st.timesteps.append([])
            st.prev_res, st.prev_blocks = None, None
        st.step += 1
        st.timesteps[-1].append(t)
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev_in, eps)
        streams = {n: call[n] for n in self.spec.streams}
        if self.layout is None:
            out = runner.run(call, streams)
        else:
            ex = ComputeExecutor(record=True)
            out, blocks = streams, []
            for li in range(self.layout.num_blocks):
                out = run_blocks(self.layout, call, out, ex, li, li + 1)
                blocks.append([v.detach().clone() for v in out.values() if v is not None])
            self._accumulate(st, ex.outputs)
            if self.config.gram_dim:
                st.feats.append([self._sketch(f) for f in ex.outputs])
            self._curves(st, out[self.spec.cached_streams[0]] - streams[self.spec.cached_streams[0]], blocks)
        if self.progress is not None:
            self.progress()
        cached = {n: out[n] for n in self.spec.cached_streams}
        if st.prev_out is not None:
            x_rel = float(ops.rel_l1_ratio(sums))  # host-read-ok: calibration is offline
            num = sum(float((cached[n] - st.prev_out[n]).abs().sum()) for n in cached)  # host-read-ok
            den = sum(float(st.prev_out[n].abs().sum()) for n in cached)  # host-read-ok: calibration
            if den > 0:
                st.pairs.append((x_rel, num / den))
        st.prev_out = {n: v.detach().clone() for n, v in cached.items()}
        st.prev_t = t
        return out

    def _curves(self, st: _Recorder, residual: torch.Tensor, blocks: list[list[torch.Tensor]]) -> None:
        """MagCache's gamma_s (M1, diffusers' calibration formula: the mean over batch rows
        and tokens of ``||R_s|| / (||R_{s-1}|| + 1e-8)``, norms over channels; 1 at step 0)
        and Block Caching's Delta_i(s) (B1; 0 at step 0), summed over runs per step."""
        r = residual.detach().float()
        if st.prev_res is None:
            gamma = 1.0
        else:
            cur, prev = torch.linalg.norm(r, dim=-1), torch.linalg.norm(st.prev_res, dim=-1)
            gamma = float((cur / (prev + 1e-8)).mean())  # host-read-ok: calibration is offline
        st.prev_res = r
        if st.prev_blocks is None:
            delta = [0.0] * len(blocks)
        else:
            delta = []
            for now, before in zip(blocks, st.prev_blocks):
                num = sum(float((a.float() - b.float()).abs().sum()) for a, b in zip(now, before))  # host-read-ok
                den = sum(float(a.float().abs().sum()) for a in now)  # host-read-ok: calibration is offline
                delta.append(num / den if den > 0 else 0.0)
        st.prev_blocks = blocks
        if st.step == len(st.mag_sums):
            st.mag_sums.append(gamma)
            st.change_sums.append(delta)
        else:
            st.mag_sums[st.step] += gamma
            st.change_sums[st.step] = [a + b for a, b in zip(st.change_sums[st.step], delta)]

    def _sketch(self, f: torch.Tensor) -> torch.Tensor:
        """``f`` flattened (fp32) when it has at most ``gram_dim`` elements, else its
        CountSketch to ``gram_dim`` buckets (a fixed random bucket and sign per element):
        a linear map that keeps the squared norm of any fixed vector within about
        ``sqrt(2 / gram_dim)`` relative error, so the quadratic forms of the schedule search
        (forecast minus truth, a linear combination of steps) stay close."""
        v = f.detach().reshape(-1).float()
        r = self.config.gram_dim
        if v.numel() <= r:
            return v
        key = (v.numel(), v.device)
        hs = self._hashes.get(key)
        if hs is None:
            g = torch.Generator().manual_seed(0x5EED + v.numel())
            idx = torch.randint(0, r, (v.numel(),), generator=g)
            sign = torch.randint(0, 2, (v.numel(),), generator=g).float() * 2 - 1
            hs = self._hashes[key] = (idx.to(v.device), sign.to(v.device))
        return torch.zeros(r, dtype=torch.float32, device=v.device).index_add_(0, hs[0], v * hs[1])

    def _accumulate(self, st: _Recorder, outputs: list[torch.Tensor]) -> None:
        # Eq. 4: mean over runs (and, per channel, over batch rows and tokens).
        if self.config.granularity == "channel":
            means = [f.detach().float().mean(dim=(0, 1)) for f in outputs]
        else:
            means = [f.detach().float().mean(dim=0) for f in outputs]
        if st.step == len(st.sums):
            st.sums.append(means)
            st.counts.append(1)
        else:
            st.sums[st.step] = [a + b for a, b in zip(st.sums[st.step], means)]
            st.counts[st.step] += 1


class Recording:
    """The pairs recorded by :func:`recording`, and the fit."""

    def __init__(self, handle):
        self.handle = handle
        self._frozen: np.ndarray | None = None

    @property
    def pairs(self) -> np.ndarray:
        """``(n, 2)``: input rel-L1, output rel-L1, one row per step after the first of a run."""
        if self._frozen is not None:
            return self._frozen
        rows = [p for st in self.handle.contexts.values() for p in st.pairs]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 2)

    def fit(self, degree: int = 4) -> tuple[float, ...]:
        """``numpy.polyfit(input_rel_l1, output_rel_l1, degree)``, highest power first."""
        p = self.pairs
        if len(p) <= degree:
            raise ValueError(
                f"calibration recorded {len(p)} step pairs, too few to fit degree {degree}: "
                "run more sampling runs (or steps) inside fastcache.tuning.calibration.recording(model)"
            )
        return tuple(float(c) for c in np.polyfit(p[:, 0], p[:, 1], degree))


@contextlib.contextmanager
def recording(model: torch.nn.Module, spec=None) -> Iterator[Recording]:
    """Patch ``model`` to record calibration pairs during ordinary (uncached) sampling."""
    h = patch(model, CalibrationConfig(), spec)
    rec = Recording(h)
    try:
        yield rec
    finally:
        rec._frozen = rec.pairs  # the pairs outlive the patch
        h.remove()


def calibrate(
    model: torch.nn.Module,
    run,
    granularity: str = "channel",
    scheduler: str | None = None,
    spec=None,
    progress: bool = True,
    gram_dim: int = 8192,
) -> Profile:
    """Extract EOC's prior (and TeaCache's calibration pairs) from uncached runs.

    ``run()`` performs one or more ordinary sampling runs of ``model`` (same number of
    steps each; a rising timestep starts a new run). Every block runs through its
    interior program (the model's output is unchanged, bitwise), and each slot's
    branch output is averaged per step over the runs: ``(D,)`` per slot and step with
    ``granularity="channel"`` (default; see :mod:`fastcache.tuning.profile` for sizes),
    ``(N, D)`` with ``"token"``. ``scheduler``: a name stored in the profile's metadata
    (default: the scheduler is described by the recorded timesteps only). ``gram_dim``:
    the per-slot step Gram of the branch outputs that :func:`fastcache.search_schedule`
    searches on (exact for slots of at most ``gram_dim`` elements, else a CountSketch to
    that size; 0 = none); ``(slots, S, S)`` fp64 in the profile.
    """
    if not callable(run):
        raise TypeError(f"calibrate(model, run): run must be a callable performing sampling runs, got {run!r}")
    h = patch(model, CalibrationConfig(priors=True, granularity=granularity, gram_dim=gram_dim), spec)
    bar = Progress("fastcache.calibrate", progress)
    h.policy.progress = bar
    try:
        with torch.no_grad():
            run()
        states = list(h.contexts.values())
        for st in states:
            st.fold()
        layout = h.policy.layout
        pairs = [p for st in states for p in st.pairs]
    finally:
        bar.close()
        h.remove()
    lengths, sums, counts, timesteps, mag, change = [], None, None, [], None, None
    grams = [st.gram for st in states if st.gram is not None]
    if grams and len({tuple(g.shape) for g in grams}) != 1:
        raise ValueError("calibrate: contexts recorded runs of different lengths")
    for st in states:
        if st.step < 0:
            continue
        lengths += st.run_lengths + [st.step + 1]
        timesteps += st.timesteps
        if sums is None:
            sums, counts, mag, change = st.sums, st.counts, st.mag_sums, st.change_sums
        else:
            if len(st.sums) != len(sums):
                raise ValueError("calibrate: contexts recorded runs of different lengths")
            sums = [[a + b for a, b in zip(x, y)] for x, y in zip(sums, st.sums)]
            counts = [a + b for a, b in zip(counts, st.counts)]
            mag = [a + b for a, b in zip(mag, st.mag_sums)]
            change = [[a + b for a, b in zip(x, y)] for x, y in zip(change, st.change_sums)]
    if not lengths:
        raise ValueError("calibrate: run() made no model call; it must perform at least one sampling run")
    if len(set(lengths)) != 1:
        raise ValueError(
            f"calibrate: the runs had different numbers of steps {sorted(set(lengths))}; a profile is made for "
            "one step count, so calibrate each step count separately"
        )
    S = _check_int("steps per run", lengths[0], 2, " (a one-step run has nothing to cache)")
    shapes = {tuple(t.shape) for t in sums[0]}
    if len(shapes) != 1:
        if granularity == "channel":  # one prior holds one width
            raise ValueError(
                f"calibrate: {type(model).__name__}'s branch outputs have different widths {sorted(shapes)} (streams "
                "of different widths, e.g. LTX-2's video and audio tokens); a profile holds one width, so this model "
                "cannot be profiled: use the methods that need no profile (TeaCacheConfig, FirstBlockCacheConfig, "
                "FORAConfig, DeltaDiTConfig, TaylorSeerConfig, ScheduleConfig with a plan)"
            )
        raise ValueError(
            f"calibrate: granularity={granularity!r} gives slots of different shapes {sorted(shapes)} (streams with "
            "different token counts, e.g. Flux's text and image tokens); use granularity='channel'"
        )
    prior = torch.stack([torch.stack(step) / c for step, c in zip(sums, counts)])
    cls, chash = model_fingerprint(model)
    meta = {
        "model_class": cls,
        "config_hash": chash,
        "spec": h.spec.name,
        "num_steps": S,
        "runs": len(lengths),
        "scheduler": scheduler or "unspecified",
        "timesteps": [round(t, 6) for t in timesteps[0]],
        "granularity": granularity,
    }
    mag_ratios = torch.tensor([m / c for m, c in zip(mag, counts)], dtype=torch.float32)
    block_change = torch.tensor([[d / c for d in row] for row, c in zip(change, counts)], dtype=torch.float32)
    return Profile(
        prior.cpu(),  # host-read-ok: calibration is offline
        layout.describe(),
        meta,
        np.asarray(pairs, dtype=np.float64),
        mag_ratios=mag_ratios,
        block_change=block_change,
        step_gram=sum(grams[1:], grams[0]) if grams else None,
    )
