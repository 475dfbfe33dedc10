"""The stack-residual engine: what the whole-stack and block-range policies (TeaCache,
First-Block Cache, MagCache, Δ-DiT) share. One cache context's device state with its
fused decision (:class:`DecisionState`), the skip as one ``torch.cond`` under tracing
(:func:`residual_cond`, :func:`traced_stack`), the residual stores gated by a device
flag (:func:`store_residuals`) and the eager skipped step (:func:`skipped_stack`).

The branch-level policies (FORA, EOC, TaylorSeer, ScheduleConfig, T-GATE, Block Caching)
share :mod:`fastcache.policies.interior_engine` instead.
"""

from __future__ import annotations

import sys

import torch

from .. import ops
from ..ops import AUX_JITTER, AUX_LAST_RUN_STEPS, AUX_REPEATS, AUX_RUN_LENGTH_MISMATCHES
from ..ops.reference import N_COMPUTED, N_RUNS, N_SKIPPED, STATE_HEADER, STEP


class DecisionState:
    """Device tensors of one cache context of a stack policy with a fused decision
    (TeaCache, First-Block Cache). ``signature`` guards against reuse across a change of
    shape, dtype or device."""

    def __init__(self, history: int):
        self.history = history
        self.signature = None
        self.prev: torch.Tensor | None = None  # the policy's previous indicator
        self.residuals: dict[str, torch.Tensor] = {}  # cached residual per stream
        self.state: torch.Tensor | None = None  # decision state (fastcache.ops layout)
        self.coeffs: torch.Tensor | None = None  # rescaling polynomial (may be empty)
        self.aux: torch.Tensor | None = None  # AUX_* counters
        self.out: dict[str, torch.Tensor] = {}  # eager skipped-step output per stream (reused)
        self.num_steps = 0  # steps per run for this context (pipeline context, config or set_num_steps)

    def nbytes(self) -> int:
        ts = [self.prev, self.state, self.coeffs, self.aux, *self.residuals.values(), *self.out.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def allocate(self, indicator: torch.Tensor, residual_like: dict, coefficients) -> None:
        """Fresh buffers and a fresh decision state for a new signature (the next decision
        is a forced compute). Never mix shapes, dtypes or devices."""
        dev = indicator.device
        self.prev = torch.zeros_like(indicator, memory_format=torch.contiguous_format)
        self.residuals = {
            n: torch.zeros_like(t, memory_format=torch.contiguous_format) for n, t in residual_like.items()
        }
        self.out = {}
        self.state = ops.new_state(self.history, device=dev)
        self.coeffs = torch.tensor(tuple(coefficients), dtype=torch.float32, device=dev)
        if self.aux is None or self.aux.device != dev:
            self.aux = ops.new_aux(device=dev)

    def ensure(self, residual_like: dict, coefficients=(), indicator: torch.Tensor | None = None) -> bool:
        """Buffers for these shapes, dtypes and devices: reallocated (:meth:`allocate`) when
        the indicator or any residual stream differs from the last call's; returns whether
        it was. ``indicator`` None: the policy keeps no indicator (a 1-element ``prev``)."""
        sig = (
            None if indicator is None else (tuple(indicator.shape), indicator.dtype, indicator.device),
            tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in residual_like.items()),
        )
        if sig == self.signature:
            return False
        if indicator is None:
            indicator = torch.zeros(1, device=next(iter(residual_like.values())).device)
        self.allocate(indicator, residual_like, coefficients)
        self.signature = sig
        return True

    def reset(self) -> None:
        if self.state is None:
            return
        self.state.copy_(ops.new_state(self.history, device=self.state.device))
        self.aux.zero_()
        self.prev.zero_()
        for r in self.residuals.values():
            r.zero_()

    def output_buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The buffer a skipped step writes ``x + R`` into (a fresh large tensor costs page
        faults on every step on CPU). Reused only when nothing outside holds the previous
        step's output, neither the tensor nor a view of its memory; otherwise a new one, so
        a caller that kept an earlier output never sees it overwritten."""
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        buf = self.out.get(name)
        if (
            buf is not None
            and use_count is not None
            and buf.shape == like.shape
            # references: self.out, the local `buf`, getrefcount's argument; storage users:
            # the tensor and the temporary storage object (a view elsewhere would add one)
            and sys.getrefcount(buf) <= 3
            and use_count(buf.untyped_storage()._cdata) <= 2
        ):
            return buf
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.out[name] = buf
        return buf

    def stats(self, repeat_hint: str = "") -> dict:
        """Counters, timeline, indicator trace and warnings (reads the device state: call it
        off the step path)."""
        if self.state is None:
            return {"steps": 0, "computed": 0, "skipped": 0, "runs": 0, "timeline": [], "cache_bytes": 0}
        s = self.state.detach().cpu()  # host-read-ok: stats are read off the step path
        aux = self.aux.detach().cpu()  # host-read-ok: stats
        H = self.history
        steps = min(int(s[STEP]), H)
        out = {
            "steps": int(s[STEP]),
            "computed": int(s[N_COMPUTED]),
            "skipped": int(s[N_SKIPPED]),
            "runs": int(s[N_RUNS]),
            "timeline": [bool(f) for f in s[STATE_HEADER + 2 * H : STATE_HEADER + 2 * H + steps]],
            "rel_l1": s[STATE_HEADER : STATE_HEADER + steps].tolist(),  # host-read-ok: stats
            "repeated_timestep_calls": int(aux[AUX_REPEATS]),
            "timestep_jitter_calls": int(aux[AUX_JITTER]),
            "last_run_steps": int(aux[AUX_LAST_RUN_STEPS]),
            "run_length_mismatches": int(aux[AUX_RUN_LENGTH_MISMATCHES]),
            "cache_bytes": self.nbytes(),
        }
        warn = []
        if out["repeated_timestep_calls"]:
            warn.append(
                f"{out['repeated_timestep_calls']} call(s) repeated the previous call's timestep and ran uncached. "
                "If these are the two branches of classifier-free guidance, give each its own state with "
                "transformer.cache_context(name) or fastcache.context(model, name)" + repeat_hint
            )
        if self.num_steps and (out["run_length_mismatches"] or out["steps"] > self.num_steps):
            warn.append(
                f"num_steps={self.num_steps} but a run had {out['last_run_steps'] or out['steps']} steps: the forced "
                "last step is misplaced. Set num_steps to the sampler's number of steps (handle.set_num_steps)."
            )
        out["warnings"] = warn
        return out


def residual_cond(flag, run, ins: dict, returned: list, residuals: dict) -> dict:
    """The skip under tracing / capture as one cond operator with functional branches:
    ``run(streams)`` (the blocks) on a computed step, ``x + R`` for each stream with a
    cached residual and a copy of the others on a skipped one. Returns the ``returned``
    streams (fresh dense tensors, as cond requires of both branches: a stack may end in
    a view, Flux's single blocks slice the text off), each of its input stream's shape
    (the skip branch's ``x + R``). The residual stores stay outside.

    Operands and outputs cross the operator flat (:func:`fastcache.tracing.skip_cond`,
    ``shapes``): a compiled model keeps working when the resolution changes."""
    from ..tracing import skip_cond

    present = [n for n, v in ins.items() if v is not None]
    cached = list(residuals)
    k = len(present)

    def compute(*operands):
        outs = run(dict(zip(present, operands[:k])))
        return tuple(outs[n].clone(memory_format=torch.contiguous_format) for n in returned)

    def skip(*operands):
        xs = dict(zip(present, operands[:k]))
        res = dict(zip(cached, operands[k:]))
        return tuple(
            ops.apply_residual(xs[n], res[n]) if n in res else xs[n].clone(memory_format=torch.contiguous_format)
            for n in returned
        )

    operands = (*[ins[n] for n in present], *residuals.values())
    shapes = [ins[n].shape for n in returned]
    return dict(zip(returned, skip_cond(flag, compute, skip, operands, shapes)))


def traced_stack(runner, call: dict, streams: dict, spec, flag, store, residuals: dict) -> dict:
    """A whole-stack residual cache under tracing / capture (TeaCache, MagCache): the stack
    or ``x + R`` as one cond operator (:func:`residual_cond`), then the residual stores
    outside the cond, gated by ``store`` on the device."""
    returned = [n for n in spec.returns if streams.get(n) is not None and n not in spec.dropped_streams]
    result = dict(streams)
    result.update(residual_cond(flag, lambda ins: runner.run(call, ins), streams, returned, residuals))
    store_residuals(result, streams, residuals, store)
    return result


def store_residuals(result: dict, streams: dict, residuals: dict, store) -> None:
    """``R <- result - streams`` per cached stream where ``store`` (a device flag) is set."""
    for n, r in residuals.items():
        ops.store_residual(result[n], streams[n], store, r)


def skipped_stack(st: DecisionState, streams: dict, residuals: dict) -> dict:
    """An eager skipped step: ``x + R`` per cached stream, into the state's owned output
    buffers (:meth:`DecisionState.output_buffer`); other streams pass through."""
    result = dict(streams)
    for n, r in residuals.items():
        result[n] = ops.apply_residual(streams[n], r, out=st.output_buffer(n, r))
    return result
