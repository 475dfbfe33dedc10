"""One denoising step — cache decision included — as one CUDA graph.

fastcache's decision lives on the device, so a patched transformer call can be captured
whole: the skip becomes a ``torch.cond``, which torch records as CUDA-graph
*conditional nodes* (``torch/_higher_order_ops/cudagraph_conditional_nodes.py``). Each
replay then decides on the GPU whether the block stack runs — zero host reads per step.

Requirements: torch >= 2.9 with ``torch._higher_order_ops.cudagraph_conditional_nodes``
(shipped in 2.13, which fastcache pins), a CUDA 12.4+ driver (conditional nodes), and
tensor arguments (a Python-number timestep would be baked into the graph).

Example::

    handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25, num_steps=28))
    step = fastcache.cudagraph.CUDAGraphStep(
        lambda x, t: transformer(hidden_states=x, timestep=t, ...).sample, latents, t0, model=transformer)
    for t in timesteps:
        noise_pred = step(latents, t.expand(B))      # replay; the decision runs on the GPU
        latents = scheduler.step(noise_pred, t, latents).prev_sample
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .policies.base import force_cond


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
        warmup_iters: eager warm-up calls through ``torch.cond`` (both branches).
    """

    def __init__(self, fn: Callable, *inputs, model: torch.nn.Module | None = None, warmup_iters: int = 1):
        ok, why = conditional_nodes_available()
        if not ok:
            raise RuntimeError(f"CUDAGraphStep cannot capture here: {why}")
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
        with torch.cuda.stream(side), force_cond():
            for _ in range(warmup_iters):
                with ControlFlowOpWarmupDispatchMode():
                    fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if model is not None:
            from .runtime import reset

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
