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
import threading
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .config import CacheConfig
from .distributed import check_policy, resolve_group
from .families.auto import auto_spec
from .policies import policy_for
from .policies.base import VARARGS, StackRunner, StepInfo, is_tracing
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
        self.varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        self.defaults = {
            p.name: p.default
            for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def __call__(self, args, kwargs) -> dict:
        n = len(self.names)
        if len(args) > n and not self.varargs:
            raise TypeError(f"too many positional arguments: {len(args)} for {self.names}")
        out = dict(self.defaults)
        out.update(zip(self.names, args))
        out.update(kwargs)
        if len(args) > n:  # forward(..., *args): replayed positionally (policies.base.call_block)
            out[VARARGS] = (tuple(self.names), tuple(args[n:]))
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
    num_steps: int | None = None  # given by the caller (fastcache.context(..., num_steps=n))
    run_steps: int | None = None  # announced by the sampler, for the current call only
    last_index: int | None = None  # the previous call's announced step (None: unannounced)

    def info(self, configured: int | None) -> StepInfo:
        n = self.num_steps or configured
        return StepInfo(index=self.step_index, num_steps=n, call=self.calls, run_steps=self.run_steps or n)


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
        self._build_policy()
        self.clocks: dict[str, _Clock] = {DEFAULT_CONTEXT: _Clock()}
        self.current_context = DEFAULT_CONTEXT
        self.num_steps: int | None = getattr(self.config, "num_steps", None)
        # grad_bypassed_calls: calls run uncached under autograd; new_runs: runs the host
        # started (the reason: "set_timesteps", "step 0", "weights", "blocks")
        self.counters = {"grad_bypassed_calls": 0, "new_runs": {}}
        self._timestep: torch.Tensor | None = None
        self._step: StepInfo | None = None
        self._bypass = False
        self._warned: set[str] = set()
        self._pending_warnings: list[str] = []  # noticed in traced code, warned on the next eager call
        self._originals: list[list] | None = None
        self._lock = threading.Lock()  # one model call at a time (see _dispatch)
        self._owner: int | None = None  # the thread inside the current model call
        self._structure_changed = False  # a module or parameter was registered inside the model
        self._weights_version: int | None = None

    def _build_policy(self) -> None:
        """The policy, the block list it runs and fresh per-context state (at patch time,
        after a copy, and when the model's blocks were replaced: :meth:`_follow_blocks`)."""
        self.policy = policy_for(self.config, self.spec)(self.config, self.spec, self.model)
        self.policy.group = getattr(self, "group", None)
        check_policy(self.policy, self.policy.group)
        self.segments = self.spec.blocks(self.model)
        self.head = self.segments[0][0]
        self.contexts: dict[str, object] = {DEFAULT_CONTEXT: self.policy.new_state()}

    def _bind(self) -> None:
        """Resolve the original forwards and argument binders (after install / copy)."""
        saved = {id(m): fwd for m, fwd in self._saved}
        self._originals = [[_original(b, saved.get(id(b), _MISSING)) for b in seg] for seg in self.segments]
        self._model_fwd = _original(self.model, saved.get(id(self.model), _MISSING))
        self._model_binder = _Binder(self._model_fwd)
        self._block_binders = [_Binder(seg[0]) for seg in self._originals]
        self._sub_originals = [_original(m, saved.get(id(m), _MISSING)) for m in self.policy.submodules()]
        self._runner = StackRunner(self.spec, self._originals)
        # the blocks patched (segments may be the model's live ModuleLists: ids, not the lists)
        self._block_ids = [[id(b) for b in seg] for seg in self.segments]
        self._params = list(self.model.parameters())
        self._weights_version = _params_version(self._params)
        self._structure_changed = False
        _watch(self.model, self)

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

    @property
    def runner(self) -> StackRunner:
        """The :class:`~fastcache.policies.base.StackRunner` of the patched blocks (what
        :func:`fastcache.cuda_graphs.compile_stack` compiles)."""
        self._ensure_runtime()
        return self._runner

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
        self._install_blocks()
        if callable(getattr(type(self.model), "cache_context", None)):
            self._has_cache_context = True
            self._saved_cache_context = _instance_attr(self.model, "cache_context")
            _set_instance_attr(self.model, "cache_context", _CacheContextMethod(self))
        self._bind()
        self._hook_state_dict()
        self.active = True

    def _install_blocks(self) -> None:
        block_kind = self.policy.granularity
        if block_kind not in ("stack", "block"):
            raise ValueError(f"policy granularity must be 'stack' or 'block', got {block_kind!r}")
        for i, seg in enumerate(self.segments):
            for j, blk in enumerate(seg):
                self._saved.append((blk, _instance_attr(blk, "forward")))
                kind = "block" if block_kind == "block" else ("head" if (i, j) == (0, 0) else "pass")
                _set_instance_attr(blk, "forward", _Forward(self, kind, (i, j)))
        for k, sub in enumerate(self.policy.submodules()):
            self._saved.append((sub, _instance_attr(sub, "forward")))
            _set_instance_attr(sub, "forward", _Forward(self, "sub", (k, 0)))

    def _restore_forwards(self, keep_model: bool = False) -> None:
        """Put back every patched ``forward`` (the blocks' only, with ``keep_model``)."""
        kept = self._saved[:1] if keep_model else []
        for module, fwd in reversed(self._saved[len(kept) :]):
            cur = _instance_attr(module, "forward")
            if isinstance(cur, _Forward) and cur.patch is self:
                _set_instance_attr(module, "forward", fwd)
            # else: a wrapper was set on top of ours after patching; keep it (our object
            # under it forwards to the original from now on).
        self._saved = kept

    def _hook_state_dict(self) -> None:
        # load_state_dict changes the weights: the caches were made with the old ones. The
        # hook is a host event (no per-step cost) and reaches compiled models too, whose
        # calls never run the eager weight-version check. A module-level function that
        # finds the patch on the module, so a copy of the model invalidates its own patch.
        self.model.register_load_state_dict_post_hook(_on_load_state_dict)

    def remove(self) -> None:
        """Restore every patched attribute and drop the cache buffers (stats are kept on
        the handle: ``handle.stats()`` still answers)."""
        if not self.active:
            return
        self._ensure_runtime()
        self._final_stats = self.stats()
        if self.announcer is not None:  # the scheduler gets its own methods back
            self.announcer.remove()
        self._restore_forwards()
        hooks = self.model._load_state_dict_post_hooks
        for k in [k for k, h in hooks.items() if h is _on_load_state_dict]:
            del hooks[k]
        _unwatch(self)
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
            if kind == "sub":
                return self._sub_originals[index[0]](*args, **kwargs)
            return self._originals[index[0]][index[1]](*args, **kwargs)
        if kind == "model":
            if is_tracing():
                return self._model_forward(args, kwargs)
            return self._one_call_at_a_time(args, kwargs)
        if kind == "pass":
            call = self._block_binders[index[0]](args, kwargs)
            return self.spec.pack({n: call.get(n) for n in self.spec.returns})
        if kind == "sub":
            if self._bypass or self._timestep is None:
                # the bypass, or a submodule called outside the model's call (its own use)
                return self._sub_originals[index[0]](*args, **kwargs)
            state = self.contexts[self.current_context]
            return self.policy.sub_call(state, index[0], self._sub_originals[index[0]], args, kwargs, self._timestep)
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
        if kind == "block" and self.policy.raw_block_calls:
            return self.policy.block_call(state, index, self._originals[index[0]][index[1]], args, kwargs, t)
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

    def _one_call_at_a_time(self, args, kwargs):
        """An eager model call, refused while another thread is inside one: the call state
        (timestep, step, context) and the cache state are the patch's, not the thread's,
        so two overlapping calls would read each other's. Re-entry from the same thread
        (a model calling itself) is let through."""
        me = threading.get_ident()
        if self._lock.acquire(blocking=False):
            self._owner = me
            try:
                return self._model_forward(args, kwargs)
            finally:
                self._owner = None
                self._lock.release()
        if self._owner == me:
            return self._model_forward(args, kwargs)
        raise RuntimeError(
            f"fastcache: the patched {type(self.model).__name__} was called from a second thread while another "
            "call was running. A patched model is not thread-safe: its cache state belongs to the sampling run, "
            "not to a thread. Give each thread its own copy (copy.deepcopy(model) of the patched model is an "
            "independent patched copy with empty caches), or run the sampling loops one after another."
        )

    def _needs_grad(self, call: dict) -> bool:
        if not torch.is_grad_enabled():
            return False
        for v in call.values():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                return True
        # every parameter the model has now (one added after patching included), not a
        # list taken at patch time
        return any(p.requires_grad for p in self.model.parameters())

    def _check_model_unchanged(self) -> None:
        """Eager, before the step: the caches were made by these blocks and these weights.
        Blocks replaced since the last call are followed (:meth:`_follow_blocks`); a module
        or parameter added anywhere in the model, or a parameter changed in place (its
        version counter: ``load_state_dict``, ``copy_``, an optimizer step), starts a new
        run, so nothing computed with the old weights is reused."""
        if self._structure_changed:
            self._follow_blocks()
        v = _params_version(self._params)
        if v != self._weights_version:
            self._weights_version = v
            self.begin_run("weights")

    def _follow_blocks(self) -> None:
        self._structure_changed = False
        segments = self.spec.blocks(self.model)
        if [[id(b) for b in seg] for seg in segments] != self._block_ids:
            # new blocks: patch them, give the old ones back their forward, start afresh
            self._restore_forwards(keep_model=True)
            self._build_policy()
            if self.num_steps != getattr(self.config, "num_steps", None):
                self.policy.set_num_steps(self.num_steps)
            for name in self.clocks:
                self.contexts.setdefault(name, self.policy.new_state())
            self._install_blocks()
            self._bind()
            self._count_run("blocks")
            return
        # a module or parameter added inside the model (an adapter, a new trainable weight)
        self._params = list(self.model.parameters())
        self._weights_version = _params_version(self._params)
        _watch(self.model, self)
        self.begin_run("weights")

    def begin_run(self, reason: str, context: str | None = None) -> None:
        """The next call starts a new sampling run, in every context (or in ``context``):
        nothing cached before reaches it (:meth:`Policy.new_run`; new weights or blocks
        also drop the caches: :meth:`Policy.invalidate`). Host and device writes only;
        counted in ``stats()['new_runs'][reason]``."""
        names = list(self.contexts) if context is None else [context]
        for name in names:
            if reason in ("weights", "blocks"):  # computed with the old weights: dropped now
                self.policy.invalidate(self.contexts[name])
            self.policy.new_run(self.contexts[name])
        self._count_run(reason)

    def _count_run(self, reason: str) -> None:
        runs = self.counters["new_runs"]
        runs[reason] = runs.get(reason, 0) + 1

    def _model_forward(self, args, kwargs):
        # is_tracing() first: a traced read of the host step count would be guarded on and
        # recompile every step (compiled calls get the step at context entry, or count on
        # the device)
        a = None if is_tracing() else self.announcer
        if a is not None:
            clock = self.clocks[self.current_context]
            cur = a.current()
            if cur is not None and clock.step_index is None:  # the scheduler's step, announced for this call
                with self.context(self.current_context, _announced=cur):
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
        if is_tracing():
            if self._structure_changed:
                raise RuntimeError(
                    f"fastcache: a module or parameter was added to, or a block replaced in, the patched "
                    f"{type(self.model).__name__} while it is compiled. Re-patch it (fastcache.unpatch(model); "
                    "fastcache.patch(model, config)) and compile again, or make one eager call first "
                    "(the patch follows the model's new blocks then)."
                )
        else:
            self._check_block_hooks()
            self._check_model_unchanged()
            self._flush_warnings()
        if self._needs_grad(call):
            # A skipped step would return no gradient to the input or the blocks: run the
            # model uncached (and leave the cache state untouched, except that the next
            # cached call must recompute).
            self.counters["grad_bypassed_calls"] += 1
            if "grad" not in self._warned:  # host-side only: no device value is read
                self._warned.add("grad")
                self._warn(
                    f"fastcache: {type(self.model).__name__} was called with autograd on (grad enabled and an input "
                    "or parameter requires grad), so the call runs uncached: a skipped step would drop gradients. "
                    "For sampling, wrap the loop in torch.no_grad() or torch.inference_mode() (diffusers pipelines "
                    "do). Counted in fastcache.stats(model)['grad_bypassed_calls']."
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
        if spec.timestep_rises:  # every policy expects a run's timesteps to fall (ModelSpec.timestep_rises)
            t = -t
        clock = self.clocks[self.current_context]
        if is_tracing():
            # Host counters change every step: read inside a compiled region they would be
            # guarded on and recompile each step. Compiled policies count on the device.
            step = StepInfo(index=None, num_steps=clock.num_steps or self.num_steps, call=None)
        else:
            step = clock.info(self.num_steps)
            clock.calls += 1
            if clock.step_index is None:
                clock.last_index = None  # an unannounced call: a later announced step 0 starts a run
        if self.policy.needs_frame_layout and spec.frame_layout is not None:  # shapes and config only
            step = dataclasses.replace(step, frame_layout=spec.frame_layout(self.model, call))
        self._timestep = t
        self._step = step
        self.policy.begin_step(self.contexts[self.current_context], t, step)
        try:
            out = self._model_fwd(*args, **kwargs)
            self.policy.end_step(self.contexts[self.current_context])
            return out
        finally:
            self._timestep = None
            self._step = None

    def _warn(self, msg: str) -> None:
        """A RuntimeWarning now, or, in traced code (dynamo cannot trace ``warnings.warn``),
        at the next eager call or ``stats()``."""
        if is_tracing():
            self._pending_warnings.append(msg)
        else:
            warnings.warn(msg, RuntimeWarning, stacklevel=8)  # the caller of model(...)

    def _flush_warnings(self) -> None:
        while self._pending_warnings:
            warnings.warn(self._pending_warnings.pop(0), RuntimeWarning, stacklevel=3)

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
    def context(
        self, name: str, step_index: int | None = None, num_steps: int | None = None, _announced=None
    ) -> Iterator[None]:
        """Route calls inside the block to the cache context ``name`` (e.g. "cond" and
        "uncond" when classifier-free guidance runs the two branches as separate calls).
        ``step_index`` / ``num_steps``: where the sampling loop is, when the caller knows;
        ``num_steps`` has the meaning of the config's (the last step is forced where the
        method forces it). Step 0 after any other step (or after unannounced calls)
        starts a new run in this context. ``_announced``: ``(index, run_steps)`` from the
        sampler's announcer (:func:`announce_steps`), for placement and checks only."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"context name must be a non-empty string, got {name!r}")
        self._ensure_runtime()
        run_steps = None
        if step_index is None:
            cur = _announced if _announced is not None else (self.announcer.current() if self.announcer else None)
            if cur is not None:
                step_index, run_steps = cur
        if name not in self.contexts:
            self.contexts[name] = self.policy.new_state()
            self.clocks[name] = _Clock()
        clock = self.clocks[name]
        prev = (self.current_context, clock.step_index, clock.run_steps)
        self.current_context = name
        clock.step_index = _opt_int("step_index", step_index, 0)
        clock.run_steps = run_steps
        if num_steps is not None:
            clock.num_steps = _opt_int("num_inference_steps", num_steps, 1)
        state = self.contexts[name]
        if clock.step_index == 0 and clock.last_index != 0:
            # the host knows a run starts here: an interrupted run's cache must not reach it,
            # whatever its timesteps (an img2img run may start below where the last one stopped)
            self.policy.new_run(state)
            self._count_run("step 0")
        clock.last_index = clock.step_index
        if clock.step_index is not None:
            self.policy.plan_step(state, clock.info(self.num_steps))
        try:
            yield
        finally:
            if clock.step_index is not None:
                self.policy.plan_step(state, None)
            self.current_context, clock.step_index, clock.run_steps = prev

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
        self._flush_warnings()
        out = {
            "policy": self.config.kind,
            "model": self.spec.name,
            "config": self.config.to_dict(),
            "grad_bypassed_calls": self.counters["grad_bypassed_calls"],
            "new_runs": dict(self.counters["new_runs"]),
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


def _params_version(params) -> int | None:
    """The sum of the parameters' version counters: every in-place change of a parameter
    (``load_state_dict``, ``copy_``, an optimizer step) raises it. A host-side read of
    counters, no device value (about 0.1 us per parameter). None where versions are not
    tracked (inference tensors)."""
    try:
        return sum(p._version for p in params)
    except RuntimeError:
        return None


# Modules of patched models -> their patches. torch's global registration hooks tell a
# patch when a submodule or parameter is assigned anywhere inside its model (a block
# replaced, an adapter or a trainable weight added): a host event, no per-step cost.
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HOOKS_INSTALLED = [False]


def _on_registration(module, name, value):
    patches = _WATCHED.get(module)
    if patches:
        for p in list(patches):
            p._structure_changed = True
    return None


def _watch(model: nn.Module, patch: Patch) -> None:
    if not _HOOKS_INSTALLED[0]:
        from torch.nn.modules.module import (
            register_module_module_registration_hook,
            register_module_parameter_registration_hook,
        )

        register_module_module_registration_hook(_on_registration)
        register_module_parameter_registration_hook(_on_registration)
        _HOOKS_INSTALLED[0] = True
    for m in model.modules():
        patches = _WATCHED.get(m)
        if patches is None:
            patches = _WATCHED[m] = weakref.WeakSet()
        patches.add(patch)


def _unwatch(patch: Patch) -> None:
    for m in patch.model.modules():
        patches = _WATCHED.get(m)
        if patches is not None:
            patches.discard(patch)


def _on_load_state_dict(module, incompatible_keys) -> None:
    p = module.__dict__.get(PATCH_ATTR)
    if p is not None and p.active:
        p.begin_run("weights")
        p._weights_version = _params_version(p._params)  # counted once, not again at the next call


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
    spec = spec or spec_for(model)
    group = resolve_group(model, process_group)
    p = Patch(model, config, spec, group)
    p._install()
    model.__dict__[PATCH_ATTR] = p
    return p


def spec_for(model: nn.Module) -> ModelSpec:
    """A registered family's spec, else the automatic path's
    (:func:`fastcache.families.auto.auto_spec`), else a TypeError saying what is missing."""
    try:
        return find_spec(model)
    except TypeError:
        pass
    try:
        return auto_spec(model)
    except TypeError as e:
        find_spec(model, why=str(e))
        raise


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


class _MethodHooks:
    """Callbacks run after an object's methods (a scheduler's ``set_timesteps`` / ``step``, a
    pipeline's ``maybe_free_model_hooks``), one wrapper per method however many listen: two
    pipelines sharing one scheduler each add a listener, and removing one leaves the other's.
    The wrapper is an instance attribute; when the last listener of a method goes, whatever
    instance attribute was there before is put back."""

    ATTR = "_fastcache_method_hooks"

    def __init__(self, obj):
        self.obj = obj
        self.methods: dict[str, tuple[object, list]] = {}  # name -> (saved instance attr, callbacks)

    @classmethod
    def on(cls, obj, name: str, callback) -> None:
        hooks = obj.__dict__.get(cls.ATTR)
        if hooks is None:
            hooks = obj.__dict__[cls.ATTR] = cls(obj)
        if name not in hooks.methods:
            saved = _instance_attr(obj, name)
            original = getattr(obj, name)
            callbacks: list = []

            @functools.wraps(original)  # pipelines inspect set_timesteps' signature (custom timesteps / sigmas)
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                for cb in list(callbacks):
                    cb(obj)
                return out

            obj.__dict__[name] = wrapper
            hooks.methods[name] = (saved, callbacks)
        hooks.methods[name][1].append(callback)

    @classmethod
    def off(cls, obj, name: str, callback) -> None:
        hooks = obj.__dict__.get(cls.ATTR)
        if hooks is None or name not in hooks.methods:
            return
        saved, callbacks = hooks.methods[name]
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _set_instance_attr(obj, name, saved)
            del hooks.methods[name]
        if not hooks.methods:
            del obj.__dict__[cls.ATTR]


class StepAnnouncer:
    """Counts a diffusers scheduler's steps on the host and announces them to a patched
    transformer (:func:`announce_steps`). Nothing here reads the device.

    A run is the scheduler's: it starts at ``set_timesteps`` (step 0, ``len(timesteps)``
    steps; every context of the model starts a new run: :meth:`Patch.begin_run`), moves
    one step per ``step`` call, and ends after its last step, or when the pipeline call
    returns (``maybe_free_model_hooks``, which every diffusers pipeline calls last). Only
    calls made inside that run are announced: a later call the scheduler does not drive
    (another pipeline sharing the transformer, the user's own loop, a swapped
    ``pipe.scheduler``) gets no step and decides on the device as an unannounced call. A
    sampling loop calls the transformer for step i before ``scheduler.step`` of step i,
    so the count is the loop index, for repeated timesteps (Heun) too: they are separate
    entries of ``timesteps``."""

    def __init__(self, scheduler, patch: Patch, pipe=None):
        for attr in ("set_timesteps", "step"):
            if not callable(getattr(scheduler, attr, None)):
                raise TypeError(
                    f"announce_steps: {type(scheduler).__name__} has no {attr}() method; pass a diffusers pipeline "
                    "or scheduler (or announce the steps yourself with fastcache.context(model, name, step_index=i))"
                )
        if patch.announcer is not None:
            raise ValueError("announce_steps: this model's steps are already announced; remove() that one first")
        self.patch, self.pipe = patch, pipe
        self.scheduler = None
        self.index: int | None = None  # the step of the run in progress; None between runs
        self.num_steps: int | None = None
        self._listen(scheduler)
        if pipe is not None and callable(getattr(pipe, "maybe_free_model_hooks", None)):
            _MethodHooks.on(pipe, "maybe_free_model_hooks", self._end)
        patch.announcer = self

    def _methods(self):
        out = [("set_timesteps", self._start), ("step", self._advance)]
        if callable(getattr(self.scheduler, "set_begin_index", None)):
            out.append(("set_begin_index", self._begin_at))  # img2img: the run starts part-way
        return out

    def _listen(self, scheduler) -> None:
        self._unlisten()
        self.scheduler = scheduler
        self.index = None
        for name, cb in self._methods():
            _MethodHooks.on(scheduler, name, cb)

    def _unlisten(self) -> None:
        if self.scheduler is not None:
            for name, cb in self._methods():
                _MethodHooks.off(self.scheduler, name, cb)

    def _start(self, scheduler) -> None:
        self.index, self.num_steps = 0, len(scheduler.timesteps)
        self.patch.begin_run("set_timesteps")

    def _begin_at(self, scheduler) -> None:
        # img2img / inpainting pipelines start the loop at timesteps[begin_index]: the run
        # has that many steps fewer, and its first step is step 0
        b = getattr(scheduler, "begin_index", None)
        if self.index == 0 and isinstance(b, int) and 0 <= b < len(scheduler.timesteps):
            self.num_steps = len(scheduler.timesteps) - b

    def _advance(self, scheduler) -> None:
        if self.index is not None:
            self.index += 1
            if self.index >= self.num_steps:
                self.index = None  # the run is over

    def _end(self, pipe) -> None:
        self.index = None

    def current(self) -> tuple[int, int] | None:
        """``(step, steps in the run)`` for a call made now, or None: no run in progress,
        or the pipeline's scheduler is no longer the one counted (its next run is)."""
        pipe = self.pipe
        if pipe is not None:
            sch = getattr(pipe, "scheduler", None)
            if sch is not self.scheduler:  # swapped: its run in progress was not counted, so not announced
                if callable(getattr(sch, "set_timesteps", None)) and callable(getattr(sch, "step", None)):
                    self._listen(sch)  # its next run is
                else:
                    self.index = None
                return None
        if self.index is None:
            return None
        return self.index, self.num_steps

    def remove(self) -> None:
        self._unlisten()
        if self.pipe is not None:
            _MethodHooks.off(self.pipe, "maybe_free_model_hooks", self._end)
        self.index = None
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
    pipeline = pipe if scheduler is not pipe else None
    model = model if model is not None else getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError("announce_steps(pipe): pass a pipeline with a transformer, or announce_steps(scheduler, model)")
    p = _find(model)
    if p is None or not p.active:
        raise ValueError(f"announce_steps: {type(model).__name__} is not patched; fastcache.patch(model, config) first")
    return StepAnnouncer(scheduler, p, pipeline)


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
