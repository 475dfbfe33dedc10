"""Reversible, per-instance patching of a transformer's block stack.

``fastcache.patch(model, config)`` sets instance-level ``forward`` attributes (never
touches classes, parameters or buffers, so ``state_dict`` is unchanged):

* the model's ``forward`` — records the step's timestep for the decision and refuses
  arguments that inject values between blocks (ControlNet residuals);
* the first block of the first segment — the *head*: hands the whole stack to the
  policy, which decides on the device and either runs every original block (through a
  :class:`~fastcache.policies.base.StackRunner`) or reuses its cache;
* every other block — a pass-through: the head already produced the stack's output.

``handle.remove()`` restores each ``forward`` exactly as it was (including instance
attributes set by others before us, e.g. accelerate hooks).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .config import CacheConfig
from .policies import policy_for
from .policies.base import StackRunner
from .specs import ModelSpec, find_spec

DEFAULT_CONTEXT = "default"
_PATCHES: weakref.WeakKeyDictionary[nn.Module, Patch] = weakref.WeakKeyDictionary()
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
        self.var_kw = any(p.kind == p.VAR_KEYWORD for p in params)

    def __call__(self, args, kwargs) -> dict:
        if len(args) > len(self.names):
            raise TypeError(f"too many positional arguments: {len(args)} for {self.names}")
        out = dict(self.defaults)
        out.update(zip(self.names, args))
        out.update(kwargs)
        return out


def _instance_forward(module: nn.Module):
    return module.__dict__.get("forward", _MISSING)


def _set_forward(module: nn.Module, fn) -> None:
    if fn is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = fn


class Patch:
    """The handle returned by :func:`patch`. ``remove()`` undoes the patch."""

    def __init__(self, model: nn.Module, config: CacheConfig, spec: ModelSpec):
        self.model = model
        self.config = config
        self.spec = spec
        self.policy = policy_for(config)(config, spec, model)
        self.segments = spec.blocks(model)
        self.head = self.segments[0][0]
        self.contexts: dict[str, object] = {DEFAULT_CONTEXT: self.policy.new_state()}
        self.current_context = DEFAULT_CONTEXT
        self.active = False
        self._timestep: torch.Tensor | None = None
        self._saved: list[tuple[nn.Module, object]] = []

    # -- install / remove -------------------------------------------------------------
    def _install(self) -> None:
        spec = self.spec
        model_fwd = self.model.forward
        model_binder = _Binder(model_fwd)
        originals = [[blk.forward for blk in seg] for seg in self.segments]
        block_binder = _Binder(originals[0][0])
        runner = StackRunner(spec, originals)
        head = self.head
        policy = self.policy
        patch = self

        def model_forward(*args, **kwargs):
            call = model_binder(args, kwargs)
            for name in spec.refuse_args:
                if call.get(name) is not None:
                    raise ValueError(
                        f"fastcache: {type(patch.model).__name__} was called with {name}=..., which adds "
                        "values between blocks; a cached block stack cannot honour it. Remove the cache "
                        "(handle.remove()) for this call."
                    )
            t = call.get(spec.timestep_arg)
            if t is None:
                raise ValueError(
                    f"fastcache: the model call has no {spec.timestep_arg!r} argument; the cache needs "
                    "the step's timestep to detect a new sampling run."
                )
            if not isinstance(t, torch.Tensor):
                t = torch.tensor([float(t)], dtype=torch.float32)
            patch._timestep = t
            policy.begin_step(patch.contexts[patch.current_context], t)
            try:
                return model_fwd(*args, **kwargs)
            finally:
                patch._timestep = None

        def head_forward(*args, **kwargs):
            call = block_binder(args, kwargs)
            t = patch._timestep
            if t is None:
                raise RuntimeError(
                    "fastcache: the patched block stack was called outside its model's forward; "
                    "call the model itself (the cache decision needs the step's timestep)."
                )
            state = patch.contexts[patch.current_context]
            x = call[spec.streams[0]]
            if t.device != x.device:
                t = t.to(x.device, non_blocking=True)
            out = policy.run_stack(state, runner, head, call, t)
            return spec.pack(out)

        def make_passthrough(binder):
            def passthrough_forward(*args, **kwargs):
                call = binder(args, kwargs)
                return spec.pack({n: call.get(n) for n in spec.returns})

            return passthrough_forward

        def make_block_forward(index, forward, binder):
            def block_forward(*args, **kwargs):
                t = patch._timestep
                if t is None:
                    raise RuntimeError(
                        "fastcache: a patched block was called outside its model's forward; call the model itself."
                    )
                state = patch.contexts[patch.current_context]
                return policy.block_forward(state, index, forward, binder(args, kwargs), t)

            return block_forward

        self._saved.append((self.model, _instance_forward(self.model)))
        _set_forward(self.model, model_forward)
        if policy.granularity == "block":
            for i, seg in enumerate(self.segments):
                binder = _Binder(originals[i][0])
                for j, blk in enumerate(seg):
                    self._saved.append((blk, _instance_forward(blk)))
                    _set_forward(blk, make_block_forward((i, j), originals[i][j], binder))
            self.active = True
            return
        if policy.granularity != "stack":
            raise ValueError(f"policy granularity must be 'stack' or 'block', got {policy.granularity!r}")
        for i, seg in enumerate(self.segments):
            passthrough = make_passthrough(_Binder(originals[i][0]))
            for j, blk in enumerate(seg):
                self._saved.append((blk, _instance_forward(blk)))
                _set_forward(blk, head_forward if (i, j) == (0, 0) else passthrough)
        self.active = True

    def remove(self) -> None:
        """Restore every patched ``forward`` and drop the cache buffers."""
        if not self.active:
            return
        for module, fwd in reversed(self._saved):
            _set_forward(module, fwd)
        self._saved.clear()
        self.contexts = {DEFAULT_CONTEXT: self.policy.new_state()}
        self.active = False
        if _PATCHES.get(self.model) is self:
            del _PATCHES[self.model]

    # -- contexts and state -------------------------------------------------------------
    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Route calls inside the block to the cache context ``name`` (e.g. "cond" and
        "uncond" when classifier-free guidance runs the two branches as separate calls)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"context name must be a non-empty string, got {name!r}")
        if name not in self.contexts:
            self.contexts[name] = self.policy.new_state()
        prev = self.current_context
        self.current_context = name
        try:
            yield
        finally:
            self.current_context = prev

    def set_num_steps(self, num_steps: int | None) -> None:
        """Steps per sampling run (forces the last one to compute); None = unknown."""
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {num_steps!r}")
        self.policy.num_steps = num_steps or 0

    def reset(self) -> None:
        for st in self.contexts.values():
            self.policy.reset_state(st)

    def stats(self) -> dict:
        return {
            "policy": self.config.kind,
            "model": self.spec.name,
            "config": self.config.to_dict(),
            "contexts": {name: self.policy.state_stats(st) for name, st in self.contexts.items()},
        }

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch(model: nn.Module, config: CacheConfig, spec: ModelSpec | None = None) -> Patch:
    """Patch ``model`` in place with the cache ``config``; returns a handle with ``.remove()``.

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
    if model in _PATCHES:
        raise RuntimeError(
            f"{type(model).__name__} is already patched with {_PATCHES[model].config.kind}; "
            "call fastcache.unpatch(model) (or handle.remove()) before patching again."
        )
    spec = spec or find_spec(model)
    p = Patch(model, config, spec)
    p._install()
    _PATCHES[model] = p
    return p


def _unwrap(model):
    """The module behind a ``torch.compile`` wrapper (OptimizedModule._orig_mod)."""
    return getattr(model, "_orig_mod", model)


def get_patch(model: nn.Module) -> Patch:
    try:
        return _PATCHES[_unwrap(model)]
    except (KeyError, TypeError):
        raise ValueError(f"{type(model).__name__} is not patched by fastcache (use fastcache.patch first)") from None


def unpatch(model: nn.Module) -> None:
    get_patch(model).remove()


@contextlib.contextmanager
def patched(model: nn.Module, config: CacheConfig, spec: ModelSpec | None = None) -> Iterator[Patch]:
    """``with fastcache.patched(model, cfg) as handle:`` — the patch is removed on exit."""
    p = patch(model, config, spec)
    try:
        yield p
    finally:
        p.remove()


def stats(model: nn.Module) -> dict:
    """Per context: steps computed / skipped in the current run, the decision timeline,
    the relative-L1 and accumulator traces, cache memory in bytes. Reads the device
    state to the host: call it between runs, not inside a step."""
    return get_patch(model).stats()


def reset(model: nn.Module) -> None:
    """Forget every cached tensor and decision state of ``model`` (in place)."""
    get_patch(model).reset()


def context(model: nn.Module, name: str):
    """``with fastcache.context(model, "uncond"): model(...)`` — separate cache state for
    separately-called CFG branches."""
    return get_patch(model).context(name)
