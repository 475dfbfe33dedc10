"""The automatic path: a transformer no family file describes, driven through its own
forward. fastcache finds its block lists (every ``nn.ModuleList`` whose items contain an
attention layer), and the policies of the automatic path hook the blocks (stack methods:
First-Block Cache) or the blocks' attention / feed-forward submodules (branch methods:
FORA, TaylorSeer, ScheduleConfig) while the model's own loop calls them, so whatever the
model does between blocks (concatenating streams, per-block conditioning, long skips)
runs as written.

What it needs of the model, established at :func:`auto_spec` (patch time): block lists
and a timestep argument of its forward. Everything about a block's streams is learnt by
the policies from the calls themselves. Where that fails, the refusal names the class,
what is missing and the one thing to register (a :class:`~fastcache.ModelSpec`).
"""

from __future__ import annotations

import inspect

from torch import nn

from ..specs import ModelSpec, qualified_name

#: names of a model forward's timestep argument, in the order they are tried
TIMESTEP_ARGS = ("timestep", "timesteps", "t", "time_step", "sigma", "sigmas")
_ATTENTION_BASES = ("Attention", "AttentionModuleMixin", "MultiheadAttention")
#: classes whose pipelines pass a timestep that rises during a run (Lumina2Pipeline passes
#: ``1 - t / 1000``, ZImagePipeline ``(1000 - t) / 1000``): ModelSpec.timestep_rises
RISING_TIMESTEP = (
    "diffusers.models.transformers.transformer_lumina2.Lumina2Transformer2DModel",
    "diffusers.models.transformers.transformer_z_image.ZImageTransformer2DModel",
)


def is_attention(m: nn.Module) -> bool:
    """diffusers' attention classes (``Attention``, every ``AttentionModuleMixin``),
    torch's ``MultiheadAttention``, and any class named ``*Attention``."""
    names = {c.__name__ for c in type(m).__mro__}
    return bool(names & set(_ATTENTION_BASES)) or type(m).__name__.endswith("Attention")


def is_block(m: nn.Module) -> bool:
    return any(is_attention(s) for s in m.modules())


def find_block_lists(model: nn.Module) -> list[str]:
    """Attribute paths of the model's block lists, in definition order (the model's call
    order is learnt at the first call). A list inside a block is the block's own."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        if all(is_block(b) for b in mod):
            out.append(name)
    return out


def timestep_arg(model: nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((n for n in TIMESTEP_ARGS if n in params), None)


def auto_spec(model: nn.Module) -> ModelSpec:
    """The automatic spec of ``model`` (registered, so copies and unpickled models find it
    by name), or a TypeError saying what is missing."""
    from ..specs import register, registered

    cls = type(model)
    name = f"auto:{qualified_name(cls)}"
    for s in registered():
        if s.name == name:
            return s
    lists = find_block_lists(model)
    if not lists:
        raise TypeError(
            f"fastcache cannot cache {cls.__name__}: it has no block list (an nn.ModuleList of modules that "
            "contain an attention layer), so there is no stack to cache. Describe the model with "
            "fastcache.register(fastcache.ModelSpec(...)) (see fastcache.specs)."
        )
    t = timestep_arg(model)
    if t is None:
        raise TypeError(
            f"fastcache cannot cache {cls.__name__} automatically: its forward has no timestep argument "
            f"(tried {', '.join(TIMESTEP_ARGS)}), which the cache needs to tell the steps and runs apart. "
            "Register a fastcache.ModelSpec(..., timestep_arg='<its name>') for it."
        )
    spec = ModelSpec(
        name=name,
        model_types=qualified_name(cls),
        segments=tuple(lists),
        streams=(),
        returns=(),
        modulation=None,
        timestep_arg=t,
        timestep_rises=any(qualified_name(c) in RISING_TIMESTEP for c in cls.__mro__),
        auto=True,
    )
    return register(spec, builtin=True)
