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
"""

from __future__ import annotations

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
        self.graph = torch.cuda.CUDAGraph()
        with force_cond(), torch.cuda.graph(self.graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            self.static_output = fn(*self.static_inputs)

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
