"""How the cache skip runs in each execution mode, and the sync-free compiled path.

A patched step decides on the device (:func:`fastcache.ops.cache_decision` writes a
one-element bool ``flag``); what differs between modes is who reads that flag. Host
reads per step, as measured by ``tests/runtime/test_modes.py`` (the table with its
evidence is ``docs/modes.md``):

* eager — a Python ``if flag.item():``: 1 read.
* ``torch.compile`` (inductor, the default backend) — 0 graph breaks, the skip is a
  ``torch.cond``, but inductor lowers it to ``if buf.item():`` in its generated wrapper
  (``torch/_inductor/codegen/wrapper.py``, ``codegen_conditional``): 1 read. On a GPU,
  from the sources only: ``mode="reduce-overhead"`` does not put the cond (nor the stack
  inside it) in a CUDA graph (``torch/_inductor/lowering.py``, ``cond``;
  ``torch/_inductor/scheduler.py``, ``should_partition``).
* ``torch.compile(backend="aot_eager")`` — the cond stays the higher-order operator; its
  dense kernel runs ``if pred:``: 1 read.
* ``torch.compile(backend="cudagraphs")`` — the same graph, run by torch's CUDA-graph trees,
  which capture the cond operator as a conditional node (GPU only; never run here).
* :class:`fastcache.cudagraph.CUDAGraphStep` — the whole step, captured once; the skip is
  dispatched straight to the cond operator (:func:`skip_cond`), which torch's capture mode
  records as a conditional node; replays run no Python: 0 reads (GPU only). With
  ``compile_stack=True`` the compute branch is the block stack compiled by inductor as its
  own graph (:func:`compile_stack`): fused kernels and no host read — the sync-free compiled
  path.

Example (GPU)::

    handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25, num_steps=28))
    step = fastcache.cudagraph.CUDAGraphStep(
        lambda x, t: transformer(x, t, labels), latents, t0, model=transformer, compile_stack=True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .policies.base import StackRunner, force_cond

_COND = torch.ops.higher_order.cond


def _control_flow_mode_active() -> bool:
    """Whether one of torch's CUDA-graph control-flow dispatch modes (capture or warm-up)
    is on the dispatch-mode stack: they turn a dispatched cond into a conditional node."""
    try:
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            ControlFlowOpWarmupDispatchMode,
            CUDAGraphCaptureControlFlowOpDispatchMode,
        )
    except ImportError:
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    kinds = (CUDAGraphCaptureControlFlowOpDispatchMode, ControlFlowOpWarmupDispatchMode)
    return any(isinstance(m, kinds) for m in _get_current_dispatch_mode_stack())


def skip_cond(flag: torch.Tensor, compute: Callable, skip: Callable, operands, shapes=None) -> tuple:
    """``compute(*operands) if flag else skip(*operands)`` as torch's cond operator.

    flag: one-element bool tensor (the device decision); both branches return the same
    tuple of fresh tensors (never an operand or a view of one: cond outputs may not alias
    its inputs), with the same shapes and dtypes.

    * Under torch.compile tracing: ``torch.cond`` (dynamo turns it into the operator in
      the graph).
    * Otherwise the operator is called directly, ``torch.ops.higher_order.cond(...)`` —
      not ``torch.cond``, which in eager compiles a wrapper with dynamo on every call.
      Under a dispatch mode with ``supports_higher_order_operators`` (torch's CUDA-graph
      capture mode) the call reaches the mode with the plain Python branches, which it
      records as a conditional node; with no mode, torch's dense kernel reads the flag
      (``if pred:``) and runs one branch.

    ``shapes``: the shape of each output, known before the branches run. Given it, every
    tensor operand and output crosses the operator flat (1-D, contiguous: views, no copy,
    unless an operand is strided) and the branches see and return the real shapes. Why:
    the cond's output layout is inferred from the branches', and under symbolic shapes (a
    compiled model called at a new resolution, which dynamo recompiles with dynamic sizes,
    or ``torch.compile(dynamic=True)``) a dense ``(B, N, D)`` output has the stride
    ``D*Max(1, N)`` that torch's cond rejects ("one of cond's output stride is not a
    simple accumulative multiplication of sizes"), whatever copy produced it; inductor
    also asserts each operand's stride inside the branches, which a transposed producer
    (a patch embedding's ``flatten().transpose()``) may not match. A 1-D tensor has a
    single layout. ``None``: operands and outputs cross as they are (static shapes only).

    Raises RuntimeError during a CUDA-graph capture without torch's control-flow capture
    mode: the dense kernel's flag read would fail the capture (use ``CUDAGraphStep``).
    """
    operands = tuple(operands)
    if shapes is not None:
        compute, skip, operands, shapes = _flat_branches(compute, skip, operands, shapes)
    if torch.compiler.is_compiling():
        outs = torch.cond(flag, compute, skip, operands)
    elif torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and not _control_flow_mode_active():
        raise RuntimeError(
            "fastcache: a patched model is being captured into a CUDA graph without torch's "
            "control-flow capture mode, so its cache skip cannot become a conditional node. Capture "
            "it with fastcache.cudagraph.CUDAGraphStep, or inside "
            "torch._higher_order_ops.cudagraph_conditional_nodes.CUDAGraphCaptureControlFlowOpDispatchMode()."
        )
    else:
        outs = _COND(flag, compute, skip, operands)
    if shapes is None:
        return outs
    return tuple(o.view(s) for o, s in zip(outs, shapes, strict=True))


def _flat_branches(compute: Callable, skip: Callable, operands: tuple, shapes) -> tuple:
    """The branches, operands and output shapes of :func:`skip_cond` with every tensor
    crossing the operator as a flat contiguous tensor (see there)."""
    shapes = tuple(tuple(s) for s in shapes)
    in_shapes = tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in operands)
    flat = tuple(o.reshape(-1) if isinstance(o, torch.Tensor) else o for o in operands)

    def wrap(fn: Callable) -> Callable:
        def branch(*ops):
            outs = fn(*(o if s is None else o.view(s) for o, s in zip(ops, in_shapes)))
            if len(outs) != len(shapes):
                raise RuntimeError(
                    f"fastcache internal error: a cond branch returned {len(outs)} tensors, "
                    f"its shapes list has {len(shapes)}"
                )
            for o, s in zip(outs, shapes):
                if tuple(o.shape) != s:  # equal expressions: no guard
                    raise RuntimeError(
                        f"fastcache internal error: a cond branch returned shape {tuple(o.shape)} where {s} "
                        "was declared"
                    )
            return tuple(o.reshape(-1) for o in outs)

        return branch

    return wrap(compute), wrap(skip), flat, shapes


def _runner(model: nn.Module) -> StackRunner:
    from .runtime import get_patch

    p = get_patch(model)
    if p.policy.granularity != "stack":
        raise ValueError(
            f"compile_stack needs a stack-granularity policy (the whole stack is one graph); "
            f"{p.config.kind} runs at {p.policy.granularity!r} granularity"
        )
    p._ensure_runtime()
    return p._runner


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
    from .runtime import reset

    reset(model)
    with force_cond(), _BothBranchesMode():
        return fn(*inputs)
