"""The reach matrix: every diffusers transformer class of the reach zoo (the curated
families of ``support.zoo`` and the 31 classes of ``support.reach_image`` /
``support.reach_video``) x the methods that should work everywhere, run the same way for
the contract test (tests/reach/test_reach.py) and for the table users read
(bench/reach_table.py writes docs/reach.md from it).

A cell is measured, never typed:

* ``works``: ``fastcache.patch`` takes the model; at the method's never-skip setting the
  sampling loop is bitwise the unpatched one; at a skipping setting it is finite and runs
  fewer attention calls than the unpatched loop (counted at
  ``torch.nn.functional.scaled_dot_product_attention`` and every attention processor's
  fallback, the work a skipped step saves);
* ``refused``: ``patch`` or the first call raises a TypeError / ValueError that names the
  class and says what to do (register a spec, use another method);
* ``wrong`` / ``crash``: anything else (a test failure).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

import fastcache

from .reach_image import CASES_IMAGE
from .reach_video import CASES_VIDEO
from .zoo import CASES as CURATED

STEPS = 6
#: every class of the reach zoo, once: short name -> builder (a class a family file curates
#: gets its family's spec, the others the automatic path's)
_FIRST = ("diffusers-dit", "diffusers-pixart", "diffusers-flux", "diffusers-sd3", "diffusers-wan")
CLASSES: dict[str, Callable] = {**{k: CURATED[k] for k in _FIRST}, **CASES_IMAGE, **CASES_VIDEO}

F = fastcache


@dataclasses.dataclass(frozen=True)
class Setting:
    never_skip: Callable  # -> config computing every step
    skipping: Callable  # -> config that skips on a 6-step run


SETTINGS = {
    "FirstBlockCacheConfig": Setting(
        lambda: F.FirstBlockCacheConfig(threshold=0.0), lambda: F.FirstBlockCacheConfig(threshold=10.0)
    ),
    "TaylorSeerConfig": Setting(
        lambda: F.TaylorSeerConfig(interval=1, order=1), lambda: F.TaylorSeerConfig(interval=2, order=1)
    ),
    "FORAConfig": Setting(lambda: F.FORAConfig(interval=1), lambda: F.FORAConfig(interval=2)),
    "ScheduleConfig": Setting(lambda: F.ScheduleConfig(plan="C" * STEPS), lambda: F.ScheduleConfig(plan="CC1C1C")),
    "TeaCacheConfig": Setting(lambda: F.TeaCacheConfig(threshold=0.0), lambda: F.TeaCacheConfig(threshold=10.0)),
}


class AttentionCount(TorchFunctionMode):
    """Counts attention kernels called (scaled_dot_product_attention, baddbmm/bmm of the
    classic processors)."""

    NAMES = ("scaled_dot_product_attention", "baddbmm", "bmm")

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass
class Cell:
    status: str  # works / refused / wrong / crash
    detail: str = ""
    skipped_fraction: float = 0.0  # attention calls saved by the skipping setting


_REFS: dict = {}


def built(name: str):
    """(case, uncached output, attention calls) of class ``name``, built once."""
    if name not in _REFS:
        case = CLASSES[name]()
        mode = AttentionCount()
        with mode:
            ref = case.sample(steps=STEPS, seed=2)
        _REFS[name] = (case, ref, mode.calls)
    return _REFS[name]


def run_cell(name: str, method: str) -> Cell:
    case, ref, calls = built(name)
    m = case.model
    setting = SETTINGS[method]
    try:
        with fastcache.patched(m, setting.never_skip()):
            out = case.sample(steps=STEPS, seed=2)
    except (TypeError, ValueError) as e:
        return Cell("refused", str(e))
    except Exception as e:  # noqa: BLE001  (a crash is a result here)
        return Cell("crash", f"{type(e).__name__}: {e}")
    if not torch.equal(out, ref):
        return Cell("wrong", f"never-skip differs from the model by {(out - ref).abs().max().item():.3g}")
    try:
        mode = AttentionCount()
        with fastcache.patched(m, setting.skipping()):
            with mode:
                out = case.sample(steps=STEPS, seed=2)
    except Exception as e:  # noqa: BLE001
        return Cell("crash", f"skipping setting: {type(e).__name__}: {e}")
    if not torch.isfinite(out).all():
        return Cell("wrong", "the skipping setting gives non-finite values")
    if mode.calls >= calls:
        return Cell("wrong", f"the skipping setting ran {mode.calls} attention calls, the model {calls}")
    after = case.sample(steps=STEPS, seed=2)
    if not torch.equal(after, ref):
        return Cell("wrong", "remove() did not restore the model")
    return Cell("works", skipped_fraction=1.0 - mode.calls / calls)


# ---------------------------------------------------------------------------------- peers
# The same classes, loop and criteria for diffusers' own hooks and cache-dit's DBCache, each
# applied the way a user holding only the transformer would, on a deep copy of the model:
# the never-skip setting bitwise the model, the skipping setting finite with fewer attention
# calls (there is no remove() to check: the copy is dropped).

CACHE_DIT = "cache-dit DBCache"


@dataclasses.dataclass(frozen=True)
class Peer:
    what: str  # what is applied (docs/reach.md says it)
    enable: Callable  # (class name, skipping: bool) -> (model copy, context(i) or None, route)


def _diffusers_context(dm):
    """What the pipelines do around each call: ``with transformer.cache_context("cond")``."""
    import contextlib

    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    @contextlib.contextmanager
    def ctx(i):
        _set_cache_context(dm, CacheContext("cond"))
        try:
            yield
        finally:
            _set_cache_context(dm, None)

    return ctx


def explicit_identifiers(model) -> list[str]:
    """``<list>\\.\\d+\\.<path>`` for the outermost attention / feed-forward modules inside the
    blocks of each of the model's top-level block lists (what a user passes as TaylorSeer's
    ``cache_identifiers`` when its default patterns match no module)."""
    import re

    from diffusers.hooks._common import _ATTENTION_CLASSES, _FEEDFORWARD_CLASSES

    kinds = _ATTENTION_CLASSES + _FEEDFORWARD_CLASSES
    out: list[str] = []

    def walk(prefix, module, path):
        for sub, mod in module.named_children():
            p = f"{path}.{sub}" if path else sub
            if isinstance(mod, kinds):
                pat = rf"{re.escape(prefix)}\.\d+\.{re.escape(p)}"
                if pat not in out:
                    out.append(pat)
            else:
                walk(prefix, mod, p)

    for lname, lst in model.named_children():
        if isinstance(lst, torch.nn.ModuleList):
            for block in lst:
                walk(lname, block, "")
    return out


def _diffusers_peer(kind: str) -> Callable:
    def enable(name: str, skipping: bool):
        import copy

        from diffusers.hooks import (
            FirstBlockCacheConfig,
            MagCacheConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_mag_cache,
            apply_taylorseer_cache,
        )

        dm = copy.deepcopy(built(name)[0].model)
        if kind == "fbc":
            cfg, apply = FirstBlockCacheConfig(threshold=10.0 if skipping else 0.0), apply_first_block_cache
        elif kind == "mag":
            cfg = MagCacheConfig(
                threshold=10.0, max_skip_steps=2 if skipping else 0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS
            )
            apply = apply_mag_cache
        else:
            cfg = TaylorSeerCacheConfig(
                cache_interval=2 if skipping else 1,
                disable_cache_before_step=1,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=explicit_identifiers(dm) if kind == "taylor-explicit" else None,
            )
            apply = apply_taylorseer_cache
        if hasattr(dm, "enable_cache"):  # diffusers' CacheMixin: what a user calls
            dm.enable_cache(cfg)
        else:
            apply(dm, cfg)
        return dm, _diffusers_context(dm), ""

    return enable


def cache_dit_version() -> str | None:
    """cache-dit's version, or None when it is not importable (its column then says so)."""
    try:
        import cache_dit
    except ImportError:
        return None
    return str(getattr(cache_dit, "__version__", "?"))


def _cache_dit_config(skipping: bool):
    from cache_dit import DBCacheConfig

    return DBCacheConfig(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        residual_diff_threshold=10.0 if skipping else 0.0,  # >= 1: always similar; <= 0: never
        max_warmup_steps=1,
        num_inference_steps=STEPS,
        enable_separate_cfg=False,  # the zoo's loops make one call per step
    )


_CACHE_DIT_ROUTE: dict = {}


def _cache_dit_block_adapter(case, lname: str, pattern, skipping: bool):
    import copy

    import cache_dit
    from cache_dit import BlockAdapter

    dm = copy.deepcopy(case.model)
    adapter = BlockAdapter(
        transformer=dm, blocks=getattr(dm, lname), forward_pattern=pattern, check_forward_pattern=True
    )
    cache_dit.enable_cache(adapter, cache_config=_cache_dit_config(skipping))
    return dm


def _cache_dit_route(case, ref):
    """How a user gets DBCache onto this transformer: ``enable_cache(transformer)`` when
    cache-dit has an adapter registered for the class; else a ``BlockAdapter`` on the largest
    block list (also where the adapter registered under the class's name prefix refuses the
    class) with the first ``ForwardPattern`` that cache-dit's signature check accepts and
    whose never-skip loop reproduces the model (the check cannot tell the output orders
    apart; a wrong order feeds the text stream in as the image one). Raises what cache-dit
    raised when nothing fits."""
    import copy

    import cache_dit
    from cache_dit import ForwardPattern

    try:
        cache_dit.enable_cache(copy.deepcopy(case.model), cache_config=_cache_dit_config(False))
        return ("registered", None)
    except (ValueError, AssertionError) as e:  # no adapter, or one for another class of the name
        if "not officially supported" not in str(e) and "not in allowed classes" not in str(e):
            raise
        refusal = e
    lists = [(n, len(m)) for n, m in case.model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise refusal
    lname = max(lists, key=lambda nl: nl[1])[0]
    tried = []
    for pattern in ForwardPattern:
        try:
            dm = _cache_dit_block_adapter(case, lname, pattern, skipping=False)
            out = case.sample(model=dm, steps=STEPS, seed=2)
        except Exception as e:  # noqa: BLE001  (this pattern does not fit: the next one)
            tried.append(f"{pattern.name} {type(e).__name__}: {str(e)[:60]}")
            continue
        if torch.equal(out, ref):
            return ("adapter", (lname, pattern))
        tried.append(f"{pattern.name} never-skip differs from the model")
    raise ValueError(f"{refusal} Then BlockAdapter({lname}, ...): " + "; ".join(tried))


def _enable_cache_dit(name: str, skipping: bool):
    import copy

    import cache_dit

    case, ref, _ = built(name)
    if name not in _CACHE_DIT_ROUTE:
        _CACHE_DIT_ROUTE[name] = _cache_dit_route(case, ref)
    kind, arg = _CACHE_DIT_ROUTE[name]
    if kind == "registered":
        dm = copy.deepcopy(case.model)
        cache_dit.enable_cache(dm, cache_config=_cache_dit_config(skipping))
        return dm, None, "registered adapter"
    lname, pattern = arg
    return _cache_dit_block_adapter(case, lname, pattern, skipping), None, f"BlockAdapter({lname}, {pattern.name})"


PEERS = {
    "diffusers FBC": Peer(
        "`transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))` (never-skip: 0.0)",
        _diffusers_peer("fbc"),
    ),
    "diffusers MagCache": Peer(
        "`enable_cache(MagCacheConfig(threshold=10.0, max_skip_steps=2, num_inference_steps=6, "
        "mag_ratios=[1.0] * 6))` (flat ratios stand in for a calibration: every step after the retained "
        "first may skip; never-skip: `max_skip_steps=0`)",
        _diffusers_peer("mag"),
    ),
    "diffusers TaylorSeer": Peer(
        "`enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, "
        "taylor_factors_dtype=torch.float32))`, its default module patterns (never-skip: `cache_interval=1`)",
        _diffusers_peer("taylor"),
    ),
    "diffusers TaylorSeer, explicit modules": Peer(
        "the same with `cache_identifiers` naming the attention and feed-forward modules inside every "
        "block list (`<list>\\.\\d+\\.<module>`, found on the model: what a user writes when the defaults "
        "match nothing)",
        _diffusers_peer("taylor-explicit"),
    ),
    CACHE_DIT: Peer(
        "cache-dit's `enable_cache(transformer, cache_config=DBCacheConfig(Fn_compute_blocks=1, "
        "Bn_compute_blocks=0, residual_diff_threshold=10.0, max_warmup_steps=1, num_inference_steps=6, "
        "enable_separate_cfg=False))` (never-skip: threshold 0.0); where cache-dit has no adapter for the "
        "class (or the one registered under its name prefix refuses it), a `BlockAdapter(transformer=..., "
        "blocks=<largest block list>, forward_pattern=...)` with "
        "the first `ForwardPattern` its check accepts and whose never-skip loop reproduces the model",
        _enable_cache_dit,
    ),
}

#: raised while enabling, with a message: a refusal (anything else is a crash)
_REFUSALS = (ValueError, TypeError, AssertionError, NotImplementedError)


def run_peer(name: str, peer: str) -> Cell:
    """One peer cell: ``works``, ``no effect`` (ran right and finite, skipped nothing: the hook
    found nothing to cache), ``refused`` (raised a ValueError / TypeError / AssertionError
    while being enabled), ``crash`` (anything else), ``wrong`` (never-skip not bitwise the
    model, or non-finite) or ``not installed``; ``detail`` names the route or the error."""
    case, ref, calls = built(name)
    if peer == CACHE_DIT and cache_dit_version() is None:
        return Cell("not installed")
    enable = PEERS[peer].enable
    outs = {}
    where = ""
    for skipping in (False, True):
        try:
            dm, ctx, route = enable(name, skipping)
        except _REFUSALS as e:
            return Cell("refused", f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001  (a crash is the measurement)
            return Cell("crash", f"enabling: {type(e).__name__}: {e}")
        where = f"{route}: " if route else ""
        mode = AttentionCount()
        try:
            with mode:
                outs[skipping] = case.sample(model=dm, steps=STEPS, seed=2, context=ctx)
        except Exception as e:  # noqa: BLE001
            return Cell("crash", f"{where}{'skipping' if skipping else 'never-skip'}: {type(e).__name__}: {e}")
    if not torch.equal(outs[False], ref):
        diff = (outs[False] - ref).abs().max().item()  # host-read-ok: a test's report
        return Cell("wrong", f"{where}never-skip differs from the model by {diff:.3g}")
    if not torch.isfinite(outs[True]).all():
        return Cell("wrong", f"{where}the skipping setting gives non-finite values")
    if mode.calls >= calls:
        return Cell("no effect", f"{where}ran {mode.calls} attention calls, the model {calls}")
    return Cell("works", route, skipped_fraction=1.0 - mode.calls / calls)


# --------------------------------------------------------------------- the README's table
# README.md's methods x models table is written from these cells (bench/reach_table.py
# --readme) and tests/test_readme.py measures the same cells against it: every method of
# tests/support/methods.py on every family of support.zoo.CASES, at the contract suite's
# caching setting, on a 4-step loop after a calibration (the profile-driven methods need one).

README_STEPS = 4
README_BEGIN = "<!-- methods-table:begin (written by `python bench/reach_table.py --readme`) -->"
README_END = "<!-- methods-table:end -->"
#: README row label -> config (the row order of the table)
README_ROWS = {
    "TeaCache": "TeaCacheConfig",
    "First-Block Cache / DBCache": "FirstBlockCacheConfig",
    "FORA": "FORAConfig",
    "Error-Optimized Cache": "EOCConfig",
    "Δ-DiT": "DeltaDiTConfig",
    "TaylorSeer": "TaylorSeerConfig",
    "T-GATE": "TGateConfig",
    "MagCache": "MagCacheConfig",
    "Block Caching": "BlockCacheConfig",
    "searched schedule": "ScheduleConfig",
    "SmoothCache": "SmoothCacheConfig",
    "AdaCache": "AdaCacheConfig",
}
#: README column -> zoo case (the column order of the table)
README_COLUMNS = {
    "DiT": "diffusers-dit",
    "PixArt-α/Σ": "diffusers-pixart",
    "Flux.1": "diffusers-flux",
    "SD3 / 3.5": "diffusers-sd3",
    "Wan 2.1 / 2.2": "diffusers-wan",
    "reference DiT": "fastcache-dit",
    "Qwen-Image": "diffusers-qwenimage",
    "Flux.2": "diffusers-flux2",
    "Z-Image": "diffusers-zimage",
    "HunyuanVideo": "diffusers-hunyuanvideo",
    "LTX-Video": "diffusers-ltx",
    "CogVideoX": "diffusers-cogvideox",
    "Mochi": "diffusers-mochi",
    "ChronoEdit": "diffusers-chronoedit",
    "SkyReels-V2": "diffusers-skyreelsv2",
    "Sana": "diffusers-sana",
    "Lumina2": "diffusers-lumina2",
    "HunyuanVideo 1.5": "diffusers-hunyuanvideo15",
    "HunyuanImage 2.1": "diffusers-hunyuanimage",
}
_README_CASES: dict = {}


def readme_case(family: str):
    """(case, calibrated profile) of zoo family ``family``, built once."""
    if family not in _README_CASES:
        case = CURATED[family]()
        profile = fastcache.calibrate(case.model, lambda: [case.sample(steps=README_STEPS, seed=1)], progress=False)
        _README_CASES[family] = (case, profile)
    return _README_CASES[family]


def readme_cell(family: str, config: str) -> str:
    """``✓``: ``fastcache.patch`` takes the model at the method's caching setting and the loop
    runs finite and caches something (skipped steps, reused blocks or a computed fraction
    below 1); ``—``: ``patch`` refuses with a ValueError / TypeError that has a message and
    leaves the model unpatched; anything else ``✗`` and what happened (never in the README:
    the generator refuses to write it, the test fails)."""
    from .methods import METHODS

    case, profile = readme_case(family)
    m = case.model
    cfg = METHODS[config].caching(profile, README_STEPS)
    try:
        handle = fastcache.patch(m, cfg)
    except (ValueError, TypeError) as e:
        if fastcache.runtime._find(m) is not None:
            fastcache.unpatch(m)
            return f"✗ refused but left the model patched: {e}"
        return "—" if str(e).strip() else f"✗ refused without a message ({type(e).__name__})"
    try:
        out = case.sample(steps=README_STEPS, seed=2)
        st = fastcache.stats(m)["contexts"]["default"]
    except Exception as e:  # noqa: BLE001  (a crash is the cell's result)
        return f"✗ crash: {type(e).__name__}: {e}"
    finally:
        handle.remove()
    if not torch.isfinite(out).all():
        return "✗ non-finite output"
    reused = st.get("skipped", 0) + st.get("reused_blocks", 0)
    if not (reused > 0 or st.get("computed_fraction", 1.0) < 1.0):
        return f"✗ cached nothing: {st}"
    return "✓"


def readme_column(family: str) -> dict[str, str]:
    """config -> cell of one README column, measured."""
    return {config: readme_cell(family, config) for config in README_ROWS.values()}


def readme_table(cells: dict[tuple[str, str], str]) -> str:
    """The README block (markers included) for ``cells``: (config, family) -> ✓ / —."""
    bad = {k: v for k, v in cells.items() if v not in ("✓", "—")}
    if bad:
        raise ValueError(f"README cells that are neither ✓ nor —: {bad}; fix them before writing the table")
    head = "| method (config) | " + " | ".join(README_COLUMNS) + " |"
    lines = [README_BEGIN, head, "|---" * (1 + len(README_COLUMNS)) + "|"]
    for label, config in README_ROWS.items():
        row = [cells[(config, fam)] for fam in README_COLUMNS.values()]
        lines.append(f"| {label} (`{config}`) | " + " | ".join(row) + " |")
    return "\n".join(lines + [README_END])


def readme_block(text: str) -> str:
    """The block between (and including) the markers of README text ``text``."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(
            f"README.md must hold the methods x models table between one {README_BEGIN!r} and one "
            f"{README_END!r} line; add them around the table"
        )
    i = text.index(README_BEGIN)
    return text[i : text.index(README_END) + len(README_END)]
