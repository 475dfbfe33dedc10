"""One call on a diffusers pipeline: :func:`enable`, :func:`disable`, :func:`report`.

    import fastcache
    fastcache.enable(pipe, fastcache.TeaCacheConfig(threshold=0.25))   # or a profile + budget=K,
    images = pipe(prompt, num_inference_steps=50).images                # a dict, a JSON file, a name
    print(fastcache.report(pipe))
    fastcache.disable(pipe)                                             # the pipeline as it was

:func:`enable` patches every denoiser of the pipeline (``transformer``, and ``transformer_2``
where Wan 2.2's two experts run; every ``transformer*`` component that is set), each with its
own cache state, and announces the scheduler's steps to each (:func:`fastcache.announce_steps`),
so static schedules place every step on the host: 0 host reads per step. Classifier-free
guidance needs nothing: diffusers pipelines wrap each branch in
``transformer.cache_context("cond" | "uncond")``, which the patch follows. For Wan 2.2 each
expert is patched on its own: nothing of one expert's cache reaches the other, and the first
step on each expert computes.

What ``config`` may be (the same forms :meth:`fastcache.CacheConfig.to_dict` writes, so a
serving engine can pass a backend name plus a dict):

* a config object (``fastcache.TeaCacheConfig(...)``, ...);
* a :class:`fastcache.Profile` (or the path of its ``.safetensors``) holding searched
  schedules, with ``budget=K`` choosing the schedule of K computed steps;
* a dict in ``to_dict`` form (``{"kind": "teacache", "threshold": 0.2}``), or the path of a
  ``.json`` file holding one;
* a method name (``"first_block"``, ``"teacache"``, ...): that method's defaults;
* a dict from denoiser names to any of the above (``{"transformer": cfg, "transformer_2":
  cfg2}``), where the denoisers need different settings (a profile fits one model).

Everything is checked before anything is patched, and a failure patches nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch.nn as nn

from .config import _CONFIG_TYPES, CacheConfig
from .runtime import StepAnnouncer, _find, patch, spec_for
from .tuning.profile import Profile

__all__ = ["denoisers", "disable", "enable", "report"]

ENABLED_ATTR = "_fastcache_enabled"


@dataclasses.dataclass
class Enabled:
    """What :func:`enable` did to a pipeline (``pipe._fastcache_enabled``): the patch and
    the step announcer of each denoiser, by component name."""

    patches: dict
    announcers: dict

    def remove(self) -> None:
        for a in self.announcers.values():
            a.remove()
        for p in self.patches.values():
            if p.active:
                p.remove()


def _is_denoiser_name(name: str) -> bool:
    return name.startswith("transformer") or name in ("unet", "prior", "denoiser")


def denoisers(pipe) -> dict[str, nn.Module]:
    """The pipeline's denoiser components by name (``transformer``, ``transformer_2``, ...;
    components set to None, as Wan 2.1's ``transformer_2``, are left out)."""
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, Mapping):
        what = type(pipe).__name__
        hint = (
            "for a transformer use fastcache.patch(model, config)"
            if isinstance(pipe, nn.Module)
            else "pass a diffusers pipeline (DiffusionPipeline.from_pretrained(...))"
        )
        raise TypeError(f"fastcache.enable: {what} is not a diffusers pipeline (it has no .components); {hint}")
    return {n: m for n, m in comps.items() if _is_denoiser_name(n) and isinstance(m, nn.Module)}


def _cacheable(pipe) -> dict[str, nn.Module]:
    found = denoisers(pipe)
    out, why = {}, []
    for name, model in found.items():
        if name == "unet" or type(model).__name__.startswith("UNet"):
            why.append(f"{name} ({type(model).__name__}): a UNet; fastcache caches diffusion transformers")
            continue
        try:
            spec_for(model)
        except TypeError as e:
            why.append(f"{name} ({type(model).__name__}): {e}")
            continue
        out[name] = model
    if not out:
        comps = sorted(n for n, m in pipe.components.items() if m is not None)
        detail = "; ".join(why) if why else f"no transformer component among {comps}"
        raise TypeError(f"fastcache.enable: {type(pipe).__name__} has no denoiser fastcache can cache: {detail}")
    if why:  # a denoiser left uncached would make the run half cached: say so instead
        raise TypeError(f"fastcache.enable: {type(pipe).__name__}: cannot cache " + "; ".join(why))
    return out


def _kinds() -> list[str]:
    return [c.kind for c in _CONFIG_TYPES if c.kind != "calibration"]  # calibration: fastcache.calibrate


def _from_profile(profile: Profile, budget, name: str, model: nn.Module) -> CacheConfig:
    have = sorted(profile.schedules)
    make = (
        "search one with `python -m fastcache calibrate --pipeline PATH --steps N --budget K "
        "--out profile.safetensors` (or fastcache.search_schedule(model, runs, K, profile=profile).store(profile))"
    )
    if not have:
        raise ValueError(f"fastcache.enable: the profile {profile._who()} holds no searched schedule; {make}")
    if budget is None:
        raise ValueError(
            f"fastcache.enable: the profile {profile._who()} holds schedules for budgets {have}: pass budget=K, "
            f"one of them (K = computed steps)"
        )
    if int(budget) not in profile.schedules:
        raise ValueError(
            f"fastcache.enable: budget={budget}: the profile {profile._who()} holds schedules for budgets {have}; "
            f"pass one of them, or {make.replace('--budget K ', f'--budget {budget} ')}"
        )
    profile.check_fits(model, method=f"fastcache.enable ({name})")
    return profile.schedule(int(budget))


def _resolve(config, budget, name: str, model: nn.Module) -> CacheConfig:
    """One denoiser's config from any accepted form (see the module docstring)."""
    if isinstance(config, (str, Path)) and not (isinstance(config, str) and config in _kinds()):
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(
                f"fastcache.enable: {str(config)!r} is neither a method name ({', '.join(_kinds())}) nor an existing "
                "file (a .json config or a .safetensors profile)"
            )
        if path.suffix == ".json":
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"fastcache.enable: {path}: not a readable JSON config ({e})") from None
            if not isinstance(config, Mapping):
                raise ValueError(f"fastcache.enable: {path}: expected a JSON object in CacheConfig.to_dict form")
        else:
            config = Profile.load(path)
    if isinstance(config, str):
        config = {"kind": config}
    if isinstance(config, Profile):
        return _from_profile(config, budget, name, model)
    if budget is not None:
        raise ValueError(
            f"fastcache.enable: budget={budget} picks a searched schedule from a profile; with a "
            f"{type(config).__name__} config pass no budget"
        )
    if isinstance(config, Mapping):
        if "kind" not in config:
            raise ValueError(
                f"fastcache.enable: the config dict {dict(config)!r} has no 'kind' (one of {', '.join(_kinds())}); "
                "it is the form CacheConfig.to_dict() writes"
            )
        try:
            return CacheConfig.from_dict(dict(config))
        except (TypeError, ValueError) as e:
            raise ValueError(f"fastcache.enable: config dict {dict(config)!r}: {e}") from None
    if isinstance(config, CacheConfig):
        return config
    raise TypeError(
        f"fastcache.enable: config must be a fastcache config, a Profile (with budget=K), a dict or JSON file "
        f"in CacheConfig.to_dict form, or a method name; got {type(config).__name__}"
    )


def enable(pipe, config, *, budget: int | None = None) -> Enabled:
    """Cache every denoiser of the diffusers pipeline ``pipe`` with ``config`` and announce
    the scheduler's steps to each; :func:`disable` undoes it exactly. See the module
    docstring for what ``config`` may be. Returns the record also kept on the pipeline."""
    if getattr(pipe, "__dict__", {}).get(ENABLED_ATTR) is not None:
        raise RuntimeError(
            f"fastcache.enable: {type(pipe).__name__} is already enabled; call fastcache.disable(pipe) first"
        )
    models = _cacheable(pipe)
    if isinstance(config, Mapping) and "kind" not in config and config and set(config) <= set(denoisers(pipe)):
        missing = sorted(set(models) - set(config))
        if missing:
            raise ValueError(
                f"fastcache.enable: the per-denoiser config names {sorted(config)} but not {missing}; "
                "give every denoiser a config"
            )
        per = dict(config)
    else:
        per = dict.fromkeys(models, config)
    for name, model in models.items():
        if _find(model) is not None:
            raise RuntimeError(
                f"fastcache.enable: {name} ({type(model).__name__}) is already patched; "
                "fastcache.unpatch(pipe." + name + ") first, or let enable() patch it"
            )
    configs = {name: _resolve(per[name], budget, name, model) for name, model in models.items()}
    scheduler = getattr(pipe, "scheduler", None)
    if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
        raise TypeError(
            f"fastcache.enable: {type(pipe).__name__}.scheduler ({type(scheduler).__name__}) has no "
            "set_timesteps()/step(): its steps cannot be announced"
        )
    record = Enabled({}, {})
    try:
        for name, model in models.items():
            record.patches[name] = patch(model, configs[name])
            record.announcers[name] = StepAnnouncer(scheduler, record.patches[name], pipe)
    except BaseException:
        record.remove()
        raise
    pipe.__dict__[ENABLED_ATTR] = record
    return record


def disable(pipe) -> None:
    """Undo :func:`enable`: every denoiser's original forward back, the scheduler's and
    the pipeline's methods as they were (the uncached pipeline, bitwise)."""
    record = getattr(pipe, "__dict__", {}).get(ENABLED_ATTR)
    if record is None:
        raise ValueError(f"fastcache.disable: {type(pipe).__name__} is not enabled (fastcache.enable(pipe, config))")
    record.remove()
    del pipe.__dict__[ENABLED_ATTR]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _lines(who: str, stats: dict) -> list[str]:
    out = []
    method = stats["policy"]
    used = {c: st for c, st in stats["contexts"].items() if st.get("steps", 0) or st.get("warnings")}
    if not used:
        return [f"{who} {method}: no calls yet"]
    for ctx, st in used.items():
        steps, computed = int(st.get("steps", 0)), int(st.get("computed", 0))
        skipped = int(st.get("skipped", steps - computed))
        frac = st.get("computed_fraction")
        if frac is None:
            frac = computed / steps if steps else 1.0
        ideal = f"{1 / frac:.2f}x" if frac > 0 else "-"
        line = (
            f"{who} [{ctx}] {method}: {steps} steps, {computed} computed, {skipped} skipped, "
            f"ideal speedup {ideal}, cache {_mb(int(st.get('cache_bytes', 0)))}"
        )
        out.append(line)
        out.extend(f"    warning: {w}" for w in st.get("warnings", ()))
    if stats.get("grad_bypassed_calls"):
        out.append(f"    warning: {stats['grad_bypassed_calls']} call(s) ran uncached under autograd")
    return out


def report(model_or_pipe) -> str:
    """One line per denoiser, cache context and method: steps, computed, skipped, the
    ideal speedup (block work), cache memory, then any warnings. Reads device state: call
    it between runs."""
    from .runtime import get_patch

    if isinstance(model_or_pipe, nn.Module):
        return "\n".join(_lines(type(model_or_pipe).__name__, get_patch(model_or_pipe).stats()))
    record = getattr(model_or_pipe, "__dict__", {}).get(ENABLED_ATTR)
    if record is not None:
        found = dict(record.patches)
    else:  # patched by hand
        found = {n: _find(m) for n, m in denoisers(model_or_pipe).items() if _find(m) is not None}
    if not found:
        raise ValueError(f"fastcache.report: nothing of {type(model_or_pipe).__name__} is cached (fastcache.enable)")
    return "\n".join(line for n, p in found.items() for line in _lines(n, p.stats()))
