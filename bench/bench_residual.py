"""The residual ops of a cached step: fastcache's kernels vs the eager torch expressions.

* ``gated_residual``  ``x + gate[:, None] * cached`` (FORA's skipped-branch residual;
  variant ``plain``) and ``x + gate[:, None] * (cached * (1 + w * trend))`` (EOC, Qiu et
  al. arXiv 2501.19243 Eq. 7; variant ``trend``, trend ``(N, D)``, w = 0.01);
* ``apply_residual``  ``x + r`` (TeaCache's skipped stack);
* ``store_residual``  ``r <- out - x_in`` on a computed step. The peers allocate a new
  tensor (TeaCache: ``previous_residual = hidden_states - ori_hidden_states``); fastcache
  writes the cache buffer in place, gated by the device flag.

Providers: ``eager`` (the torch expression), ``eager_out`` (one ATen call writing a
preallocated output: ``torch.addcmul(x, gate, cached, out=o)``, ``torch.add(x, r, out=o)``,
``torch.sub(out, x_in, out=r)``; no single call exists for the trend variant),
``compile`` (``torch.compile`` of the expression, compiled before timing),
``fastcache_reference`` (eager reference op), ``fastcache_cpp`` (C++ kernel through the
public wrapper and the dispatcher). Shapes: DiT-XL/2 256px, PixArt 1024px, Flux 1024px,
B = 2; fp32 and bf16.

On CPU an op that returns a new tensor pays for the first touch of its output: PyTorch's
CPU allocator hands large blocks straight to glibc, which maps fresh pages (one minor
page fault per 4 KiB) for blocks above its mmap threshold (<= 32 MiB). ``eager_out`` and
the in-place ``store_residual`` show the bandwidth without that cost.

Bytes moved (ideal): every ``(B, N, D)`` operand read once, the output written once, plus
the gate ``(B, D)`` and the trend ``(N, D)``. GB/s is reported against the copy bandwidth
measured in the same run.

Run::

    python bench/bench_residual.py                  # table + bench/results/residual.{csv,json}
    python bench/bench_residual.py --quick --no-compile
    pytest bench/bench_residual.py --benchmark-only
"""

from __future__ import annotations

import inspect
import time

import common
import torch
from common import DTYPES, SHAPES, Config

NAME = "residual"
W_TREND = 0.01  # EOC's weight on a rule-based schedule
CASES = (  # (op, variant)
    ("gated_residual", "plain"),
    ("gated_residual", "trend"),
    ("apply_residual", ""),
    ("store_residual", ""),
)
PROVIDERS = ("eager", "eager_out", "compile", "fastcache_reference", "fastcache_cpp", "fastcache_cpp_out")
# The fused op vs the eager expression it replaces (summary ratio columns, paired per round).
PAIRS = (
    ("x_eager", "eager", "fastcache_cpp"),
    ("x_eager_out", "eager_out", "fastcache_cpp_out"),
    ("x_compile", "compile", "fastcache_cpp"),
)


# The eager expressions, as the peers write them.
def eager_gated(x, gate, cached):
    return x + gate[:, None] * cached


def eager_gated_trend(x, gate, cached, trend):
    return x + gate[:, None] * (cached * (1 + W_TREND * trend))


def eager_apply(x, r):
    return x + r


def eager_store(out, x_in):
    return out - x_in


def make_inputs(shape: tuple[int, int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    B, N, D = shape
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(dtype)

    return {
        "x": rnd(B, N, D),
        "cached": rnd(B, N, D),
        "gate": rnd(B, D, scale=0.1),
        "trend": rnd(N, D, scale=0.1),
        "out": rnd(B, N, D),
        "r": torch.zeros(B, N, D, dtype=dtype),
        "flag": torch.tensor(True),
    }


def bytes_moved(op: str, variant: str, shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    B, N, D = shape
    es = torch.empty((), dtype=dtype).element_size()
    full = B * N * D * es
    if op == "gated_residual":
        return 3 * full + B * D * es + (N * D * es if variant == "trend" else 0)
    return 3 * full + (1 if op == "store_residual" else 0)


def make_fn(op: str, variant: str, provider: str, inp: dict[str, torch.Tensor]):
    """``(fn, note, extra)``: a zero-argument callable, or ``(None, why, {})``."""
    x, gate, cached, trend = inp["x"], inp["gate"], inp["cached"], inp["trend"]
    out, r, flag = inp["out"], inp["r"].clone(), inp["flag"]
    if provider in ("eager", "compile"):
        expr, operands = {
            ("gated_residual", "plain"): (eager_gated, (x, gate, cached)),
            ("gated_residual", "trend"): (eager_gated_trend, (x, gate, cached, trend)),
            ("apply_residual", ""): (eager_apply, (x, cached)),
            ("store_residual", ""): (eager_store, (out, x)),
        }[(op, variant)]
        extra = {}
        if provider == "compile":
            torch._dynamo.reset()
            expr = torch.compile(expr, dynamic=False, fullgraph=True)
            t0 = time.perf_counter()
            expr(*operands)
            extra["compile_s"] = time.perf_counter() - t0
        return (lambda: expr(*operands)), "", extra
    if provider == "eager_out":
        o = torch.empty_like(x)
        fns = {
            ("gated_residual", "plain"): lambda: torch.addcmul(x, gate[:, None], cached, out=o),
            ("apply_residual", ""): lambda: torch.add(x, cached, out=o),
            ("store_residual", ""): lambda: torch.sub(out, x, out=r),
        }
        if (op, variant) not in fns:
            return None, "n/a: no single ATen call with out= for this expression", {}
        return fns[(op, variant)], "", {}
    if provider == "fastcache_reference":
        from fastcache.ops import reference as impl

        fns = {
            ("gated_residual", "plain"): lambda: impl.gated_residual(x, gate, cached, None, 0.0),
            ("gated_residual", "trend"): lambda: impl.gated_residual(x, gate, cached, trend, W_TREND),
            ("apply_residual", ""): lambda: impl.apply_residual(x, cached),
            ("store_residual", ""): lambda: impl.store_residual(out, x, flag, r),
        }
        return fns[(op, variant)], "", {}
    if provider == "fastcache_cpp":
        if not common.cpp_active():
            return None, common.cpp_skip_note(), {}
        from fastcache import ops

        fns = {
            ("gated_residual", "plain"): lambda: ops.gated_residual(x, gate, cached),
            ("gated_residual", "trend"): lambda: ops.gated_residual(x, gate, cached, trend, W_TREND),
            ("apply_residual", ""): lambda: ops.apply_residual(x, cached),
            ("store_residual", ""): lambda: ops.store_residual(out, x, flag, r),
        }
        return fns[(op, variant)], "", {}
    if provider == "fastcache_cpp_out":
        if not common.cpp_active():
            return None, common.cpp_skip_note(), {}
        from fastcache import ops

        if "out" not in inspect.signature(ops.apply_residual).parameters:
            return None, "skipped: this fastcache has no out= form of the residual ops", {}
        o = torch.empty_like(x)
        fns = {
            ("gated_residual", "plain"): lambda: ops.gated_residual(x, gate, cached, out=o),
            ("gated_residual", "trend"): lambda: ops.gated_residual(x, gate, cached, trend, W_TREND, out=o),
            ("apply_residual", ""): lambda: ops.apply_residual(x, cached, out=o),
        }
        if (op, variant) not in fns:
            return None, "n/a: store_residual always writes its buffer in place", {}
        return fns[(op, variant)], "", {}
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def run(args) -> list[common.Result]:
    common.setup_torch()
    busy = common.warn_if_busy()
    env = common.environment()
    if busy:
        env["warning"] = busy
    flusher = None if args.hot else common.CacheFlusher()
    copy_gbps = common.copy_bandwidth()
    env["copy_gbps"] = copy_gbps
    env["cache"] = "hot" if args.hot else f"cold (flush reads {flusher.nbytes >> 20} MiB before each call)"
    print(common.describe_env(env, copy_gbps), flush=True)
    shapes = {"dit-xl2-256": SHAPES["dit-xl2-256"]} if args.quick else SHAPES
    reps = args.reps or (5 if args.quick else 9)
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "compile")]
    results = []
    for shape_name, shape in shapes.items():
        for dname, dtype in DTYPES.items():
            inp = make_inputs(shape, dtype)
            for op, variant in CASES:
                nbytes = bytes_moved(op, variant, shape, dtype)
                cfgs, fns, extras = {}, {}, {}
                for provider in providers:
                    cfg = Config(NAME, op, provider, shape_name, shape, dname, variant)
                    fn, note, extra = make_fn(op, variant, provider, inp)
                    if fn is None:
                        if not note.startswith("n/a"):
                            results.append(common.make_result(cfg, None, nbytes, copy_gbps, note))
                        continue
                    cfgs[provider], fns[provider], extras[provider] = cfg, fn, extra
                # all providers of a case round-robin, so machine drift hits them alike
                timings, samples = common.measure_interleaved(
                    fns,
                    warmup=2,
                    reps=reps,
                    min_reps=min(reps, 5),
                    max_seconds=8.0,
                    flush=flusher,
                    min_sample_us=1000.0,
                )
                for provider, cfg in cfgs.items():
                    t = timings[provider]
                    extra = dict(extras[provider])
                    for key, num, den in PAIRS:
                        if den == provider and num in samples:
                            extra[key] = common.paired_ratio(samples[num], samples[den])
                    res = common.make_result(cfg, t, nbytes, copy_gbps, "", **extra)
                    results.append(res)
                    print(f"  {cfg.id():62s} {t.median_us:11.1f} us  {res.gbps:7.2f} GB/s", flush=True)
    summary = summarize(results)
    common.report(NAME, results, env, format_summary(summary), {"cases": summary}, write=not args.no_write)
    return results


def summarize(results: list[common.Result]) -> list[dict]:
    rows = []
    for rs in common.group_by_case(results).values():
        c = next(iter(rs.values())).config
        row = {
            "op": c.op + (f"[{c.variant}]" if c.variant else ""),
            "shape": c.shape_name,
            "dtype": c.dtype,
        }
        for p in PROVIDERS:
            row[p] = rs[p].us if p in rs else None
        cpp = rs.get("fastcache_cpp")
        if cpp is not None and not cpp.skipped:
            row["cpp_gbps"] = cpp.gbps
            row["pct_copy"] = cpp.pct_copy
        for key, _, den in PAIRS:  # paired per-round ratios (see common.measure_interleaved)
            r = rs.get(den)
            row[key] = dict(r.extra).get(key) if r is not None and not r.skipped else None
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = [
        ("op", "op"),
        ("shape", "shape"),
        ("dtype", "dtype"),
        ("eager", "eager us"),
        ("eager_out", "eager out= us"),
        ("compile", "compile us"),
        ("fastcache_reference", "ref us"),
        ("fastcache_cpp", "cpp us"),
        ("fastcache_cpp_out", "cpp out= us"),
        ("cpp_gbps", "cpp GB/s"),
        ("pct_copy", "% copy"),
        ("x_eager", "x eager"),
        ("x_eager_out", "out= x eager out="),
        ("x_compile", "x compile"),
    ]
    return common.format_table(rows, cols)


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("dtype", list(DTYPES))
    @pytest.mark.parametrize("shape_name", list(SHAPES))
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("op,variant", CASES)
    def test_residual(benchmark, op, variant, provider, shape_name, dtype):
        common.setup_torch()
        shape = SHAPES[shape_name]
        fn, note, extra = make_fn(op, variant, provider, make_inputs(shape, DTYPES[dtype]))
        if fn is None:
            pytest.skip(note)
        nbytes = bytes_moved(op, variant, shape, DTYPES[dtype])
        benchmark.group = f"{op}{'[' + variant + ']' if variant else ''}/{shape_name}/{dtype}"
        benchmark.extra_info.update(bytes_moved=nbytes, **extra)
        benchmark.pedantic(fn, setup=common.flush_caches, rounds=7, warmup_rounds=1)
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    run(common.base_parser(__doc__.splitlines()[0]).parse_args())
