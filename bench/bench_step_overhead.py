"""Per-step overhead of fastcache's TeaCache machinery on the reference DiT, eager and compiled.

Measured per model forward (B = 2, fp32, no grad):

* ``full``             the unpatched model;
* ``patched_computed`` patched with TeaCache, on a step that runs the stack: indicator op +
  decision op + flag read + every block + residual store. Each call starts a new sampling
  run (the timestep rises), so step 0's forced compute makes every call a computed step;
* ``patched_skipped``  patched, threshold 1e9, same timestep every call after the first:
  every call reuses the cached residual (embeddings, first block's adaLN linear,
  indicator, decision, ``x + R``, final layer);
* ``decision``         the decision alone on the model's token shape: fused indicator op +
  decision op + ``flag.item()``;
* ``decision_teacache_host``  the peers' equivalent for comparison: TeaCache's eager
  LayerNorm/modulate/rel-L1 formula, ``.cpu().item()``, ``np.poly1d`` and host math.

Each is reported in ms and as % of ``full``; ``patched_computed`` also as the overhead
over ``full``. The three forwards run on three instances with the same weights, timed
round-robin; the % figures are medians of per-round ratios, so drift of a shared machine
cancels. With ``torch.compile(fullgraph=True)`` (the skip is a ``torch.cond``; the
unpatched baseline is compiled too) the same rows are reported for ``provider=compile``;
compile times are reported separately and excluded.

Models: the shipped digits DiT (``fastcache.models.load_digits_dit``) when its weights
are installed; a DiT-S-like configuration of the reference DiT (hidden 384, depth 12, 6
heads, 32x32x4 input, patch 2: 256 tokens); diffusers' ``DiTTransformer2DModel`` at the
same DiT-S size (its first block computes the timestep+label embedding MLP that the
indicator shares with it); and diffusers' ``PixArtTransformer2DModel`` at PixArt's width
(16 heads x 72 = 1152, 120 caption tokens of 4096 channels) with 1024 image tokens and 4
blocks (PixArt-alpha has 28: with fewer blocks the overhead in % is larger, so this is a
pessimistic figure that keeps the run short on 2 CPU cores).

Run::

    python bench/bench_step_overhead.py               # table + bench/results/step_overhead.{csv,json}
    python bench/bench_step_overhead.py --no-compile  # eager only
    python bench/bench_step_overhead.py --model diffusers-dit-s --model pixart   # a subset
    pytest bench/bench_step_overhead.py --benchmark-only
"""

from __future__ import annotations

import itertools
import time

import common
import numpy as np
import torch
from common import Config

NAME = "step_overhead"
BATCH = 2
DIT_S = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=10)
DIFFUSERS_DIT_S = dict(
    num_attention_heads=6,
    attention_head_dim=64,
    in_channels=4,
    out_channels=8,
    num_layers=12,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
PIXART = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=4,
    sample_size=64,
    patch_size=2,
    cross_attention_dim=1152,
    caption_channels=4096,
    use_additional_conditions=False,
)
MODEL_NAMES = ("digits", "dit-s", "diffusers-dit-s", "pixart")
SKIP_ALL = 1e9  # a threshold no accumulated distance reaches: every non-forced step skips
MEASUREMENTS = ("full", "patched_computed", "patched_skipped", "decision", "decision_teacache_host")


def _randomize_zero_init(m: torch.nn.Module) -> torch.nn.Module:
    # adaLN-Zero init makes an untrained block the identity; random values keep the
    # work realistic (same FLOPs either way, but no all-zero operands).
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


class Bench:
    """A model and how to call it for one step at timestep ``t`` (fixed inputs)."""

    def __init__(self, model, note, call, token_shape):
        self.model, self.note, self.call, self.token_shape = model, note, call, token_shape


def _reference_dit(m, note) -> Bench:
    c = m.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.arange(BATCH) % c.num_classes
    return Bench(m, note, lambda model, t: model(x, t, y), (BATCH, (c.input_size // c.patch_size) ** 2, c.hidden_size))


def load_models(which) -> dict[str, Bench]:
    """name -> Bench. ``which``: "all" or a list of names from MODEL_NAMES."""
    from fastcache.models import DiT

    names = MODEL_NAMES if which == "all" else tuple(which)
    models: dict[str, Bench] = {}
    if "digits" in names:
        try:
            from fastcache.models import load_digits_dit

            models["digits"] = _reference_dit(load_digits_dit().eval(), "shipped weights")
        except Exception as e:  # weights not installed yet: report and go on
            print(f"  digits DiT unavailable ({type(e).__name__}: {e})", flush=True)
    if "dit-s" in names:
        torch.manual_seed(0)
        m = _randomize_zero_init(DiT(**DIT_S))
        models["dit-s"] = _reference_dit(m, "random weights, " + ", ".join(f"{k}={v}" for k, v in DIT_S.items()))
    if "diffusers-dit-s" in names:
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        m = _randomize_zero_init(DiTTransformer2DModel(**DIFFUSERS_DIT_S))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, 4, 32, 32, generator=g)
        y = torch.arange(BATCH) % 1000
        models["diffusers-dit-s"] = Bench(
            m,
            "random weights, DiTTransformer2DModel " + ", ".join(f"{k}={v}" for k, v in DIFFUSERS_DIT_S.items()),
            lambda model, t: model(hidden_states=x, timestep=t, class_labels=y).sample,
            (BATCH, 256, 384),
        )
    if "pixart" in names:
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        m = _randomize_zero_init(PixArtTransformer2DModel(**PIXART))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, 4, 64, 64, generator=g)
        text = torch.randn(BATCH, 120, 4096, generator=g)
        cond = {"resolution": None, "aspect_ratio": None}
        models["pixart"] = Bench(
            m,
            "random weights, PixArtTransformer2DModel " + ", ".join(f"{k}={v}" for k, v in PIXART.items()),
            lambda model, t: (
                model(hidden_states=x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond).sample
            ),
            (BATCH, 1024, 1152),
        )
    return models


def forward_fn(bench: Bench, model, mode: str):
    """One step. ``rising``: every call starts a new sampling run (a forced computed step);
    ``falling``: the timestep falls by 0.01 per call (one run: steps can skip); ``fixed``:
    the unpatched baseline's constant timestep."""
    counter = itertools.count()

    def fn():
        i = next(counter)
        v = {"rising": 100.0 + i, "falling": 900.0 - 0.01 * i, "fixed": 500.0}[mode]
        return bench.call(model, torch.full((BATCH,), v))

    return fn


def decision_fn(shape):
    from fastcache import ops

    B, N, D = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g)
    shift, scale = 0.1 * torch.randn(B, D, generator=g), 0.1 * torch.randn(B, D, generator=g)
    prev = torch.randn(B, N, D, generator=g)
    state = ops.new_state(1024)
    coeffs = torch.empty(0)
    t = torch.full((B,), 500.0)

    def fn():
        sums = ops.modulated_rel_l1_sums(x, shift, scale, prev, 1e-6)
        flag = ops.cache_decision(sums, t, coeffs, state, SKIP_ALL, 1, 0, 0)
        return flag.item()

    return fn


def decision_teacache_host_fn(shape):
    import torch.nn.functional as F

    B, N, D = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g)
    shift, scale = 0.1 * torch.randn(B, D, generator=g), 0.1 * torch.randn(B, D, generator=g)
    st = {"prev": torch.randn(B, N, D, generator=g), "acc": 0.0}
    coefficients = [1.0, 0.0]  # identity, like fastcache's default for DiT

    def fn():
        m = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        rescale_func = np.poly1d(coefficients)
        st["acc"] += rescale_func(((m - st["prev"]).abs().mean() / st["prev"].abs().mean()).cpu().item())
        should_calc = st["acc"] >= SKIP_ALL
        st["prev"] = m
        return should_calc

    return fn


def _time(fn, args) -> common.Timing:
    return common.measure(
        fn, warmup=3, reps=args.reps or (9 if args.quick else 41), min_reps=5, max_seconds=2.0 if args.quick else 3.0
    )


def _steps(models: dict, args) -> tuple[dict[str, common.Timing], dict[str, float]]:
    """Time full / computed / skipped forwards round-robin; ratios to ``full`` are medians
    of per-round ratios (robust to drift of a shared machine)."""
    b = models["bench"]
    fns = {
        "full": forward_fn(b, models["full"], "fixed"),
        "patched_computed": forward_fn(b, models["computed"], "rising"),
        "patched_skipped": forward_fn(b, models["skipped"], "falling"),
    }
    timings, samples = common.measure_interleaved(
        fns,
        warmup=3,
        reps=args.reps or (9 if args.quick else 41),
        max_seconds=4.0 if args.quick else 12.0,
    )
    ratios = {k: common.paired_ratio(samples[k], samples["full"]) for k in fns}
    return timings, ratios


def _check_stats(model, computed: int | None = None, skipped: int | None = None) -> None:
    import fastcache

    st = fastcache.stats(model)["contexts"]["default"]
    if computed is not None and st["computed"] != computed:
        raise RuntimeError(f"expected {computed} computed steps, stats say {st}")
    if skipped is not None and st["skipped"] != skipped:
        raise RuntimeError(f"expected {skipped} skipped steps, stats say {st}")


def bench_model(name, bench: Bench, args, results, env):
    """Three instances with the same weights: unpatched (full), patched with rising
    timesteps (every step computed), patched with falling timesteps and threshold 1e9
    (every step after the first skipped); timed round-robin."""
    import copy

    import fastcache

    model, note = bench.model, bench.note
    shape = in_shape = bench.token_shape
    full: dict[str, float] = {}

    def record(measure_name, provider, timing, extra_note="", ratio=None, **extra):
        cfg = Config(NAME, measure_name, provider, name, in_shape, "fp32")
        base = full.get(provider)
        if ratio is not None:
            extra["pct_of_full"] = 100.0 * ratio
            if measure_name == "patched_computed":
                extra["overhead_pct"] = 100.0 * (ratio - 1.0)
        elif timing is not None and base:
            extra["pct_of_full"] = 100.0 * timing.median_us / base
        extra["tokens"] = "x".join(map(str, shape))
        res = common.make_result(cfg, timing, note=extra_note or note, **extra)
        results.append(res)
        ms = "-" if timing is None else f"{timing.median_us / 1e3:9.3f} ms"
        print(f"  {name:11s} {provider:8s} {measure_name:24s} {ms}  {extra_note}", flush=True)

    cfg_skip = fastcache.TeaCacheConfig(threshold=SKIP_ALL)
    computed_model, skipped_model = copy.deepcopy(model), copy.deepcopy(model)
    inst = {"full": model, "computed": computed_model, "skipped": skipped_model, "bench": bench}
    with torch.no_grad(), fastcache.patched(computed_model, cfg_skip), fastcache.patched(skipped_model, cfg_skip):
        # ---- eager
        timings, ratios = _steps(inst, args)
        _check_stats(computed_model, skipped=0)
        _check_stats(skipped_model, computed=1)
        full["eager"] = timings["full"].median_us
        for k, t in timings.items():
            record(k, "eager", t, ratio=None if k == "full" else ratios[k])
        record("decision", "eager", _time(decision_fn(shape), args))
        record("decision_teacache_host", "eager", _time(decision_teacache_host_fn(shape), args))

        if args.no_compile:
            return
        # ---- torch.compile(fullgraph=True) of each instance
        try:
            fastcache.reset(computed_model)
            fastcache.reset(skipped_model)
            torch._dynamo.reset()
            compiled = {"bench": bench}
            compile_s = {}
            for key in ("full", "computed", "skipped"):
                compiled[key] = torch.compile(inst[key], fullgraph=True)
                t0 = time.perf_counter()
                forward_fn(bench, compiled[key], {"computed": "rising", "skipped": "falling"}.get(key, "fixed"))()
                compile_s[key] = time.perf_counter() - t0
            timings, ratios = _steps(compiled, args)
            _check_stats(computed_model, skipped=0)
            _check_stats(skipped_model, computed=1)
            full["compile"] = timings["full"].median_us
            keys = {"full": "full", "patched_computed": "computed", "patched_skipped": "skipped"}
            for k, t in timings.items():
                ratio = None if k == "full" else ratios[k]
                record(k, "compile", t, ratio=ratio, compile_s=compile_s[keys[k]])
        except Exception as e:  # report, do not hide: the eager rows stand on their own
            msg = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record("patched_computed", "compile", None, msg)
            env.setdefault("errors", []).append(f"{name}: {msg}")
        finally:
            torch._dynamo.reset()


def run(args) -> list[common.Result]:
    common.setup_torch()
    busy = common.warn_if_busy()
    env = common.environment()
    if busy:
        env["warning"] = busy
    env["cache"] = "hot (whole forwards, back to back)"
    print(common.describe_env(env), flush=True)
    results: list[common.Result] = []
    models = load_models(["dit-s"] if args.quick else (args.model or "all"))
    env["models"] = {k: v.note for k, v in models.items()}
    for name, bench in models.items():
        bench_model(name, bench, args, results, env)
    summary = summarize(results)
    common.report(NAME, results, env, format_summary(summary), {"rows": summary}, write=not args.no_write)
    return results


def summarize(results: list[common.Result]) -> list[dict]:
    rows = []
    for r in results:
        e = dict(r.extra)
        rows.append(
            {
                "model": r.config.shape_name,
                "tokens": e.get("tokens"),
                "mode": r.config.provider,
                "measurement": r.config.op,
                "ms": None if r.skipped else r.us / 1e3,
                "pct_of_full": e.get("pct_of_full"),
                "overhead_pct": e.get("overhead_pct"),
                "compile_s": e.get("compile_s"),
                "note": r.note if r.skipped else "",
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = [
        ("model", "model"),
        ("tokens", "B x N x D"),
        ("mode", "mode"),
        ("measurement", "measurement"),
        ("ms", "ms"),
        ("pct_of_full", "% of full"),
        ("overhead_pct", "overhead %"),
        ("compile_s", "compile s"),
        ("note", "note"),
    ]
    return common.format_table(rows, cols)


# ============================================================================ per call kind
# Every kind of call a cached model makes, at the kind's floor: what each costs in time
# (ratio to the unpatched call, timed round-robin in one loop, median of per-round ratios)
# and in dispatched ops (a TorchDispatchMode counter: every aten / fastcache op one eager
# call issues, i.e. the kernel launches of an eager GPU call), next to diffusers' own hooks.
#
# Kinds: ``computed`` (TaylorSeer computing and updating its history), ``forecast``
# (TaylorSeer with the step index announced, and ScheduleConfig's announced plan),
# ``reuse`` (FORA), ``skip`` (TeaCache). Floors, per model (``floor_forecast`` /
# ``floor_skip``, measured by :func:`floor_model`): a forecast or reuse step must still run
# the model outside the blocks (embeddings, final layer) and every block's AdaLN modulation
# (the gates of this step); ``floor_forecast`` is the model with each block replaced by its
# interior program run with an executor that drops every branch and residual (so exactly the
# modulation work, nothing else). A skipped step needs only the work outside the blocks:
# ``floor_skip`` is the model with every block the identity. A computed step's floor is the
# unpatched call.
KIND_MODELS = ("dit-s2", "pixart", "flux")
KIND_DIT_S2 = dict(DIFFUSERS_DIT_S, sample_size=16)  # DiT-S/2: 12 blocks, 384 wide, 64 tokens
KIND_PIXART = dict(PIXART, sample_size=32, num_layers=4)  # PixArt width 1152, 4 blocks, 256 tokens
KIND_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip  # Flux width 3072, 1 dual + 2 single blocks, 64 image + 16 text tokens
FAR = 10**6  # an interval no run reaches: every step after the first is forecast / reused
PLAN_STEPS = 4096


def kind_models(which) -> dict[str, Bench]:
    names = KIND_MODELS if which == "all" else tuple(which)
    out: dict[str, Bench] = {}
    g = torch.Generator().manual_seed(0)
    if "dit-s2" in names:
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        m = _randomize_zero_init(DiTTransformer2DModel(**KIND_DIT_S2))
        x, y = torch.randn(BATCH, 4, 16, 16, generator=g), torch.arange(BATCH) % 1000
        out["dit-s2"] = Bench(
            m,
            "DiTTransformer2DModel DiT-S/2: 12 blocks, 384 wide, 64 tokens",
            lambda model, t, x=x, y=y: model(hidden_states=x, timestep=t, class_labels=y).sample,
            (BATCH, 64, 384),
        )
    if "pixart" in names:
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        m = _randomize_zero_init(PixArtTransformer2DModel(**KIND_PIXART))
        x, text = torch.randn(BATCH, 4, 32, 32, generator=g), torch.randn(BATCH, 120, 4096, generator=g)
        cond = {"resolution": None, "aspect_ratio": None}
        out["pixart"] = Bench(
            m,
            "PixArtTransformer2DModel: 4 blocks, 1152 wide, 256 tokens, 120 caption tokens",
            lambda model, t, x=x, text=text, cond=cond: (
                model(hidden_states=x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond).sample
            ),
            (BATCH, 256, 1152),
        )
    if "flux" in names:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        m = _randomize_zero_init(FluxTransformer2DModel(**KIND_FLUX))
        x, text = torch.randn(BATCH, 64, 64, generator=g), torch.randn(BATCH, 16, 4096, generator=g)
        pooled = torch.randn(BATCH, 768, generator=g)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(16, 3)
        out["flux"] = Bench(
            m,
            "FluxTransformer2DModel: 1 dual + 2 single blocks, 3072 wide, 64 image + 16 text tokens",
            lambda model, t: (
                model(
                    hidden_states=x,
                    encoder_hidden_states=text,
                    pooled_projections=pooled,
                    timestep=t / 1000,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                ).sample
            ),  # fmt: skip
            (BATCH, 64, 3072),
        )
    return out


def _share_copy(model):
    """A copy of ``model`` sharing its parameters and buffers (instances for each kind
    without one copy of the weights each: Flux's width would not fit otherwise)."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class _DropAll:
    """An interior executor that runs no branch and adds no residual (the floor)."""

    def begin_block(self, block):
        self.block = block

    def residual(self, name, fn, xs, gates):
        return xs


def floor_model(model, mode: str):
    """A copy of ``model`` at a kind's floor: ``"forecast"`` = each block reduced to its
    modulation (its interior program with :class:`_DropAll`), ``"skip"`` = each block the
    identity. Model-specific only in how a block returns its streams (DiT / PixArt: the
    hidden states; Flux blocks: ``(encoder_hidden_states, hidden_states)``)."""
    import inspect

    from fastcache.interior import program_for
    from fastcache.runtime import spec_for

    m = _share_copy(model)
    spec = spec_for(m)
    for seg in spec.blocks(m):
        for blk in seg:
            prog = program_for(blk)
            sig = inspect.signature(type(blk).forward)

            def fwd(*args, _blk=blk, _prog=prog, _sig=sig, **kw):
                b = _sig.bind(_blk, *args, **kw)
                b.apply_defaults()
                call = dict(b.arguments)
                call.update(call.pop("kwargs", None) or {})
                streams = {n: call.get(n) for n in spec.streams if n in call}
                if mode == "forecast":
                    streams = _prog.run(_blk, call, dict(streams), _DropAll())
                if "encoder_hidden_states" in streams and len(spec.streams) > 1:
                    return streams["encoder_hidden_states"], streams["hidden_states"]
                return streams["hidden_states"]

            blk.forward = fwd
    return m


class OpCounter:
    """Counts the ops one call dispatches (aten and fastcache; views included)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.n += 1
                return func(*args, **(kwargs or {}))

        self.n = 0
        self.mode = _Mode()

    def count(self, fn) -> int:
        self.n = 0
        with self.mode:
            fn()
        return self.n


def _kind_fns(bench: Bench, model) -> tuple[dict, dict, list]:
    """name -> (callable making one call of that kind, checker); the models to unpatch."""

    import fastcache

    fns: dict = {}
    checks: dict = {}
    patched: list = []

    def announced(m, num_steps=None):
        counter = itertools.count(1)

        def fn():
            i = next(counter)
            with fastcache.context(m, "default", step_index=i, num_steps=num_steps):
                return bench.call(m, torch.full((BATCH,), 900.0 - 0.01 * i))

        with fastcache.context(m, "default", step_index=0, num_steps=num_steps):
            bench.call(m, torch.full((BATCH,), 900.0))  # step 0: computed, fills the cache
        return fn

    def patch(cfg):
        m = _share_copy(model)
        fastcache.patch(m, cfg)
        patched.append(m)
        return m

    fns["unpatched"] = forward_fn(bench, model, "fixed")
    m = patch(fastcache.TaylorSeerConfig(interval=1, warmup_steps=1, order=1))
    fns["computed fastcache TaylorSeer"] = announced(m)
    checks["computed fastcache TaylorSeer"] = (m, "skipped", 0)
    m = patch(fastcache.TaylorSeerConfig(interval=FAR, warmup_steps=1, order=1))
    fns["forecast fastcache TaylorSeer"] = announced(m)
    checks["forecast fastcache TaylorSeer"] = (m, "computed", 1)
    m = patch(fastcache.ScheduleConfig.from_steps((0,), PLAN_STEPS, order=1))
    fns["forecast fastcache ScheduleConfig"] = announced(m, PLAN_STEPS)
    checks["forecast fastcache ScheduleConfig"] = (m, "computed", 1)
    m = patch(fastcache.FORAConfig(interval=FAR, warmup_steps=1))
    fns["reuse fastcache FORA"] = announced(m)
    checks["reuse fastcache FORA"] = (m, "computed", 1)
    m = patch(fastcache.TeaCacheConfig(threshold=SKIP_ALL))
    fns["skip fastcache TeaCache"] = forward_fn(bench, m, "falling")
    checks["skip fastcache TeaCache"] = (m, "computed", 1)
    try:
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        from diffusers.hooks.taylorseer_cache import apply_taylorseer_cache

        for name, interval in (("computed diffusers TaylorSeer", 1), ("forecast diffusers TaylorSeer", FAR)):
            m = _share_copy(model)
            apply_taylorseer_cache(
                m,
                TaylorSeerCacheConfig(
                    cache_interval=interval, disable_cache_before_step=1, max_order=1,
                    taylor_factors_dtype=torch.float32,
                ),
            )  # fmt: skip
            _set_cache_context(m, CacheContext("cond"))
            f = forward_fn(bench, m, "falling")
            for _ in range(3):  # steps 0-2 compute (warm-up, then the first refresh)
                f()
            fns[name] = f
        m = _share_copy(model)
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=SKIP_ALL))
        _set_cache_context(m, CacheContext("cond"))
        f = forward_fn(bench, m, "falling")
        f()
        fns["skip diffusers FirstBlockCache"] = f
    except Exception as e:  # a diffusers without these hooks: the fastcache rows stand alone
        print(f"  diffusers hooks unavailable: {type(e).__name__}: {e}", flush=True)
    fns["floor forecast/reuse"] = forward_fn(bench, floor_model(model, "forecast"), "fixed")
    fns["floor skip"] = forward_fn(bench, floor_model(model, "skip"), "fixed")
    return fns, checks, patched


def bench_kinds(name: str, bench: Bench, args, results, env) -> None:
    import fastcache

    with torch.no_grad():
        fns, checks, patched = _kind_fns(bench, bench.model)
    try:
        with torch.no_grad():
            for f in fns.values():  # warm every instance (first-call allocations)
                f()
            counter = OpCounter()
            ops_n = {k: counter.count(f) for k, f in fns.items()}
            timings, samples = common.measure_interleaved(
                fns, warmup=2, reps=args.reps or (7 if args.quick else 21), max_seconds=6.0 if args.quick else 30.0
            )
        for k, (m, field, want) in checks.items():
            st = fastcache.stats(m)["contexts"]["default"]
            if st[field] != want:
                raise RuntimeError(f"{name} {k}: expected {field}={want}, stats say {st}")
        base_ops = ops_n["unpatched"]
        for k, t in timings.items():
            ratio = common.paired_ratio(samples[k], samples["unpatched"])
            cfg = Config(NAME + "_kinds", k, "eager", name, bench.token_shape, "fp32")
            extra = {"ratio": ratio, "ops": ops_n[k], "ops_ratio": ops_n[k] / base_ops,
                     "tokens": "x".join(map(str, bench.token_shape))}  # fmt: skip
            results.append(common.make_result(cfg, t, note=bench.note, **extra))
            print(f"  {name:7s} {k:36s} {t.median_us / 1e3:9.3f} ms  x{ratio:6.3f}  {ops_n[k]:5d} ops", flush=True)
    finally:
        for m in patched:
            fastcache.unpatch(m)


def run_kinds(args) -> list[common.Result]:
    common.setup_torch()
    env = common.environment()
    busy = common.warn_if_busy()
    if busy:
        env["warning"] = busy
    env["ops"] = "dispatched ops of one eager call (TorchDispatchMode): aten + fastcache ops, views included"
    results: list[common.Result] = []
    models = kind_models(args.kind_model or "all")
    env["models"] = {k: v.note for k, v in models.items()}
    for name, bench in models.items():
        bench_kinds(name, bench, args, results, env)
    rows = [
        {
            "model": r.config.shape_name,
            "kind": r.config.op,
            "ms": r.us / 1e3,
            "x_unpatched": dict(r.extra)["ratio"],
            "ops": dict(r.extra)["ops"],
        }
        for r in results
    ]
    cols = [("model", "model"), ("kind", "call kind"), ("ms", "ms"), ("x_unpatched", "time / unpatched")]
    cols.append(("ops", "ops"))
    table = common.format_table(rows, cols)
    common.report(NAME + "_kinds", results, env, table, {"rows": rows}, write=not args.no_write)
    return results


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("measurement", MEASUREMENTS)
    def test_step_overhead(benchmark, measurement):
        """Eager mode on the DiT-S-like model (the compiled rows are script-only)."""
        import fastcache

        common.setup_torch()
        (bench,) = load_models(["dit-s"]).values()
        model = bench.model
        benchmark.group = "step_overhead/dit-s"
        with torch.no_grad():
            if measurement == "decision":
                benchmark(decision_fn(bench.token_shape))
            elif measurement == "decision_teacache_host":
                benchmark(decision_teacache_host_fn(bench.token_shape))
            elif measurement == "full":
                benchmark.pedantic(forward_fn(bench, model, "fixed"), rounds=5, warmup_rounds=1)
            else:
                with fastcache.patched(model, fastcache.TeaCacheConfig(threshold=SKIP_ALL)):
                    mode = "rising" if measurement == "patched_computed" else "falling"
                    fn = forward_fn(bench, model, mode)
                    fn()
                    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, action="append", help="repeatable; default: all")
    parser.add_argument(
        "--kinds", action="store_true", help="the per-call-kind table instead (bench/results/step_overhead_kinds.*)"
    )
    parser.add_argument("--kind-model", choices=KIND_MODELS, action="append", help="with --kinds; default: all")
    a = parser.parse_args()
    run_kinds(a) if a.kinds else run(a)
