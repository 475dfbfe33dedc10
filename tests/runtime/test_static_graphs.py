"""CUDA graphs for static schedules: one captured graph per step kind, replayed by the plan.

``fastcache.cuda_graphs.StaticScheduleGraphs`` on a model patched with an announced static
plan (``ScheduleConfig``, or TaylorSeer / FORA through ``static_plan``). Here (CPU) the
graphs are ``StandInGraph``s: the capture records every op with its constants and every
tensor that existed before the step (the static addresses), each replay re-runs the step
eagerly and must be exactly the captured graph — the same ops and constants on the same
static addresses, temporaries made by the same ops, no host read, no cond, no host data —
so a real ``torch.cuda.CUDAGraph`` replay would be valid. Checked over whole announced
sampling loops (diffusers' DiT and Flux, a mixed-order plan and TaylorSeer): bitwise the
plain patched eager loop, the same timeline, two graphs (computed, forecast) for plans with
three forecast orders, zero host reads. The negative tests show the stand-in catching what
a real replay would get wrong (a reallocated state tensor, a changing constant, a host read,
host data). The real capture and replay are the GPU test at the end (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from support.hostreads import HostReadMode, python_level_reads
from support.zoo import CASES

import fastcache
from fastcache.cuda_graphs import (
    GraphCheckError,
    StandInGraph,
    StaticScheduleGraphs,
    _state_tensors,
    static_plan,
)
from fastcache.policies.taylorseer import TaylorSeerPolicy

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 8
MIXED = "CC1C20C1"  # forecasts of orders 0, 1 and 2: one forecast graph serves them all
TAYLOR = fastcache.TaylorSeerConfig(compute_steps=(0, 1, 2, 5), order=2, num_steps=STEPS)


def _step_fn(case, m, kw0):
    """``fn(x, t)``: one model call of ``case`` with its other inputs fixed (those of step 0)."""
    other = {k: v for k, v in kw0.items() if k not in (case.stream, "timestep")}
    return lambda x, t: case.output(m(**{case.stream: x, "timestep": t}, **other))


def _announced(m, n):
    return lambda i: fastcache.context(m, "default", step_index=i, num_steps=n)


def _graph_loop(case, m, graphs, steps, x0):
    """The sampling loop with every model call replaced by ``graphs(x, t, step=i)``; host
    reads and conds counted over the graph calls only."""
    sch = case.scheduler()
    sch.set_timesteps(steps)
    x, mode, py = x0.clone(), HostReadMode(), []
    for i, t in enumerate(sch.timesteps):
        kw = case.inputs(x, t)
        with python_level_reads() as seen, mode:
            out = graphs(x, kw["timestep"], step=i)
        py += seen
        x = sch.step(out, t, x).prev_sample
    return x, mode, py


@pytest.mark.parametrize(
    "name, config",
    [("diffusers-dit", fastcache.ScheduleConfig(plan=MIXED)), ("diffusers-flux", TAYLOR)],
    ids=["dit-mixed-plan", "flux-taylorseer"],
)
def test_static_graphs_replay_the_announced_eager_loop_bitwise(name, config):
    case = CASES[name]()
    m = case.model
    with fastcache.patched(m, config):  # the plain patched eager loop, steps announced
        ref = case.sample(steps=STEPS, context=_announced(m, STEPS))
        ref_stats = fastcache.stats(m)["contexts"]["default"]
    plan = static_plan(config)
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x0 = case.latents(torch.Generator().manual_seed(1))
    kw0 = case.inputs(x0, sch.timesteps[0])
    with fastcache.patched(m, plan), torch.no_grad():
        graphs = StaticScheduleGraphs(_step_fn(case, m, kw0), x0, kw0["timestep"], model=m, backend="stand-in")
        st = fastcache.get_patch(m).contexts["default"]
        at_capture = {k: t.data_ptr() for k, t in _state_tensors(st).items()}
        out, mode, py = _graph_loop(case, m, graphs, STEPS, x0)
        stats = fastcache.stats(m)["contexts"]["default"]
        after = {k: t.data_ptr() for k, t in _state_tensors(st).items()}
    assert torch.equal(out, ref)
    assert stats["timeline"] == ref_stats["timeline"] == [c == "C" for c in plan.plan]
    assert (stats["computed"], stats["skipped"]) == (ref_stats["computed"], ref_stats["skipped"])
    # one graph per step kind, whatever the forecast orders; every step replayed one of them
    assert set(graphs.graphs) == {"computed", "forecast"}
    assert len({c for c in plan.plan if c != "C"}) == (3 if plan.plan == MIXED else 1)
    assert graphs.replays == {"computed": plan.plan.count("C"), "forecast": STEPS - plan.plan.count("C")}
    assert all(g.replays == graphs.replays[k] for k, g in graphs.graphs.items())
    # the forecast graph reads the step's offset (and, for a plan of several orders, the
    # order) from the announced device tensors, the computed graph writes the history in
    # place; no state tensor moved
    static = {p for p, _, _ in graphs.graphs["forecast"].static_tensors}
    assert st.plan_dx.data_ptr() in static
    assert (st.plan_k.data_ptr() in static) == (plan.plan == MIXED)  # one order: nothing to select
    assert all(h.data_ptr() in {p for p, _, _ in graphs.graphs["computed"].static_tensors} for h in st.hist)
    assert after == at_capture
    assert mode.reads == [] and mode.conds == [] and py == []


def test_taylorseer_and_fora_run_as_their_static_plans():
    assert static_plan(TAYLOR).plan == "CCC22C2C"  # the last step computed (num_steps known)
    assert static_plan(fastcache.FORAConfig(interval=3), num_steps=8).plan == "C00C00C0"
    p = fastcache.ScheduleConfig(plan=MIXED)
    assert static_plan(p) is p
    with pytest.raises(TypeError, match="CUDAGraphStep"):
        static_plan(fastcache.TeaCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="no num_steps"):
        static_plan(fastcache.TaylorSeerConfig(compute_steps=(0, 3)))
    with pytest.raises(ValueError, match="has 8 steps but num_steps=6"):
        static_plan(p, num_steps=6)


def _dit_setup(config):
    case = CASES["diffusers-dit"]()
    m = case.model
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x0 = case.latents(torch.Generator().manual_seed(1))
    kw0 = case.inputs(x0, sch.timesteps[0])
    handle = fastcache.patch(m, config)
    return case, m, handle, _step_fn(case, m, kw0), x0, kw0["timestep"]


def test_refusals_name_the_fix():
    # a config deciding from the data has no static step kind: CUDAGraphStep
    case, m, h, fn, x0, t0 = _dit_setup(fastcache.TeaCacheConfig(threshold=0.2, num_steps=STEPS))
    with pytest.raises(ValueError, match="CUDAGraphStep"):
        StaticScheduleGraphs(fn, x0, t0, model=m, backend="stand-in")
    h.remove()
    # TaylorSeer patched as such: re-patch with its static plan
    case, m, h, fn, x0, t0 = _dit_setup(TAYLOR)
    with pytest.raises(ValueError, match=r"static_plan\(config, num_steps\)"):
        StaticScheduleGraphs(fn, x0, t0, model=m, backend="stand-in")
    h.remove()
    case, m, h, fn, x0, t0 = _dit_setup(fastcache.ScheduleConfig(plan=MIXED))
    with pytest.raises(ValueError, match="plan .* has 8 steps but num_steps=10"):
        StaticScheduleGraphs(fn, x0, t0, model=m, num_steps=10, backend="stand-in")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='stand-in'"):
            StaticScheduleGraphs(fn, x0, t0, model=m)
    with torch.no_grad():
        graphs = StaticScheduleGraphs(fn, x0, t0, model=m, backend="stand-in")
        with pytest.raises(ValueError, match="step index"):
            graphs(x0, t0)  # unannounced
        for i in range(STEPS + 2):  # past the plan's end: computed
            graphs(x0, t0, step=i)
        assert graphs.replays == {"computed": MIXED.count("C") + 2, "forecast": STEPS - MIXED.count("C")}
        assert fastcache.stats(m)["contexts"]["default"]["timeline"][-2:] == [True, True]
        fastcache.reset(m)  # drops the state: the graphs would replay stale addresses
        with pytest.raises(RuntimeError, match="reallocated since the capture"):
            graphs(x0, t0, step=0)
    h.remove()


def test_a_plan_without_forecasts_has_one_graph():
    case, m, h, fn, x0, t0 = _dit_setup(fastcache.ScheduleConfig(plan="CCCC"))
    with torch.no_grad():
        graphs = StaticScheduleGraphs(fn, x0, t0, model=m, backend="stand-in")
        assert list(graphs.graphs) == ["computed"]
        outs = [graphs(x0, t0, step=i).clone() for i in range(4)]
    h.remove()
    with torch.no_grad():
        plain = fn(x0, t0)
    assert all(torch.equal(o, plain) for o in outs)  # every step computed: the unpatched model


# ------------------------------------------------------------------ the stand-in catches what a replay gets wrong
def test_stand_in_accepts_in_place_state_and_catches_a_reallocated_one():
    x = torch.randn(4)
    state = {"h": torch.zeros(4)}

    def in_place():
        state["h"].add_(x)
        return state["h"] * 2

    g = StandInGraph()
    out = g.capture(in_place)
    assert (state["h"].data_ptr(), (4,), torch.float32) in g.static_tensors
    g.replay(in_place)
    assert torch.equal(out, state["h"] * 2)  # the replay wrote the captured output

    def reallocating():
        state["h"] = state["h"] + x  # a new tensor every step: a graph would keep reading the old one
        return state["h"] * 2

    g = StandInGraph()
    g.capture(reallocating)
    with pytest.raises(GraphCheckError, match="reallocated"):
        g.replay(reallocating)


def test_stand_in_catches_a_changing_constant_a_host_read_and_host_data():
    x = torch.randn(4)
    step = [1.0]
    g = StandInGraph()
    g.capture(lambda: x * step[0])
    step[0] = 2.0
    with pytest.raises(GraphCheckError, match="baked the value"):
        g.replay(lambda: x * step[0])
    with pytest.raises(GraphCheckError, match="reads a device value to the host"):
        StandInGraph().capture(lambda: x * 2 if x.sum() > 0 else x)
    with pytest.raises(GraphCheckError, match="host data"):
        StandInGraph().capture(lambda: x + torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_a_policy_reallocating_its_state_inside_the_step_is_caught(monkeypatch):
    """The Taylor update writing a new ``valid`` tensor instead of updating it in place: a
    real graph would keep reading the captured one, so the stand-in refuses the replay."""

    def reallocating_update(self, st, fs, dx, first, store):
        valid = torch.where(first, torch.zeros_like(st.valid), st.valid)
        for h, f in zip(st.hist, fs):
            fastcache.ops.taylor_update(h, f, dx, valid, store)
        st.valid = torch.where(store, (valid + 1.0).clamp(max=float(self.order + 1)), st.valid)

    monkeypatch.setattr(TaylorSeerPolicy, "_update", reallocating_update)
    case, m, h, fn, x0, t0 = _dit_setup(fastcache.ScheduleConfig(plan=MIXED))
    with torch.no_grad():
        graphs = StaticScheduleGraphs(fn, x0, t0, model=m, backend="stand-in")
        with pytest.raises(GraphCheckError, match="reallocated"):
            graphs(x0, t0, step=0)
    h.remove()


# ------------------------------------------------------------------ GPU: the real capture and replay
@requires_cuda
@pytest.mark.gpu
def test_cuda_static_graphs_match_eager_with_zero_host_reads():
    case = CASES["diffusers-dit"]()
    m = case.model.cuda()
    config = fastcache.ScheduleConfig(plan=MIXED)
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x0 = case.latents(torch.Generator().manual_seed(1)).cuda()
    labels = torch.arange(2, device="cuda")
    fn = lambda x, t: m(hidden_states=x, timestep=t, class_labels=labels).sample  # noqa: E731
    with fastcache.patched(m, config), torch.no_grad():
        x = x0.clone()
        for i, t in enumerate(sch.timesteps):
            with fastcache.context(m, "default", step_index=i, num_steps=STEPS):
                x = sch.step(fn(x, t.expand(2).cuda()), t, x).prev_sample
        eager, tl = x, fastcache.stats(m)["contexts"]["default"]["timeline"]
        ts = [t.expand(2).cuda() for t in sch.timesteps]
        graphs = StaticScheduleGraphs(fn, x0, ts[0], model=m)
        assert all(isinstance(g, torch.cuda.CUDAGraph) for g in graphs.graphs.values())
        x, mode = x0.clone(), HostReadMode()
        for i, (t, tt) in enumerate(zip(sch.timesteps, ts)):
            with mode:
                out = graphs(x, tt, step=i).clone()
            x = sch.step(out, t, x).prev_sample
        assert fastcache.stats(m)["contexts"]["default"]["timeline"][-STEPS:] == tl
    assert set(graphs.graphs) == {"computed", "forecast"}
    assert mode.reads == [] and mode.conds == []
    torch.testing.assert_close(x, eager, rtol=1e-4, atol=1e-4)
