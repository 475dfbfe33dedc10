"""Fit TeaCache coefficients for a model without published ones (DiT, PixArt, SD3, yours).

The authors' recipe (METHODS.md, TeaCache): on uncached runs, pair each step's
relative-L1 change of the indicator (the first block's modulated input) with the
relative-L1 change of the block stack's output, over all steps of many prompts or
classes, and fit ``numpy.polyfit(x=input_rel_l1, y=output_rel_l1, deg=4)``. The fitted
polynomial maps the cheap indicator change to the change the cache would miss.

Example::

    with fastcache.calibration.recording(model) as rec:
        for labels in batches:
            sample(model, labels)                   # ordinary uncached sampling runs
    coeffs = rec.fit(degree=4)
    fastcache.patch(model, fastcache.TeaCacheConfig(threshold=0.1, coefficients=coeffs))

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

from . import ops
from .config import CacheConfig, config_type
from .policies.base import Policy, register_policy
from .runtime import patch


@config_type
@dataclasses.dataclass(frozen=True)
class CalibrationConfig(CacheConfig):
    """Records (input rel-L1, output rel-L1) pairs; never skips."""

    kind: ClassVar[str] = "calibration"


class _Recorder:
    def __init__(self):
        self.prev_in: torch.Tensor | None = None
        self.prev_out: dict[str, torch.Tensor] | None = None
        self.prev_t = float("inf")
        self.pairs: list[tuple[float, float]] = []


@register_policy(CalibrationConfig)
class CalibrationPolicy(Policy):
    def new_state(self):
        return _Recorder()

    def reset_state(self, st):
        st.prev_in, st.prev_out, st.prev_t = None, None, float("inf")
        st.pairs.clear()

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
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev_in, eps)
        streams = {n: call[n] for n in self.spec.streams}
        out = runner.run(call, streams)
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
                "run more sampling runs (or steps) inside fastcache.calibration.recording(model)"
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
