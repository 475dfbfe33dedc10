"""The reach matrix: every diffusers transformer class of the reach zoo (the curated
families of ``support.zoo`` and the 31 classes of ``support.reach_image`` /
``support.reach_video``) x the methods that should work everywhere, run the same way for
the contract test (tests/reach/test_reach.py) and for the table users read
(bench/reach_table.py writes docs/reach.md from it).

A cell is measured, never typed:

* ``works``: ``fastcache.patch`` takes the model; at the method's never-skip setting the
  sampling loop is bitwise the unpatched one; at a skipping setting it is finite and runs
  fewer attention calls than the unpatched loop (counted at
  ``torch.nn.functional.scaled_dot_product_attention`` and every attention processor's
  fallback, the work a skipped step saves);
* ``refused``: ``patch`` or the first call raises a TypeError / ValueError that names the
  class and says what to do (register a spec, use another method);
* ``wrong`` / ``crash``: anything else (a test failure).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

import fastcache

from .reach_image import CASES_IMAGE
from .reach_video import CASES_VIDEO
from .zoo import CASES as CURATED

STEPS = 6
#: every class of the reach zoo, once: short name -> builder (a class a family file curates
#: gets its family's spec, the others the automatic path's)
_FIRST = ("diffusers-dit", "diffusers-pixart", "diffusers-flux", "diffusers-sd3", "diffusers-wan")
CLASSES: dict[str, Callable] = {**{k: CURATED[k] for k in _FIRST}, **CASES_IMAGE, **CASES_VIDEO}

F = fastcache


@dataclasses.dataclass(frozen=True)
class Setting:
    never_skip: Callable  # -> config computing every step
    skipping: Callable  # -> config that skips on a 6-step run


SETTINGS = {
    "FirstBlockCacheConfig": Setting(
        lambda: F.FirstBlockCacheConfig(threshold=0.0), lambda: F.FirstBlockCacheConfig(threshold=10.0)
    ),
    "TaylorSeerConfig": Setting(
        lambda: F.TaylorSeerConfig(interval=1, order=1), lambda: F.TaylorSeerConfig(interval=2, order=1)
    ),
    "FORAConfig": Setting(lambda: F.FORAConfig(interval=1), lambda: F.FORAConfig(interval=2)),
    "ScheduleConfig": Setting(lambda: F.ScheduleConfig(plan="C" * STEPS), lambda: F.ScheduleConfig(plan="CC1C1C")),
    "TeaCacheConfig": Setting(lambda: F.TeaCacheConfig(threshold=0.0), lambda: F.TeaCacheConfig(threshold=10.0)),
}


class AttentionCount(TorchFunctionMode):
    """Counts attention kernels called (scaled_dot_product_attention, baddbmm/bmm of the
    classic processors)."""

    NAMES = ("scaled_dot_product_attention", "baddbmm", "bmm")

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass
class Cell:
    status: str  # works / refused / wrong / crash
    detail: str = ""
    skipped_fraction: float = 0.0  # attention calls saved by the skipping setting


_REFS: dict = {}


def built(name: str):
    """(case, uncached output, attention calls) of class ``name``, built once."""
    if name not in _REFS:
        case = CLASSES[name]()
        mode = AttentionCount()
        with mode:
            ref = case.sample(steps=STEPS, seed=2)
        _REFS[name] = (case, ref, mode.calls)
    return _REFS[name]


def run_cell(name: str, method: str) -> Cell:
    case, ref, calls = built(name)
    m = case.model
    setting = SETTINGS[method]
    try:
        with fastcache.patched(m, setting.never_skip()):
            out = case.sample(steps=STEPS, seed=2)
    except (TypeError, ValueError) as e:
        return Cell("refused", str(e))
    except Exception as e:  # noqa: BLE001  (a crash is a result here)
        return Cell("crash", f"{type(e).__name__}: {e}")
    if not torch.equal(out, ref):
        return Cell("wrong", f"never-skip differs from the model by {(out - ref).abs().max().item():.3g}")
    try:
        mode = AttentionCount()
        with fastcache.patched(m, setting.skipping()):
            with mode:
                out = case.sample(steps=STEPS, seed=2)
    except Exception as e:  # noqa: BLE001
        return Cell("crash", f"skipping setting: {type(e).__name__}: {e}")
    if not torch.isfinite(out).all():
        return Cell("wrong", "the skipping setting gives non-finite values")
    if mode.calls >= calls:
        return Cell("wrong", f"the skipping setting ran {mode.calls} attention calls, the model {calls}")
    after = case.sample(steps=STEPS, seed=2)
    if not torch.equal(after, ref):
        return Cell("wrong", "remove() did not restore the model")
    return Cell("works", skipped_fraction=1.0 - mode.calls / calls)
