"""First-Block Cache on the automatic path (models no family file describes).

The model's own loop calls its blocks; every block call reaches :meth:`AutoFirstBlockPolicy.block_call`
as the model made it (``granularity = "block"``, ``raw_block_calls``). What the curated policy
(:mod:`fastcache.policies.first_block`) reads from a family file is learnt here from the calls:

* **The probe** (the first step of each input signature, computed in full): the block call
  order, and per call which output slot returns which input stream (diffusers'
  ``TransformerBlockRegistry`` metadata where the block class is registered there, else the
  one input of the output's shape and dtype, names breaking ties). Two consecutive calls are
  *chained* when every stream the second reads is an output of the first (the same tensor),
  or a verified concatenation of the first's outputs (Flux.2 / AuraFlow join text and image
  before their single-stream blocks: the join is checked value for value on the probe), and
  every output of the first is read by the second. The cached run is the longest chain
  (refiner lists called before the main stack, whose outputs are not all passed on as they
  are, end up outside it and keep computing). A model that changes the hidden states between
  two blocks (adds a control hint, reshapes a stream) breaks the chain there, so nothing
  crosses that code from the cache.
* **Every later step**: the first ``fn`` calls of the run compute; the last of them decides
  with the curated policy's device ops (relative L1 change of the first blocks' residual on
  the hidden-state stream, threshold, warm-up, max skips). Skipped: the decision block returns
  its outputs plus the cached residual per stream, the blocks after it up to the tail (the
  run's last block but ``bn``) return their inputs in their output layout, as diffusers'
  ``apply_first_block_cache`` does. Computed: the residual ``tail output - head output`` per
  stream (per head stream's slice of a joined tail stream) is stored on the device.

Eager: one host read per step (the flag at the head); the later blocks follow a host bool.
Under torch.compile the head's return and every cached block call is a cond with functional
branches (:func:`fastcache.tracing.skip_cond`); the probe needs one eager call per input
signature first.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque

import torch
from torch.utils import _pytree as pytree

from .. import ops
from ..tracing import skip_cond, static_floats, warm_signatures
from .base import Policy, is_tracing, register_policy
from .first_block import FirstBlockCacheConfig, first_block_decision
from .stack_engine import DecisionState

#: argument names of a block's main (hidden-state) stream, in the order preferred
MAIN_STREAM_NAMES = ("hidden_states", "x", "hidden", "visual_embed", "sample", "img", "hidden_state")


def _registry_metadata(block_cls):
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        return TransformerBlockRegistry.get(block_cls)
    except Exception:  # not installed, or the class is not registered: match by shape and name
        return None


def _param_names(forward) -> list[str]:
    try:
        return [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return []


def _get(args, kwargs, loc):
    kind, key = loc
    if kind == "a":
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def _outputs(out) -> tuple[list, bool]:
    if isinstance(out, (tuple, list)):
        return list(out), True
    return [out], False


@dataclasses.dataclass
class _CallInfo:
    """What the probe learnt of one block call."""

    index: tuple[int, int]
    is_tuple: bool
    slots: list  # per output slot: the input locator it returns, or None (a None output)
    names: list  # per output slot: the input's argument name (or None)
    shapes: list  # per output slot: its shape (None for a None output)
    link: list | None = None  # per slot vs the previous call: ("id", j) | ("join", [(j, size)], dim) | None
    why: str = ""  # why the call is not chained to the previous one
    main: int | None = None  # the slot of the main (hidden-state) stream


@dataclasses.dataclass
class _Plan:
    """A learnt step: the call order, where the run decides and ends, each cached call's
    stream layout and how each head stream maps onto the tail's outputs."""

    calls: list  # _CallInfo per call of the step
    decide: int  # position of the decision call (the fn-th call of the run)
    first: int  # position of the run's first call
    tail: int  # position of the last cached call
    c0: int  # decision call's output slot of the indicator stream
    c0_in: tuple  # locator of that stream's input at the run's first call
    residual: dict  # head slot k -> (tail slot j, dim, offset, size)
    joined: bool  # a concatenation of streams is crossed inside the cached range
    note: str = ""
    position: dict = dataclasses.field(default_factory=dict)  # block index -> position in the step


class AutoFirstBlockState(DecisionState):
    """One cache context: the curated policy's device state plus the host position in the
    step (which block call comes next), the step's host decision and the probe's record."""

    def __init__(self, history: int):
        super().__init__(history)
        self.pos = 0
        self.plan: _Plan | None = None
        self.mode = "idle"  # "plan" | "probe" | "compute" (the whole step computes)
        self.skipping = False
        self.flag = None
        self.store = None
        self.head_out: list | None = None
        self.probe = None
        self.sig = None
        self.t = None
        self.first_in = None
        self.replans = 0


class _Run:
    """A chain of calls seen by the probe, holding only the tensors the step-0 stores need."""

    def __init__(self, pos: int, fn: int, bn: int):
        self.start = pos
        self.length = 0
        self.first_io: list = []  # (args, kwargs, outs) of the first fn calls
        self.last_outs: deque = deque(maxlen=bn + 1)
        self.fn = fn

    def add(self, args, kwargs, outs):
        if self.length < self.fn:
            self.first_io.append((args, kwargs, outs))
        self.last_outs.append(outs)
        self.length += 1


class _Probe:
    def __init__(self, timestep):
        self.calls: list[_CallInfo] = []
        self.prev_outs: list | None = None
        self.run: _Run | None = None
        self.best: _Run | None = None
        self.t = timestep


@register_policy(FirstBlockCacheConfig, auto=True)
class AutoFirstBlockPolicy(Policy):
    """First-Block Cache through the model's own block calls (see the module docstring)."""

    granularity = "block"
    raw_block_calls = True
    decides_from_data = True

    def __init__(self, config: FirstBlockCacheConfig, spec, model):
        super().__init__(config, spec, model)
        self.segments = spec.blocks(model)
        self.names = list(spec.segments)
        self.plans: dict = {}
        self.num_steps = config.num_steps or 0
        self._param_names: dict = {}

    # -- state ----------------------------------------------------------------------------
    def new_state(self) -> AutoFirstBlockState:
        return AutoFirstBlockState(self.config.history)

    def reset_state(self, st: AutoFirstBlockState) -> None:
        st.reset()

    def invalidate(self, st: AutoFirstBlockState) -> None:
        if st.prev is not None:
            st.prev.zero_()  # no valid ratio next step: it computes and stores afresh

    def begin_step(self, st: AutoFirstBlockState, timestep, step) -> None:
        st.num_steps = step.num_steps or 0
        st.pos = 0
        st.mode = "idle"
        st.skipping = False
        st.flag = st.store = st.head_out = st.first_in = None
        st.t = timestep

    def end_step(self, st: AutoFirstBlockState) -> None:
        if st.mode == "probe":
            probe, st.probe = st.probe, None
            st.mode = "idle"
            self._finish_probe(st, probe)

    def _block_name(self, index) -> str:
        seg, blk = index
        return f"{self.names[seg]}.{blk}"

    def _names_of(self, forward, index) -> list[str]:
        cls = type(self.segments[index[0]][index[1]])
        if cls not in self._param_names:
            self._param_names[cls] = _param_names(forward)
        return self._param_names[cls]

    # -- the step -------------------------------------------------------------------------
    def block_call(self, st: AutoFirstBlockState, index, forward, args, kwargs, timestep):
        # The position in the step. A planned step places each block by its index: a host
        # counter mutated across calls does not survive dynamo's speculation of the cond
        # branches; eager calls also check the counter (the model's call order is the plan's).
        counted = st.pos
        st.pos = counted + 1
        if st.mode == "idle":
            leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            st.sig = (index, tuple((tuple(t.shape), t.dtype, t.device) for t in leaves))
            plan = self.plans.get(st.sig)
            if plan is None:
                if is_tracing():
                    raise RuntimeError(
                        f"fastcache: FirstBlockCacheConfig on the automatic path learns {type(self.model).__name__}'s "
                        "block calls from one eager call per input shape, and this shape has none: call the patched "
                        "model once eagerly with these inputs before compiling it"
                    )
                st.mode, st.probe = "probe", _Probe(timestep)
            else:
                st.mode, st.plan = "plan", plan
        if st.mode == "probe":
            out = forward(*args, **kwargs)
            self._probe_call(st.probe, index, forward, args, kwargs, out)
            return out
        if st.mode != "plan":
            return forward(*args, **kwargs)
        plan = st.plan
        pos = plan.position.get(index, -1)
        if pos < 0 or (not is_tracing() and pos != counted):
            return self._off_plan(st, pos, index, forward, args, kwargs)
        if pos < plan.first or pos > plan.tail:
            return forward(*args, **kwargs)
        if pos < plan.decide:
            if pos == plan.first:
                st.first_in = _get(args, kwargs, plan.c0_in)
            return forward(*args, **kwargs)
        if pos == plan.decide:
            return self._head(st, plan, forward, args, kwargs, timestep)
        return self._cached(st, plan, pos, forward, args, kwargs)

    def _off_plan(self, st, pos, index, forward, args, kwargs):
        if st.skipping or is_tracing():
            raise RuntimeError(
                f"fastcache: {type(self.model).__name__} called block {self._block_name(index)} at a place its first "
                f"call (the plan learnt for these input shapes) did not, inside a skipped step. The model's block "
                "order depends on something other than the input shapes; "
                "FirstBlockCacheConfig cannot cache it automatically: register a fastcache.ModelSpec for it."
            )
        # computed so far: compute the rest, and learn the step again next time
        self.plans.pop(st.sig, None)
        st.mode = "compute"
        st.replans += 1
        return forward(*args, **kwargs)

    @static_floats
    def _head(self, st: AutoFirstBlockState, plan: _Plan, forward, args, kwargs, timestep):
        out = forward(*args, **kwargs)
        outs, _ = _outputs(out)
        x_in = st.first_in if plan.first < plan.decide else _get(args, kwargs, plan.c0_in)
        if [None if o is None else tuple(o.shape) for o in outs] != plan.calls[plan.decide].shapes:
            if is_tracing():
                raise RuntimeError("fastcache: the decision block's outputs changed shape under torch.compile")
            self.plans.pop(st.sig, None)
            st.mode, st.replans = "compute", st.replans + 1
            return out
        h = outs[plan.c0]
        q = h - x_in
        st.ensure({str(k): outs[k] for k in plan.residual}, indicator=q)
        if timestep.device != h.device:
            timestep = timestep.to(h.device, non_blocking=True)
        flag, store, rep = first_block_decision(self, st, q, timestep, h, x_in)
        st.flag, st.store = flag, store
        keys = list(plan.residual)
        if is_tracing():
            warm_signatures(
                [self.segments[i][j] for i, j in (c.index for c in plan.calls[plan.decide : plan.tail + 1])]
            )
            present = [k for k, o in enumerate(outs) if o is not None]

            def compute(*xs):
                return tuple(x.clone(memory_format=torch.contiguous_format) for x in xs[: len(present)])

            def skip(*xs):
                res = dict(zip(keys, xs[len(present) :]))
                return tuple(
                    ops.apply_residual(x, res[k]) if k in res else x.clone(memory_format=torch.contiguous_format)
                    for k, x in zip(present, xs)
                )

            operands = [outs[k] for k in present] + [st.residuals[str(k)] for k in keys]
            # the tail's residual store reads the computed head outputs (what the compute branch
            # returns), kept before the cond: dynamo drops Python state written after it
            st.head_out = outs
            new = skip_cond(flag, compute, skip, operands, [outs[k].shape for k in present])
            outs = list(outs)
            for k, v in zip(present, new):
                outs[k] = v
            return self._pack(plan.calls[plan.decide], outs)
        st.skipping = not flag.item()  # host-read-ok: the single eager decision read per step
        if st.skipping:
            outs = list(outs)
            for k in keys:
                r = st.residuals[str(k)]
                outs[k] = ops.apply_residual(outs[k], r, out=st.output_buffer(str(k), r))
            return self._pack(plan.calls[plan.decide], outs)
        st.head_out = outs
        return out

    def _pack(self, info: _CallInfo, outs: list):
        return tuple(outs) if info.is_tuple else outs[0]

    def _passthrough(self, info: _CallInfo, args, kwargs) -> list:
        outs = []
        for loc in info.slots:
            if loc is None:
                outs.append(None)
                continue
            v = _get(args, kwargs, loc)
            if not isinstance(v, torch.Tensor):
                raise RuntimeError(
                    f"fastcache: block {self._block_name(info.index)} was called without its stream argument "
                    f"{loc[1]!r} where its first call passed it; FirstBlockCacheConfig cannot skip it (register a "
                    "fastcache.ModelSpec)"
                )
            outs.append(v)
        return outs

    @static_floats
    def _cached(self, st: AutoFirstBlockState, plan: _Plan, pos, forward, args, kwargs):
        info = plan.calls[pos]
        if is_tracing():
            ins = self._passthrough(info, args, kwargs)
            present = [k for k, o in enumerate(ins) if o is not None]
            leaves, spec = pytree.tree_flatten((args, kwargs))
            tpos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

            def compute(*xs):
                lv = list(leaves)
                for i, x in zip(tpos, xs):
                    lv[i] = x
                a, kw = pytree.tree_unflatten(lv, spec)
                o, _ = _outputs(forward(*a, **kw))
                return tuple(o[k].clone(memory_format=torch.contiguous_format) for k in present)

            tensor_ids = {id(leaves[i]): n for n, i in enumerate(tpos)}
            idx = [tensor_ids[id(ins[k])] for k in present]

            def skip(*xs):
                return tuple(xs[i].clone(memory_format=torch.contiguous_format) for i in idx)

            new = skip_cond(st.flag, compute, skip, [leaves[i] for i in tpos], [ins[k].shape for k in present])
            outs = [None] * len(info.slots)
            for k, v in zip(present, new):
                outs[k] = v
        elif st.skipping:
            return self._pack(info, self._passthrough(info, args, kwargs))
        else:
            outs, _ = _outputs(forward(*args, **kwargs))
        if pos == plan.tail:
            for k, (j, dim, off, size) in plan.residual.items():
                t = outs[j] if dim is None else outs[j].narrow(dim, off, size)
                ops.store_residual(t, st.head_out[k], st.store, st.residuals[str(k)])
            st.head_out = None
        return self._pack(info, outs)

    # -- the probe ------------------------------------------------------------------------
    def _probe_call(self, probe: _Probe, index, forward, args, kwargs, out) -> None:
        outs, is_tuple = _outputs(out)
        names = self._names_of(forward, index)
        inputs = []  # (locator, name, tensor)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                inputs.append((("a", i), names[i] if i < len(names) else None, a))
        for k, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                inputs.append((("k", k), k, a))
        info = _CallInfo(index, is_tuple, [], [], [])
        prev = probe.prev_outs
        meta = _registry_metadata(type(self.segments[index[0]][index[1]]))
        by_meta = {}
        if meta is not None:
            if is_tuple:
                pairs = [
                    (meta.return_hidden_states_index, meta.hidden_states_argument_name),
                    (meta.return_encoder_hidden_states_index, meta.encoder_hidden_states_argument_name),
                ]
            else:
                pairs = [(0, meta.hidden_states_argument_name)]
            for slot, name in pairs:
                if slot is not None and slot < len(outs):
                    by_meta[slot] = name
        used = set()
        problem = ""
        for k, o in enumerate(outs):
            if o is None:
                info.slots.append(None)
                info.names.append(None)
                info.shapes.append(None)
                continue
            if not isinstance(o, torch.Tensor):
                problem = problem or f"output {k} is a {type(o).__name__}, not a tensor"
                info.slots.append(None)
                info.names.append(None)
                info.shapes.append(None)
                continue
            cands = [
                (loc, n, t) for loc, n, t in inputs if t.shape == o.shape and t.dtype == o.dtype and loc not in used
            ]
            pick = None
            if k in by_meta:
                pick = next((c for c in cands if c[1] == by_meta[k]), None)
            if pick is None and len(cands) > 1 and prev is not None:
                chained = [c for c in cands if any(c[2] is p for p in prev if p is not None)]
                if len(chained) == 1:
                    pick = chained[0]
            if pick is None and len(cands) > 1:
                named = [c for c in cands if c[1] in MAIN_STREAM_NAMES or c[1] in ("encoder_hidden_states",)]
                if len(named) == 1:
                    pick = named[0]
            if pick is None and len(cands) == 1:
                pick = cands[0]
            if pick is None:
                problem = problem or (
                    f"output {k} {tuple(o.shape)} matches {'no' if not cands else len(cands)} input(s) of its shape"
                )
                info.slots.append(None)
                info.names.append(None)
                info.shapes.append(tuple(o.shape))
                continue
            used.add(pick[0])
            info.slots.append(pick[0])
            info.names.append(pick[1])
            info.shapes.append(tuple(o.shape))
        present = [k for k, s in enumerate(info.slots) if s is not None]
        main = None
        if meta is not None and (meta.return_hidden_states_index or 0) in present:
            main = meta.return_hidden_states_index or 0
        if main is None:
            for n in MAIN_STREAM_NAMES:
                main = next((k for k in present if info.names[k] == n), None)
                if main is not None:
                    break
        if main is None and present:
            main = present[0]
        info.main = main
        if problem:
            info.why = f"block {self._block_name(index)}: {problem}"
        elif prev is None:
            info.why = "the first block call"
        else:
            info.link, info.why = self._link(info, args, kwargs, prev, probe.calls[-1])
        probe.calls.append(info)
        probe.prev_outs = None if problem else outs
        if info.link is None:
            probe.run = None if problem else _Run(len(probe.calls) - 1, self.config.fn, self.config.bn)
        if probe.run is not None:
            probe.run.add(args, kwargs, outs)
            if probe.best is None or probe.run.length >= probe.best.length:
                probe.best = probe.run

    def _link(self, info: _CallInfo, args, kwargs, prev: list, pinfo: _CallInfo):
        """How each of this call's streams comes from the previous call's outputs, or None
        and why not."""
        here = f"between {self._block_name(pinfo.index)} and {self._block_name(info.index)}"
        link = []
        consumed = set()
        for k, loc in enumerate(info.slots):
            if loc is None:
                link.append(None)
                continue
            x = _get(args, kwargs, loc)
            j = next((j for j, p in enumerate(prev) if p is x), None)
            if j is not None:
                link.append(("id", j))
                consumed.add(j)
                continue
            join = self._find_join(x, prev)
            if join is None:
                return None, (
                    f"{here}: the stream {info.names[k]!r} of the second is neither an output of the first nor a "
                    "concatenation of them (the model changes it between the calls)"
                )
            link.append(join)
            consumed.update(j for j, _ in join[1])
        missing = [j for j, p in enumerate(prev) if p is not None and j not in consumed]
        if missing:
            return None, f"{here}: output(s) {missing} of the first are not passed to the second as they are"
        return link, ""

    @staticmethod
    def _find_join(x, prev):
        outs = [(j, p) for j, p in enumerate(prev) if p is not None]
        if len(outs) < 2 or x.dim() < 2:
            return None
        import itertools

        for dim in range(1, x.dim()):
            for order in itertools.permutations(outs):
                ts = [p for _, p in order]
                if any(t.dim() != x.dim() or t.dtype != x.dtype for t in ts):
                    continue
                if any(t.shape[:dim] + t.shape[dim + 1 :] != x.shape[:dim] + x.shape[dim + 1 :] for t in ts):
                    continue
                if sum(t.shape[dim] for t in ts) != x.shape[dim]:
                    continue
                if torch.equal(torch.cat(ts, dim), x):  # host-read-ok: the probe verifies the join once
                    return ("join", [(j, p.shape[dim]) for j, p in order], dim)
        return None

    def _finish_probe(self, st: AutoFirstBlockState, probe: _Probe) -> None:
        cfg = self.config
        run = probe.best
        cls = type(self.model).__name__
        need = cfg.fn + cfg.bn + 1
        if run is None or run.length < need:
            breaks = [c.why for c in probe.calls[1:] if c.link is None and c.why][:3]
            raise ValueError(
                f"fastcache: FirstBlockCacheConfig(fn={cfg.fn}, bn={cfg.bn}) needs {need} consecutive block calls of "
                f"{cls} that pass their hidden states on to each other unchanged, and its longest such chain has "
                f"{0 if run is None else run.length}"
                + (f" ({'; '.join(breaks)})" if breaks else "")
                + f". Register a fastcache.ModelSpec for {cls} (fastcache/families/ holds examples) to cache it, or "
                "lower fn / bn."
            )
        first, decide, tail = run.start, run.start + cfg.fn - 1, run.start + run.length - 1 - cfg.bn
        calls = probe.calls
        # the indicator stream, traced from the run's first call to the decision call
        c0 = calls[first].main
        c0_in = calls[first].slots[c0]
        for p in range(first + 1, decide + 1):
            nxt = [k for k, lk in enumerate(calls[p].link) if lk == ("id", c0)]
            if len(nxt) != 1:
                raise ValueError(
                    f"fastcache: {cls}'s hidden-state stream cannot be followed through its first fn={cfg.fn} blocks "
                    f"(at {self._block_name(calls[p].index)}); use fn=1 or register a fastcache.ModelSpec for {cls}"
                )
            c0 = nxt[0]
        # provenance of each stream from the decision call to the tail: list of (head slot, size) along dim
        prov = {k: ([(k, None)], None) for k, s in enumerate(calls[decide].slots) if s is not None}
        joined = False
        for p in range(decide + 1, tail + 1):
            new = {}
            for k, lk in enumerate(calls[p].link):
                if lk is None:
                    continue
                if lk[0] == "id":
                    new[k] = prov[lk[1]]
                    continue
                pieces, dims = [], set()
                for j, size in lk[1]:
                    sub, d = prov[j]
                    if d is not None or len(sub) != 1:
                        pieces = None
                        break
                    pieces.append((sub[0][0], size))
                    dims.add(lk[2])
                if pieces is None:
                    raise ValueError(
                        f"fastcache: {cls} concatenates streams twice inside its block stack (at "
                        f"{self._block_name(calls[p].index)}); FirstBlockCacheConfig on the automatic path follows one "
                        f"concatenation. Register a fastcache.ModelSpec for {cls}."
                    )
                new[k] = (pieces, lk[2])
                joined = True
            prov = new
        residual = {}
        for j, (pieces, dim) in prov.items():
            off = 0
            for k, size in pieces:
                if k in residual:
                    raise ValueError(
                        f"fastcache: {cls}'s stream {k} of {self._block_name(calls[decide].index)} reaches the tail "
                        f"block twice; register a fastcache.ModelSpec for {cls}."
                    )
                residual[k] = (j, dim, off, size)
                off += size or 0
        if c0 not in residual:
            raise ValueError(
                f"fastcache: {cls}'s hidden-state stream does not reach block {self._block_name(calls[tail].index)}; "
                f"register a fastcache.ModelSpec for {cls}."
            )
        plan = _Plan(calls, decide, first, tail, c0, c0_in, residual, joined)
        indices = [c.index for c in calls]
        if len(set(indices)) != len(indices):
            raise ValueError(
                f"fastcache: {cls} calls one block more than once per step; FirstBlockCacheConfig on the automatic "
                f"path places each block by its position. Register a fastcache.ModelSpec for {cls}."
            )
        plan.position = {ix: p for p, ix in enumerate(indices)}
        plan.note = (
            f"head {self._block_name(calls[first].index)}, decision at {self._block_name(calls[decide].index)}, tail "
            f"{self._block_name(calls[tail].index)}: {tail - decide} of {len(calls)} block calls cached"
            + ("; crosses a concatenation of streams (learnt and verified at the first call)" if joined else "")
        )
        self.plans[st.sig] = plan
        st.plan = plan
        # the probe step was computed: record it as a computed step and store its residuals,
        # as a planned computed step would (the next step decides against it)
        fargs, fkw, fouts = run.first_io[0]
        x_in = _get(fargs, fkw, c0_in)
        d_outs = run.first_io[cfg.fn - 1][2]
        t_outs = run.last_outs[0]
        h = d_outs[c0]
        q = h - x_in
        st.ensure({str(k): d_outs[k] for k in residual}, indicator=q)
        t = probe.t
        if t.device != h.device:
            t = t.to(h.device)
        flag, store, rep = first_block_decision(self, st, q, t, h, x_in)
        for k, (j, dim, off, size) in residual.items():
            tt = t_outs[j] if dim is None else t_outs[j].narrow(dim, off, size)
            ops.store_residual(tt, d_outs[k], store, st.residuals[str(k)])

    # -- stats ----------------------------------------------------------------------------
    def state_stats(self, st: AutoFirstBlockState) -> dict:
        out = st.stats(repeat_hint=".")
        out.update(fn=self.config.fn, bn=self.config.bn, automatic=True, replanned_steps=st.replans)
        if st.plan is not None:
            p = st.plan
            out["plan"] = p.note
            out["cached_calls"] = p.tail - p.decide
            out["block_calls"] = len(p.calls)
            n = out.get("computed", 0) + out.get("skipped", 0)
            if n:
                out["computed_fraction"] = 1 - (p.tail - p.decide) / len(p.calls) * out["skipped"] / n
        return out
