"""TeaCache on fused, device-resident state (Liu et al., arXiv 2411.19108).

Per step (METHODS.md, "TeaCache"):

1. indicator ``I_s = LN(x) * (1 + scale_msa) + shift_msa`` of the first block, its
   relative-L1 distance to ``I_{s-1}`` and ``I_{s-1} <- I_s`` — one fused op
   (:func:`fastcache.ops.modulated_rel_l1_sums`), every step;
2. polynomial rescale, accumulate, threshold, forced first/last step, reset on
   compute — one fused op on a device state vector (:func:`fastcache.ops.cache_decision`);
3. computed step: run the whole stack, ``R <- out - in`` per cached stream;
   skipped step: ``out = in + R``.

Eager mode reads the decision flag once per step and branches in Python. Under
``torch.compile`` or CUDA-graph capture the branch is ``torch.cond`` with functional
branches; the residual store sits outside and is gated by the device flag.
"""

from __future__ import annotations

import torch

from .. import ops
from ..config import TeaCacheConfig
from ..ops.reference import ACC, N_COMPUTED, N_RUNS, N_SKIPPED, STATE_HEADER, STEP
from .base import Policy, StackRunner, is_tracing, register_policy


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

    def nbytes(self) -> int:
        ts = [self.prev, self.state, self.coeffs, *self.residuals.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


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
        st.state = ops.new_state(st.history, device=x.device)
        st.coeffs = torch.tensor(self.coefficients, dtype=torch.float32, device=x.device)
        st.signature = sig

    def reset_state(self, st: TeaCacheState) -> None:
        if st.state is None:
            return
        st.state.copy_(ops.new_state(st.history, device=st.state.device))
        st.prev.zero_()
        for r in st.residuals.values():
            r.zero_()

    def run_stack(self, st: TeaCacheState, runner: StackRunner, head, call, timestep):
        spec = self.spec
        x, shift, scale, eps = spec.modulation(head, call)
        streams = {n: call[n] for n in spec.streams}
        self._ensure(st, x, streams)
        sums = ops.modulated_rel_l1_sums(x, shift, scale, st.prev, eps)
        flag = ops.cache_decision(
            sums,
            timestep,
            st.coeffs,
            st.state,
            self.config.threshold,
            self.config.warmup_steps,
            self.config.max_consecutive_skips,
            self.num_steps,
        )
        cached = spec.cached_streams
        residuals = [st.residuals[n] for n in cached]

        if is_tracing():
            names = [n for n in spec.streams if streams[n] is not None]
            k = len(names)

            def compute(*operands):
                outs = runner.run(call, dict(zip(names, operands[:k])))
                # Both branches must return plain dense tensors (same strides, offset 0):
                # a stack may end in a view (Flux's single blocks slice the text off).
                return tuple(outs[n].clone(memory_format=torch.contiguous_format) for n in cached)

            def skip(*operands):
                ins = dict(zip(names, operands[:k]))
                return tuple(ops.apply_residual(ins[n], r) for n, r in zip(cached, operands[k:]))

            # Contiguous operands: inductor may lay out a transposed producer (e.g. a
            # patch embedding's flatten().transpose()) differently from its fake tensor,
            # and cond subgraphs assert their input strides.
            operands = (*[streams[n].contiguous() for n in names], *residuals)
            outs = runner.cond(flag, compute, skip, operands)
            result = dict(streams)
            for n, o, r in zip(cached, outs, residuals):
                ops.store_residual(o, streams[n], flag, r)
                result[n] = o
            return result

        if flag.item():  # host-read-ok: the single eager decision read per step
            result = runner.run(call, streams)
            for n, r in zip(cached, residuals):
                ops.store_residual(result[n], streams[n], flag, r)
            return result
        result = dict(streams)
        for n, r in zip(cached, residuals):
            result[n] = ops.apply_residual(streams[n], r)
        return result

    def state_stats(self, st: TeaCacheState) -> dict:
        if st.state is None:
            return {"steps": 0, "computed": 0, "skipped": 0, "runs": 0, "timeline": [], "cache_bytes": 0}
        s = st.state.detach().cpu()  # host-read-ok: stats are read off the step path
        H = st.history
        steps = min(int(s[STEP]), H)
        flags = s[STATE_HEADER + 2 * H : STATE_HEADER + 2 * H + steps]
        return {
            "steps": int(s[STEP]),
            "computed": int(s[N_COMPUTED]),
            "skipped": int(s[N_SKIPPED]),
            "runs": int(s[N_RUNS]),
            "accumulator": float(s[ACC]),
            "timeline": [bool(f) for f in flags],
            "rel_l1": s[STATE_HEADER : STATE_HEADER + steps].tolist(),  # host-read-ok: stats
            "accumulated": s[STATE_HEADER + H : STATE_HEADER + H + steps].tolist(),  # host-read-ok: stats
            "cache_bytes": st.nbytes(),
        }
