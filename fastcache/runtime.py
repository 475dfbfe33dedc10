"""Reversible, per-instance patching of a transformer's block stack.

``fastcache.patch(model, config)`` sets instance-level attributes only (never touches
classes, parameters or buffers, so ``state_dict`` is unchanged):

* the model's ``forward`` — records the step's timestep and host step index, refuses
  arguments that inject values between blocks (ControlNet residuals), and runs the
  model uncached under autograd (a cache would drop gradients);
* the first block of the first segment — the *head*: hands the whole stack to the
  policy, which decides on the device and either runs every original block (through a
  :class:`~fastcache.policies.base.StackRunner`) or reuses its cache;
* every other block — a pass-through (stack policies) or the policy's block step
  (block policies);
* ``cache_context`` on diffusers models (``CacheMixin``): the pipeline's own
  ``transformer.cache_context("cond" | "uncond")`` selects fastcache's per-branch state.

The patched ``forward`` s are small callable objects (:class:`_Forward`) holding the
:class:`Patch`, not closures, so ``copy.deepcopy`` gives an independent patched copy and
``pickle`` / ``torch.save(model)`` work (the copy gets fresh, empty cache state). The
handle lives on the instance (``model._fastcache_patch``), so a patched model is freed
like any other object.

``handle.remove()`` restores each attribute exactly as it was (including instance
attributes set by others before us, e.g. accelerate hooks). A wrapper someone set on
top of ours after patching is left in place; our object under it then forwards to the
original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .config import CacheConfig
from .distributed import check_policy, resolve_group
from .policies import policy_for
from .policies.base import StackRunner, StepInfo, is_tracing
from .specs import ModelSpec, find_spec, spec_by_name

DEFAULT_CONTEXT = "default"
PATCH_ATTR = "_fastcache_patch"
_MISSING = object()


class _Binder:
    """Maps a call's (args, kwargs) to a dict of parameter name -> value, without
    inspect.Signature.bind on the hot path (plain dict work, which dynamo traces)."""

    def __init__(self, fn):
        params = list(inspect.signature(fn).parameters.values())
        self.names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.defaults = {
            p.name: p.default
            for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def __call__(self, args, kwargs) -> dict:
        if len(args) > len(self.names):
            raise TypeError(f"too many positional arguments: {len(args)} for {self.names}")
        out = dict(self.defaults)
        out.update(zip(self.names, args))
        out.update(kwargs)
        return out


def _instance_attr(module: nn.Module, name: str):
    return module.__dict__.get(name, _MISSING)


def _set_instance_attr(module: nn.Module, name: str, value) -> None:
    if value is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def _original(module: nn.Module, saved, name: str = "forward"):
    """The callable that ran before patching: a saved instance attribute, else the class's."""
    if saved is _MISSING:
        return getattr(type(module), name).__get__(module)
    return saved


class _Forward:
    """An instance-level ``forward`` installed by a :class:`Patch` (picklable, deep-copyable).

    ``kind``: "model", "head", "pass" (pass-through) or "block"; ``index`` = (segment,
    block). After ``remove()`` it forwards to the original (someone may still hold it)."""

    __slots__ = ("patch", "kind", "index")

    def __init__(self, patch: Patch, kind: str, index: tuple[int, int]):
        self.patch, self.kind, self.index = patch, kind, index

    def __call__(self, *args, **kwargs):
        return self.patch._dispatch(self.kind, self.index, args, kwargs)

    def __getstate__(self):
        return (self.patch, self.kind, self.index)

    def __setstate__(self, state):
        self.patch, self.kind, self.index = state


class _CacheContextMethod:
    """Instance-level ``cache_context`` of a diffusers ``CacheMixin`` model: enters the
    model's own (diffusers hooks keep working) and fastcache's context of the same name."""

    __slots__ = ("patch",)

    def __init__(self, patch: Patch):
        self.patch = patch

    @contextlib.contextmanager
    def __call__(self, name: str, **kwargs):
        p = self.patch
        original = _original(p.model, p._saved_cache_context, "cache_context")
        with original(name, **kwargs):
            if not p.active:
                yield
                return
            with p.context(name, step_index=kwargs.get("step_index"), num_steps=kwargs.get("num_inference_steps")):
                yield

    def __getstate__(self):
        return self.patch

    def __setstate__(self, state):
        self.patch = state


@dataclasses.dataclass
class _Clock:
    """Host-side step bookkeeping of one context (no device value is read for it).

    ``calls`` counts model calls since the last reset. The step index within the run is
    known on the host only when the caller says it (diffusers ``cache_context(name,
    step_index=i)`` or ``fastcache.context(model, name, step_index=i)``): counting calls
    modulo ``num_steps`` would drift silently on repeated evaluations (Heun, CFG as two
    calls without a context) or an interrupted run, so it is never used for placement."""

    calls: int = 0
    step_index: int | None = None  # from the pipeline, for the current call only
    num_steps: int | None = None  # from the pipeline's context

    def info(self, configured: int | None) -> StepInfo:
        return StepInfo(index=self.step_index, num_steps=self.num_steps or configured, call=self.calls)


class Patch:
    """The handle returned by :func:`patch`. ``remove()`` undoes the patch.

    ``contexts`` maps a context name to the policy's state for it; ``stats()`` keeps
    working after ``remove()`` (it returns the statistics taken at removal)."""

    announcer = None  # a StepAnnouncer (fastcache.announce_steps); never copied

    def __init__(self, model: nn.Module, config: CacheConfig, spec: ModelSpec, group=None):
        self.model = model
        self.config = config
        self.spec = spec
        self.group = group  # fastcache.distributed.DecisionGroup or None
        self.active = False
        self._saved: list[tuple[nn.Module, object]] = []
        self._saved_cache_context = _MISSING
        self._has_cache_context = False
        self._final_stats: dict | None = None
        self._runtime()

    # -- derived runtime objects (rebuilt after copy / unpickling) ----------------------
    def _runtime(self) -> None:
        self.policy = policy_for(self.config)(self.config, self.spec, self.model)
        self.policy.group = getattr(self, "group", None)
        check_policy(self.policy, self.policy.group)
        self.segments = self.spec.blocks(self.model)
        self.head = self.segments[0][0]
        self.contexts: dict[str, object] = {DEFAULT_CONTEXT: self.policy.new_state()}
        self.clocks: dict[str, _Clock] = {DEFAULT_CONTEXT: _Clock()}
        self.current_context = DEFAULT_CONTEXT
        self.num_steps: int | None = getattr(self.config, "num_steps", None)
        self.counters = {"grad_bypassed_calls": 0}
        self._timestep: torch.Tensor | None = None
        self._step: StepInfo | None = None
        self._bypass = False
        self._warned: set[str] = set()
        self._originals: list[list] | None = None

    def _bind(self) -> None:
        """Resolve the original forwards and argument binders (after install / copy)."""
        saved = {id(m): fwd for m, fwd in self._saved}
        self._originals = [[_original(b, saved.get(id(b), _MISSING)) for b in seg] for seg in self.segments]
        self._model_fwd = _original(self.model, saved.get(id(self.model), _MISSING))
        self._model_binder = _Binder(self._model_fwd)
        self._block_binders = [_Binder(seg[0]) for seg in self._originals]
        self._runner = StackRunner(self.spec, self._originals)
        self._params = [p for seg in self.segments for p in seg.parameters()]

    def __getstate__(self):
        # Cache buffers and bound methods are not copied: a copy starts with empty state.
        try:
            registered = spec_by_name(self.spec.name) is self.spec
        except LookupError:
            registered = False
        if not registered:
            raise TypeError(
                f"fastcache: cannot copy or pickle a model patched with the unregistered spec {self.spec.name!r} "
                "(a copy finds its spec by name); fastcache.register(spec) first, or handle.remove() before copying."
            )
        return {
            "model": self.model,
            "config": self.config,
            "spec_name": self.spec.name,
            "active": self.active,
            "saved": [(m, None if fwd is _MISSING else fwd) for m, fwd in self._saved],
            "saved_cache_context": None if self._saved_cache_context is _MISSING else self._saved_cache_context,
            "has_cache_context": self._has_cache_context,
            "group": self.group,  # a DecisionGroup: shared by a deep copy, refused by pickle
        }

    def __setstate__(self, state):
        self.model = state["model"]
        self.config = state["config"]
        self.spec = spec_by_name(state["spec_name"])
        self.active = state["active"]
        self._saved = [(m, _MISSING if fwd is None else fwd) for m, fwd in state["saved"]]
        scc = state["saved_cache_context"]
        self._saved_cache_context = _MISSING if scc is None else scc
        self._has_cache_context = state["has_cache_context"]
        self.group = state.get("group")
        self._final_stats = None
        self._built_after_copy = False

    def _ensure_runtime(self) -> None:
        # After deepcopy / unpickling the modules are only complete once the whole object
        # graph is restored, so the derived objects are rebuilt on first use.
        if getattr(self, "_built_after_copy", True) is False:
            self._built_after_copy = True
            self._runtime()
            self._bind()

    # -- install / remove ---------------------------------------------------------------
    def _install(self) -> None:
        self._saved.append((self.model, _instance_attr(self.model, "forward")))
        _set_instance_attr(self.model, "forward", _Forward(self, "model", (0, 0)))
        block_kind = self.policy.granularity
        if block_kind not in ("stack", "block"):
            raise ValueError(f"policy granularity must be 'stack' or 'block', got {block_kind!r}")
        for i, seg in enumerate(self.segments):
            for j, blk in enumerate(seg):
                self._saved.append((blk, _instance_attr(blk, "forward")))
                kind = "block" if block_kind == "block" else ("head" if (i, j) == (0, 0) else "pass")
                _set_instance_attr(blk, "forward", _Forward(self, kind, (i, j)))
        if callable(getattr(type(self.model), "cache_context", None)):
            self._has_cache_context = True
            self._saved_cache_context = _instance_attr(self.model, "cache_context")
            _set_instance_attr(self.model, "cache_context", _CacheContextMethod(self))
        self._bind()
        self.active = True

    def remove(self) -> None:
        """Restore every patched attribute and drop the cache buffers (stats are kept on
        the handle: ``handle.stats()`` still answers)."""
        if not self.active:
            return
        self._ensure_runtime()
        self._final_stats = self.stats()
        if self.announcer is not None:  # the scheduler gets its own methods back
            self.announcer.remove()
        for module, fwd in reversed(self._saved):
            cur = _instance_attr(module, "forward")
            if isinstance(cur, _Forward) and cur.patch is self:
                _set_instance_attr(module, "forward", fwd)
            # else: a wrapper was set on top of ours after patching; keep it (our object
            # under it forwards to the original from now on).
        self._saved.clear()
        if self._has_cache_context:
            cur = _instance_attr(self.model, "cache_context")
            if isinstance(cur, _CacheContextMethod) and cur.patch is self:
                _set_instance_attr(self.model, "cache_context", self._saved_cache_context)
        self.contexts = {DEFAULT_CONTEXT: self.policy.new_state()}
        self.active = False
        if self.model.__dict__.get(PATCH_ATTR) is self:
            del self.model.__dict__[PATCH_ATTR]

    # -- the step -------------------------------------------------------------------
    def _dispatch(self, kind: str, index: tuple[int, int], args, kwargs):
        self._ensure_runtime()
        if not self.active:  # removed, but still reachable under a foreign wrapper
            if kind == "model":
                return self._model_fwd(*args, **kwargs)
            return self._originals[index[0]][index[1]](*args, **kwargs)
        if kind == "model":
            return self._model_forward(args, kwargs)
        if kind == "pass":
            call = self._block_binders[index[0]](args, kwargs)
            return self.spec.pack({n: call.get(n) for n in self.spec.returns})
        if self._bypass:
            return (
                self._originals[index[0]][index[1]](*args, **kwargs)
                if kind == "block"
                else self._head_bypass(args, kwargs)
            )
        t = self._timestep
        if t is None:
            raise RuntimeError(
                "fastcache: a patched block was called outside its model's forward; call the model itself "
                "(the cache decision needs the step's timestep)."
            )
        state = self.contexts[self.current_context]
        call = self._block_binders[index[0]](args, kwargs)
        if kind == "block":
            return self.policy.block_forward(state, index, self._originals[index[0]][index[1]], call, t)
        x = call[self.spec.streams[0]]
        if t.device != x.device:
            t = t.to(x.device, non_blocking=True)
        out = self.policy.run_stack(state, self._runner, self.head, call, t)
        return self.spec.pack(out)

    def _head_bypass(self, args, kwargs):
        call = self._block_binders[0](args, kwargs)
        streams = {n: call.get(n) for n in self.spec.streams}
        return self.spec.pack(self._runner.run(call, streams))

    def _needs_grad(self, call: dict) -> bool:
        if not torch.is_grad_enabled():
            return False
        for v in call.values():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                return True
        return any(p.requires_grad for p in self._params)

    def _model_forward(self, args, kwargs):
        # is_tracing() first: a traced read of the host step count would be guarded on and
        # recompile every step (compiled calls get the step at context entry, or count on
        # the device)
        a = None if is_tracing() else self.announcer
        if a is not None and a.index is not None:
            clock = self.clocks[self.current_context]
            if clock.step_index is None:  # the scheduler's step, announced for this call
                with self.context(self.current_context, step_index=a.index, num_steps=a.num_steps):
                    return self._model_forward(args, kwargs)
        spec = self.spec
        call = self._model_binder(args, kwargs)
        for name in spec.refuse_args:
            if call.get(name) is not None:
                raise ValueError(
                    f"fastcache: {type(self.model).__name__} was called with {name}=..., which adds "
                    "values between blocks; a cached block stack cannot honour it. Remove the cache "
                    "(handle.remove()) for this call."
                )
        if not is_tracing():
            self._check_block_hooks()
        if self._needs_grad(call):
            # A skipped step would return no gradient to the input or the blocks: run the
            # model uncached (and leave the cache state untouched, except that the next
            # cached call must recompute).
            self.counters["grad_bypassed_calls"] += 1
            if "grad" not in self._warned:  # host-side only: no device value is read
                self._warned.add("grad")
                warnings.warn(
                    f"fastcache: {type(self.model).__name__} was called with autograd on (grad enabled and an input "
                    "or parameter requires grad), so the call runs uncached: a skipped step would drop gradients. "
                    "For sampling, wrap the loop in torch.no_grad() or torch.inference_mode() (diffusers pipelines "
                    "do). Counted in fastcache.stats(model)['grad_bypassed_calls'].",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self.policy.invalidate(self.contexts[self.current_context])
            self._bypass = True
            try:
                return self._model_fwd(*args, **kwargs)
            finally:
                self._bypass = False
        t = call.get(spec.timestep_arg)
        if t is None:
            raise ValueError(
                f"fastcache: the model call has no {spec.timestep_arg!r} argument; the cache needs "
                "the step's timestep to detect a new sampling run."
            )
        if not isinstance(t, torch.Tensor):
            t = torch.tensor([float(t)], dtype=torch.float32)
        clock = self.clocks[self.current_context]
        if is_tracing():
            # Host counters change every step: read inside a compiled region they would be
            # guarded on and recompile each step. Compiled policies count on the device.
            step = StepInfo(index=None, num_steps=clock.num_steps or self.num_steps, call=None)
        else:
            step = clock.info(self.num_steps)
            clock.calls += 1
        self._timestep = t
        self._step = step
        self.policy.begin_step(self.contexts[self.current_context], t, step)
        try:
            return self._model_fwd(*args, **kwargs)
        finally:
            self._timestep = None
            self._step = None

    def _check_block_hooks(self) -> None:
        if self.policy.granularity != "stack":
            return
        for seg in self.segments:
            for blk in seg:
                if blk._forward_hooks or blk._forward_pre_hooks:
                    raise RuntimeError(
                        f"fastcache: a forward hook is registered on a block of {type(self.model).__name__}; with "
                        f"{self.config.kind} the block stack runs as one unit (blocks after the first pass their "
                        "input through), so the hook would see wrong values. Register it on the model instead, "
                        "or remove the cache (handle.remove())."
                    )

    # -- contexts and state -------------------------------------------------------------
    @contextlib.contextmanager
    def context(self, name: str, step_index: int | None = None, num_steps: int | None = None) -> Iterator[None]:
        """Route calls inside the block to the cache context ``name`` (e.g. "cond" and
        "uncond" when classifier-free guidance runs the two branches as separate calls).
        ``step_index`` / ``num_steps``: where the sampling loop is, when the caller knows."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"context name must be a non-empty string, got {name!r}")
        self._ensure_runtime()
        a = self.announcer
        if step_index is None and a is not None and a.index is not None:
            step_index, num_steps = a.index, num_steps or a.num_steps
        if name not in self.contexts:
            self.contexts[name] = self.policy.new_state()
            self.clocks[name] = _Clock()
        clock = self.clocks[name]
        prev = (self.current_context, clock.step_index, clock.num_steps)
        self.current_context = name
        clock.step_index = _opt_int("step_index", step_index, 0)
        if num_steps is not None:
            clock.num_steps = _opt_int("num_inference_steps", num_steps, 1)
        state = self.contexts[name]
        if clock.step_index is not None:
            self.policy.plan_step(state, clock.info(self.num_steps))
        try:
            yield
        finally:
            if clock.step_index is not None:
                self.policy.plan_step(state, None)
            self.current_context, clock.step_index, _ = prev

    def set_num_steps(self, num_steps: int | None) -> None:
        """Steps per sampling run (forces the last one to compute); None = unknown."""
        self._ensure_runtime()
        n = _opt_int("num_steps", num_steps, 1)
        warmup = getattr(self.config, "warmup_steps", 0)
        if n is not None and warmup >= n:
            raise ValueError(f"num_steps={n} leaves no cacheable step after warmup_steps={warmup}")
        self.num_steps = n
        self.policy.set_num_steps(n)

    def reset(self) -> None:
        self._ensure_runtime()
        for st in self.contexts.values():
            self.policy.reset_state(st)
        for c in self.clocks.values():
            c.calls = 0

    def stats(self) -> dict:
        if not self.active and self._final_stats is not None:
            return self._final_stats
        self._ensure_runtime()
        out = {
            "policy": self.config.kind,
            "model": self.spec.name,
            "config": self.config.to_dict(),
            **self.counters,
            "contexts": {name: self.policy.state_stats(st) for name, st in self.contexts.items()},
        }
        if self.group is not None:  # multi-device: which group, and whether decisions are reduced over it
            out["process_group"] = {**self.group.describe(), "decisions_reduced": bool(self.policy.decides_from_data)}
        if self.counters["grad_bypassed_calls"]:
            out["grad_bypass_reason"] = (
                "calls with autograd on (grad enabled and an input or parameter requiring grad) ran uncached: "
                "a skipped step would drop gradients"
            )
        for name, ctx in out["contexts"].items():
            for msg in ctx.get("warnings", ()):
                key = f"{name}:{msg}"
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(f"fastcache [{name}]: {msg}", RuntimeWarning, stacklevel=3)
        return out

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _opt_int(name: str, v, lo: int):
    if v is None:
        return None
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{name} must be an integer >= {lo} or None, got {v!r}")
    return int(v)


def patch(model: nn.Module, config: CacheConfig, spec: ModelSpec | None = None, *, process_group=None) -> Patch:
    """Patch ``model`` in place with the cache ``config``; returns a handle with ``.remove()``.

    ``process_group``: multi-device runs (sequence / context parallel, or one sample set per
    rank): a ``torch.distributed.ProcessGroup`` of every rank running this model; the
    policies that decide from the hidden states reduce their indicator sums over it, so
    every rank takes the same decisions (:mod:`fastcache.distributed`). None = the group of
    the model's diffusers parallel setup (``enable_parallelism``) when it has one, else a
    single-process run.

    Example::

        handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25))
        ...  # sample as usual
        handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() takes the transformer nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if not isinstance(config, CacheConfig):
        raise TypeError(
            f"config must be a fastcache config (e.g. fastcache.TeaCacheConfig(threshold=0.1)), "
            f"got {type(config).__name__}"
        )
    existing = model.__dict__.get(PATCH_ATTR)
    if existing is not None and existing.active:
        raise RuntimeError(
            f"{type(model).__name__} is already patched with {existing.config.kind}; "
            "call fastcache.unpatch(model) (or handle.remove()) before patching again."
        )
    spec = spec or find_spec(model)
    group = resolve_group(model, process_group)
    p = Patch(model, config, spec, group)
    p._install()
    model.__dict__[PATCH_ATTR] = p
    return p


def _unwrap(model):
    """The module behind a ``torch.compile`` wrapper (OptimizedModule._orig_mod)."""
    return getattr(model, "_orig_mod", model)


def _find(model) -> Patch | None:
    m = _unwrap(model)
    p = m.__dict__.get(PATCH_ATTR) if isinstance(m, nn.Module) else None
    return p if p is not None and p.active else None


def get_patch(model: nn.Module) -> Patch:
    p = _find(model)
    if p is None:
        raise ValueError(f"{type(model).__name__} is not patched by fastcache (use fastcache.patch first)")
    return p


def unpatch(model: nn.Module) -> None:
    get_patch(model).remove()


@contextlib.contextmanager
def patched(
    model: nn.Module, config: CacheConfig, spec: ModelSpec | None = None, *, process_group=None
) -> Iterator[Patch]:
    """``with fastcache.patched(model, cfg) as handle:`` — the patch is removed on exit."""
    p = patch(model, config, spec, process_group=process_group)
    try:
        yield p
    finally:
        p.remove()


def stats(model: nn.Module) -> dict:
    """Per context: steps computed / skipped in the current run, the decision timeline,
    the relative-L1 and accumulator traces, cache memory in bytes, and anything the
    runtime noticed (repeated timesteps, run lengths that differ from ``num_steps``,
    calls run uncached under autograd). Reads the device state to the host: call it
    between runs, not inside a step."""
    return get_patch(model).stats()


def reset(model: nn.Module) -> None:
    """Forget every cached tensor and decision state of ``model`` (in place)."""
    get_patch(model).reset()


class StepAnnouncer:
    """Counts a diffusers scheduler's steps on the host and announces them to a patched
    transformer (:func:`announce_steps`). ``set_timesteps`` starts a run (step 0, ``num_steps
    = len(scheduler.timesteps)``); every ``step`` call moves to the next step. A sampling
    loop calls the transformer for step i before ``scheduler.step`` of step i, so the count
    is the loop index, for repeated timesteps (Heun) too: they are separate entries of
    ``timesteps``. Nothing here reads the device."""

    def __init__(self, scheduler, patch: Patch):
        for attr in ("set_timesteps", "step"):
            if not callable(getattr(scheduler, attr, None)):
                raise TypeError(
                    f"announce_steps: {type(scheduler).__name__} has no {attr}() method; pass a diffusers pipeline "
                    "or scheduler (or announce the steps yourself with fastcache.context(model, name, step_index=i))"
                )
        if patch.announcer is not None:
            raise ValueError("announce_steps: this model's steps are already announced; remove() that one first")
        self.scheduler, self.patch = scheduler, patch
        self.index: int | None = None
        self.num_steps: int | None = None
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(set_timesteps)  # pipelines inspect its signature (custom timesteps / sigmas)
        def set_timesteps_(*args, **kwargs):
            out = set_timesteps(*args, **kwargs)
            self.index, self.num_steps = 0, len(scheduler.timesteps)
            return out

        @functools.wraps(step)
        def step_(*args, **kwargs):
            out = step(*args, **kwargs)
            if self.index is not None:
                self.index += 1
            return out

        scheduler.set_timesteps, scheduler.step = set_timesteps_, step_
        patch.announcer = self

    def remove(self) -> None:
        for attr in ("set_timesteps", "step"):
            self.scheduler.__dict__.pop(attr, None)
        if self.patch.announcer is self:
            self.patch.announcer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def announce_steps(pipe, model: nn.Module | None = None) -> StepAnnouncer:
    """Announce a diffusers pipeline's steps to its patched transformer, so static
    schedules (``ScheduleConfig``, FORA, TaylorSeer, Δ-DiT, T-GATE, MagCache, Block
    Caching) place every step on the host — 0 host reads per step in eager mode — without
    changing the pipeline::

        fastcache.patch(pipe.transformer, fastcache.ScheduleConfig(plan=...))
        fastcache.announce_steps(pipe)          # .remove() to stop
        images = pipe(...)

    ``pipe``: a pipeline (its ``scheduler`` and ``transformer`` are used) or a scheduler,
    with ``model`` the patched transformer. Pipelines that wrap the transformer call in
    ``cache_context`` (Flux, ...) get the step at context entry, outside any compiled
    region, so a compiled transformer runs the announced path too; others get it at the
    start of each eager call."""
    scheduler = getattr(pipe, "scheduler", pipe)
    model = model if model is not None else getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError("announce_steps(pipe): pass a pipeline with a transformer, or announce_steps(scheduler, model)")
    p = _find(model)
    if p is None or not p.active:
        raise ValueError(f"announce_steps: {type(model).__name__} is not patched; fastcache.patch(model, config) first")
    return StepAnnouncer(scheduler, p)


def context(model: nn.Module, name: str, step_index: int | None = None, num_steps: int | None = None):
    """``with fastcache.context(model, "uncond"): model(...)`` — separate cache state for
    separately-called CFG branches. On a model that is not patched (or no longer) this
    is a no-op, so the same sampling code runs with and without the cache.

    diffusers pipelines need none of this: they already wrap each call in
    ``transformer.cache_context("cond" | "uncond")``, which fastcache follows."""
    p = _find(model)
    if p is None:
        return contextlib.nullcontext()
    return p.context(name, step_index=step_index, num_steps=num_steps)
