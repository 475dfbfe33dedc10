"""Models described as data: one :class:`ModelSpec` per transformer family.

A spec tells the runtime where the block stack is, how a block is called (which
arguments carry the hidden-state streams, in which order it returns them), how to read
the first block's AdaLN modulation (TeaCache's indicator), and which model-level
arguments it must refuse because they inject values between blocks. Policies talk to
specs, never to model classes.

Register your own model::

    fastcache.register(fastcache.ModelSpec(
        name="my-dit",
        model_types=(MyDiT,),
        segments=("blocks",),
        streams=("x",),
        returns=("x",),
        modulation=lambda block, call: (call["x"], *block.ada(call["c"]).chunk(6, 1)[:2], 1e-6),
        timestep_arg="t",
    ))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# (block, bound block arguments) -> (x (B,N,D), shift (B,D), scale (B,D), LayerNorm eps[, memo])
# memo (optional): ((submodule, its output[, args it is called with]), ...) — the block's
# own submodules this function ran; on a computed step the block gets these outputs
# instead of recomputing them (fastcache.policies.memo).
ModulationFn = Callable[[nn.Module, dict], tuple]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How fastcache finds and drives the block stack of one model family.

    Attributes:
        name: short id, shown in errors and stats.
        model_types: classes, or class names ``"module.QualName"`` (matched along the
            model's MRO without importing anything), or a zero-arg callable returning
            classes, whose instances this spec matches.
        segments: attribute paths of the ``nn.ModuleList`` s that form the stack, in the
            order the model runs them, e.g. Flux's dual- then single-stream blocks.
            Every block of every segment takes the same keyword arguments.
        streams: names of the block arguments carrying hidden-state streams.
        returns: the block's return value layout: a tuple of stream names in return
            order; a single name means the block returns a bare tensor.
        cached_streams: streams whose stack residual is cached (the streams the model
            uses after the stack); others pass through unchanged on a skipped step.
            Defaults to ``streams[:1]``.
        dropped_streams: streams the model never reads after the stack (Flux's and SD3's
            text tokens: their last block may even return None for them). Under
            ``torch.cond`` the cache neither stores nor returns them; every other
            returned stream comes back computed on a computed step.
        modulation: reads the first block's timestep modulation for the indicator.
        timestep_arg: name of the model forward's timestep argument (a rise in the
            timestep starts a new sampling run).
        timestep_rises: the timestep argument rises during a run (Z-Image: ``1 - sigma``);
            the runtime then reads it negated, so the run-start rule above holds.
        refuse_args: model forward arguments that add values between blocks
            (ControlNet residuals, skipped layers); stack caching refuses them when set.
        teacache_coefficients: published TeaCache polynomial (numpy.poly1d order), if any.
        interior: ``block -> fastcache.interior.BlockProgram`` for branch-level policies
            (FORA, EOC); None = no interior known (those policies refuse the model).
        auto: made by :func:`fastcache.families.auto.auto_spec` for a model no family
            describes: only the segments and the timestep argument are known; the policies
            of the automatic path learn the rest from the calls.
        frame_layout: video families: ``(model, the model forward's bound arguments) ->
            (frames, tokens_per_frame)`` of this call's first cached stream, whose tokens
            are frame-major (frame ``f`` holds tokens ``f*S .. (f+1)*S - 1``), or None when
            the call does not tell. None (image families, the automatic path): no frame
            layout is known (AdaCache's MoReg refuses the model).
    """

    name: str
    model_types: Any
    segments: tuple[str, ...]
    streams: tuple[str, ...]
    returns: tuple[str, ...]
    modulation: ModulationFn
    timestep_arg: str = "timestep"
    timestep_rises: bool = False
    cached_streams: tuple[str, ...] | None = None
    dropped_streams: tuple[str, ...] = ()
    refuse_args: tuple[str, ...] = ()
    teacache_coefficients: tuple[float, ...] | None = None
    interior: Any = None
    auto: bool = False
    frame_layout: Callable[[nn.Module, dict], tuple[int, int] | None] | None = None

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError(f"ModelSpec {self.name!r}: segments must name at least one ModuleList")
        if self.auto:
            return
        if not self.streams or not set(self.returns) <= set(self.streams):
            raise ValueError(
                f"ModelSpec {self.name!r}: returns {self.returns} must be stream names from {self.streams}"
            )
        cached = self.cached_streams if self.cached_streams is not None else self.streams[:1]
        if not set(cached) <= set(self.returns):
            raise ValueError(f"ModelSpec {self.name!r}: cached_streams {cached} must be among returns {self.returns}")
        object.__setattr__(self, "cached_streams", tuple(cached))
        dropped = tuple(self.dropped_streams)
        if set(dropped) & set(cached) or not set(dropped) <= set(self.streams):
            raise ValueError(
                f"ModelSpec {self.name!r}: dropped_streams {dropped} must be streams that are not cached {cached}"
            )
        object.__setattr__(self, "dropped_streams", dropped)

    def types(self) -> tuple[type | str, ...]:
        t = self.model_types
        if callable(t) and not isinstance(t, type):
            try:
                t = t()
            except ImportError:
                return ()
        return tuple(t) if isinstance(t, (tuple, list)) else (t,)

    def matches(self, model: nn.Module) -> bool:
        types = self.types()
        classes = tuple(t for t in types if isinstance(t, type))
        if classes and isinstance(model, classes):
            return True
        names = {t for t in types if isinstance(t, str)}
        return bool(names) and any(qualified_name(c) in names for c in type(model).__mro__)

    def blocks(self, model: nn.Module) -> list[nn.ModuleList]:
        out = []
        for path in self.segments:
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if not isinstance(obj, nn.ModuleList):
                raise TypeError(
                    f"{type(model).__name__} has no nn.ModuleList at {path!r} (spec {self.name!r}); "
                    "the spec does not fit this model"
                )
            out.append(obj)
        if len(out[0]) == 0:
            raise ValueError(f"{type(model).__name__}.{self.segments[0]} is empty: nothing to cache")
        return out

    def pack(self, streams: dict[str, torch.Tensor | None]):
        """Block return value from stream values."""
        if len(self.returns) == 1:
            return streams[self.returns[0]]
        return tuple(streams[n] for n in self.returns)

    def unpack(self, out) -> dict[str, torch.Tensor | None]:
        if len(self.returns) == 1:
            return {self.returns[0]: out}
        return dict(zip(self.returns, out))


def qualified_name(cls: type) -> str:
    """``"module.QualName"`` of a class (how specs and block programs name classes they
    must not import)."""
    return f"{cls.__module__}.{cls.__qualname__}"


_REGISTRY: list[ModelSpec] = []


def register(spec: ModelSpec, builtin: bool = False) -> ModelSpec:
    """Add (or replace, by name) a model spec; user specs are tried before built-ins
    (``builtin=True``: after every spec registered so far, as ``fastcache.families`` does)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a fastcache.ModelSpec, got {type(spec).__name__}")
    _REGISTRY[:] = [s for s in _REGISTRY if s.name != spec.name]
    _REGISTRY.insert(len(_REGISTRY) if builtin else 0, spec)
    return spec


def registered() -> list[ModelSpec]:
    return list(_REGISTRY)


def spec_by_name(name: str) -> ModelSpec:
    """The registered spec called ``name`` (copies and unpickled models find theirs here)."""
    for spec in _REGISTRY:
        if spec.name == name:
            return spec
    raise LookupError(
        f"fastcache: no registered ModelSpec named {name!r} (the model was patched with it); "
        "fastcache.register() it before copying or loading the patched model."
    )


def find_spec(model: nn.Module, why: str = "") -> ModelSpec:
    """The registered (not automatic) spec of ``model``; ``why``: the automatic path's
    refusal, quoted in the error."""
    for spec in _REGISTRY:
        if spec.matches(model) and not spec.auto:
            return spec
    names = sorted(
        {t.rsplit(".", 1)[-1] if isinstance(t, str) else t.__name__ for s in _REGISTRY if not s.auto for t in s.types()}
    )
    raise TypeError(
        f"{why or f'fastcache does not know how to cache {type(model).__name__}.'} "
        f"Families fastcache describes by hand: {', '.join(names)}. "
        "For your own model describe it with fastcache.register(fastcache.ModelSpec(...)) "
        "(see fastcache.specs for the fields and an example), or pass spec=... to fastcache.patch."
    )
