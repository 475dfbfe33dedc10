"""How the cache skip is traced and dispatched, in every execution mode.


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
* :class:`fastcache.cuda_graphs.CUDAGraphStep` — the whole step, captured once; the skip is
  dispatched straight to the cond operator (:func:`skip_cond`), which torch's capture mode
  records as a conditional node; replays run no Python: 0 reads (GPU only). With
  ``compile_stack=True`` the compute branch is the block stack compiled by inductor as its
  own graph (:func:`fastcache.cuda_graphs.compile_stack`): fused kernels and no host read — the sync-free compiled
  path.

Example (GPU)::

    handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25, num_steps=28))
    step = fastcache.cuda_graphs.CUDAGraphStep(
        lambda x, t: transformer(x, t, labels), latents, t0, model=transformer, compile_stack=True)

This module holds what the policies need for that (the skip as a cond, whether a call is
traced or captured); :mod:`fastcache.cuda_graphs` holds the user-facing CUDA-graph tools.
It imports nothing of fastcache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_FORCE_COND = [False]


@contextlib.contextmanager
def force_cond() -> Iterator[None]:
    """Take the cond path in eager mode too: the skip is dispatched as the
    ``torch.ops.higher_order.cond`` operator (see :func:`skip_cond`). CUDA-graph
    warm-up and capture need it (:mod:`fastcache.cuda_graphs`); outside them it is the same
    computation as the Python branch, with the flag read by torch's cond kernel instead."""
    old = _FORCE_COND[0]
    _FORCE_COND[0] = True
    try:
        yield
    finally:
        _FORCE_COND[0] = old


def is_tracing() -> bool:
    """True under torch.compile tracing, inside :func:`force_cond`, or during CUDA-graph
    stream capture: the skip must then be a cond operator (a Python branch on a device
    value cannot be traced, and cannot be captured)."""
    if torch.compiler.is_compiling():
        return True
    if _FORCE_COND[0]:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def warm_signatures(modules) -> None:
    """Build, outside any ``torch.cond``, the ``inspect.signature`` of every attention
    processor under ``modules`` (diffusers' ``Attention.forward`` calls it on its processor
    every call). Call it while tracing, before a policy's conds.

    Why: torch 2.13's dynamo caches ``inspect.signature`` results for the whole traced
    frame (``OutputGraph.signature_cache``). A signature first built inside a cond branch
    keeps its cache entry after the branch's side effects (the Signature's own attribute
    writes) are rolled back, so the next cond or block that reads it fails with
    "'Signature' object has no attribute '_parameters'". Built in the root graph first, the
    results stay valid in every branch. Scanned at trace time, so processors swapped after
    patching are covered; no graph op."""
    import inspect

    seen = set()
    for root in modules:
        for m in root.modules():
            proc = getattr(m, "processor", None)
            if callable(proc) and id(proc) not in seen:
                seen.add(id(proc))
                inspect.signature(proc.__call__)


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
            "it with fastcache.cuda_graphs.CUDAGraphStep, or inside "
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


def _float_specialization():
    """A context that dynamo traces as "floats read from here on are constants"
    (``torch._dynamo.config.specialize_float=True`` for the rest of the trace inside it,
    restored on exit); None where this torch lacks the mechanism."""
    try:
        from torch._dynamo.decorators import DynamoConfigPatchProxy
    except ImportError:
        return None
    # torch._dynamo.patch_dynamo_config builds the same proxy but refuses this key; the
    # proxy is what dynamo recognises as a traceable config patch.
    return DynamoConfigPatchProxy(torch._dynamo.config.patch(specialize_float=True))


_STATIC_FLOATS = _float_specialization()


def static_floats(run_stack):
    """Decorator for a policy's ``run_stack``: under torch.compile, trace it with Python
    floats specialized (guarded constants), as dynamo does without ``dynamic=True``.

    Why: with ``torch.compile(dynamic=True)`` dynamo turns every float it reads (a
    LayerNorm's ``eps``, an attention ``scale``, a dropout probability) into a symbolic
    graph input, realized on first use. Read inside a ``torch.cond`` branch, such a float
    becomes an operand of the cond, which torch refuses ("operands can only be of
    (Tensor, int, SymInt)"), and a float realized in one branch and read in the other
    fails with "lift_tracked_freevar_to_input should not be called on root
    SubgraphTracer". Shapes stay symbolic. Eager calls are unaffected."""
    import functools

    @functools.wraps(run_stack)
    def wrapper(self, *args, **kwargs):
        if _STATIC_FLOATS is not None and torch.compiler.is_compiling():
            with _STATIC_FLOATS:
                return run_stack(self, *args, **kwargs)
        return run_stack(self, *args, **kwargs)

    return wrapper
