"""One denoising step — cache decision included — as one CUDA graph.

fastcache's decision lives on the device, so a patched transformer call can be captured
whole: under capture the skip is dispatched straight to torch's cond operator
(:func:`fastcache.tracing.skip_cond`), which torch's capture mode records as CUDA-graph
*conditional nodes* (``torch/_higher_order_ops/cudagraph_conditional_nodes.py``). A
replay runs no Python and reads nothing to the host; the GPU decides whether the block
stack runs. ``compile_stack=True`` makes the compute branch the block stack compiled by
inductor as its own graph (:func:`compile_stack`): fused kernels, still
no host read.

Verified here (CPU, ``tests/runtime/test_modes.py``): the cond reaches a stand-in of the
capture mode as the operator with plain Python branches, nothing in the step reads the
host, both branches and the compiled stack give the eager numerics. Never run here (no
GPU): the capture and replay themselves (``tests/runtime/test_cudagraph.py``, GPU tests).

Requirements: torch >= 2.9 with ``torch._higher_order_ops.cudagraph_conditional_nodes``
(shipped in 2.13, which fastcache pins), a CUDA 12.4+ driver (conditional nodes), and
tensor arguments (a Python-number timestep would be baked into the graph).

Example::

    handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25, num_steps=28))
    step = fastcache.cuda_graphs.CUDAGraphStep(
        lambda x, t: transformer(hidden_states=x, timestep=t, ...).sample, latents, t0,
        model=transformer, compile_stack=True)
    for t in timesteps:
        noise_pred = step(latents, t.expand(B))      # replay; the decision runs on the GPU
        latents = scheduler.step(noise_pred, t, latents).prev_sample

Static schedules (an announced ``ScheduleConfig``; TaylorSeer / FORA through
:func:`static_plan`) need no decision in the graph at all: :class:`StaticScheduleGraphs`
captures one plain graph per step kind (computed, forecast) and the host replays the
step's kind after writing its scalars into device tensors (docs/modes.md, "Static
schedules as CUDA graphs"). :class:`StandInGraph` checks on CPU that such a replay would be
valid (``tests/runtime/test_static_graphs.py``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .policies.base import StackRunner
from .runtime import get_patch, reset
from .tracing import _COND, force_cond


def conditional_nodes_available() -> tuple[bool, str]:
    """Whether this torch and machine can capture ``torch.cond`` as conditional nodes."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        importlib.import_module("torch._higher_order_ops.cudagraph_conditional_nodes")
    except ImportError:
        return False, f"torch {torch.__version__} lacks torch._higher_order_ops.cudagraph_conditional_nodes"
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return False, f"torch {torch.__version__} lacks CUDAGraph.begin_capture_to_if_node"
    return True, ""


class CUDAGraphStep:
    """Capture ``fn(*inputs)`` into one CUDA graph whose cache skip is a conditional node.

    Args:
        fn: one denoising step, usually a call of a fastcache-patched transformer.
        inputs: example tensors; they become the graph's static inputs (copied in on
            every call).
        model: the patched transformer; its cache state is reset after warm-up (in
            place, so the graph keeps pointing at the same buffers).
        warmup_iters: eager warm-up calls through the cond operator (both branches).
        compile_stack: compile the block stack with inductor as its own graph
            (:func:`compile_stack`; needs ``model``) and capture its kernels
            in the compute branch. It compiles before any capture, in one call that runs the
            cond as the capture does (:func:`warm_compiled_stack`).
    """

    def __init__(
        self,
        fn: Callable,
        *inputs,
        model: torch.nn.Module | None = None,
        warmup_iters: int = 1,
        compile_stack: bool = False,
    ):
        ok, why = conditional_nodes_available()
        if not ok:
            raise RuntimeError(f"CUDAGraphStep cannot capture here: {why}")
        if compile_stack and model is None:
            raise ValueError("compile_stack=True needs model= (the patched transformer whose stack is compiled)")
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode,
            CUDAGraphCaptureControlFlowOpDispatchMode,
        )

        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor) and not x.is_cuda:
                raise ValueError(f"input {i} is on {x.device}; CUDA graphs need every tensor input on CUDA")
        self.fn = fn
        self.static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if compile_stack:
                compile_stack(model)
                warm_compiled_stack(model, fn, *self.static_inputs)  # inductor compiles here, not in capture
            with force_cond():
                for _ in range(warmup_iters):
                    with ControlFlowOpWarmupDispatchMode():
                        fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if model is not None:
            reset(model)
            before = _all_state_addresses(model)
        self.graph = torch.cuda.CUDAGraph()
        with force_cond(), torch.cuda.graph(self.graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            self.static_output = fn(*self.static_inputs)
        if model is not None:
            made = sorted(k for k, v in _all_state_addresses(model).items() if before.get(k) != v)
            if made:
                # a policy whose reset drops its state allocates it again inside the capture: the graph
                # would replay that first call (compute, store) on every step while the stats count skips
                raise RuntimeError(
                    f"CUDAGraphStep: {type(get_patch(model).config).__name__} allocated cache state during the "
                    f"capture ({', '.join(made[:4])}{'...' if len(made) > 4 else ''}), so every replay would be its "
                    "first call. Capture a static schedule (TaylorSeer, FORA, ScheduleConfig) with "
                    "fastcache.cuda_graphs.StaticScheduleGraphs instead (one graph per step kind)"
                )

    def __call__(self, *inputs):
        if len(inputs) != len(self.static_inputs):
            raise TypeError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, x in zip(self.static_inputs, inputs):
            if isinstance(static, torch.Tensor):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_output


# ------------------------------------------------------------ the block stack compiled on its own
def _runner(model: nn.Module) -> StackRunner:
    p = get_patch(model)
    if p.policy.granularity != "stack":
        raise ValueError(
            f"compile_stack needs a stack-granularity policy (the whole stack is one graph); "
            f"{p.config.kind} runs at {p.policy.granularity!r} granularity"
        )
    return p.runner


def compile_stack(model: nn.Module, *, dynamic: bool | None = False, options: dict | None = None) -> StackRunner:
    """Compile the block stack of a patched ``model`` with inductor as a graph of its own.

    Every eager run of the stack (a computed step; the compute branch of the cond under
    CUDA-graph capture) then calls ``torch.compile(runner.run_blocks, fullgraph=True)``:
    the blocks fused, with no cond and no host read inside (checked on CPU by
    ``tests/runtime/test_modes.py``). Inductor's own CUDA graphs are off
    (``triton.cudagraphs=False``) so an outer capture (``CUDAGraphStep``) records its
    kernels. The first computed step compiles (10-15 s for the small test models on
    2 CPU cores); a change of shape recompiles (``dynamic=False``), and so does the first
    call from inside the cond operator (different dispatch keys): before a CUDA-graph
    capture use :func:`warm_compiled_stack`, which ``CUDAGraphStep`` does. Undo with
    :func:`uncompile_stack`.

    Returns the model's :class:`~fastcache.policies.base.StackRunner`.
    """
    runner = _runner(model)
    opts = {"triton.cudagraphs": False, **(options or {})}
    runner.compiled = torch.compile(runner.run_blocks, fullgraph=True, dynamic=dynamic, options=opts)
    return runner


def uncompile_stack(model: nn.Module) -> None:
    """Run the stack of ``model`` eagerly again (undoes :func:`compile_stack`)."""
    _runner(model).compiled = None


class _BothBranchesMode(TorchDispatchMode):
    """Runs a dispatched cond the way a CUDA graph records it — both branches, from inside
    the operator's dispatch — and selects on the device (``torch.where``), with no graph."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # compiled code (the stack) must run, and compile, under this mode

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _COND:
            pred, true_fn, false_fn, operands = args
            with self:
                outs = true_fn(*operands)
                other = false_fn(*operands)
                for a, b in zip(pytree.tree_iter(outs), pytree.tree_iter(other)):
                    a.copy_(torch.where(pred, a, b))
            return outs
        return func(*args, **(kwargs or {}))


def warm_compiled_stack(model: nn.Module, fn: Callable, *inputs):
    """Compile the stack of ``model`` (see :func:`compile_stack`) for a CUDA-graph capture:
    reset the cache state, then one call ``fn(*inputs)`` with the cond path taken and both
    branches run from inside the cond operator's dispatch, as the capture will run them.

    Why: dynamo guards a compiled function on its inputs' dispatch keys, and inside the
    cond operator autograd is below the dispatch (no Autograd key): a stack compiled by an
    ordinary eager step would be recompiled during the capture. Returns ``fn``'s output;
    the cache state is left advanced by one step (reset it before use).
    """
    runner = _runner(model)
    if runner.compiled is None:
        compile_stack(model)
    reset(model)
    with force_cond(), _BothBranchesMode():
        return fn(*inputs)


# ------------------------------------------------------------ static schedules: one graph per step kind
def static_plan(config, num_steps: int | None = None):
    """The :class:`fastcache.ScheduleConfig` that runs the static schedule of ``config`` with
    the step announced (what :class:`StaticScheduleGraphs` captures).

    * a ``ScheduleConfig`` (or a subclass, e.g. SmoothCache's): returned as it is;
    * ``TaylorSeerConfig``: its computed steps over ``num_steps`` (``config.computes(s,
      num_steps)``: the last step computed, as with ``fastcache.context(..., num_steps=n)``)
      and its order on every other step. The same numbers as TaylorSeer with announced
      steps (the docs/methods.md section 12 claim, checked by
      ``tests/runtime/test_static_graphs.py``);
    * ``FORAConfig``: its computed steps and order 0 (reuse) elsewhere.

    ``num_steps`` defaults to the config's own (TaylorSeer / FORA) and is required when it
    has none.
    """
    from .policies.fora import FORAConfig
    from .policies.schedule import ScheduleConfig
    from .policies.taylorseer import TaylorSeerConfig

    if isinstance(config, ScheduleConfig):
        if num_steps is not None and num_steps != config.num_steps:
            raise ValueError(
                f"static_plan: the plan has {config.num_steps} steps but num_steps={num_steps}; give a plan of "
                f"{num_steps} steps (fastcache.search_schedule) or sample with {config.num_steps} steps"
            )
        return config
    if not isinstance(config, (TaylorSeerConfig, FORAConfig)):
        raise TypeError(
            f"static_plan: {type(config).__name__} has no static plan (its steps are decided from the data on "
            "the device); capture its step with fastcache.cuda_graphs.CUDAGraphStep (conditional nodes)"
        )
    n = num_steps if num_steps is not None else getattr(config, "num_steps", None)
    if n is None or int(n) < 1:
        raise ValueError(
            f"static_plan: {type(config).__name__} has no num_steps; give the run's step count, "
            "static_plan(config, num_steps=n)"
        )
    n = int(n)
    if isinstance(config, TaylorSeerConfig):
        plan = "".join("C" if config.computes(s, n) else str(config.order) for s in range(n))
        return ScheduleConfig(plan=plan, history=config.history)
    plan = "".join("C" if config.computes(s) else "0" for s in range(n))
    return ScheduleConfig(plan=plan, history=config.history)


class GraphCheckError(AssertionError):
    """A captured step that a CUDA graph could not replay correctly (raised by the CPU
    stand-in :class:`StandInGraph`): a host read, a cond, host data entering the step, or a
    replay that differs from the capture (a reallocated tensor, a changed constant)."""


_HOST_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} at 0x{t.data_ptr():x}"


class _TraceMode(TorchDispatchMode):
    """Records every dispatched op of one step in a canonical form a CUDA graph fixes:
    the op, its non-tensor arguments (constants baked into the kernels), and per tensor
    either ``("S", data_ptr, shape, stride, dtype)`` — a tensor that existed before the
    step (static: the graph holds its address) — or ``("T", producer, offset, shape,
    stride, dtype)`` — a temporary made by an earlier op of the step (``producer`` = (op
    index, output index): the graph's private pool gives it the same place on every
    replay). Refuses host reads, the cond operator and host data (``lift_fresh``:
    ``torch.tensor(...)`` inside the step, a blocking host-to-device copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True
        self.trace: list[tuple] = []
        self.where: list[str] = []
        self._temps: dict[int, tuple[int, int]] = {}  # storage address -> producer

    def _ref(self, t: torch.Tensor, local: dict):
        st = t.untyped_storage()
        if st.nbytes() == 0:
            return ("E", tuple(t.shape), t.dtype)
        sp = st.data_ptr()
        prod = local.get(sp, self._temps.get(sp))
        if prod is None:
            return ("S", t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        return ("T", prod, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func is _COND:
            raise GraphCheckError(
                "the step dispatched torch's cond operator: its cache decision is made on the device, which a "
                "static-schedule graph cannot hold (announce the steps of a static plan, or capture the step "
                "with fastcache.cuda_graphs.CUDAGraphStep)"
            )
        if func in _HOST_READ_OPS:
            raise GraphCheckError(f"the step reads a device value to the host ({name}); a CUDA graph cannot")
        if func is torch.ops.aten.lift_fresh.default:
            raise GraphCheckError(
                "the step builds a tensor from host data (torch.tensor(...) inside the step: a blocking "
                "host-to-device copy on a GPU, refused during CUDA-graph capture, and its value would be baked "
                "into the graph); write it into a device tensor before the step instead"
            )
        flat, _ = pytree.tree_flatten((args, kwargs))
        ins = [self._ref(a, {}) if isinstance(a, torch.Tensor) else ("V", a) for a in flat]
        in_storages = {}
        for a, r in zip(flat, ins):
            if isinstance(a, torch.Tensor) and r[0] == "T":
                in_storages[a.untyped_storage().data_ptr()] = r[1]
            elif isinstance(a, torch.Tensor) and r[0] == "S":
                in_storages[a.untyped_storage().data_ptr()] = None
        out = func(*args, **kwargs)
        i = len(self.trace)
        outs = []
        for k, o in enumerate(pytree.tree_leaves(out)):
            if not isinstance(o, torch.Tensor):
                outs.append(("V", o))
                continue
            st = o.untyped_storage()
            sp = st.data_ptr()
            if st.nbytes() and sp not in in_storages:
                self._temps[sp] = (i, k)  # a new allocation of this step
            outs.append(self._ref(o, {}))
        self.trace.append((name, tuple(ins), tuple(outs)))
        return out


def _diff_traces(captured: list[tuple], replayed: list[tuple]) -> str | None:
    """The first difference between a capture's trace and a replay's, in words (None: equal)."""
    for i, (a, b) in enumerate(zip(captured, replayed)):
        if a == b:
            continue
        if a[0] != b[0]:
            return f"op {i}: the capture ran {a[0]}, the replay {b[0]} (the step's ops changed)"
        for side, xa, xb in (("argument", a[1], b[1]), ("output", a[2], b[2])):
            for j, (ra, rb) in enumerate(zip(xa, xb)):
                if ra == rb:
                    continue
                if ra[0] == "V" or rb[0] == "V":
                    return (
                        f"op {i} ({a[0]}), {side} {j}: the capture baked the value {ra[1:]!r} into the graph, "
                        f"the replay has {rb[1:]!r} (a host value that changes from step to step: write it into "
                        "a device tensor before the step)"
                    )
                if ra[0] == "S" and rb[0] == "S":
                    return (
                        f"op {i} ({a[0]}), {side} {j}: the capture read the tensor {ra[2]} at 0x{ra[1]:x}, the "
                        f"replay one at 0x{rb[1]:x} (a state tensor was reallocated; a graph replays the captured "
                        "address)"
                    )
                if ra[0] == "S":
                    return (
                        f"op {i} ({a[0]}), {side} {j}: the capture read the tensor {ra[2]} at 0x{ra[1]:x} that "
                        f"existed before the step; the replay reads a temporary made by op {rb[1][0]} (a state "
                        "tensor is replaced inside the step; a graph replays the captured address)"
                    )
                if rb[0] == "S":
                    return (
                        f"op {i} ({a[0]}), {side} {j}: the capture read a temporary of op {ra[1][0]}; the replay "
                        f"reads a tensor {rb[2]} at 0x{rb[1]:x} made outside the step (state kept from a "
                        "captured temporary was replaced)"
                    )
                return f"op {i} ({a[0]}), {side} {j}: captured {ra}, replayed {rb}"
            if len(xa) != len(xb):
                return f"op {i} ({a[0]}): {len(xa)} {side}s captured, {len(xb)} replayed"
    if len(captured) != len(replayed):
        return f"the capture ran {len(captured)} ops, the replay {len(replayed)}"
    return None


class StandInGraph:
    """A CPU stand-in for ``torch.cuda.CUDAGraph`` that checks what a real graph needs.

    :meth:`capture` runs ``fn()`` under a dispatch mode that records every op: its
    constants, every tensor it reads or writes that existed before the step (the graph's
    static addresses: :attr:`static_tensors`, ``(data_ptr, shape, dtype)``) and how the
    temporaries flow between ops. :meth:`replay` runs ``fn()`` again eagerly and raises
    :class:`GraphCheckError` unless the replay is the captured graph: the same ops with
    the same constants on the same static addresses, temporaries made by the same ops; no
    host read, no cond, no ``torch.tensor`` from host data. The replay's outputs are
    copied into the captured outputs (a real replay writes its output in place).
    """

    def __init__(self):
        self.trace: list[tuple] | None = None
        self.output = None
        self.replays = 0

    @property
    def static_tensors(self) -> set[tuple]:
        """``(data_ptr, shape, dtype)`` of every tensor the step touched that existed before it."""
        out = set()
        for _, ins, outs in self.trace or ():
            for r in (*ins, *outs):
                if r[0] == "S":
                    out.add((r[1], r[2], r[4]))
        return out

    def capture(self, fn: Callable):
        mode = _TraceMode()
        with mode:
            out = fn()
        self.trace = mode.trace
        self.output = out
        return out

    def replay(self, fn: Callable) -> None:
        if self.trace is None:
            raise RuntimeError("StandInGraph.replay before capture")
        mode = _TraceMode()
        with mode:
            out = fn()
        why = _diff_traces(self.trace, mode.trace)
        if why is not None:
            raise GraphCheckError(f"a CUDA graph replay of this step would differ from its capture: {why}")
        for dst, src in zip(pytree.tree_leaves(self.output), pytree.tree_leaves(out), strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.replays += 1


def _state_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor held by a cache context's state (attributes, lists, tuples, dicts)."""
    out: dict[str, torch.Tensor] = {}

    def walk(v, path):
        if isinstance(v, torch.Tensor):
            out[path] = v
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{path}[{k!r}]")

    for name, v in vars(obj).items():
        walk(v, f"{prefix}{name}")
    return out


def _all_state_addresses(model: nn.Module) -> dict[str, tuple]:
    """(address, shape, dtype) of every tensor of every cache context of ``model``."""
    out = {}
    for name, st in get_patch(model).contexts.items():
        for k, t in _state_tensors(st, f"{name}.").items():
            out[k] = (t.data_ptr(), tuple(t.shape), t.dtype)
    return out


def _host_fingerprint(obj) -> dict:
    """The host-side (Python) part of a cache context's state: what a real graph replay,
    which runs no Python, would leave as it is. Tensors count by shape and dtype only (their
    addresses are checked by the graph's trace)."""

    def fp(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(fp(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple((k, fp(x)) for k, x in v.items()))
        return v

    return {k: fp(v) for k, v in vars(obj).items()}


class StaticScheduleGraphs:
    """One CUDA graph per step kind of a static schedule, replayed by the plan.

    For a model patched with a :class:`fastcache.ScheduleConfig` (a searched plan, or the
    static plan of a TaylorSeer / FORA config: :func:`static_plan`) the host knows every
    step before it runs (docs/methods.md section 12): announcing step ``i``
    (:meth:`fastcache.Patch.context` with ``step_index=i``) writes the step's scalars — the
    steps since the last computed step, the forecast order, the first-step and store flags —
    into small device tensors, and the call then branches on a Python bool. So a step is
    one of two kinds — *computed* (the blocks run and the Taylor history is updated) or
    *forecast* (every order the plan uses is forecast from the history and the step's order
    is selected on the device from the announced ``k``) — and one captured graph per kind
    serves every step of that kind: nothing that changes from step to step is baked in.

    Per call ``graphs(*inputs, step=i)``: the host announces step ``i`` (device writes of
    the scalars, outside any graph), copies ``inputs`` into the static input buffers and
    replays the graph of the step's kind; it returns that graph's static output (valid
    until the next replay of the same kind: clone it to keep it). Steps past the plan's end
    compute. No device value is read to the host.

    Construction: a warm-up follows the plan from step 0 until every kind has run (eagerly,
    on the capture's code path, on a side stream on a GPU), then each kind is captured once
    and the statistics the warm-up and capture added are taken back (in place). Every
    cache state tensor keeps its storage from then on; a call checks that on the host
    (addresses only) and refuses a state reallocated since the capture (e.g. by
    ``fastcache.reset(model)``) or weights changed in place: re-create the graphs then.

    Args:
        fn: one denoising step, a call of the patched transformer, e.g.
            ``lambda x, t: model(x, t, labels).sample`` (one model call per step).
        inputs: example tensors (the static inputs; timesteps as tensors, not numbers).
        model: the patched transformer.
        num_steps: steps per run; must equal the plan's length (checked here, before any
            work). Default: the plan's.
        context: the cache context the steps run in (``fastcache.context`` name).
        backend: ``"cuda"`` (``torch.cuda.CUDAGraph``, inputs on a CUDA device),
            ``"stand-in"`` (:class:`StandInGraph`: the structure checked on any device, each
            replay re-run eagerly), or ``"auto"`` (``"cuda"`` for CUDA inputs).
        warmup_runs: passes of the warm-up over the plan's first steps.

    Refused with a message naming the fix: a config that decides from the data (TeaCache,
    MagCache, ...: use :class:`CUDAGraphStep`), a TaylorSeer / FORA patch (re-patch with
    ``static_plan(config, num_steps)``), a plan of another length than ``num_steps``, and a
    call with no step index (unannounced).

    Example (GPU)::

        handle = fastcache.patch(transformer, fastcache.cuda_graphs.static_plan(
            fastcache.TaylorSeerConfig(compute_steps=(0, 1, 2, 6, 10, 14, 18), order=2), num_steps=20))
        graphs = fastcache.cuda_graphs.StaticScheduleGraphs(
            lambda x, t: transformer(x, t, labels).sample, latents, t0, model=transformer)
        for i, t in enumerate(timesteps):
            eps = graphs(latents, t.expand(B), step=i)     # announce step i, replay its kind
            latents = scheduler.step(eps, t, latents).prev_sample
    """

    def __init__(
        self,
        fn: Callable,
        *inputs,
        model: nn.Module,
        num_steps: int | None = None,
        context: str = "default",
        backend: str = "auto",
        warmup_runs: int = 1,
    ):
        from .policies.schedule import SchedulePolicy
        from .runtime import _params_version

        p = get_patch(model)
        pol = p.policy
        if not isinstance(pol, SchedulePolicy):
            kind = type(p.config).__name__
            if pol.decides_from_data is False:
                raise ValueError(
                    f"StaticScheduleGraphs: the model is patched with {kind}, whose announced steps are not planned "
                    "into device tensors; re-patch it with the same schedule as a plan, fastcache.patch(model, "
                    f"fastcache.cuda_graphs.static_plan(config, num_steps)) (the same outputs)"
                )
            raise ValueError(
                f"StaticScheduleGraphs: {kind} decides from the data on the device, so its steps have no static "
                "kind to capture; capture its step with fastcache.cuda_graphs.CUDAGraphStep (the decision as a "
                "CUDA conditional node)"
            )
        plan = p.config.plan
        n = len(plan) if num_steps is None else int(num_steps)
        if n != len(plan):
            raise ValueError(
                f"StaticScheduleGraphs: the plan ({type(p.config).__name__}.plan) has {len(plan)} steps but "
                f"num_steps={n}; give a plan of {n} steps (fastcache.search_schedule) or sample with {len(plan)}"
            )
        if backend == "auto":
            backend = "cuda" if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs) else ""
            if not backend:
                raise ValueError(
                    "StaticScheduleGraphs: the inputs are not on a CUDA device; move them (and the model) to CUDA, "
                    "or pass backend='stand-in' to check the graphs' structure on this device"
                )
        if backend not in ("cuda", "stand-in"):
            raise ValueError(f"StaticScheduleGraphs: backend must be 'auto', 'cuda' or 'stand-in', got {backend!r}")
        if backend == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "StaticScheduleGraphs cannot capture here: no CUDA device; backend='stand-in' checks the graphs' "
                    "structure on this device"
                )
            for i, x in enumerate(inputs):
                if isinstance(x, torch.Tensor) and not x.is_cuda:
                    raise ValueError(f"input {i} is on {x.device}; CUDA graphs need every tensor input on CUDA")
        self.fn, self.model, self.patch, self.num_steps, self.context = fn, model, p, n, context
        self.backend = backend
        self.plan = plan
        self.static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        self.graphs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.replays = {"computed": 0, "forecast": 0}

        with p.context(context):  # creates the context's state if it is new
            pass
        st = p.contexts[context]
        clock = p.clocks[context]
        # what the warm-up and capture add to the statistics, taken back afterwards
        saved_counts = None if st.counts is None else st.counts.clone()
        saved = (list(st.host_timeline), dict(st.forced), clock.calls)

        first_forecast = next((i for i, c in enumerate(plan) if c != "C"), None)
        prefix = range(len(plan) if first_forecast is None else first_forecast + 1)
        run = lambda: fn(*self.static_inputs)  # noqa: E731
        # warm-up: the plan's first steps until every kind has run, on the capture's code path
        side = torch.cuda.Stream() if backend == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())  # before entering it: inside, current_stream() is side
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), torch.no_grad():
            for _ in range(warmup_runs):
                for i in prefix:
                    with p.context(context, step_index=i, num_steps=n), force_cond():
                        run()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        # capture: the same host sequence of announcements, each kind captured at its first step
        # (no_grad: a call with autograd on would bypass the cache and drop its state)
        for i in prefix:
            with p.context(context, step_index=i, num_steps=n), torch.no_grad():
                kind = "computed" if st.planned else "forecast"
                if kind in self.graphs:
                    continue
                if backend == "cuda":
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        self.outputs[kind] = run()
                else:
                    g = StandInGraph()
                    with force_cond():
                        self.outputs[kind] = g.capture(run)
                self.graphs[kind] = g
        # statistics back to what they were; the state keeps its storage
        if st.counts is not None:
            st.counts.copy_(saved_counts if saved_counts is not None else torch.zeros_like(st.counts))
        st.host_timeline, st.forced, clock.calls = saved
        st.host_valid = 0  # a forecast before the run's first computed step computes (nothing of this run cached)
        clock.last_index = None  # the next announced step 0 starts a run
        self._state = st
        self._addresses = {k: (t.data_ptr(), tuple(t.shape), t.dtype) for k, t in _state_tensors(st).items()}
        self._params_version = _params_version(p._params)

    # ------------------------------------------------------------------ the step
    def _check_unchanged(self) -> None:
        """Host-side, before a replay: the state holds the captured tensors, the weights the
        captured versions (addresses and version counters only; no device read)."""
        from .runtime import _params_version

        st = self.patch.contexts.get(self.context)
        now = {} if st is None else {k: (t.data_ptr(), tuple(t.shape), t.dtype) for k, t in _state_tensors(st).items()}
        if st is not self._state or now != self._addresses:
            gone = sorted(k for k in self._addresses if now.get(k) != self._addresses[k])
            raise RuntimeError(
                f"StaticScheduleGraphs: the cache state of context {self.context!r} was reallocated since the "
                f"capture ({', '.join(gone[:4]) or 'the state object'}"
                f"{'...' if len(gone) > 4 else ''}: fastcache.reset(model), a re-patch, or an eager call with other "
                "shapes); the graphs would replay stale addresses. Create the StaticScheduleGraphs again"
            )
        if _params_version(self.patch._params) != self._params_version:
            raise RuntimeError(
                "StaticScheduleGraphs: the model's weights changed in place since the capture; the cached "
                "history was made with the old ones. Create the StaticScheduleGraphs again"
            )

    def kind(self, step: int) -> str:
        """The kind of step ``step`` as planned, ignoring forced computes (host only)."""
        return "computed" if self.patch.config.computes(step) else "forecast"

    def __call__(self, *inputs, step: int | None = None):
        if len(inputs) != len(self.static_inputs):
            raise TypeError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        if step is None:
            raise ValueError(
                "StaticScheduleGraphs: call it with the step index, graphs(*inputs, step=i): an unannounced step "
                "has no kind known on the host (for steps decided on the device use CUDAGraphStep)"
            )
        self._check_unchanged()
        with self.patch.context(self.context, step_index=step, num_steps=self.num_steps):
            kind = "computed" if self._state.planned else "forecast"
            g = self.graphs.get(kind)
            if g is None:  # a plan with no forecast step, or a forecast planned where none was captured
                raise RuntimeError(f"StaticScheduleGraphs: no {kind} graph was captured for this plan")
            for static, x in zip(self.static_inputs, inputs):
                if isinstance(static, torch.Tensor):
                    static.copy_(x, non_blocking=True)
            if self.backend == "cuda":
                g.replay()
            else:
                before = _host_fingerprint(self._state)
                with force_cond(), torch.no_grad():
                    g.replay(lambda: self.fn(*self.static_inputs))
                after = _host_fingerprint(self._state)
                if after != before:
                    changed = sorted(k for k in after if after[k] != before.get(k))
                    raise GraphCheckError(
                        f"the step changed host-side cache state ({', '.join(changed)}); a CUDA graph replay runs "
                        "no Python and would not"
                    )
        self.replays[kind] += 1
        return self.outputs[kind]
