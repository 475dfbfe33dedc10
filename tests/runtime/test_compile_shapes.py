"""A compiled patched model keeps working when its input shapes change, as the unpatched
model does: ``torch.compile(fullgraph=True)`` recompiles for a new resolution (dynamo makes
the changed sizes symbolic), and ``torch.compile(dynamic=True)`` compiles symbolic shapes
on the first call.

What used to break (``fastcache.tracing.skip_cond``, ``fastcache.tracing.static_floats``):
under symbolic sizes a dense ``(B, N, D)`` cond output has the stride ``D*Max(1, N)``, which
torch's cond refuses ("one of cond's output stride is not a simple accumulative
multiplication of sizes"); and with ``dynamic=True`` the floats the blocks read (a norm's
``eps``, a dropout probability) become symbolic inputs that a cond cannot capture
("lift_tracked_freevar_to_input should not be called on root SubgraphTracer", or "operands
can only be of (Tensor, int, SymInt)").

Each case samples eagerly first at the resolution the compiled model then sees (the
reference output; it allocates the cache buffers for that shape), then with the compiled
model from a reset state. The graphs compiled per resolution are counted: a new resolution
costs what the first one did (TeaCache, First-Block: 1 graph; the interior policies: 2, the
first call after a reset taking its own path), and under ``dynamic=True`` nothing.
"""

import pytest
import torch
import torch._dynamo
from support.zoo import dit_case, pixart_case
from torch._dynamo.utils import counters

import fastcache

pytestmark = pytest.mark.compile

STEPS = 4
SIZES = (12, 16)  # latent resolutions, neither the model's sample_size 8 (its patch embedding guards on that)


def configs():
    return {
        "teacache": fastcache.TeaCacheConfig(threshold=0.3, num_steps=STEPS),
        "fora": fastcache.FORAConfig(interval=2, num_steps=STEPS),
        "taylorseer": fastcache.TaylorSeerConfig(interval=2, order=1, warmup_steps=1, num_steps=STEPS),
        "first_block": fastcache.FirstBlockCacheConfig(threshold=0.3, num_steps=STEPS),
    }


def small_dit():
    return dit_case(num_layers=2)


def at(case, size: int):
    case.latents = lambda g: torch.randn(case.batch, 4, size, size, generator=g)
    return case


def timeline(m):
    return fastcache.stats(m)["contexts"]["default"]["timeline"]


def eager_then_compiled(case, compiled, size):
    """The eager run at ``size`` (reference; allocates the cache for this shape), then the
    compiled run from a reset state. Returns (eager, compiled, timelines, graphs compiled)."""
    m = case.model
    at(case, size)
    fastcache.reset(m)
    eager = case.sample(steps=STEPS)
    eager_tl = timeline(m)
    fastcache.reset(m)
    before = counters["stats"]["unique_graphs"]
    out = case.sample(model=compiled, steps=STEPS)
    return eager, out, (eager_tl, timeline(m)), counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("name", sorted(set(configs()) - {"teacache"}))
def test_compiled_model_recompiles_for_a_new_resolution(name):
    """One policy per traced path and buffer layout: the block range (First-Block), the
    interior step without (FORA) and with the Taylor history (TaylorSeer; ScheduleConfig's
    device schedule runs the same step on the same history, its plan looked up by the step:
    nothing that depends on a size). The residual cond (TeaCache): the inductor test below
    compiles the same captures (same model, sizes and config) and checks all of this and more
    (one graph per resolution)."""
    case = small_dit()
    m = case.model
    torch._dynamo.reset()
    counters.clear()
    with fastcache.patched(m, configs()[name]):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        graphs = []
        for size in SIZES:
            eager, out, (eager_tl, tl), n = eager_then_compiled(case, compiled, size)
            assert 0 < sum(eager_tl) < STEPS, f"{name} at {size}: the run should compute some steps and skip others"
            assert tl == eager_tl, f"{name} at {size}"
            torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
            graphs.append(n)
    # the first resolution's graphs static, the second's with symbolic sizes: as many
    assert graphs[0] in (1, 2) and graphs[1] == graphs[0], graphs


def _dynamic_case(name):
    if name == "tgate":  # a text-conditioned model (cross-attention to gate), as small as small_dit
        case = pixart_case(num_layers=2)
        return case, fastcache.TGateConfig(gate_step=2, warm_up=1, sp_interval=1, fi_interval=1)
    case = small_dit()
    if name == "magcache":
        prof = fastcache.calibrate(case.model, lambda: [case.sample(steps=STEPS, seed=1)], progress=False)
        return case, fastcache.MagCacheConfig(threshold=1.0, max_skips=2, profile=prof)
    return case, configs()[name]


@pytest.mark.parametrize("name", ["first_block", "fora", "magcache", "teacache", "tgate"])
def test_dynamic_compile_first_call(name):
    """One policy per traced path: the residual cond (TeaCache, MagCache; First-Block's block
    range), the interior step (FORA; TaylorSeer and ScheduleConfig share its cond site) and
    T-GATE's nested conds (which failed with "lift_tracked_freevar_to_input" before it
    traced with static floats and crossed its conds flat)."""
    case, cfg = _dynamic_case(name)
    m = case.model
    torch._dynamo.reset()
    counters.clear()
    with fastcache.patched(m, cfg):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
        eager, out, (eager_tl, tl), n = eager_then_compiled(case, compiled, SIZES[0])
        assert tl == eager_tl
        torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
        assert n >= 1
        # the symbolic graphs serve the next resolution as they are
        eager, out, (eager_tl, tl), n = eager_then_compiled(case, compiled, SIZES[1])
        assert tl == eager_tl
        torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
        assert n == 0


def test_inductor_teacache_recompiles_for_a_new_resolution():
    case = small_dit()
    m = case.model
    torch._dynamo.reset()
    counters.clear()
    with fastcache.patched(m, configs()["teacache"]):
        compiled = torch.compile(m, fullgraph=True)
        for size in SIZES:
            eager, out, (eager_tl, tl), n = eager_then_compiled(case, compiled, size)
            assert 0 < sum(eager_tl) < STEPS
            assert tl == eager_tl, size
            torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
            assert n == 1, size
