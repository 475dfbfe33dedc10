"""TeaCache on fused, device-resident state (Liu et al., arXiv 2411.19108).

Per step (docs/methods.md, section 1, Eq. T1-T9):

1. indicator ``I_s = LN(x) * (1 + scale_msa) + shift_msa`` of the first block, its
   relative-L1 distance to ``I_{s-1}`` and ``I_{s-1} <- I_s`` — one fused op
   (:func:`fastcache.ops.modulated_rel_l1_sums`), every step;
2. polynomial rescale, accumulate, threshold, forced first/last step, reset on
   compute — one fused op on a device state vector (:func:`fastcache.ops.cache_decision`);
3. computed step: run the whole stack, ``R <- out - in`` per cached stream;
   skipped step: ``out = in + R``.

Timesteps (all on the device, no host read): a new sampling run starts when the
timestep rises by more than a relative tolerance (:data:`TIMESTEP_RTOL`; float jitter
such as KDPM2-ancestral's 554.9999 -> 555.0 stays in the run). A call whose timestep
repeats the previous call's (Heun's and PNDM's repeated evaluations, or classifier-free
guidance run as two calls without a context) is computed in full and leaves the cache
untouched: it neither reuses nor overwrites the other call's residual, indicator or
accumulator, and it is counted in ``stats`` (``repeated_timestep_calls``).

Eager mode reads the decision flag once per step and branches in Python. Under
``torch.compile`` or CUDA-graph capture the branch is a cond operator with functional
branches (``StackRunner.cond``; host reads per mode in docs/modes.md); the residual
store sits outside and is gated by the device flag.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import ops
from ..config import TeaCacheConfig
from ..ops.reference import ACC, N_COMPUTED, N_RUNS, N_SKIPPED, STATE_HEADER, STEP
from .base import Policy, StackRunner, is_tracing, register_policy
from .memo import reuse_outputs
from .steps import (
    AUX_JITTER,
    AUX_LAST_RUN_STEPS,
    AUX_REPEATS,
    AUX_RUN_LENGTH_MISMATCHES,
    AUX_SIZE,
    timestep_guard,
)


class TeaCacheState:
    """Device tensors of one cache context. ``signature`` guards against reuse across a
    change of shape, dtype or device."""

    def __init__(self, history: int):
        self.history = history
        self.signature = None
        self.prev: torch.Tensor | None = None  # previous modulated input (B, N, D)
        self.residuals: dict[str, torch.Tensor] = {}  # stack residual per cached stream
        self.state: torch.Tensor | None = None  # decision state (fastcache.ops layout)
        self.coeffs: torch.Tensor | None = None
        self.aux: torch.Tensor | None = None  # AUX_* counters
        self.out: dict[str, torch.Tensor] = {}  # eager skipped-step output per cached stream (reused)
        self.num_steps = 0  # steps per run for this context (pipeline context, config or set_num_steps)

    def nbytes(self) -> int:
        ts = [self.prev, self.state, self.coeffs, self.aux, *self.residuals.values(), *self.out.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _output_buffer(st: TeaCacheState, name: str, like: torch.Tensor) -> torch.Tensor:
    """The buffer a skipped step writes ``x + R`` into (a fresh large tensor costs page
    faults on every step on CPU). Reused only when nothing outside holds the previous
    step's output, neither the tensor nor a view of its memory; otherwise a new one, so a
    caller that kept an earlier output never sees it overwritten."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    buf = st.out.get(name)
    if (
        buf is not None
        and use_count is not None
        and buf.shape == like.shape
        # references: st.out, the local `buf`, getrefcount's argument; storage users: the
        # tensor and the temporary storage object (a view elsewhere would add one)
        and sys.getrefcount(buf) <= 3
        and use_count(buf.untyped_storage()._cdata) <= 2
    ):
        return buf
    buf = torch.empty_like(like, memory_format=torch.contiguous_format)
    st.out[name] = buf
    return buf


@register_policy(TeaCacheConfig)
class TeaCachePolicy(Policy):
    def __init__(self, config: TeaCacheConfig, spec, model):
        super().__init__(config, spec, model)
        coeffs = config.coefficients
        if coeffs is None:
            coeffs = spec.teacache_coefficients or ()
        self.coefficients: tuple[float, ...] = tuple(coeffs)
        self.num_steps = config.num_steps or 0

    def new_state(self) -> TeaCacheState:
        return TeaCacheState(self.config.history)

    def _ensure(self, st: TeaCacheState, x: torch.Tensor, streams: dict) -> None:
        cached = self.spec.cached_streams
        sig = (
            tuple(x.shape),
            x.dtype,
            x.device,
            tuple((n, tuple(streams[n].shape), streams[n].dtype, streams[n].device) for n in cached),
        )
        if sig == st.signature:
            return
        # New shape / batch / dtype / device: fresh buffers and a fresh decision state
        # (PREV_T = -inf, so the next decision is a forced compute). Never mix.
        st.prev = torch.zeros_like(x, memory_format=torch.contiguous_format)
        st.residuals = {n: torch.zeros_like(streams[n], memory_format=torch.contiguous_format) for n in cached}
        st.out = {}
        st.state = ops.new_state(st.history, device=x.device)
        st.coeffs = torch.tensor(self.coefficients, dtype=torch.float32, device=x.device)
        if st.aux is None or st.aux.device != x.device:
            st.aux = torch.zeros(AUX_SIZE, dtype=torch.float32, device=x.device)
        st.signature = sig

    def begin_step(self, st: TeaCacheState, timestep, step) -> None:
        # diffusers' cache_context(num_inference_steps=...) or the configured num_steps
        st.num_steps = step.num_steps or 0

    def reset_state(self, st: TeaCacheState) -> None:
        if st.state is None:
            return
        st.state.copy_(ops.new_state(st.history, device=st.state.device))
        st.aux.zero_()
        st.prev.zero_()
        for r in st.residuals.values():
            r.zero_()

    def invalidate(self, st: TeaCacheState) -> None:
        # An infinite accumulator forces the next decision to compute (then resets to 0);
        # the step count of the run is kept. A host-to-device write, no read.
        if st.state is not None:
            st.state[ACC : ACC + 1].fill_(math.inf)

    def run_stack(self, st: TeaCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        x, shift, scale, eps, *memo = spec.modulation(head, call)
        streams = {n: call[n] for n in spec.streams}
        self._ensure(st, x, streams)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, st.num_steps)
        # A repeated call (rep) must leave the cache as it found it (see the module
        # docstring): the ops hold prev and the decision state, and the decision says compute.
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev, eps, hold=rep)
        flag = ops.cache_decision(
            sums,
            t_op,
            st.coeffs,
            st.state,
            self.config.threshold,
            self.config.warmup_steps,
            self.config.max_consecutive_skips,
            st.num_steps,
            hold=rep,
        )
        store = flag & ~rep
        cached = spec.cached_streams
        residuals = [st.residuals[n] for n in cached]
        returned = [n for n in spec.returns if streams.get(n) is not None and n not in spec.dropped_streams]

        if is_tracing():
            names = [n for n in spec.streams if streams[n] is not None]
            k = len(names)

            def compute(*operands):
                outs = runner.run(call, dict(zip(names, operands[:k])))
                # Both branches must return plain dense tensors (same strides, offset 0):
                # a stack may end in a view (Flux's single blocks slice the text off).
                return tuple(outs[n].clone(memory_format=torch.contiguous_format) for n in returned)

            def skip(*operands):
                ins = dict(zip(names, operands[:k]))
                res = dict(zip(cached, operands[k:]))
                # Streams without a cached residual pass through (a copy: branches are functional).
                return tuple(
                    ops.apply_residual(ins[n], res[n])
                    if n in res
                    else ins[n].clone(memory_format=torch.contiguous_format)
                    for n in returned
                )

            # Contiguous operands: inductor may lay out a transposed producer (e.g. a
            # patch embedding's flatten().transpose()) differently from its fake tensor,
            # and cond subgraphs assert their input strides.
            operands = (*[streams[n].contiguous() for n in names], *residuals)
            outs = runner.cond(flag, compute, skip, operands)
            result = dict(streams)
            result.update(zip(returned, outs))
            for n, r in zip(cached, residuals):
                ops.store_residual(result[n], streams[n], store, r)
            return result

        if flag.item():  # host-read-ok: the single eager decision read per step
            # The first block gets the modulation computed for the indicator (no second
            # embedding MLP / AdaLN linear on a computed step). Not into a compiled stack
            # (graphs.compile_stack): dynamo would guard on, and capture, the handed output.
            with reuse_outputs(memo[0] if memo and runner.compiled is None else ()):
                result = runner.run(call, streams)
            for n, r in zip(cached, residuals):
                ops.store_residual(result[n], streams[n], store, r)
            return result
        result = dict(streams)
        for n, r in zip(cached, residuals):
            result[n] = ops.apply_residual(streams[n], r, out=_output_buffer(st, n, r))
        return result

    def state_stats(self, st: TeaCacheState) -> dict:
        if st.state is None:
            return {"steps": 0, "computed": 0, "skipped": 0, "runs": 0, "timeline": [], "cache_bytes": 0}
        s = st.state.detach().cpu()  # host-read-ok: stats are read off the step path
        aux = st.aux.detach().cpu()  # host-read-ok: stats
        H = st.history
        steps = min(int(s[STEP]), H)
        flags = s[STATE_HEADER + 2 * H : STATE_HEADER + 2 * H + steps]
        out = {
            "steps": int(s[STEP]),
            "computed": int(s[N_COMPUTED]),
            "skipped": int(s[N_SKIPPED]),
            "runs": int(s[N_RUNS]),
            "accumulator": float(s[ACC]),
            "timeline": [bool(f) for f in flags],
            "rel_l1": s[STATE_HEADER : STATE_HEADER + steps].tolist(),  # host-read-ok: stats
            "accumulated": s[STATE_HEADER + H : STATE_HEADER + H + steps].tolist(),  # host-read-ok: stats
            "repeated_timestep_calls": int(aux[AUX_REPEATS]),
            "timestep_jitter_calls": int(aux[AUX_JITTER]),
            "last_run_steps": int(aux[AUX_LAST_RUN_STEPS]),
            "run_length_mismatches": int(aux[AUX_RUN_LENGTH_MISMATCHES]),
            "cache_bytes": st.nbytes(),
        }
        warn = []
        if out["repeated_timestep_calls"]:
            warn.append(
                f"{out['repeated_timestep_calls']} call(s) repeated the previous call's timestep and ran uncached. "
                "If these are the two branches of classifier-free guidance, give each its own state with "
                "transformer.cache_context(name) or fastcache.context(model, name) (diffusers pipelines do); "
                "Heun/PNDM-style repeated evaluations are expected to run uncached."
            )
        if st.num_steps and (out["run_length_mismatches"] or out["steps"] > st.num_steps):
            warn.append(
                f"num_steps={st.num_steps} but a run had {out['last_run_steps'] or out['steps']} steps: the forced "
                "last step is misplaced. Set num_steps to the sampler's number of steps (handle.set_num_steps)."
            )
        out["warnings"] = warn
        return out
