"""Running the user's runs and measuring them: the one helper the offline tools share.

A *run* is a callable performing ONE seeded sampling run of the model and returning its
output tensor (e.g. the final images). :func:`fastcache.search_threshold`,
:func:`fastcache.search_schedule` and ``python -m fastcache.tuning`` all take lists of
them, run them uncached for the reference and patched for each candidate, and score the
candidate by the PSNR of its outputs against the reference:

* :func:`as_runs` — one callable or a sequence of them, checked;
* :func:`run_all` — every run once (no grad, process CPU time, outputs detached; with a
  patch handle: reset before each run, its stats read after each, off the step path);
* :func:`psnr` — over all runs' outputs at once; :func:`computed_fraction` — of a patch's
  stats (:meth:`Measured.computed_fraction` over runs); :func:`check_max_evals`;
  :class:`Progress` — the progress bar.

Everything here reads values to the host: it runs between sampling runs, not on a step
path.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["Measured", "Progress", "as_runs", "check_max_evals", "computed_fraction", "psnr", "run_all"]

Run = Callable[[], torch.Tensor]


class Progress:
    """tqdm if installed, else a one-line counter on stderr; called once per unit of work."""

    def __init__(self, desc: str, enabled: bool):
        self.n = 0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc=desc, unit="step")
            except ImportError:
                self.desc = desc

    def __call__(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc}: {self.n} steps", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n:
            print(file=sys.stderr)


def as_runs(runs: Run | Sequence[Run], who: str) -> list[Run]:
    """``runs`` as a non-empty list of callables (one callable is a list of one)."""
    runs = [runs] if callable(runs) else list(runs)
    if not runs or not all(callable(r) for r in runs):
        raise TypeError(f"{who}: runs must be a callable or a non-empty sequence of callables")
    return runs


def check_max_evals(who: str, max_evals, minimum: int) -> int:
    """``max_evals`` as an integer >= ``minimum`` (bools refused), before any run."""
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < minimum:
        raise ValueError(f"{who}: max_evals={max_evals!r} must be an integer >= {minimum}")
    return max_evals


@dataclasses.dataclass
class Measured:
    """What :func:`run_all` measured: each run's output (detached), the process CPU
    seconds spent inside the runs, and each run's patch stats (empty without a handle)."""

    outputs: list[torch.Tensor]
    seconds: float
    stats: list[dict]

    def computed_fraction(self) -> float:
        """The computed fraction of the block work over all runs (each run's, weighted by
        its steps); needs the stats of a patched :func:`run_all`."""
        per_run = [computed_fraction(st) for st in self.stats]
        steps = sum(n for _, n in per_run)
        return sum(f * n for f, n in per_run) / max(steps, 1)


def run_all(runs: Sequence[Run], who: str, *, handle=None, tick: Callable[[], None] | None = None) -> Measured:
    """Every run once, in order, under ``torch.no_grad()``; each must return its output
    tensor (else TypeError naming ``who``). With ``handle`` (a :class:`fastcache.Patch`)
    the cache is reset before each run and ``handle.stats()`` read after it. ``tick`` is
    called after each run (a :class:`Progress`)."""
    outs, secs, stats = [], 0.0, []
    for r in runs:
        if handle is not None:
            handle.reset()
        c = time.process_time()
        with torch.no_grad():
            out = r()
        secs += time.process_time() - c
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{who}: each run must return its output tensor, got {type(out).__name__}")
        outs.append(out.detach())
        if handle is not None:
            stats.append(handle.stats())  # off the step path: between runs
        if tick is not None:
            tick()
    return Measured(outs, secs, stats)


def psnr(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], data_range: float) -> float:
    """PSNR in dB of ``outs`` against ``refs`` (run by run), over all their elements at
    once: ``10 log10(data_range^2 / MSE)``; inf when they are equal."""
    err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs))
    n = sum(r.numel() for r in refs)
    mse = err / n
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def computed_fraction(stats: dict) -> tuple[float, int]:
    """(computed fraction of the block work, steps) over the contexts of a patch's stats."""
    work = steps = 0.0
    for ctx in stats["contexts"].values():
        n = ctx.get("computed", 0) + ctx.get("skipped", 0)
        f = ctx.get("computed_fraction", ctx.get("computed", 0) / n if n else 1.0)
        work += f * n
        steps += n
    return (work / steps if steps else 1.0), int(steps)
