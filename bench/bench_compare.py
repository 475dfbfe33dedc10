"""fastcache's policies side by side with diffusers' and cache-dit's caches, on one trained model.

The model is the shipped digits DiT converted to diffusers' ``DiTTransformer2DModel``
(:func:`fastcache.models.convert.dit_to_diffusers`: bitwise the same outputs), so every
tool runs on the same diffusers class, the same weights, the same sampler (50-step DDIM,
batched classifier-free guidance), the same labels and noise, in the same process:

* fastcache: TeaCache, First-Block Cache, FORA, EOC, and every other policy this build
  ships, at 2-3 settings each;
* diffusers 0.42 hooks: ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig`` (on the
  attention and feed-forward outputs, float32 factors), ``MagCacheConfig`` (its ratios
  calibrated with diffusers' own ``calibrate=True`` pass on the calibration runs);
* cache-dit: ``DBCacheConfig`` (Fn=1, Bn=0 as First-Block Cache; and with its TaylorSeer
  calibrator).

A peer that is not installed (``pip install -e .[bench]``) is a skipped row with the
reason; it never fails the run.

Per row: computed fraction of the block work (attention and feed-forward calls counted on
their first linear layer, the same counter for every tool), wall and process-CPU time
(best of ``--repeats``, taken round robin over the rows), speedup vs uncached and the
ideal speedup ``1 / computed fraction``, the time per step beyond the ideal (overhead of
the method), PSNR and SSIM of the final images vs uncached, the bytes the caches hold at
the end of a run (tensors reachable from the model that are neither parameters nor
buffers), and under ``torch.compile`` (default mode, 10 steps): graph breaks and host reads
per step, counted from what runs (tests/support/hostreads.py).

    python bench/bench_compare.py               # writes bench/results/compare.{csv,json,png}
    python bench/bench_compare.py --no-compile  # skip the compile columns (saves ~1 minute)
    python bench/bench_compare.py --families    # only the random-weight families (below)

Then, speed only, each family's tiny random-weight diffusers model (DiT, PixArt, Flux, SD3:
tests/support/zoo.py, 20 steps): milliseconds per step of every tool computing everything
(threshold 0 / interval 1: the pure per-step overhead) and at one skipping setting.
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' support package (support.zoo, support.hostreads)

import fastcache  # noqa: E402
from fastcache.models import load_digits_dit, psnr, sample_digits  # noqa: E402
from fastcache.models.convert import DiffusersDiT  # noqa: E402
from fastcache.models.metrics import ssim  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass
class Row:
    provider: str  # fastcache | diffusers | cache-dit
    method: str  # one curve per (provider, method) in the plot
    setting: str
    apply: Callable | None  # apply(wrapper, ctx) -> None; None = uncached
    skip: str | None = None  # reason the row cannot run here
    compile_probe: bool = False  # measure graph breaks / host reads under torch.compile for this row


# ------------------------------------------------------------------------------ peers
def _peer(name):
    try:
        return __import__(name), None
    except ImportError as e:  # a missing optional peer is a skipped row, not a failure
        return None, f"{name} not installed ({e}); pip install -e .[bench]"


def _diffusers_rows(steps):
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
        apply_taylorseer_cache,
    )

    rows = []
    for i, thr in enumerate((0.05, 0.1, 0.2)):
        rows.append(
            Row(
                "diffusers",
                "first-block cache",
                f"threshold {thr:g}",
                lambda w, ctx, thr=thr: apply_first_block_cache(w.transformer, FirstBlockCacheConfig(threshold=thr)),
                compile_probe=i == 0,
            )
        )
    ids = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
    for i, n in enumerate((3, 5)):
        rows.append(
            Row(
                "diffusers",
                "taylorseer",
                f"interval {n}, order 1",
                lambda w, ctx, n=n: apply_taylorseer_cache(
                    w.transformer,
                    TaylorSeerCacheConfig(
                        cache_interval=n, max_order=1, taylor_factors_dtype=torch.float32, cache_identifiers=ids
                    ),
                ),
                compile_probe=i == 0,
            )
        )
    for i, thr in enumerate((0.06, 0.12)):
        rows.append(
            Row(
                "diffusers",
                "magcache",
                f"threshold {thr:g}, K=3",
                lambda w, ctx, thr=thr: apply_mag_cache(
                    w.transformer,
                    MagCacheConfig(
                        threshold=thr, max_skip_steps=3, num_inference_steps=steps, mag_ratios=ctx["mag_ratios"]
                    ),
                ),
                compile_probe=i == 0,
            )
        )
    return rows


def _cache_dit_rows(steps):
    cache_dit, why = _peer("cache_dit")
    if cache_dit is None:
        return [Row("cache-dit", "dbcache", "-", None, skip=why)]
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
    from cache_dit.caching.cache_blocks.pattern_3_4_5 import CachedBlocks_Pattern_3_4_5

    # cache-dit swaps ``transformer_blocks`` for its wrapper during the call; diffusers'
    # DiT forward reads ``transformer_blocks[0].norm1`` after the loop (its final-layer
    # conditioning), so the wrapper forwards that one attribute to the first block.
    if not hasattr(CachedBlocks_Pattern_3_4_5, "norm1"):
        CachedBlocks_Pattern_3_4_5.norm1 = property(lambda self: self.transformer_blocks[0].norm1)

    def enable(w, thr, taylor):
        cache_dit.enable_cache(
            BlockAdapter(
                transformer=w.transformer,
                blocks=w.transformer.transformer_blocks,
                forward_pattern=ForwardPattern.Pattern_3,
                has_separate_cfg=False,
            ),
            cache_config=DBCacheConfig(
                Fn_compute_blocks=1,
                Bn_compute_blocks=0,
                residual_diff_threshold=thr,
                max_warmup_steps=1,
                num_inference_steps=steps,
            ),
            calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1) if taylor else None,
        )

    rows = []
    for i, thr in enumerate((0.08, 0.16)):
        rows.append(Row("cache-dit", "dbcache F1B0", f"threshold {thr:g}", lambda w, ctx, t=thr: enable(w, t, False)))
        rows[-1].compile_probe = i == 0
    for thr in (0.08, 0.16):
        rows.append(
            Row(
                "cache-dit", "dbcache F1B0 + taylorseer", f"threshold {thr:g}", lambda w, ctx, t=thr: enable(w, t, True)
            )
        )
    return rows


# --------------------------------------------------------------------------- fastcache
def _fastcache_rows(steps):
    def fc(cfg_fn):
        return lambda w, ctx: fastcache.patch(w.transformer, cfg_fn(ctx))

    rows = []

    def add(method, setting, cfg_fn, probe=False):
        rows.append(Row("fastcache", method, setting, fc(cfg_fn), compile_probe=probe))

    for i, thr in enumerate((0.05, 0.1, 0.2)):
        add(
            "teacache",
            f"threshold {thr:g} (fitted)",
            lambda ctx, t=thr: fastcache.TeaCacheConfig(threshold=t, coefficients=ctx["coeffs"], num_steps=steps),
            probe=i == 0,
        )
    for i, thr in enumerate((0.05, 0.1, 0.2)):
        add(
            "first-block cache",
            f"threshold {thr:g}",
            lambda ctx, t=thr: fastcache.FirstBlockCacheConfig(threshold=t, num_steps=steps),
            probe=i == 0,
        )
    for i, n in enumerate((2, 3)):
        add("fora", f"interval {n}", lambda ctx, n=n: fastcache.FORAConfig(interval=n, num_steps=steps), probe=i == 0)
    for i, n in enumerate((2, 3)):
        add(
            "eoc on fora",
            f"interval {n}, w=1",
            lambda ctx, n=n: fastcache.EOCConfig(
                base=fastcache.FORAConfig(interval=n), profile=ctx["profile"], weight=1.0, regulation=0.0, threshold=0.0
            ),
            probe=i == 0,
        )
    # schedules searched by bench/bench_schedule.py (calibration seeds 1000+k; this run's
    # seed differs, so these rows are held out from the search)
    sched = RESULTS / "digits50.schedules.json"
    if steps != 50 or not sched.is_file():
        why = "searched for 50 steps" if steps != 50 else "run bench/bench_schedule.py first"
        rows.append(Row("fastcache", "schedule (searched)", "-", None, skip=why))
    else:
        for i, (k, v) in enumerate(sorted(json.loads(sched.read_text()).items(), key=lambda kv: int(kv[0]))):
            add(
                "schedule (searched)",
                f"K={k}",
                lambda ctx, plan=v["plan"]: fastcache.ScheduleConfig(plan=plan),
                probe=i == 0,
            )
    for method, make in _EXTRA_FASTCACHE.items():
        cls = getattr(fastcache, make[0], None)
        if cls is None:
            rows.append(Row("fastcache", method, "-", None, skip=f"fastcache.{make[0]} is not in this build"))
            continue
        for i, (setting, kw) in enumerate(make[1](steps)):
            add(method, setting, lambda ctx, cls=cls, kw=kw: cls(**_resolve(kw, ctx)), probe=i == 0)
    return rows


def _resolve(kw, ctx):
    return {k: (ctx[v[1:]] if isinstance(v, str) and v.startswith("@") else v) for k, v in kw.items()}


# The policies landing with the rest of the method family: (config class name, settings).
_EXTRA_FASTCACHE: dict[str, tuple[str, Callable]] = {
    "taylorseer": (
        "TaylorSeerConfig",
        lambda S: [
            ("interval 3, order 1", dict(interval=3, order=1, warmup_steps=3, num_steps=S)),
            ("interval 5, order 2", dict(interval=5, order=2, warmup_steps=3, num_steps=S)),
        ],
    ),
    "magcache": (
        "MagCacheConfig",
        lambda S: [
            ("threshold 0.06, K=3", dict(threshold=0.06, max_skips=3, profile="@profile", num_steps=S)),
            ("threshold 0.12, K=4", dict(threshold=0.12, max_skips=4, profile="@profile", num_steps=S)),
        ],
    ),
    "block caching": (
        "BlockCacheConfig",
        lambda S: [
            ("delta 0.03", dict(delta=0.03, profile="@profile", num_steps=S)),
            ("delta 0.05", dict(delta=0.05, profile="@profile", num_steps=S)),
        ],
    ),
    "delta-dit": (
        "DeltaDiTConfig",
        lambda S: [
            ("N=2, Nc=3, b=0.8S", dict(interval=2, num_cached=3, boundary=round(0.8 * S), num_steps=S)),
            ("N=2, Nc=4, b=0.6S", dict(interval=2, num_cached=4, boundary=round(0.6 * S), num_steps=S)),
        ],
    ),
}


# ------------------------------------------------------------------------- measurement
class _Counter:
    """Calls of every block's attention and feed-forward, counted on their first linear
    layer (``attn1.to_q``, ``ff.net.0.proj``): a call there is a branch computed. The same
    counter for every tool: reuse and forecasts skip these layers."""

    def __init__(self, transformer):
        self.n = 0
        self.handles = []
        for blk in transformer.transformer_blocks:
            for mod in (blk.attn1.to_q, blk.ff.net[0].proj):
                self.handles.append(mod.register_forward_hook(self._hook))
        self.total_per_call = 2 * len(transformer.transformer_blocks)

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _cache_bytes(model) -> int:
    """Bytes of the tensors reachable from ``model``'s object graph that are neither its
    parameters nor its buffers: what the caches hold (fastcache's state, diffusers' hook
    states, cache-dit's contexts)."""
    own = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    seen_obj, seen_ptr, total = set(), set(), 0
    stack = [(model, 0)]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen_obj or depth > 12:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter) or obj.data_ptr() in own or obj.data_ptr() in seen_ptr:
                continue
            seen_ptr.add(obj.data_ptr())
            total += obj.untyped_storage().nbytes()
            continue
        if (
            isinstance(obj, (str, bytes, int, float, bool, type(None), type))
            or callable(obj)
            and not hasattr(obj, "__dict__")
        ):
            continue
        if isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        else:
            d = getattr(obj, "__dict__", None)
            children = [] if d is None else [v for k, v in d.items() if k not in ("_parameters", "_buffers")]
            if isinstance(obj, torch.nn.Module):
                children += list(obj._modules.values())
        stack.extend((c, depth + 1) for c in children)
    return total


def _sample(w, labels, steps, seed):
    g = torch.Generator().manual_seed(seed)
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        x = sample_digits(w, labels, num_steps=steps, generator=g)
    return x, time.perf_counter() - t, time.process_time() - c


def _build(ref, row, ctx):
    w = DiffusersDiT(ref)
    if row.apply is not None:
        row.apply(w, ctx)
    return w


def _compile_probe(ref, row, ctx, steps, labels):
    """Graph breaks and host reads per step with the model compiled (torch.compile,
    default mode, fullgraph=False so a tool that breaks the graph still runs)."""
    from support.hostreads import HostReadMode, python_level_reads

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    w = _build(ref, row, ctx)
    w.transformer = torch.compile(w.transformer)
    _sample(w, labels, steps, 0)  # compile (and recompile) outside the counted run
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    # count inside the model calls only (the sampler's own reads are not the cache's)
    mode, stack, py, calls = HostReadMode(), [], [], [0]

    def pre(*_):
        es = contextlib.ExitStack()
        es.enter_context(mode)
        py.append(es.enter_context(python_level_reads()))
        stack.append(es)
        calls[0] += 1

    def post(*_):
        stack.pop().close()

    hooks = [w.transformer.register_forward_pre_hook(pre), w.transformer.register_forward_hook(post)]
    try:
        _sample(w, labels, steps, 1)
    finally:
        for h in hooks:
            h.remove()
    reads = len(mode.reads) + sum(len(p) for p in py)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    reads = round(reads / max(calls[0], 1), 2)
    return dict(graph_breaks=breaks, compiled_graphs=graphs, host_reads_per_step=reads)


def run(steps, batch, repeats, seed, compile_steps):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ref = load_digits_dit()
    labels = torch.arange(batch) % 10

    def calib_runs(w):
        return lambda: [_sample(w, (labels + 3 * k + 1) % 10, steps, 1000 + k) for k in range(2)]

    t0 = time.perf_counter()
    cw = DiffusersDiT(ref)
    profile = fastcache.calibrate(cw.transformer, calib_runs(cw), scheduler="DDIMScheduler(trailing)", progress=False)
    ctx = {"profile": profile, "coeffs": profile.fit_teacache(4), "steps": steps}
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    mw = DiffusersDiT(ref)
    apply_mag_cache(mw.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    import contextlib
    import io

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        _sample(mw, labels[:4], steps, 1000)  # diffusers' own calibration pass prints the ratios
    mag_log = log.getvalue().splitlines()
    ctx["mag_ratios"] = _parse_mag_ratios(mag_log, mw, steps)
    print(f"calibrated in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = [Row("uncached", "uncached", "-", None)]
    rows += _fastcache_rows(steps) + _diffusers_rows(steps) + _cache_dit_rows(steps)
    live = [r for r in rows if r.skip is None]
    for r in rows:
        if r.skip:
            print(f"  skipped {r.provider} {r.method}: {r.skip}", flush=True)

    base, _, _ = _sample(_build(ref, rows[0], ctx), labels, steps, seed)
    results = []
    for r in live:
        w = _build(ref, r, ctx)
        cnt = _Counter(w.transformer)
        imgs, _, _ = _sample(w, labels, steps, seed)
        cnt.remove()
        frac = cnt.n / (cnt.total_per_call * steps)
        results.append(
            dict(
                provider=r.provider,
                method=r.method,
                setting=r.setting,
                computed=round(frac, 4),
                psnr_db=None if r.apply is None else round(float(psnr(imgs, base, reduction="mean")), 2),
                ssim=round(float(ssim(imgs, base).mean()), 4),
                cache_bytes=_cache_bytes(w.transformer),
            )
        )
        del w
        gc.collect()
    best = [(math.inf, math.inf)] * len(live)
    for _ in range(repeats):
        for i, r in enumerate(live):
            w = _build(ref, r, ctx)
            _, t, c = _sample(w, labels, steps, seed)
            best[i] = (min(best[i][0], t), min(best[i][1], c))
            del w
    base_t, base_c = best[0]
    for res, (t, c) in zip(results, best):
        ideal = 1.0 / max(res["computed"], 1e-9)
        res.update(
            wall_s=round(t, 3),
            cpu_s=round(c, 3),
            speedup_wall=round(base_t / t, 3),
            speedup_cpu=round(base_c / c, 3),
            ideal_speedup=round(ideal, 3),
            overhead_ms_per_step=round(1000 * (c - base_c * res["computed"]) / steps, 3),
        )
    if compile_steps:
        for res, r in zip(results, live):
            if r.compile_probe or r.apply is None:
                try:
                    res.update(_compile_probe(ref, r, ctx, compile_steps, labels))
                except Exception as e:  # reported, not hidden: the row says why
                    res["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for res in results:
        p = "     -" if res["psnr_db"] is None else f"{res['psnr_db']:6.2f}"
        print(
            f"  {res['provider']:<9} {res['method']:<26} {res['setting']:<22} computed {res['computed']:.2f} "
            f"cpu {res['cpu_s']:6.2f} s ({res['speedup_cpu']:4.2f}x of ideal {res['ideal_speedup']:4.2f}x) "
            f"{p} dB ssim {res['ssim']:.3f} cache {res['cache_bytes'] / 1e6:6.2f} MB "
            + (
                ""
                if "graph_breaks" not in res
                else f"breaks {res['graph_breaks']} reads/step {res['host_reads_per_step']}"
            ),
            flush=True,
        )
    skipped = [dict(provider=r.provider, method=r.method, setting=r.setting, skipped=r.skip) for r in rows if r.skip]
    return results, skipped


# ------------------------------------------------------------- random-weight families
def _family_rows(case_name):
    """Per family: what each tool costs per step when it computes everything (threshold 0,
    interval 1: pure overhead), and one skipping setting per decision method (speed only:
    random weights make PSNR meaningless)."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )

    rows = [("uncached", "uncached", "-", None)]

    def fc(cfg):
        return lambda m: fastcache.patch(m, cfg)

    rows += [
        ("fastcache", "teacache", "threshold 0 (overhead)", fc(fastcache.TeaCacheConfig(threshold=0.0))),
        (
            "fastcache",
            "first-block cache",
            "threshold 0 (overhead)",
            fc(fastcache.FirstBlockCacheConfig(threshold=0.0)),
        ),
        ("fastcache", "fora", "interval 1 (overhead)", fc(fastcache.FORAConfig(interval=1))),
        (
            "fastcache",
            "taylorseer",
            "interval 1 (overhead)",
            fc(fastcache.TaylorSeerConfig(interval=1, warmup_steps=1)),
        ),
        ("fastcache", "first-block cache", "threshold 0.2", fc(fastcache.FirstBlockCacheConfig(threshold=0.2))),
    ]
    if (
        case_name != "diffusers-sd3"
    ):  # diffusers' First-Block Cache hook fails on SD3 (tests/runtime/test_first_block.py)
        rows += [
            (
                "diffusers",
                "first-block cache",
                "threshold 0 (overhead)",
                lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.0)),
            ),
            (
                "diffusers",
                "first-block cache",
                "threshold 0.2",
                lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.2)),
            ),
        ]
    rows.append(
        (
            "diffusers",
            "taylorseer",
            "interval 1 (overhead)",
            lambda m: apply_taylorseer_cache(
                m,
                TaylorSeerCacheConfig(
                    cache_interval=1, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
                ),
            ),
        )
    )
    return rows


@contextlib.contextmanager
def _contexts(m, name):
    """The cache context as a diffusers pipeline sets it (``cache_context``, or the hooks'
    context directly on models without the mixin), which fastcache also follows."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(m, CacheContext(name))
    try:
        with fastcache.context(m, name):
            yield
    finally:
        _set_cache_context(m, None)


def run_families(steps=20, repeats=3):
    """Seconds per step of every family's tiny diffusers model (tests/runtime/zoo.py) under
    each tool, best of ``repeats`` round robin; overhead = time / uncached - 1."""
    from support.zoo import CASES

    out = []
    for name in ("diffusers-dit", "diffusers-pixart", "diffusers-flux", "diffusers-sd3"):
        rows = _family_rows(name)
        models = []
        for *_, apply in rows:
            case = CASES[name]()  # a fresh model per row: no hook or patch is ever removed
            if apply is not None:
                apply(case.model)
            models.append(case)
        ctx = "cfg"

        def one(case):
            m = case.model
            t = time.process_time()
            case.sample(steps=steps, context=lambda i: _contexts(m, ctx))
            return time.process_time() - t

        for c in models:
            one(c)  # warm-up
        best = [math.inf] * len(rows)
        for _ in range(repeats):
            for i, c in enumerate(models):
                best[i] = min(best[i], one(c))
        for (prov, meth, setting, _), t in zip(rows, best):
            out.append(
                dict(
                    family=name,
                    provider=prov,
                    method=meth,
                    setting=setting,
                    ms_per_step=round(1000 * t / steps, 3),
                    vs_uncached=round(t / best[0], 3),
                )
            )
            print(
                f"  {name:<17} {prov:<9} {meth:<18} {setting:<24} {1000 * t / steps:7.3f} ms/step  "
                f"{t / best[0]:5.2f}x uncached",
                flush=True,
            )
    return out


def _parse_mag_ratios(log, w, steps):
    """The ratios diffusers' calibration pass logs (it prints them for copying into the config)."""
    for msg in log:
        if "[" in msg and "]" in msg:
            body = msg[msg.index("[") + 1 : msg.rindex("]")]
            try:
                vals = [float(v) for v in body.split(",")]
            except ValueError:
                continue
            if len(vals) == steps:
                return vals
    raise RuntimeError("diffusers' MagCache calibration pass did not report its ratios; log: " + " | ".join(log)[:400])


def _meta():
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None

    versions = {}
    for name in ("torch", "diffusers", "cache_dit", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return dict(
        commit=git("rev-parse", "--short", "HEAD"),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        versions=versions,
        backend=fastcache.ops.BACKEND.as_dict(),
        load_avg=os.getloadavg()[0],
    )


def write(results, skipped, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in results:
        keys += [k for k in r if k not in keys]
    with open(out / "compare.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in results:
            f.write(",".join("" if r.get(k) is None else str(r[k]).replace(",", ";") for k in keys) + "\n")
    (out / "compare.json").write_text(json.dumps({"meta": meta, "rows": results, "skipped": skipped}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    marker = {"fastcache": "o", "diffusers": "s", "cache-dit": "^"}
    curves: dict[tuple[str, str], list] = {}
    for r in results:
        if r["psnr_db"] is not None:
            curves.setdefault((r["provider"], r["method"]), []).append((r["speedup_cpu"], min(r["psnr_db"], 60.0)))
    for (prov, meth), pts in sorted(curves.items()):
        pts.sort()
        ax.plot(
            *zip(*pts), marker=marker.get(prov, "x"), ls="-" if prov == "fastcache" else "--", label=f"{prov}: {meth}"
        )
    ax.set_xlabel("speedup vs uncached (process CPU time)")
    ax.set_ylabel("PSNR vs uncached (dB, capped at 60)")
    ax.set_title(f"digits DiT (diffusers DiTTransformer2DModel), 50-step DDIM, CFG — commit {meta['commit']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=10, help="labels per run (x2 rows with CFG)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-steps", type=int, default=10, help="steps of the torch.compile probe (0 = skip it)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile probe")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--families", action="store_true", help="only the random-weight families' per-step cost")
    p.add_argument("--no-families", action="store_true", help="skip the random-weight families' per-step cost")
    a = p.parse_args(argv)

    def families():
        rows = run_families()
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "compare_families.json").write_text(json.dumps({"meta": _meta(), "rows": rows}, indent=1))
        print(f"wrote {a.out / 'compare_families.json'}")

    if a.families:
        families()
        return
    if os.getloadavg()[0] > 1.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f}: other jobs share the CPU, timings are noisy")
    t0 = time.perf_counter()
    results, skipped = run(a.steps, a.batch, a.repeats, a.seed, 0 if a.no_compile else a.compile_steps)
    meta = _meta()
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write(results, skipped, meta, a.out)
    print(f"wrote {a.out / 'compare.csv'}, compare.json, compare.png in {meta['elapsed_s']:.0f} s")
    if not a.no_families:
        families()


if __name__ == "__main__":
    main()
