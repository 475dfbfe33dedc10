"""CUDA-graph capture of a whole step through torch.cond conditional nodes.

The capture itself needs a CUDA device (skipped here). What the graph records is the
``torch.cond`` path with the fused ops; that path is checked on CPU in eager mode
(``force_cond``) against the Python-branch path.
"""

import pytest
import torch
from zoo import CASES

import fastcache
from fastcache.cudagraph import CUDAGraphStep, conditional_nodes_available
from fastcache.policies.base import force_cond

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cond_path_equals_python_branch_path():
    case = CASES["fastcache-dit"]()
    cfg = fastcache.TeaCacheConfig(threshold=0.3, num_steps=10)
    with fastcache.patched(case.model, cfg):
        eager = case.sample(steps=10)
        tl = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
        with force_cond():
            via_cond = case.sample(steps=10)
        tl_cond = fastcache.stats(case.model)["contexts"]["default"]["timeline"]
    assert not all(tl)
    assert tl_cond == tl
    torch.testing.assert_close(via_cond, eager, rtol=1e-6, atol=1e-6)


def test_capture_refuses_without_cuda():
    ok, why = conditional_nodes_available()
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal path is not reachable")
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match="cannot capture"):
        CUDAGraphStep(lambda x: x, torch.zeros(1))


@requires_cuda
@pytest.mark.gpu
def test_graph_step_matches_eager_with_zero_host_reads():
    case = CASES["fastcache-dit"]()
    m = case.model.cuda()
    steps = 10
    cfg = fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)
    sch = case.scheduler()
    sch.set_timesteps(steps)
    labels = torch.arange(2, device="cuda")
    x0 = case.latents(torch.Generator().manual_seed(1)).cuda()
    with fastcache.patched(m, cfg):
        x = x0.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(m(x, t.expand(2).cuda(), labels), t, x).prev_sample
        eager, tl = x, fastcache.stats(m)["contexts"]["default"]["timeline"]
        fastcache.reset(m)
        with torch.no_grad():
            step = CUDAGraphStep(lambda a, t: m(a, t, labels), x0, sch.timesteps[0].expand(2).cuda(), model=m)
            x = x0.clone()
            for t in sch.timesteps:
                x = sch.step(step(x, t.expand(2).cuda()).clone(), t, x).prev_sample
        assert fastcache.stats(m)["contexts"]["default"]["timeline"] == tl
    torch.testing.assert_close(x, eager, rtol=1e-4, atol=1e-4)
