"""The branch methods on the automatic path (models no family file describes): FORA,
TaylorSeer and ScheduleConfig through the blocks' own attention and feed-forward
submodules.

No block program is needed: the blocks run their own code every step (their gates,
residuals, norms and whatever the model does between them). What is cached is the output
of each *branch module* called inside a block — its attention modules
(:func:`fastcache.families.auto.is_attention`) and its feed-forward modules (diffusers'
``FeedForward``, classes named ``*FeedForward`` and modules named ``ff``, ``ff_context``,
``mlp``, ``ffn``, ``feed_forward``, ...; :func:`is_feed_forward`), the outermost such
module of each nest (:func:`branch_modules`). diffusers' TaylorSeer hook
(``diffusers/hooks/taylorseer_cache.py``) caches the same outputs; here the state is
device tensors updated by fastcache's fused ops, the steps are announced or counted on
the device, and torch.compile sees no graph break.

Per hooked call (slot = (module, its call count within the model call: a module called
twice per step, CogView4's ``ff``, has two slots)):

* computed step: the module runs; its outputs (a tensor or a tuple of tensors) update the
  slot's history ``H[k] = D^k`` (fp32, ``(order+1, *shape)``) with
  :func:`fastcache.ops.taylor_update` (Eq. TS1, ``dx`` = steps since the slot's last
  computed step, orders not yet differenced since a run's step 0 kept at 0, as the hook);
* reused step: the module does not run; it returns :func:`fastcache.ops.taylor_forecast`
  of the history at this step's order (FORA: order 0, the last computed outputs;
  TaylorSeer: ``order``; ScheduleConfig: the plan's digit), cast to the output's dtype.

The step is decided on the host when the caller announces it (``StepInfo.index``: 0 host
reads), else on the device as :class:`~fastcache.policies.taylorseer.TaylorSeerPolicy`
does (timestep guard + :func:`fastcache.ops.cache_decision`, explicit schedules through a
device mask); eager reads that decision once per model call, at the first hooked call,
and every other hooked call of the step branches on the host bool. Under torch.compile
every hooked call is a :func:`~fastcache.tracing.skip_cond` (compute branch: the module;
reuse branch: the forecast made before the cond), the history updated after it gated by
the device store flag: no graph break, no host read.

Never silently wrong: a slot whose inputs change signature (shape, dtype, device, the
argument structure), that has nothing cached, or whose outputs are not tensors, computes
(counted in ``stats()["forced_computes"]``); a repeated call of the same step computes and
leaves the history as it was. ``ScheduleConfig`` plans holding ``"E"`` need a profile's
prior per block slot and are refused at patch time.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import ops
from ..families.auto import is_attention
from ..ops.reference import N_RUNS, STATE_HEADER, STEP
from ..tracing import skip_cond, static_floats, warm_signatures
from .base import Policy, StepInfo, is_tracing, register_policy
from .fora import FORAConfig
from .schedule import ScheduleConfig
from .steps import AUX_SIZE, timestep_guard
from .taylorseer import TaylorSeerConfig

#: names (last attribute) of feed-forward submodules in diffusers' transformer blocks
FF_NAMES = frozenset(
    {
        "ff",
        "ff_context",
        "ff_i",
        "ff_t",
        "txt_ff",
        "audio_ff",
        "mlp",
        "img_mlp",
        "txt_mlp",
        "ffn",
        "feed_forward",
    }
)


def is_feed_forward(name: str, m: nn.Module) -> bool:
    """diffusers' ``FeedForward``, any class named ``*FeedForward`` and any module whose
    attribute name is one of :data:`FF_NAMES`."""
    from diffusers.models.attention import FeedForward

    return isinstance(m, FeedForward) or type(m).__name__.endswith("FeedForward") or name.rsplit(".", 1)[-1] in FF_NAMES


def branch_modules(model: nn.Module, segments) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every branch module of the blocks of ``segments``
    (block list attribute paths), block by block: the attention and feed-forward modules
    of each block, the outermost of each nest, each module once."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for path in segments:
        for i, blk in enumerate(model.get_submodule(path)):
            taken: list[str] = []
            for name, m in blk.named_modules():
                if not name or any(name.startswith(p + ".") for p in taken):
                    continue
                if is_attention(m) or is_feed_forward(name, m):
                    taken.append(name)
                    if id(m) not in seen:
                        seen.add(id(m))
                        out.append((f"{path}.{i}.{name}", m))
    return out


def _signature(leaves) -> tuple:
    """What a cached output depends on besides the weights and the step: the shapes,
    dtypes and devices of the call's tensors and its other (host) values."""
    sig = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            sig.append((tuple(v.shape), v.dtype, v.device))
        elif v is None or isinstance(v, (bool, int, float, str)):
            sig.append(v)
        else:
            sig.append(type(v).__name__)
    return tuple(sig)


class _Slot:
    """One hooked call position: its input signature, output structure and history."""

    def __init__(self, sig, out_spec, outs: list, m: int, dev):
        self.sig = sig
        self.out_spec = out_spec  # pytree spec of the outputs
        self.shapes = [None if o is None else tuple(o.shape) for o in outs]
        self.dtypes = [None if o is None else o.dtype for o in outs]
        self.hist = [
            None if o is None else torch.zeros((m + 1, *o.shape), dtype=torch.float32, device=dev) for o in outs
        ]
        self.valid = torch.zeros(1, dtype=torch.float32, device=dev)  # orders the history holds
        self.last = torch.zeros(1, dtype=torch.float32, device=dev)  # step of the last stored outputs
        self.stored = 0  # computed steps stored since the slot was made (eager only, capped)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hist if h is not None)


class AutoBranchState:
    """Per cache context: the device decision state, the slots and the counters."""

    def __init__(self, history: int):
        self.history = history
        self.state: torch.Tensor | None = None  # device decision state (ops layout)
        self.aux: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.coeffs: torch.Tensor | None = None
        self.flags: torch.Tensor | None = None  # (history,) fp32: explicit schedules' device timeline
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.calls: list[int] = []
        self.step: StepInfo | None = None
        self.timestep: torch.Tensor | None = None
        self.pending = False
        # the step being run: host values (eager) and device values (both)
        self.compute = True
        self.store = True
        self.order = 0
        self.host_s: int | None = None  # the announced step of the previous call (host schedule)
        self.s_dev: torch.Tensor | None = None  # (1,) fp32 step index
        self.first: torch.Tensor | None = None  # (1,) bool: step 0 of a run
        self.compute_t: torch.Tensor | None = None  # 0-dim bool (traced)
        self.store_t: torch.Tensor | None = None  # 0-dim bool
        self.order_t: torch.Tensor | None = None  # (1,) long (traced, ScheduleConfig)
        self.counts: torch.Tensor | None = None  # traced: computed steps, reused steps
        self.host = {"computed": 0, "skipped": 0, "calls_computed": 0, "calls_reused": 0, "host_steps": 0}
        self.forced = {"new_inputs": 0, "short_history": 0, "not_tensors": 0}
        self.timeline: list[bool] = []

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.slots.values())


class AutoBranchPolicy(Policy):
    """The branch methods on the automatic path; see the module docstring. One class,
    three configs (:class:`AutoFORAPolicy`, :class:`AutoTaylorSeerPolicy`,
    :class:`AutoSchedulePolicy`) differing in their schedule and orders."""

    granularity = "block"
    raw_block_calls = True
    decides_from_data = False  # static schedules: identical on every rank of a process group

    def __init__(self, config, spec, model):
        super().__init__(config, spec, model)
        self.branches = branch_modules(model, spec.segments)
        if not self.branches:
            name = type(model).__name__
            raise TypeError(
                f"fastcache: {type(config).__name__} caches the attention and feed-forward modules inside the "
                f"blocks of {name}, and its blocks ({', '.join(spec.segments)}) hold none fastcache recognises "
                "(diffusers Attention / AttentionModuleMixin / *Attention, FeedForward / *FeedForward). Register a "
                f"fastcache.ModelSpec for {name} (fastcache/families/ holds examples)."
            )
        self.K = len(self.branches)
        self.m = self.history_order()
        self.num_steps = getattr(config, "num_steps", None) or 0
        self._mask: dict[torch.device, torch.Tensor] = {}
        self._true: dict[torch.device, torch.Tensor] = {}

    # -- what a config says -------------------------------------------------------------
    def history_order(self) -> int:
        raise NotImplementedError

    def host_computes(self, s: int, step: StepInfo) -> bool:
        raise NotImplementedError

    def order_at(self, s: int) -> int:
        """The forecast order of a reused step ``s`` (host)."""
        return self.m

    def explicit_mask(self) -> list[bool] | None:
        """Explicit schedules: compute flags per step (the device mask), else None."""
        return None

    def mask_tail(self) -> bool:
        """Explicit schedules: what steps past the mask do (True = compute)."""
        return False

    def device_orders(self, dev) -> torch.Tensor | None:
        """Per-step forecast orders on the device (None: :attr:`m` at every step)."""
        return None

    # -- the runtime's interface ----------------------------------------------------------
    def submodules(self) -> list[nn.Module]:
        return [m for _, m in self.branches]

    def block_call(self, state, index, forward, args, kwargs, timestep):
        return forward(*args, **kwargs)  # the block runs as written; its branch modules are hooked

    def new_state(self) -> AutoBranchState:
        return AutoBranchState(getattr(self.config, "history", 1024))

    def reset_state(self, st: AutoBranchState) -> None:
        st.slots = {}
        st.state = None
        st.host_s = None
        st.timeline = []
        st.host = {k: 0 for k in st.host}
        st.forced = {k: 0 for k in st.forced}
        if st.counts is not None:
            st.counts.zero_()

    def invalidate(self, st: AutoBranchState) -> None:
        # computed with other weights or around an uncached call: nothing cached is reused
        # (every slot is made afresh by its next call, which computes); statistics kept
        st.slots = {}
        st.host_s = None

    def set_num_steps(self, num_steps: int | None) -> None:
        super().set_num_steps(num_steps)
        self._mask.clear()

    def begin_step(self, st: AutoBranchState, timestep, step: StepInfo) -> None:
        st.step = step
        st.timestep = timestep
        st.pending = True
        st.calls = [0] * self.K

    # -- per step -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return torch.device("cpu") if p is None else p.device

    def _true_flag(self, dev) -> torch.Tensor:
        t = self._true.get(dev)
        if t is None:
            t = self._true[dev] = torch.ones((), dtype=torch.bool, device=dev)
        return t

    def _ensure(self, st: AutoBranchState, dev) -> None:
        if st.s_dev is None or st.s_dev.device != dev:
            st.s_dev = torch.zeros(1, dtype=torch.float32, device=dev)
            st.first = torch.zeros(1, dtype=torch.bool, device=dev)
            st.counts = torch.zeros(2, dtype=torch.float32, device=dev)
            st.state = None
        if st.state is None or st.state.device != dev:
            st.state = ops.new_state(st.history, device=dev)
            st.aux = torch.zeros(AUX_SIZE, dtype=torch.float32, device=dev)
            st.coeffs = torch.zeros(0, dtype=torch.float32, device=dev)
            st.sums = torch.tensor(((0.0, 1.0),), dtype=torch.float32, device=dev)  # ratio 0: the schedule decides
            st.flags = torch.zeros(st.history, dtype=torch.float32, device=dev)

    def _device_mask(self, dev) -> torch.Tensor:
        m = self._mask.get(dev)
        if m is None:
            flags = self.explicit_mask()
            m = self._mask[dev] = torch.tensor([*flags, self.mask_tail()], dtype=torch.bool, device=dev)
        return m

    def device_decision(self, st: AutoBranchState, t_op, hold) -> torch.Tensor:
        """0-dim bool, True = compute (updates the decision state unless ``hold``)."""
        flags = self.explicit_mask()
        if flags is None:
            n = self.config.interval
            thr = 0.0 if n == 1 else math.inf
            return ops.cache_decision(
                st.sums, t_op, st.coeffs, st.state, thr, self.config.warmup_steps, n - 1, self.last_forced(), hold=hold
            )
        # explicit steps: the decision op only counts steps; the flag is the mask's
        ops.cache_decision(st.sums, t_op, st.coeffs, st.state, 0.0, 1, 0, 0, hold=hold)
        mask = self._device_mask(t_op.device)
        s_raw = (st.state[STEP : STEP + 1] - 1).clamp(min=0).to(torch.long)
        flag = mask.index_select(0, s_raw.clamp(max=mask.numel() - 1))[0]
        i = s_raw.clamp(max=st.history - 1)
        st.flags.index_copy_(0, i, torch.where(hold, st.flags.index_select(0, i), flag.to(torch.float32)))
        return flag | hold

    def last_forced(self) -> int:
        """``num_steps`` for the decision op's forced last step (0: none)."""
        return 0

    def _begin(self, st: AutoBranchState) -> None:
        """The step's decision, at the first hooked call of a model call."""
        st.pending = False
        dev = self._device()
        self._ensure(st, dev)
        step = st.step
        if not is_tracing() and step is not None and step.index is not None:
            s = step.index
            compute = self.host_computes(s, step)
            repeat = st.host_s == s  # the same announced step again (a corrector call)
            st.compute, st.store, st.order = compute, compute and not repeat, self.order_at(s)
            st.host_s = s
            st.s_dev.fill_(float(s))  # host -> device writes, never read back
            st.first.fill_(s == 0)
            st.host["host_steps"] += 1
            st.host["computed" if compute else "skipped"] += 1
            st.timeline.append(compute)
            return
        st.host_s = None
        t = st.timestep.to(dev, non_blocking=True)
        t_op, rep = timestep_guard(st.state, st.aux, t, self.num_steps)
        flag = self.device_decision(st, t_op, rep)
        s_idx = (st.state[STEP : STEP + 1] - 1).clamp(min=0)
        st.s_dev.copy_(s_idx)
        st.first.copy_(s_idx == 0)
        store = flag & ~rep
        compute = flag | rep
        orders = self.device_orders(dev)
        if is_tracing():
            st.compute_t, st.store_t = compute, store
            st.order_t = (
                None if orders is None else orders.index_select(0, s_idx.to(torch.long).clamp(max=orders.numel() - 1))
            )
            cf = compute.to(torch.float32)
            st.counts.add_(torch.stack([cf, 1.0 - cf]))
            return
        code = compute.to(torch.int64) + 2 * store.to(torch.int64)
        if orders is not None:
            code = code + 4 * orders.index_select(0, s_idx.to(torch.long).clamp(max=orders.numel() - 1))[0]
        code = int(code.item())  # host-read-ok: the one eager read per step (compute, store, order)
        st.compute, st.store = bool(code & 1), bool(code & 2)
        st.order = code >> 2 if orders is not None else self.m
        st.host["computed" if st.compute else "skipped"] += 1

    # -- a hooked call --------------------------------------------------------------------
    def sub_call(self, st: AutoBranchState, k: int, forward, args, kwargs, timestep):
        if is_tracing():
            return self._traced_call(st, k, forward, args, kwargs)
        if st.pending:
            self._begin(st)
        n = st.calls[k]
        st.calls[k] = n + 1
        slot = st.slots.get((k, n))
        leaves = pytree.tree_leaves((args, kwargs))
        sig = _signature(leaves)
        fresh = slot is None or slot.sig != sig
        compute = st.compute or fresh
        short = not compute and slot.stored < min(st.order + 1, self.needed(st))
        if short:
            compute = True  # the history holds fewer computed steps than the planned order needs
            st.forced["short_history"] += 1
        if not compute:
            st.host["calls_reused"] += 1
            dx = st.s_dev - slot.last
            outs = [
                None if h is None else ops.taylor_forecast(h[: st.order + 1], dx).to(dt)
                for h, dt in zip(slot.hist, slot.dtypes)
            ]
            return pytree.tree_unflatten(outs, slot.out_spec)
        st.host["calls_computed"] += 1
        out = forward(*args, **kwargs)
        if fresh:
            if not st.compute:
                st.forced["new_inputs"] += 1
            slot = self._new_slot(st, k, n, sig, out)
            if slot is None:
                return out
        if not (st.store or fresh or short):
            return out
        self._update(st, slot, pytree.tree_leaves(out), self._true_flag(st.s_dev.device), fresh)
        slot.stored = 1 if fresh or st.host_s == 0 else min(slot.stored + 1, self.m + 1)
        return out

    def needed(self, st: AutoBranchState) -> int:
        """Computed steps a reused step's forecast needs at least (ScheduleConfig: the plan's
        computed steps so far); others forecast from what the history holds."""
        return 0

    def _new_slot(self, st: AutoBranchState, k: int, n: int, sig, out) -> _Slot | None:
        outs, spec = pytree.tree_flatten(out)
        if not outs or not all(o is None or isinstance(o, torch.Tensor) for o in outs):
            st.forced["not_tensors"] += 1  # always computed: nothing to forecast
            st.slots.pop((k, n), None)
            return None
        slot = _Slot(sig, spec, outs, self.m, st.s_dev.device)
        st.slots[(k, n)] = slot
        return slot

    def _update(self, st: AutoBranchState, slot: _Slot, outs, store: torch.Tensor, fresh: bool) -> None:
        """Eq. TS1 on every output of ``slot``, gated by the 0-dim bool ``store``."""
        dx = st.s_dev - slot.last
        first = st.first
        if fresh:
            first = torch.ones_like(first)
        valid = torch.where(first, torch.zeros_like(slot.valid), slot.valid)
        for h, f in zip(slot.hist, outs):
            if h is not None:
                ops.taylor_update(h, f.detach().to(torch.float32).contiguous(), dx, valid, store)
        slot.valid.copy_(torch.where(store, (valid + 1.0).clamp(max=float(self.m + 1)), slot.valid))
        slot.last.copy_(torch.where(store, st.s_dev, slot.last))

    @static_floats
    def _traced_call(self, st: AutoBranchState, k: int, forward, args, kwargs):
        if st.pending:
            warm_signatures(self.submodules())
            self._begin(st)
        n = st.calls[k]
        st.calls[k] = n + 1
        slot = st.slots.get((k, n))
        leaves, in_spec = pytree.tree_flatten((args, kwargs))
        sig = _signature(leaves)
        if slot is None or slot.sig != sig:
            # nothing cached for these inputs (the first traced call of this shape): compute,
            # and the history starts here
            out = forward(*args, **kwargs)
            slot = self._new_slot(st, k, n, sig, out)
            if slot is not None:
                self._update(st, slot, pytree.tree_leaves(out), self._true_flag(st.s_dev.device), True)
            return out
        dx = st.s_dev - slot.last
        forecast = [h for h in slot.hist if h is not None]
        forecast = [self._forecast_traced(st, h, dx) for h in forecast]
        tpos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        nt = len(tpos)
        live = [i for i, h in enumerate(slot.hist) if h is not None]
        dtypes = [slot.dtypes[i] for i in live]

        def compute_fn(*o):
            vals = list(leaves)
            for i, v in zip(tpos, o[:nt]):
                vals[i] = v
            a, kw = pytree.tree_unflatten(vals, in_spec)
            res = pytree.tree_leaves(forward(*a, **kw))
            return tuple(res[i].clone(memory_format=torch.contiguous_format) for i in live)

        def reuse_fn(*o):
            return tuple(f.to(dt).clone(memory_format=torch.contiguous_format) for f, dt in zip(o[nt:], dtypes))

        operands = (*[leaves[i] for i in tpos], *forecast)
        shapes = [slot.shapes[i] for i in live]
        res = skip_cond(st.compute_t, compute_fn, reuse_fn, operands, shapes)
        outs = [None] * len(slot.hist)
        for i, r in zip(live, res):
            outs[i] = r
        self._update(st, slot, outs, st.store_t, False)
        return pytree.tree_unflatten(outs, slot.out_spec)

    def _forecast_traced(self, st: AutoBranchState, h: torch.Tensor, dx) -> torch.Tensor:
        if st.order_t is None:
            return ops.taylor_forecast(h, dx)
        used = self.orders_used()
        f = ops.taylor_forecast(h[: used[-1] + 1], dx)
        for o in used[:-1]:
            f = torch.where(st.order_t == o, ops.taylor_forecast(h[: o + 1], dx), f)
        return f

    def orders_used(self) -> list[int]:
        return [self.m]

    # -- stats ----------------------------------------------------------------------------
    def state_stats(self, st: AutoBranchState) -> dict:
        h = st.host
        out = {
            "steps": 0,
            "computed": h["computed"],
            "skipped": h["skipped"],
            "calls_computed": h["calls_computed"],
            "calls_reused": h["calls_reused"],
            "branch_modules": [name for name, _ in self.branches],
            "slots": len(st.slots),
            "timeline": list(st.timeline),
            "cache_bytes": st.nbytes(),
            "warnings": [],
        }
        if st.counts is not None:
            c = st.counts.detach().cpu()  # host-read-ok: stats are read off the step path
            out["computed"] += int(c[0])
            out["skipped"] += int(c[1])
        out["steps"] = out["computed"] + out["skipped"]
        if not h["host_steps"] and st.state is not None:
            s = st.state.detach().cpu()  # host-read-ok: stats
            H = st.history
            n = min(int(s[STEP]), H)
            if self.explicit_mask() is not None:
                f = st.flags.detach().cpu()  # host-read-ok: stats
                out["timeline"] = [bool(v) for v in f[:n]]
            else:
                out["timeline"] = [bool(f) for f in s[STATE_HEADER + 2 * H : STATE_HEADER + 2 * H + n]]
            out["runs"] = int(s[N_RUNS])
        if any(st.forced.values()):
            out["forced_computes"] = dict(st.forced)
            out["forced_computes_note"] = (
                "reused calls computed instead: 'new_inputs' = the call's inputs changed shape, dtype, device or "
                "structure (or nothing was cached for it), 'short_history' = fewer computed steps than the planned "
                "order needs, 'not_tensors' = the module returns something other than tensors (never cached)"
            )
        return out


@register_policy(FORAConfig, auto=True)
class AutoFORAPolicy(AutoBranchPolicy):
    """FORA on the automatic path: the branch modules' last computed outputs reused."""

    def history_order(self) -> int:
        return 0

    def host_computes(self, s, step) -> bool:
        return self.config.computes(s)


@register_policy(TaylorSeerConfig, auto=True)
class AutoTaylorSeerPolicy(AutoBranchPolicy):
    """TaylorSeer on the automatic path: the branch modules' outputs forecast."""

    def history_order(self) -> int:
        return self.config.order

    def host_computes(self, s, step) -> bool:
        return self.config.computes(s, step.num_steps or self.num_steps or None)

    def last_forced(self) -> int:
        return self.num_steps

    def explicit_mask(self):
        cs = self.config.compute_steps
        if cs is None:
            return None
        n = max(self.config.history, cs[-1] + 1, self.num_steps or 0)
        return [self.config.computes(s, self.num_steps or None) for s in range(n)]


@register_policy(ScheduleConfig, auto=True)
class AutoSchedulePolicy(AutoBranchPolicy):
    """ScheduleConfig on the automatic path: the plan's codes ``C`` and ``0``-``4``."""

    def __init__(self, config: ScheduleConfig, spec, model):
        if "E" in config.plan:
            name = type(model).__name__
            raise ValueError(
                f"fastcache: ScheduleConfig plan {config.plan!r} holds 'E' (EOC-corrected reuse), which needs the "
                f"profile's prior per block program slot; {name} runs on the automatic path, which has no block "
                "program. Use a plan of 'C' and digits 0-4 only, or register a fastcache.ModelSpec for "
                f"{name} (fastcache/families/ holds examples)."
            )
        super().__init__(config, spec, model)
        S = config.num_steps
        self._orders_used = sorted({config.order_at(s) for s in range(S) if not config.computes(s)}) or [0]
        self._computed_before = [config.plan[:s].count("C") for s in range(S + 1)]
        self._orders: dict[torch.device, torch.Tensor] = {}

    def history_order(self) -> int:
        return self.config.order

    def _check_steps(self, n: int | None) -> None:
        if n and n != self.config.num_steps:
            raise ValueError(
                f"fastcache: the schedule plans {self.config.num_steps} steps but the run has {n}; search a "
                f"schedule for {n} steps (fastcache.search_schedule) or sample with {self.config.num_steps} steps"
            )

    def set_num_steps(self, num_steps: int | None) -> None:
        self._check_steps(num_steps)
        super().set_num_steps(num_steps or self.config.num_steps)

    def begin_step(self, st, timestep, step: StepInfo) -> None:
        self._check_steps(step.run_steps or step.num_steps)
        super().begin_step(st, timestep, step)

    def host_computes(self, s, step) -> bool:
        return self.config.computes(s)

    def order_at(self, s: int) -> int:
        return self.config.order_at(s)

    def needed(self, st) -> int:
        s = st.host_s
        if s is None or s >= len(self._computed_before):
            return 0
        return self._computed_before[s]

    def explicit_mask(self):
        return [self.config.computes(s) for s in range(self.config.num_steps)]

    def mask_tail(self) -> bool:
        return True  # past the plan's end: computed

    def device_orders(self, dev) -> torch.Tensor:
        o = self._orders.get(dev)
        if o is None:
            rows = [self.config.order_at(s) for s in range(self.config.num_steps)]
            o = self._orders[dev] = torch.tensor([*rows, 0], dtype=torch.long, device=dev)
        return o

    def orders_used(self) -> list[int]:
        return self._orders_used
