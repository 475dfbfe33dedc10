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
are installed, and always a DiT-S-like configuration (hidden 384, depth 12, 6 heads,
32x32x4 input, patch 2: 256 tokens).

Run::

    python bench/bench_step_overhead.py               # table + bench/results/step_overhead.{csv,json}
    python bench/bench_step_overhead.py --no-compile  # eager only
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
SKIP_ALL = 1e9  # a threshold no accumulated distance reaches: every non-forced step skips
MEASUREMENTS = ("full", "patched_computed", "patched_skipped", "decision", "decision_teacache_host")


def load_models(which: str) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (model in eval mode, note). ``which``: all / digits / dit-s."""
    from fastcache.models import DiT

    models: dict[str, tuple[torch.nn.Module, str]] = {}
    if which in ("all", "digits"):
        try:
            from fastcache.models import load_digits_dit

            models["digits-dit"] = (load_digits_dit(), "shipped weights")
        except Exception as e:  # weights not installed yet: report and go on
            print(f"  digits DiT unavailable ({type(e).__name__}: {e}); DiT-S-like only", flush=True)
    if which in ("all", "dit-s"):
        torch.manual_seed(0)
        m = DiT(**DIT_S).eval()
        # adaLN-Zero init makes an untrained block the identity; random values keep the
        # work realistic (same FLOPs either way, but no all-zero operands).
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        models["dit-s"] = (m, "random weights, " + ", ".join(f"{k}={v}" for k, v in DIT_S.items()))
    return models


def model_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.arange(BATCH) % c.num_classes
    return x, y


def token_shape(model) -> tuple[int, int, int]:
    c = model.config
    return BATCH, (c.input_size // c.patch_size) ** 2, c.hidden_size


def forward_fn(model, x, y, rising: bool):
    """One step: ``rising`` timesteps make every call a new sampling run (a forced
    computed step); otherwise the timestep stays put (same run, steps can skip)."""
    counter = itertools.count()

    def fn():
        v = 100.0 + next(counter) if rising else 500.0
        return model(x, torch.full((BATCH,), v), y)

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
    fns = {
        "full": forward_fn(models["full"], *models["inputs"], rising=False),
        "patched_computed": forward_fn(models["computed"], *models["inputs"], rising=True),
        "patched_skipped": forward_fn(models["skipped"], *models["inputs"], rising=False),
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


def bench_model(name, model, note, args, results, env):
    """Three instances with the same weights: unpatched (full), patched with rising
    timesteps (every step computed), patched with a constant timestep and threshold 1e9
    (every step after the first skipped); timed round-robin."""
    import copy

    import fastcache

    x, y = model_inputs(model)
    shape = token_shape(model)
    in_shape = tuple(x.shape)
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
    inst = {"full": model, "computed": computed_model, "skipped": skipped_model, "inputs": (x, y)}
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
            compiled = {"inputs": (x, y)}
            compile_s = {}
            for key in ("full", "computed", "skipped"):
                compiled[key] = torch.compile(inst[key], fullgraph=True)
                t0 = time.perf_counter()
                forward_fn(compiled[key], x, y, rising=key == "computed")()
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
    models = load_models("dit-s" if args.quick else args.model)
    env["models"] = {k: v[1] for k, v in models.items()}
    for name, (model, note) in models.items():
        bench_model(name, model, note, args, results, env)
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
        ((model, _),) = load_models("dit-s").values()
        x, y = model_inputs(model)
        benchmark.group = "step_overhead/dit-s"
        with torch.no_grad():
            if measurement == "decision":
                benchmark(decision_fn(token_shape(model)))
            elif measurement == "decision_teacache_host":
                benchmark(decision_teacache_host_fn(token_shape(model)))
            elif measurement == "full":
                benchmark.pedantic(forward_fn(model, x, y, rising=False), rounds=5, warmup_rounds=1)
            else:
                with fastcache.patched(model, fastcache.TeaCacheConfig(threshold=SKIP_ALL)):
                    fn = forward_fn(model, x, y, rising=measurement == "patched_computed")
                    fn()
                    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("all", "digits", "dit-s"), default="all")
    run(parser.parse_args())
