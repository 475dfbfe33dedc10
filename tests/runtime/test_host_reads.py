"""fastcache's step path reads nothing back to the host but the one eager decision flag.

A TorchDispatchMode sees every op that turns a device value into a Python value
(``_local_scalar_dense`` behind ``.item()`` / ``float(t)``, ``is_nonzero`` behind
``bool(t)``, ``equal``); ``tolist`` and ``numpy`` bypass the dispatcher, so they are
wrapped at the Python level. Each read is attributed to the innermost fastcache frame
on the Python stack.
"""

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import CASES

import fastcache

PKG = os.path.dirname(fastcache.__file__)
READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


def _fastcache_frame():
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename.startswith(PKG):
            return f"{os.path.relpath(fr.filename, PKG)}:{fr.name}:{fr.line.strip()}"
    return None


class HostReadMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True
        self.reads: list[str | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READ_OPS:
            self.reads.append(_fastcache_frame())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def python_level_reads(monkeypatch):
    seen = []
    for name in ("tolist", "numpy"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            seen.append(_fastcache_frame())
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return seen


@pytest.mark.parametrize("name", ["fastcache-dit", "diffusers-flux"])
def test_one_flag_read_per_step_and_none_in_the_math(name, python_level_reads):
    case = CASES[name]()
    steps = 12
    mode = HostReadMode()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)):
        case.sample(steps=1)  # allocate the cache buffers outside the measured run
        fastcache.reset(case.model)
        before = len(python_level_reads)
        with mode:
            case.sample(steps=steps)
        py_reads = python_level_reads[before:]
        st = fastcache.stats(case.model)["contexts"]["default"]
    assert 0 < st["skipped"] < steps  # both branches ran
    ours = [r for r in mode.reads + py_reads if r is not None]
    # exactly the eager decision flag, once per step: the detector sees it, and nothing else
    assert len(ours) == steps, [r for r in ours if "flag.item" not in r]
    assert all(r.startswith("policies/teacache.py:run_stack:if flag.item()") for r in ours), ours


def test_no_host_read_at_all_in_the_fused_ops():
    """The decision and the residual ops themselves read nothing (any backend)."""
    x = torch.randn(2, 16, 32)
    prev = torch.zeros_like(x)
    state = fastcache.ops.new_state(64)
    coeffs = torch.tensor([1.0, 0.5], dtype=torch.float32)
    r = torch.zeros_like(x)
    mode = HostReadMode()
    with mode:
        for i in range(5):
            sums = fastcache.ops.modulated_rel_l1_sums(x + i, torch.randn(2, 32), torch.randn(2, 32), prev)
            flag = fastcache.ops.cache_decision(sums, torch.tensor([900.0 - i]), coeffs, state, 0.2, 1, 0, 5)
            y = fastcache.ops.apply_residual(x, r)
            fastcache.ops.store_residual(y * 2, x, flag, r)
            fastcache.ops.gated_residual(x, torch.randn(2, 32), y, torch.randn(16, 32), 0.01)
    assert mode.reads == []
