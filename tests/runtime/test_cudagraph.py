"""CUDA-graph capture of a whole step through torch's conditional nodes.

The capture itself needs a CUDA device (skipped here; these GPU tests have never run on
the project's machine). What the graph records is the cond path with the fused ops; that
path is checked on CPU in eager mode (``force_cond``) against the Python-branch path, and
under a stand-in of the capture mode in ``test_modes.py``.
"""

import pytest
import torch
import torch._higher_order_ops.cudagraph_conditional_nodes as cn
from support.hostreads import HostReadMode, python_level_reads
from support.zoo import CASES

import fastcache
from fastcache.cuda_graphs import CUDAGraphStep, conditional_nodes_available
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
@pytest.mark.parametrize("compile_stack", [False, True])
def test_graph_step_matches_eager_with_zero_host_reads(compile_stack, monkeypatch):
    """Capture records the skip as one conditional node; neither the capture nor the
    replays read anything to the host; the replayed loop matches eager."""
    case = CASES["fastcache-dit"]()
    m = case.model.cuda()
    steps = 10
    cfg = fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)
    sch = case.scheduler()
    sch.set_timesteps(steps)
    labels = torch.arange(2, device="cuda")
    x0 = case.latents(torch.Generator().manual_seed(1)).cuda()
    nodes = []
    if_else = cn.if_else_node

    def recording_if_else(*args):
        nodes.append(torch.cuda.is_current_stream_capturing())
        return if_else(*args)

    monkeypatch.setattr(cn, "if_else_node", recording_if_else)
    with fastcache.patched(m, cfg):
        x = x0.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(m(x, t.expand(2).cuda(), labels), t, x).prev_sample
        eager, tl = x, fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert 0 < sum(tl) < steps
        fastcache.reset(m)
        ts = [t.expand(2).cuda() for t in sch.timesteps]
        with torch.no_grad():
            step = CUDAGraphStep(lambda a, t: m(a, t, labels), x0, ts[0], model=m, compile_stack=compile_stack)
            nodes_at_capture = list(nodes)
            x = x0.clone()
            replay_mode, py = HostReadMode(), []
            for t, tt in zip(sch.timesteps, ts):
                with python_level_reads() as seen, replay_mode:
                    out = step(x, tt).clone()
                py += seen
                x = sch.step(out, t, x).prev_sample
        assert fastcache.stats(m)["contexts"]["default"]["timeline"] == tl
    # one conditional if/else pair recorded by the warm-up (into a graph it throws away), one by the capture
    assert nodes_at_capture == [True, True]
    assert len(nodes) == 2  # replays run no Python cond at all
    assert replay_mode.reads == [] and replay_mode.conds == [] and py == []
    torch.testing.assert_close(x, eager, rtol=1e-3 if compile_stack else 1e-4, atol=1e-3 if compile_stack else 1e-4)


def test_the_capture_check_sees_state_that_a_reset_drops():
    """CUDAGraphStep resets the state after warm-up and refuses when the capture allocates
    state again (the graph would replay a first call). The address map it compares keeps
    TeaCache's state over a reset (capturable) and sees TaylorSeer's dropped (refused; such
    schedules go to StaticScheduleGraphs)."""
    from fastcache.cuda_graphs import _all_state_addresses

    def moved_after_reset(cfg):
        case = CASES["fastcache-dit"]()
        with fastcache.patched(case.model, cfg):
            case.sample(steps=4)
            fastcache.reset(case.model)
            before = _all_state_addresses(case.model)
            case.sample(steps=4)
            after = _all_state_addresses(case.model)
        assert after, "no state tensors found"
        return sorted(k for k, v in after.items() if before.get(k) != v)

    assert moved_after_reset(fastcache.TeaCacheConfig(threshold=0.3, num_steps=4)) == []
    assert moved_after_reset(fastcache.TaylorSeerConfig(interval=2, num_steps=4)) != []
