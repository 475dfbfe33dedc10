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
        model_types: classes (or a zero-arg callable returning classes, for optional
            imports) whose instances this spec matches (``isinstance``).
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
        refuse_args: model forward arguments that add values between blocks
            (ControlNet residuals, skipped layers); stack caching refuses them when set.
        teacache_coefficients: published TeaCache polynomial (numpy.poly1d order), if any.
        interior: ``block -> fastcache.interior.BlockProgram`` for branch-level policies
            (FORA, EOC); None = no interior known (those policies refuse the model).
    """

    name: str
    model_types: Any
    segments: tuple[str, ...]
    streams: tuple[str, ...]
    returns: tuple[str, ...]
    modulation: ModulationFn
    timestep_arg: str = "timestep"
    cached_streams: tuple[str, ...] | None = None
    dropped_streams: tuple[str, ...] = ()
    refuse_args: tuple[str, ...] = ()
    teacache_coefficients: tuple[float, ...] | None = None
    interior: Any = None

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError(f"ModelSpec {self.name!r}: segments must name at least one ModuleList")
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

    def types(self) -> tuple[type, ...]:
        t = self.model_types
        if callable(t) and not isinstance(t, type):
            try:
                t = t()
            except ImportError:
                return ()
        return tuple(t) if isinstance(t, (tuple, list)) else (t,)

    def matches(self, model: nn.Module) -> bool:
        types = self.types()
        return bool(types) and isinstance(model, types)

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


_REGISTRY: list[ModelSpec] = []


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace, by name) a model spec; user specs are tried before built-ins."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a fastcache.ModelSpec, got {type(spec).__name__}")
    _REGISTRY[:] = [s for s in _REGISTRY if s.name != spec.name]
    _REGISTRY.insert(0, spec)
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


def find_spec(model: nn.Module) -> ModelSpec:
    for spec in _REGISTRY:
        if spec.matches(model):
            return spec
    names = sorted({t.__name__ for s in _REGISTRY for t in s.types()})
    raise TypeError(
        f"fastcache does not know how to cache {type(model).__name__}. Supported: {', '.join(names)}. "
        "For your own model describe it with fastcache.register(fastcache.ModelSpec(...)) "
        "(see fastcache.specs for the fields and an example), or pass spec=... to fastcache.patch."
    )


# --------------------------------------------------------------------------- built-ins
def _adaln_zero_linear(norm1: nn.Module, emb: torch.Tensor, x: torch.Tensor):
    """AdaLayerNormZero(-X): linear(silu(emb)); shift_msa, scale_msa are the first two
    chunks. Returns (shift, scale, the linear's whole output)."""
    chunks = 9 if norm1.linear.out_features == 9 * x.shape[-1] else 6
    out = norm1.linear(norm1.silu(emb))
    mod = out.chunk(chunks, dim=1)
    return mod[0], mod[1], out


def _mod_reference_dit(block, call):
    x = call["x"]
    out = block.adaLN_modulation(call["c"])
    shift, scale = out.chunk(6, dim=1)[:2]
    return x, shift, scale, block.norm1.eps, ((block.adaLN_modulation, out, (call["c"],)),)


def _mod_basic_ada_norm_zero(block, call):
    x = call["hidden_states"]
    n = block.norm1
    emb = n.emb(call["timestep"], call["class_labels"], hidden_dtype=x.dtype)
    shift, scale, out = _adaln_zero_linear(n, emb, x)
    # the block calls norm1.emb(timestep, class_labels, ...) and norm1.linear(silu(emb))
    return x, shift, scale, n.norm.eps, ((n.emb, emb, (call["timestep"], call["class_labels"])), (n.linear, out))


def _mod_basic_ada_norm_single(block, call):
    x = call["hidden_states"]
    B = x.shape[0]
    mod = (block.scale_shift_table[None] + call["timestep"].reshape(B, 6, -1)).chunk(6, dim=1)
    return x, mod[0], mod[1], block.norm1.eps


def _mod_joint(block, call):
    x = call["hidden_states"]
    shift, scale, out = _adaln_zero_linear(block.norm1, call["temb"], x)
    return x, shift, scale, block.norm1.norm.eps, ((block.norm1.linear, out),)


def _builtin_interior(block):
    from .interior import program_for

    return program_for(block)


def _reference_types():
    from fastcache.models.dit import DiT

    return (DiT,)


def _diffusers(name):
    def types():
        import diffusers

        return (getattr(diffusers, name),)

    return types


FLUX_TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

BUILTIN_SPECS = (
    ModelSpec(
        name="fastcache-dit",
        model_types=_reference_types,
        segments=("blocks",),
        streams=("x",),
        returns=("x",),
        modulation=_mod_reference_dit,
        timestep_arg="t",
        interior=_builtin_interior,
    ),
    ModelSpec(
        name="diffusers-dit",
        model_types=_diffusers("DiTTransformer2DModel"),
        segments=("transformer_blocks",),
        streams=("hidden_states",),
        returns=("hidden_states",),
        modulation=_mod_basic_ada_norm_zero,
        interior=_builtin_interior,
    ),
    ModelSpec(
        name="diffusers-pixart",
        model_types=_diffusers("PixArtTransformer2DModel"),
        segments=("transformer_blocks",),
        streams=("hidden_states",),
        returns=("hidden_states",),
        modulation=_mod_basic_ada_norm_single,
        interior=_builtin_interior,
    ),
    ModelSpec(
        name="diffusers-flux",
        model_types=_diffusers("FluxTransformer2DModel"),
        segments=("transformer_blocks", "single_transformer_blocks"),
        streams=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states"),
        # The reference TeaCache-FLUX caches the image tokens only: the text stream
        # leaving the single-stream blocks is dropped by the model (norm_out sees the
        # image tokens), so it passes through unchanged on a skipped step.
        cached_streams=("hidden_states",),
        dropped_streams=("encoder_hidden_states",),
        modulation=_mod_joint,
        refuse_args=("controlnet_block_samples", "controlnet_single_block_samples"),
        teacache_coefficients=FLUX_TEACACHE_COEFFICIENTS,
        interior=_builtin_interior,
    ),
    ModelSpec(
        name="diffusers-sd3",
        model_types=_diffusers("SD3Transformer2DModel"),
        segments=("transformer_blocks",),
        streams=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states"),
        cached_streams=("hidden_states",),
        dropped_streams=("encoder_hidden_states",),  # the last block may return None for it
        modulation=_mod_joint,
        refuse_args=("block_controlnet_hidden_states", "skip_layers"),
        interior=_builtin_interior,
    ),
)

_REGISTRY.extend(BUILTIN_SPECS)
