"""T-GATE on the block interior (Liu et al., arXiv 2404.02747; docs/methods.md section 5,
Eq. G1-G6): a per-(block, branch) static schedule for DiTs with cross-attention (PixArt).

Per step ``s`` (0-based; :meth:`fastcache.TGateConfig.plan`, the reference's
``tgate_scheduler``):

* cross-attention ("cross" branches, ungated in PixArt) runs while ``s < G``; at
  ``s = G-1`` its output ``f`` is cached as ``C = (f_uncond + f_cond) / 2`` (the two halves
  of the batched CFG call ``[uncond; cond]``) and from ``G`` on both halves get ``x + C``
  through the fused :func:`fastcache.ops.apply_residual` (Eq. G1-G2);
* self-attention ("attn" branches) runs on steps ``0 .. W``, every ``P_sp``-th step before
  the gate, at the gate step (cached as the CFG mean too, as the reference does), and every
  ``P_fi``-th step after it; reused in between through :func:`fastcache.ops.gated_residual`
  with the gate of the current step (Eq. G3);
* every other branch (the MLP) always runs, and the AdaLN modulation is recomputed.

Where the step comes from:

* eager, step index given by the caller (``cache_context(name, step_index=i)`` /
  ``fastcache.context(model, name, step_index=i)``): the host schedule, no device read;
  repeated / restarted step indices are recognised on the host;
* eager otherwise: the device step counter (:func:`fastcache.ops.cache_decision` at
  threshold 0 only counts steps, after :func:`~fastcache.policies.steps.timestep_guard`),
  read once per step together with the repeated-call flag; then the host schedule;
* torch.compile / capture: the schedule evaluated on the device from the step counter; the
  stack runs inside one ``torch.cond`` on "cross-attention computed" whose branches hold
  one nested ``torch.cond`` on "self-attention computed" where both values occur (pruned
  statically otherwise); the caches are written outside the conds, gated by device flags.

A repeated call (same timestep, or the same host step index) computes every branch and
leaves the caches untouched. A reuse whose cache does not hold a value of the current run
(host paths: a run entered after the gate, the cache invalidated by an autograd call)
computes the branch instead and caches it (counted as ``fallbacks``, with a warning).

After the gate both CFG halves get the same ``C``; whether the duplicate half could be
dropped inside the transformer is discussed in docs/methods.md section 5.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import torch

from .. import ops
from ..config import CacheConfig, _check_int, _set, config_type
from ..interior import Executor, apply_cached, run_blocks
from ..interior.base import combine
from ..ops.reference import STEP
from ..tracing import skip_cond, static_floats
from .base import is_tracing, register_policy, warm_signatures
from .interior_engine import SUMS_ZERO_CHANGE, InteriorCachePolicy, InteriorState
from .steps import AUX_LAST_RUN_STEPS, AUX_REPEATS, AUX_RUN_LENGTH_MISMATCHES, timestep_guard

SELF, CROSS = "attn", "cross"
# timeline codes: self-attention S computed / s reused; cross-attention C computed,
# G computed and cached (the gate step), c reused
# --------------------------------------------------------------------------- config
_TGATE_CFG = ("batched", "none")


@config_type
@dataclasses.dataclass(frozen=True)
class TGateConfig(CacheConfig):
    """T-GATE (Liu et al., arXiv 2404.02747; docs/methods.md section 5, Eq. G1-G6): for
    models with cross-attention (PixArt). Cross-attention runs on steps ``s < gate_step``;
    at ``s = gate_step - 1`` its output is cached as the mean of the two CFG halves and
    reused by both halves from ``gate_step`` on. Self-attention follows its own schedule:
    computed on steps ``0 .. warm_up``, then on steps with ``s % sp_interval == 0`` before
    the gate, at ``gate_step - 1`` (cached as the halves' mean too), and on steps with
    ``s % fi_interval == 0`` after it; reused in between. The MLP always runs.

    The schedule is the reference implementation's (``tgate_scheduler``), step indices
    0-based and absolute. Defaults: the published PixArt-Alpha setting (25 steps:
    gate 15, sp_interval 3, fi_interval 1, warm_up 2); the reference's generic defaults
    are gate 10, sp_interval 5.

    Args:
        gate_step: G >= 1; cross-attention is computed on steps 0 .. G-1 and reused after.
            ``gate_step = num_steps`` with ``sp_interval = 1`` never reuses anything
            (bitwise the unpatched model).
        warm_up: W >= 0; self-attention is computed on steps 0 .. W (the reference computes
            ``s < W`` and caches at ``s == W``).
        sp_interval: P_sp >= 1, self-attention refresh interval before the gate.
        fi_interval: P_fi >= 1, self-attention refresh interval after the gate.
        cfg: how classifier-free guidance reaches the model. ``"batched"``: one call per
            step with the batch ``[uncond; cond]`` (diffusers' PixArt pipeline); the batch
            must be even, and the gate caches the mean of the halves. ``"none"``: no CFG
            (or CFG as separate calls in their own cache contexts): each sample caches its
            own output, which is not T-GATE's mean over the CFG pair (docs/methods.md).
        num_steps: steps per run, when known (``gate_step <= num_steps``; runs of another
            length are flagged in stats).
        history: steps of timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "tgate"

    gate_step: int = 15
    warm_up: int = 2
    sp_interval: int = 3
    fi_interval: int = 1
    cfg: str = "batched"
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "gate_step", _check_int("gate_step", self.gate_step, 1, " (step 0 computes cross-attention)"))
        _set(self, "warm_up", _check_int("warm_up", self.warm_up, 0))
        _set(self, "sp_interval", _check_int("sp_interval", self.sp_interval, 1, " (1 = self-attention every step)"))
        _set(self, "fi_interval", _check_int("fi_interval", self.fi_interval, 1, " (1 = self-attention every step)"))
        if self.cfg not in _TGATE_CFG:
            raise ValueError(
                f"cfg must be one of {_TGATE_CFG} ('batched': one call per step with the batch [uncond; cond]; "
                f"'none': no classifier-free guidance in the batch), got {self.cfg!r}"
            )
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
            if self.gate_step > self.num_steps:
                raise ValueError(
                    f"gate_step={self.gate_step} > num_steps={self.num_steps}: the gate would never be reached; "
                    f"use gate_step <= {self.num_steps} (gate_step = num_steps keeps cross-attention on every step)"
                )
        _set(self, "history", _check_int("history", self.history, 1))

    def plan(self, step: int) -> tuple[bool, str]:
        """The host schedule of step ``step`` (0-based): ``(self-attention computed?,
        cross-attention mode)``, mode ``"compute"`` (s < G-1), ``"gate"`` (s = G-1:
        computed, cached as the CFG mean) or ``"reuse"`` (s >= G). At the gate step
        self-attention is computed and cached as the CFG mean as well (Eq. G1-G3)."""
        g, w = self.gate_step, self.warm_up
        if step < g - 1:
            return (step <= w or step % self.sp_interval == 0), "compute"
        if step == g - 1:
            return True, "gate"
        return step % self.fi_interval == 0, "reuse"


# --- TaylorSeer ---


# --------------------------------------------------------------------------- policy
_SA_CODE = {True: "S", False: "s"}
_CROSS_CODE = {"compute": "C", "gate": "G", "reuse": "c"}


def cfg_mean(f: torch.Tensor) -> torch.Tensor:
    """Eq. G1: ``C = (f_uncond + f_cond) / 2`` over the halves of a ``(2B, N, D)`` batch,
    returned for both halves (``(2B, N, D)``, so the fused residual ops see x's shape)."""
    h = f.shape[0] // 2
    m = (f[:h] + f[h:]) / 2
    return torch.cat([m, m])


class TGateState(InteriorState):
    """:class:`InteriorState` plus the host bookkeeping of the eager paths."""

    def __init__(self, history: int):
        super().__init__(history)
        self.valid: list[bool] | None = None  # per slot: holds a value of the current run (eager)
        self.prev_step: int | None = None  # last non-repeated step index (eager)
        self.half = False  # this call carries half the CFG batch (after the gate, eager)
        # eager counts (host ints, no device work): steps, attn computed / reused,
        # cross computed / reused, fallbacks, repeated calls
        self.host_counts = [0] * 7
        self.dev_counts: torch.Tensor | None = None  # the same, compiled steps (device)

    def nbytes(self) -> int:
        n = super().nbytes()
        return n + (0 if self.dev_counts is None else self.dev_counts.numel() * self.dev_counts.element_size())


class _EagerExecutor(Executor):
    """Per branch name a mode: "compute", "store" (compute and cache), "mean" (compute and
    cache the CFG mean) or "reuse"; branches without a mode are computed."""

    def __init__(self, policy: TGatePolicy, st: TGateState, modes: dict[str, str]):
        self.p, self.st, self.modes = policy, st, modes

    def residual(self, name, fn, xs, gates):
        mode = self.modes.get(name)
        if mode is None:
            return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fn()))
        st, p = self.st, self.p
        ids = p.layout.slot_ids[(self.block, name)]
        c = st.host_counts
        col = 1 if name == SELF else 3
        if mode == "reuse":
            if all(st.valid[k] for k in ids):
                c[col + 1] += 1
                n = xs[0].shape[0]  # half the cached batch when the sampler dropped the CFG duplicate
                return tuple(apply_cached(x, g, st.cache[k][:n]) for k, x, g in zip(ids, xs, gates))
            # nothing of this run cached (never silently wrong): compute and cache it
            c[5] += 1
            mode = "mean" if name == CROSS and p.batched and not st.half else "store"
        c[col] += 1
        fs = fn()
        if mode != "compute":
            for k, f in zip(ids, fs):
                st.cache[k] = cfg_mean(f) if mode == "mean" else f  # a fresh tensor: keep the reference
                st.valid[k] = True
        return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fs))


class _TraceExecutor(Executor):
    """Inside a cond branch: per branch name compute (collecting outputs) or reuse
    (functional, from ``cache``); the cache stores happen outside the conds."""

    def __init__(self, policy: TGatePolicy, compute: dict[str, bool], cache: dict | None):
        self.p, self.compute, self.cache = policy, compute, cache
        self.outputs: dict[int, torch.Tensor] = {}

    def residual(self, name, fn, xs, gates):
        on = self.compute.get(name)
        if on is None:
            return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fn()))
        ids = self.p.layout.slot_ids[(self.block, name)]
        if on:
            fs = fn()
            self.outputs.update(zip(ids, fs))
            return tuple(combine(x, g, f) for x, g, f in zip(xs, gates, fs))
        return tuple(apply_cached(x, g, self.cache[k]) for k, x, g in zip(ids, xs, gates))


@register_policy(TGateConfig)
class TGatePolicy(InteriorCachePolicy):
    """T-GATE: see the module docstring and :class:`fastcache.TGateConfig`."""

    decides_from_data = False  # a static schedule: identical on every rank of a process group

    def __init__(self, config: TGateConfig, spec, model):
        super().__init__(config, spec, model)
        names = {b for (_, b) in self.layout.slot_ids}
        if CROSS not in names:
            raise ValueError(
                f"fastcache: T-GATE gates cross-attention, but {type(model).__name__} (spec {spec.name!r}) has no "
                f"cross-attention branch (its blocks have: {', '.join(sorted(names))}); models with joint or "
                "self-attention only (DiT, Flux, SD3) have nothing to gate. Use FORAConfig or TeaCacheConfig there."
            )
        self.batched = config.cfg == "batched"
        self.num_steps = config.num_steps or 0
        ids = self.layout.slot_ids
        self.self_ids = [k for (_, b), ks in ids.items() if b == SELF for k in ks]
        self.cross_ids = [k for (_, b), ks in ids.items() if b == CROSS for k in ks]
        self.gated_ids = sorted(self.self_ids + self.cross_ids)
        self.n_self = sum(1 for (_, b) in ids if b == SELF)
        self.n_cross = sum(1 for (_, b) in ids if b == CROSS)
        self.n_other = len(ids) - self.n_self - self.n_cross
        self._ran: weakref.WeakSet = weakref.WeakSet()  # states (cache contexts) that ran a step

    # -- schedule -----------------------------------------------------------------------
    def combos(self) -> set[tuple[bool, bool]]:
        """(self-attention computed, cross-attention computed) pairs the schedule can
        produce (a repeated call computes both): which conds the compiled step needs."""
        c = self.config
        out = {(True, True)}
        out.update((c.plan(s)[0], True) for s in range(c.gate_step))
        if c.num_steps is None or c.gate_step < c.num_steps:  # steps after the gate exist
            out.add((True, False))  # s % P_fi == 0 (every step when P_fi = 1)
            if c.fi_interval > 1:
                out.add((False, False))
        return out

    def _half_batch(self, st: TGateState, streams: dict) -> bool:
        """Eager, cfg="batched": the call carries half the batch the state was made for
        (the paper's pipeline drops the CFG duplicate from the gate on; every other
        dimension, dtype and device unchanged)."""
        if not self.batched or st.signature is None:
            return False
        sig = tuple((n, None if v is None else (tuple(v.shape), v.dtype, v.device)) for n, v in streams.items())
        if len(sig) != len(st.signature):
            return False
        for (n, a), (m, b) in zip(sig, st.signature):
            if n != m or (a is None) != (b is None):
                return False
            if a is not None and (a[0][0] * 2 != b[0][0] or a[0][1:] != b[0][1:] or a[1:] != b[1:]):
                return False
        return True

    def device_plan(self, s: torch.Tensor):
        """The schedule on the device (``s``: 0-dim long): (self-attention computed, cross
        computed, gate step) as 0-dim bools; the same function as :meth:`TGateConfig.plan`."""
        c = self.config
        g = c.gate_step
        before = s < g - 1
        at_gate = s == g - 1
        after = s >= g
        sa = (before & ((s <= c.warm_up) | (s % c.sp_interval == 0))) | at_gate | (after & (s % c.fi_interval == 0))
        return sa, ~after, at_gate

    # -- state --------------------------------------------------------------------------
    def new_state(self) -> TGateState:
        return TGateState(self.config.history)

    def allocate(self, st: TGateState, streams: dict, dev) -> None:
        st.coeffs = torch.zeros(0, dtype=torch.float32, device=dev)
        st.sums = torch.tensor(SUMS_ZERO_CHANGE, dtype=torch.float32, device=dev)
        st.valid = [False] * self.K
        st.prev_step = None
        if st.dev_counts is None or st.dev_counts.device != dev:
            st.dev_counts = torch.zeros(7, dtype=torch.float32, device=dev)

    def reset_state(self, st: TGateState) -> None:
        super().reset_state(st)
        st.valid = None
        st.prev_step = None
        st.host_counts = [0] * 7
        if st.dev_counts is not None:
            st.dev_counts.zero_()

    def set_num_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and num_steps < self.config.gate_step:
            raise ValueError(
                f"fastcache: num_steps={num_steps} < gate_step={self.config.gate_step}: the gate would never be "
                "reached; patch with a smaller gate_step"
            )
        self.num_steps = num_steps or 0

    # -- the step -----------------------------------------------------------------------
    @static_floats
    def run_stack(self, st: TGateState, runner, head, call, timestep):
        streams = {n: call.get(n) for n in self.spec.streams}
        x = streams[self.spec.streams[0]]
        st.half = not is_tracing() and self._half_batch(st, streams)
        if self.batched and x.shape[0] % 2 and not st.half:
            raise ValueError(
                f"fastcache: TGateConfig(cfg='batched') expects the CFG batch [uncond; cond] (an even batch), but "
                f"{type(self.model).__name__} was called with batch {x.shape[0]}. Without classifier-free guidance "
                "in the batch, patch with TGateConfig(cfg='none')."
            )
        if not is_tracing():
            self._ran.add(st)
            if self.batched and len(self._ran) > 1:
                raise ValueError(
                    "fastcache: TGateConfig(cfg='batched') caches the mean of the CFG halves of one batched call, "
                    "but the model is being called in more than one cache context (classifier-free guidance as "
                    "separate calls?). The mean needs both branches in one call: batch them ([uncond; cond]), or "
                    "use cfg='none' (each context then caches its own cross-attention, which is not T-GATE's "
                    "mean; docs/methods.md section 5)."
                )
        if not st.half:
            self._ensure(st, streams)
        if st.cache is None:
            st.cache = [None] * self.K
        if not is_tracing() and st.step is not None and st.step.index is not None:
            return self._host_step(st, call, streams, st.step.index, None)
        t_op, rep = timestep_guard(st.state, st.aux, timestep, self.num_steps)
        # threshold 0: the op "computes" every call; it only counts steps and detects new
        # runs on the device (rep holds the counter on a repeated call)
        ops.cache_decision(st.sums, t_op, st.coeffs, st.state, 0.0, 1, 0, 0, hold=rep)
        s_idx = (st.state[STEP] - 1).clamp(min=0).to(torch.long)
        if is_tracing():
            return self._traced_step(st, call, streams, s_idx, rep)
        code = int((s_idx * 2 + rep.to(torch.long)).item())  # host-read-ok: the one eager read
        return self._host_step(st, call, streams, code >> 1, bool(code & 1))

    def _host_step(self, st: TGateState, call, streams, s: int, repeated: bool | None):
        if repeated is None:  # host step index: repeats and restarts recognised on the host
            repeated = st.prev_step is not None and s == st.prev_step
        c = st.host_counts
        c[0] += 1
        if repeated:  # computed in full, caches untouched
            c[6] += 1
            c[1] += self.n_self
            c[3] += self.n_cross
            ex = _EagerExecutor(self, st, {})
            return run_blocks(self.layout, call, streams, ex)
        if st.prev_step is None or s == 0 or s < st.prev_step:  # a new run: nothing cached is valid
            st.valid = [False] * self.K
        st.prev_step = s
        sa, cross = self.config.plan(s)
        if st.half and cross != "reuse":
            raise ValueError(
                f"fastcache: step {s} was called with half the CFG batch, but T-GATE's gate step is "
                f"{self.config.gate_step}: the CFG batch may be dropped from the gate step on only (the halves "
                "are equal from there); keep the [uncond; cond] batch before it."
            )
        gate = cross == "gate"
        mean = "mean" if self.batched else "store"
        modes = {
            SELF: (mean if gate else "store") if sa else "reuse",
            CROSS: {"compute": "compute", "gate": mean, "reuse": "reuse"}[cross],
        }
        st.host_timeline.append(_SA_CODE[sa] + _CROSS_CODE[cross])
        if len(st.host_timeline) > st.history:
            del st.host_timeline[0]
        return run_blocks(self.layout, call, streams, _EagerExecutor(self, st, modes))

    def _traced_step(self, st: TGateState, call, streams, s_idx, rep):
        sa, cross_on, at_gate = self.device_plan(s_idx)
        sa_c, cross_c = sa | rep, cross_on | rep
        store_sa, store_cross = sa & ~rep, at_gate & ~rep
        nf = float
        st.dev_counts.add_(
            torch.stack(
                [
                    torch.ones((), device=st.dev_counts.device),
                    sa_c.to(torch.float32) * nf(self.n_self),
                    (~sa_c).to(torch.float32) * nf(self.n_self),
                    cross_c.to(torch.float32) * nf(self.n_cross),
                    (~cross_c).to(torch.float32) * nf(self.n_cross),
                    torch.zeros((), device=st.dev_counts.device),
                    rep.to(torch.float32),
                ]
            )
        )
        gated = self.gated_ids
        if any(st.cache[k] is None for k in gated):
            # First traced call of this shape (a fresh state: step 0, everything computed).
            ex = _TraceExecutor(self, {SELF: True, CROSS: True}, None)
            out = run_blocks(self.layout, call, dict(streams), ex)
            for k in gated:
                f = ex.outputs[k].detach()
                st.cache[k] = (cfg_mean(f) if self.batched else f).clone(memory_format=torch.contiguous_format)
            return out
        warm_signatures(e.module for e in self.layout.entries)  # nested conds: see base.warm_signatures
        names = [n for n in self.spec.streams if streams[n] is not None]
        nn_ = len(names)
        returned = [n for n in self.spec.returns if streams.get(n) is not None and n not in self.spec.dropped_streams]
        combos = self.combos()

        def run(sa_on: bool, cross_on_: bool, operands):
            ins = dict(streams)
            ins.update(zip(names, operands[:nn_]))
            cache = dict(zip(gated, operands[nn_ : nn_ + len(gated)]))
            ex = _TraceExecutor(self, {SELF: sa_on, CROSS: cross_on_}, cache)
            outs = run_blocks(self.layout, call, ins, ex)
            new = [ex.outputs.get(k, cache[k]) for k in gated]
            return (
                *(outs[n].clone(memory_format=torch.contiguous_format) for n in returned),
                *(f.clone(memory_format=torch.contiguous_format) for f in new),
            )

        # outputs cross each cond flat (skip_cond's shapes): a compiled model keeps working
        # at a new resolution
        shapes = [streams[n].shape for n in returned] + [st.cache[k].shape for k in gated]

        def stage(cross_on_: bool):
            sas = sorted({a for a, b in combos if b == cross_on_})
            if len(sas) == 2:
                return lambda *o: skip_cond(
                    sa_c, lambda *p: run(True, cross_on_, p), lambda *p: run(False, cross_on_, p), o, shapes
                )
            return lambda *o: run(sas[0], cross_on_, o)

        operands = (*[streams[n].contiguous() for n in names], *[st.cache[k] for k in gated])
        if {b for _, b in combos} == {True, False}:
            outs = skip_cond(cross_c, stage(True), stage(False), operands, shapes)
        else:
            outs = stage(True)(*operands)
        result = dict(streams)
        result.update(zip(returned, outs[: len(returned)]))
        self_set = set(self.self_ids)
        for k, f in zip(gated, outs[len(returned) :]):
            cache = st.cache[k]
            if k in self_set:
                cand = torch.where(at_gate, cfg_mean(f), f) if self.batched else f
                cache.copy_(torch.where(store_sa, cand, cache))
            else:
                cand = cfg_mean(f) if self.batched else f
                cache.copy_(torch.where(store_cross, cand, cache))
        return result

    # -- stats --------------------------------------------------------------------------
    def state_stats(self, st: TGateState) -> dict:
        """Since the patch or the last reset, over all runs: ``steps``; per gated branch
        the (block, step) evaluations computed and reused; ``computed_fraction`` = computed
        branch evaluations (the MLP always) / all; ``fallbacks``: reuses that computed
        because nothing of the current run was cached; ``timeline``: per step the
        schedule's code (self-attention ``S`` computed / ``s`` reused, cross-attention
        ``C`` computed / ``G`` computed and cached / ``c`` reused)."""
        c = list(st.host_counts)
        if st.dev_counts is not None:
            d = st.dev_counts.detach().cpu().tolist()  # host-read-ok: stats are read off the step path
            c = [a + int(b) for a, b in zip(c, d)]
        steps = c[0]
        out = {
            "steps": steps,
            "self_attn": {"computed": c[1], "reused": c[2]},
            "cross_attn": {"computed": c[3], "reused": c[4]},
            "fallbacks": c[5],
            "repeated_calls": c[6],
            "cache_bytes": st.nbytes(),
        }
        total = steps * (self.n_self + self.n_cross + self.n_other)
        out["computed_fraction"] = (c[1] + c[3] + steps * self.n_other) / total if total else 1.0
        if st.host_timeline:
            out["timeline"] = list(st.host_timeline)
        elif st.state is not None:
            s = st.state.detach().cpu()  # host-read-ok: stats
            n = min(int(s[STEP]), st.history)
            out["timeline"] = [_SA_CODE[a] + _CROSS_CODE[b] for a, b in (self.config.plan(i) for i in range(n))]
        else:
            out["timeline"] = []
        warn = []
        if c[5]:
            warn.append(
                f"{c[5]} reused branch evaluation(s) had nothing of the current run cached (a run entered after the "
                "gate step, or the cache was invalidated) and were computed instead"
            )
        if st.aux is not None and self.num_steps:
            aux = st.aux.detach().cpu()  # host-read-ok: stats
            if int(aux[AUX_RUN_LENGTH_MISMATCHES]):
                warn.append(
                    f"num_steps={self.num_steps} but a run had {int(aux[AUX_LAST_RUN_STEPS])} steps; the gate step "
                    "is placed by step index. Set num_steps to the sampler's number of steps."
                )
            out["repeated_timestep_calls"] = int(aux[AUX_REPEATS])
        out["warnings"] = warn
        return out
