"""Host reads per denoising step in every execution mode, counted from what actually runs.

The rows of the mode table in ``docs/modes.md``. Each test runs a 10-step sampling loop
of a patched model (the reference DiT and diffusers' DiT, from ``zoo.py``) and counts, per
model call, the host reads seen by ``hostreads.HostReadMode`` and the cond operators
dispatched; the scheduler step between calls is not counted.

* eager: the Python branch reads the flag once.
* ``torch.compile`` (inductor): the generated wrapper holds one ``if bufN.item():``
  (inspected with ``run_and_get_code``) and that line reads once per step at run time.
* ``backend="aot_eager"`` and ``backend="cudagraphs"``: the cond stays the operator in
  the graph (its branches are FX graph modules); outside a capture its dense kernel reads
  the flag once. For ``cudagraphs`` the graph handed to torch's CUDA-graph trees is checked
  here for what they accept (one cond, no incompatible node, no input mutation); on CPU
  they decline only because of the device. The replay itself is GPU-only (test at the end).
* ``CUDAGraphStep`` (with and without ``compile_stack``): the step under a stand-in of
  torch's capture mode, which does what ``if_else_node`` records — both branches, the
  false outputs copied into the true ones where ``pred`` is false — with a device-side
  ``torch.where`` instead of conditional nodes: zero host reads, one cond per step with
  plain Python branches (no dynamo), eager numerics. The capture and replay are GPU-only
  (``test_cudagraph.py``).
"""

from __future__ import annotations

import contextlib
import re
import types

import pytest
import torch
import torch._dynamo
import torch.utils._pytree as pytree
from support.hostreads import COND, READ_OPS, HostReadMode, python_level_reads, where
from support.zoo import CASES
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import fastcache
from fastcache.cuda_graphs import compile_stack, uncompile_stack, warm_compiled_stack
from fastcache.policies.base import force_cond

pytestmark = pytest.mark.compile

STEPS = 10
NAMES = ["fastcache-dit", "diffusers-dit"]
FLAG_READ = "policies/teacache.py:run_stack:if flag.item()"
ITEM_IN_IF = re.compile(r"^\s*if \w+\.item\(\):\s*$", re.M)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class CaptureStandIn(HostReadMode):
    """CPU stand-in for ``CUDAGraphCaptureControlFlowOpDispatchMode``: a dispatched cond
    runs like ``if_else_node`` records it (both branches; the false outputs copied into the
    true outputs when ``pred`` is false), the selection a device-side ``torch.where``.
    Counts host reads like ``HostReadMode`` and logs every op it sees."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.ops.append(str(func))
        if func is COND:
            pred, true_fn, false_fn, operands = args
            self.conds.append((type(true_fn), type(false_fn)))
            with self:
                outs = true_fn(*operands)
                other = false_fn(*operands)
                for a, b in zip(pytree.tree_iter(outs), pytree.tree_iter(other)):
                    a.copy_(torch.where(pred, a, b))
            return outs
        if func in READ_OPS:
            self.reads.append(where())
        return func(*args, **(kwargs or {}))


def loop(case, model, mode_cls=HostReadMode, around=contextlib.nullcontext):
    """A STEPS-step sampling loop; every model call runs under a fresh ``mode_cls()``
    (and ``around()``). Returns the final latents and the per-step modes."""
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    x = case.latents(torch.Generator().manual_seed(1))
    modes = []
    with torch.no_grad():
        for t in sch.timesteps:
            kw = case.inputs(x, t)
            mode = mode_cls()
            with python_level_reads() as py, around(), mode:
                out = case.output(model(**kw))
            mode.reads += py
            modes.append(mode)
            x = sch.step(out, t, x).prev_sample
    return x, modes


def one_read_per_step(modes, prefix: str) -> bool:
    return all(len(m.reads) == 1 and (m.reads[0] or "").startswith(prefix) for m in modes) and len(modes) == STEPS


def cond_kinds(modes) -> list[list[str]]:
    """Per step, per cond dispatched: "graph" (FX graph-module branches, from a compiled
    graph) or "python" (plain Python functions: the HOP called directly, no dynamo)."""

    def kind(t: type, f: type) -> str:
        if issubclass(t, torch.fx.GraphModule) and issubclass(f, torch.fx.GraphModule):
            return "graph"
        if issubclass(t, types.FunctionType) and issubclass(f, types.FunctionType):
            return "python"
        return f"{t.__name__}/{f.__name__}"

    return [[kind(t, f) for t, f in m.conds] for m in modes]


def timeline(m):
    return fastcache.stats(m)["contexts"]["default"]["timeline"]


@pytest.fixture(scope="module", params=NAMES)
def patched(request):
    """A patched case with its eager (Python-branch) run: (case, output, timeline, modes)."""
    case = CASES[request.param]()
    with fastcache.patched(case.model, fastcache.TeaCacheConfig(threshold=0.3, num_steps=STEPS)):
        case.sample(steps=1)  # allocate the cache buffers: compiled calls then trace once
        fastcache.reset(case.model)
        out, modes = loop(case, case.model)
        tl = timeline(case.model)
        assert 0 < sum(tl) < STEPS, "the threshold should skip some steps and compute others"
        yield case, out, tl, modes
    torch._dynamo.reset()


def test_eager_reads_the_flag_once_per_step(patched):
    _, _, _, modes = patched
    assert one_read_per_step(modes, FLAG_READ), [m.reads for m in modes]
    assert all(m.conds == [] for m in modes)


def test_inductor_reads_the_flag_once_per_step(patched):
    """Inductor lowers the cond to ``if buf.item():`` in its wrapper: graph-break free, not sync-free."""
    case, eager, tl, _ = patched
    m = case.model
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    kw = case.inputs(case.latents(torch.Generator().manual_seed(1)), sch.timesteps[0])
    fastcache.reset(m)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, **kw)
    items = [line.strip() for code in codes for line in ITEM_IN_IF.findall(code)]
    assert len(codes) == 1 and len(items) == 1, items
    fastcache.reset(m)
    out, modes = loop(case, compiled)
    assert one_read_per_step(modes, f"inductor:{items[0]}"), [m_.reads for m_ in modes]
    assert all(m_.conds == [] for m_ in modes)  # no cond operator at run time: it is Python code now
    assert timeline(m) == tl
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def test_aot_eager_keeps_the_cond_operator_whose_kernel_reads_the_flag(patched):
    case, eager, tl, _ = patched
    m = case.model
    torch._dynamo.reset()
    fastcache.reset(m)
    out, modes = loop(case, torch.compile(m, fullgraph=True, backend="aot_eager"))
    assert cond_kinds(modes) == [["graph"]] * STEPS
    assert one_read_per_step(modes, "cond-kernel:if pred"), [m_.reads for m_ in modes]
    assert timeline(m) == tl
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_cudagraphs_backend_graph_is_capturable_but_cpu(patched, monkeypatch):
    """What ``backend="cudagraphs"`` hands to torch's CUDA-graph trees, and why it declines here."""
    import torch._dynamo.backends.cudagraphs as cgb
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    case, eager, tl, _ = patched
    m = case.model
    graphs, skips = [], []
    nop = cgb.boxed_nop
    monkeypatch.setattr(cgb, "boxed_nop", lambda gm, inputs: (graphs.append(gm), nop(gm, inputs))[1])
    monkeypatch.setattr(cgb, "log_cudagraph_skip_and_bump_counter", skips.append)
    torch._dynamo.reset()
    fastcache.reset(m)
    out, modes = loop(case, torch.compile(m, fullgraph=True, backend="cudagraphs"))
    assert len(graphs) == 1
    (gm,) = graphs
    assert sum(n.op == "call_function" and n.target is COND for n in gm.graph.nodes) == 1
    assert get_first_incompatible_cudagraph_node(gm) is None
    assert cgb.check_for_mutation_ignore_cuda_graph_managed_tensor(gm, 0) is None
    assert len(skips) == 1 and "cpu device" in skips[0], skips
    # declined: the graph runs as aot_eager does, its cond kernel reading the flag
    assert cond_kinds(modes) == [["graph"]] * STEPS
    assert one_read_per_step(modes, "cond-kernel:if pred"), [m_.reads for m_ in modes]
    assert timeline(m) == tl
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_capture_path_reads_nothing(patched):
    """What ``CUDAGraphStep`` captures (eager blocks): the cond operator, no host read."""
    case, eager, tl, _ = patched
    m = case.model
    fastcache.reset(m)
    out, modes = loop(case, m, CaptureStandIn, force_cond)
    assert [m_.reads for m_ in modes] == [[]] * STEPS
    assert cond_kinds(modes) == [["python"]] * STEPS
    assert timeline(m) == tl
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


#: a read whose innermost fastcache frame is the call into the model's own forward is the
#: model's code outside the stack (HunyuanVideo 1.5 branches on torch.all(image_embeds == 0)):
#: fastcache's own reads, and the blocks', are attributed to deeper fastcache frames
MODEL_FORWARD = "runtime.py:_model_forward:out = self._model_fwd(*args, **kwargs)"


#: a threshold that skips some steps of the 4-step loop (0.2 skips none on Z-Image)
THRESHOLD = {"diffusers-zimage": 0.5}


@pytest.mark.parametrize("name", sorted(set(CASES) - set(NAMES)))
def test_capture_path_reads_nothing_on_every_other_model(name):
    """The same on the other supported models (several streams, two segments: Flux)."""
    case = CASES[name]()
    m = case.model
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=THRESHOLD.get(name, 0.2), num_steps=STEPS)):
        case.sample(steps=1)
        fastcache.reset(m)
        eager, _ = loop(case, m)
        tl = timeline(m)
        fastcache.reset(m)
        out, modes = loop(case, m, CaptureStandIn, force_cond)
        assert timeline(m) == tl
    assert 0 < sum(tl) < STEPS
    assert [[r for r in m_.reads if r != MODEL_FORWARD] for m_ in modes] == [[]] * STEPS
    assert cond_kinds(modes) == [["python"]] * STEPS
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def compiled_stack(patched):
    """The patched case with its block stack compiled by inductor the way ``CUDAGraphStep``
    compiles it before capturing (``warm_compiled_stack``); the generated code."""
    case, eager, tl, _ = patched
    m = case.model
    torch._dynamo.reset()
    runner = compile_stack(m)
    calls = []
    compiled = runner.compiled
    runner.compiled = lambda *a: (calls.append(1), compiled(*a))[1]
    sch = case.scheduler()
    sch.set_timesteps(STEPS)
    kw = case.inputs(case.latents(torch.Generator().manual_seed(1)), sch.timesteps[0])
    counters.clear()
    with torch.no_grad():
        _, codes = run_and_get_code(lambda: warm_compiled_stack(m, lambda: m(**kw)))  # resets dynamo first
    assert calls == [1] and counters["stats"]["unique_graphs"] == 1  # one graph compiled: the stack
    yield case, eager, tl, codes, calls, runner
    uncompile_stack(m)
    torch._dynamo.reset()


def test_compiled_stack_is_fused_without_cond_or_host_read(compiled_stack):
    _, _, _, codes, _, _ = compiled_stack
    assert len(codes) == 1
    (code,) = codes
    assert ".item()" not in code and "higher_order.cond" not in code
    assert "cpp_fused" in code  # inductor fused the blocks' pointwise work into its own kernels


def test_capture_path_with_compiled_stack_reads_nothing(compiled_stack):
    """What ``CUDAGraphStep(compile_stack=True)`` captures: the cond operator whose compute
    branch runs the inductor-compiled stack; no host read, eager numerics."""
    case, eager, tl, _, calls, runner = compiled_stack
    m = case.model
    fastcache.reset(m)
    calls.clear()
    graphs = counters["stats"]["unique_graphs"]
    out, modes = loop(case, m, CaptureStandIn, force_cond)
    # no compile under the (stand-in) capture: the stack compiled before it is reused as is
    assert counters["stats"]["unique_graphs"] == graphs == 1
    tl_compiled = timeline(m)
    assert [m_.reads for m_ in modes] == [[]] * STEPS
    assert cond_kinds(modes) == [["python"]] * STEPS
    assert len(calls) == STEPS  # the stand-in runs the compute branch on every step, as capture records it
    # the blocks ran as inductor code, not as eager aten ops: the eager stack's layer norms are gone
    compiled, runner.compiled = runner.compiled, None
    try:
        fastcache.reset(m)
        _, eager_modes = loop(case, m, CaptureStandIn, force_cond)
    finally:
        runner.compiled = compiled
    lns = [sum("layer_norm" in op for op in m_.ops) for m_ in modes]
    eager_lns = [sum("layer_norm" in op for op in m_.ops) for m_ in eager_modes]
    assert all(a < b for a, b in zip(lns, eager_lns)), (lns, eager_lns)
    assert tl_compiled == tl
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


def test_eager_step_with_compiled_stack(compiled_stack):
    case, eager, tl, _, calls, _ = compiled_stack
    m = case.model
    fastcache.reset(m)
    calls.clear()
    out, modes = loop(case, m)  # dispatch keys differ outside the cond operator: one more compile
    assert one_read_per_step(modes, FLAG_READ), [m_.reads for m_ in modes]
    assert len(calls) == sum(tl)  # the compiled stack ran on every computed step
    assert counters["stats"]["unique_graphs"] == 2
    assert timeline(m) == tl
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)


@requires_cuda
@pytest.mark.gpu
def test_cudagraphs_backend_replays_without_host_reads(monkeypatch):
    """GPU only (never run on the project's machine): ``backend="cudagraphs"`` captures the
    cond as a conditional node; after warm-up and recording, replays read nothing."""
    import torch._dynamo.backends.cudagraphs as cgb

    case = CASES["fastcache-dit"]()
    m = case.model.cuda()
    cuda_inputs = case.inputs
    case.inputs = lambda x, t: {k: v.cuda() for k, v in cuda_inputs(x.cuda(), t.cuda()).items()}
    case.latents = (lambda f: lambda g: f(g).cuda())(case.latents)
    skips = []
    monkeypatch.setattr(cgb, "log_cudagraph_skip_and_bump_counter", skips.append)
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.3, num_steps=STEPS)):
        case.sample(steps=1)
        fastcache.reset(m)
        eager, _ = loop(case, m)
        tl = timeline(m)
        torch._dynamo.reset()
        fastcache.reset(m)
        out, modes = loop(case, torch.compile(m, fullgraph=True, backend="cudagraphs"))
        assert timeline(m) == tl
    assert skips == []
    assert [m_.reads for m_ in modes[2:]] == [[]] * (STEPS - 2)  # call 1 warms up, call 2 records
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_compile_stack_finds_the_runner_and_keeps_nothing_alive():
    import gc
    import weakref

    case = CASES["fastcache-dit"]()
    m = case.model
    with pytest.raises(ValueError, match="not patched"):
        compile_stack(m)
    with fastcache.patched(m, fastcache.TeaCacheConfig(threshold=0.3)):
        runner = compile_stack(m)
        assert runner.compiled is not None
        uncompile_stack(m)
        assert runner.compiled is None
        head = weakref.ref(fastcache.get_patch(m).head)
    del runner
    model = weakref.ref(m)
    del case, m
    gc.collect()
    assert model() is None and head() is None, "the runner registry kept a removed patch's blocks alive"
