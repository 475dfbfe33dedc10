"""fastcache's step path reads nothing back to the host but the one eager decision flag.

A TorchDispatchMode sees every op that turns a device value into a Python value
(``_local_scalar_dense`` behind ``.item()`` / ``float(t)``, ``is_nonzero`` behind
``bool(t)``, ``equal``); ``tolist`` and ``numpy`` bypass the dispatcher, so they are
wrapped at the Python level. Each read is attributed to the innermost fastcache frame
on the Python stack (the detector lives in ``hostreads.py``, shared with
``test_modes.py``).
"""

import pytest
import torch
from support.hostreads import HostReadMode, python_level_reads
from support.zoo import CASES

import fastcache


@pytest.fixture
def py_reads():
    with python_level_reads() as seen:
        yield seen


@pytest.mark.parametrize("name", ["fastcache-dit", "diffusers-flux"])
def test_one_flag_read_per_step_and_none_in_the_math(name, py_reads):
    case = CASES[name]()
    steps = 12
    mode = HostReadMode()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)):
        case.sample(steps=1)  # allocate the cache buffers outside the measured run
        fastcache.reset(case.model)
        before = len(py_reads)
        with mode:
            case.sample(steps=steps)
        py_reads = py_reads[before:]
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
