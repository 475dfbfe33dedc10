"""torch.compile(fullgraph=True) of every patched supported model: 0 graph breaks and the
skip is one torch.cond (dynamo's capture of the whole model's first call from a reset state:
``torch._dynamo.explain``, or on the core families the compiled loop's own first capture);
on the core families (``support.zoo.CORE``: one of each kind of block) the compiled sampling
loop also matches eager, step decisions included (the contract suite compiles every
method's loop too: tests/contracts).

The compiled loop runs with ``backend="aot_eager"`` (the graph torch captures, run by
eager kernels): what this file checks is the capture. Inductor's code generation of the
same graph is checked once, on the DiT, by
tests/runtime/test_compile_shapes.py::test_inductor_teacache_recompiles_for_a_new_resolution
(and tests/runtime/test_schedule.py's inductor test); per family it cost a minute each."""

import pytest
import torch
import torch._dynamo
from support.hostreads import COND
from support.zoo import CASES, CORE, MODEL_GRAPH_BREAKS, TEACACHE_THRESHOLDS
from torch._dynamo.testing import CompileCounterWithBackend

import fastcache

pytestmark = pytest.mark.compile

STEPS = 10
THRESHOLDS = TEACACHE_THRESHOLDS
# models that torch.compile(fullgraph=True) cannot capture even unpatched: the reason, checked
UNCOMPILABLE = {"diffusers-mochi": "diffusers' MochiAttnProcessor2_0 runs torch.nonzero on the prompt mask"}
UNCOMPILABLE["diffusers-lumina2"] = "diffusers' Lumina2RotaryPosEmbed reads the caption lengths to the host (.tolist())"
UNCOMPILABLE.update(MODEL_GRAPH_BREAKS)
# patched models whose capture fails in fastcache (open defects): strict xfail, so a fix shows
CAPTURE_DEFECTS = {
    "diffusers-hunyuanimage": "its block classes are allow_in_graph (diffusers' maybe_allow_in_graph): dynamo runs the "
    "patched first block as an opaque call, and TeaCache's static_floats config patch raises there"
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=CAPTURE_DEFECTS[n])) if n in CAPTURE_DEFECTS else n
        for n in sorted(CASES)
    ],
)
def test_fullgraph_compile_matches_eager(name):
    case = CASES[name]()
    m = case.model
    if name in UNCOMPILABLE:
        sch = case.scheduler()
        sch.set_timesteps(STEPS)
        with torch.no_grad():
            explain = torch._dynamo.explain(m)(**case.inputs(case.latents(torch.Generator()), sch.timesteps[0]))
        assert explain.graph_break_count > 0, f"{name} now compiles unpatched: remove it from UNCOMPILABLE"
        pytest.skip(f"{name}: the unpatched model breaks the graph ({UNCOMPILABLE[name]})")
    cfg = fastcache.TeaCacheConfig(threshold=THRESHOLDS[name], num_steps=STEPS)
    with fastcache.patched(m, cfg):
        eager = case.sample(steps=STEPS)
        eager_tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        assert not all(eager_tl), "the threshold should skip some steps"

        fastcache.reset(m)
        torch._dynamo.reset()
        if name in CORE:
            # the compiled loop; the capture checked is its first call's (fullgraph: a break
            # raises), the graph explain traces from the same reset state and inputs
            cnt = CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(m, fullgraph=True, backend=cnt)
            first = []
            out = case.sample(model=compiled, steps=STEPS, per_step=lambda i, o: first.append(list(cnt.graphs)))
            graphs = first[0]
            tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        else:
            sch = case.scheduler()
            sch.set_timesteps(STEPS)
            kw = case.inputs(case.latents(torch.Generator().manual_seed(1)), sch.timesteps[0])
            with torch.no_grad():
                explain = torch._dynamo.explain(m)(**kw)
            assert explain.graph_break_count == 0, explain.break_reasons
            graphs = explain.graphs
    assert len(graphs) == 1
    cond_nodes = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target is COND]
    assert len(cond_nodes) == 1, "the skip must be one torch.cond"
    if name not in CORE:
        return
    assert tl == eager_tl
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
