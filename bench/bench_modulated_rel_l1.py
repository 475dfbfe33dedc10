"""TeaCache's per-step indicator distance: fastcache's fused op vs the formula as peers run it.

The op (``fastcache.ops.modulated_rel_l1_sums``) computes the first block's modulated
input ``m = LN(x) * (1 + scale) + shift`` (LayerNorm without affine, eps 1e-6), the
per-sample sums ``[sum|m - prev|, sum|prev|]`` and writes ``prev <- m`` in one pass
(TeaCache, Liu et al. arXiv 2411.19108, Sec. 3.3; docs/methods.md "TeaCache").

Providers, side by side on x, prev ``(B, N, D)`` and shift, scale ``(B, D)``:

* ``teacache_eager``      TeaCache's code path: ``F.layer_norm`` + modulate, then
  ``(m - prev).abs().mean() / prev.abs().mean()`` and ``prev = m`` (the tensor is kept,
  as the reference implementation does);
* ``teacache_compile``    ``torch.compile`` of exactly that function (compiled and
  warmed up before timing; compile time reported separately);
* ``fastcache_reference`` the eager reference op (:mod:`fastcache.ops.reference`);
* ``fastcache_cpp``       the C++ kernel through the dispatcher (skipped unless the CPU
  backend is ``cpp``);
* ``cpp_tview`` / ``cpp_tview_copy``  x as diffusers' patch embedding hands it over,
  ``proj(x).flatten(2).transpose(1, 2)`` (strides ``(N*D, 1, N)``): read in place by the
  kernel, vs ``x.contiguous()`` first (what the wrapper did before the kernels took
  strides; one whole copy per step).

Bytes moved per call (the ideal traffic): read x, read prev, write prev (``3*B*N*D``
elements) plus shift, scale and the ``(B, 2)`` fp32 sums. Targets (reported, not
asserted): cpp >= 20x teacache_eager, >= 1.0x teacache_compile, >= 60% of the copy
bandwidth.

Run::

    python bench/bench_modulated_rel_l1.py               # table + bench/results/modulated_rel_l1.{csv,json}
    python bench/bench_modulated_rel_l1.py --quick       # DiT-XL/2 shape only, fewer samples
    pytest bench/bench_modulated_rel_l1.py --benchmark-only    # the same cases under pytest-benchmark
"""

from __future__ import annotations

import time

import common
import torch
import torch.nn.functional as F
from common import DTYPES, SHAPES, Config

NAME = "modulated_rel_l1"
OP = "modulated_rel_l1_sums"
PROVIDERS = (
    "teacache_eager",
    "teacache_compile",
    "fastcache_reference",
    "fastcache_cpp",
    "cpp_tview",
    "cpp_tview_copy",
)
EPS = 1e-6
TARGETS = {"speedup_vs_eager": 20.0, "speedup_vs_compile": 1.0, "pct_copy": 60.0}


def teacache_rel_l1(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, prev: torch.Tensor):
    """TeaCache's indicator and distance as its reference code computes them.

    Returns ``(rel_l1 0-dim, m (B, N, D))``; the caller keeps ``m`` as the next ``prev``.
    """
    D = x.shape[-1]
    m = F.layer_norm(x, (D,), eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    rel = (m - prev).abs().mean() / prev.abs().mean()
    return rel, m


def make_inputs(shape: tuple[int, int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    B, N, D = shape
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(B, N, D, generator=g).to(dtype),
        "prev": torch.randn(B, N, D, generator=g).to(dtype),
        "shift": (0.1 * torch.randn(B, D, generator=g)).to(dtype),
        "scale": (0.1 * torch.randn(B, D, generator=g)).to(dtype),
    }


def bytes_moved(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    B, N, D = shape
    es = torch.empty((), dtype=dtype).element_size()
    return 3 * B * N * D * es + 2 * B * D * es + B * 2 * 4


def make_fn(provider: str, inp: dict[str, torch.Tensor]):
    """``(fn, note, extra)``: a zero-argument callable running one step of ``provider``,
    or ``(None, why, {})`` when the provider is unavailable."""
    x, shift, scale = inp["x"], inp["shift"], inp["scale"]
    if provider in ("teacache_eager", "teacache_compile"):
        extra = {}
        formula = teacache_rel_l1
        if provider == "teacache_compile":
            torch._dynamo.reset()
            formula = torch.compile(teacache_rel_l1, dynamic=False, fullgraph=True)
            t0 = time.perf_counter()
            formula(x, shift, scale, inp["prev"].clone())
            extra["compile_s"] = time.perf_counter() - t0
        state = {"prev": inp["prev"].clone()}

        def fn():
            rel, m = formula(x, shift, scale, state["prev"])
            state["prev"] = m  # TeaCache keeps the new tensor as the previous indicator
            return rel

        return fn, "", extra
    if provider == "fastcache_reference":
        from fastcache.ops import reference

        prev = inp["prev"].clone()
        return (lambda: reference.modulated_rel_l1_sums(x, shift, scale, EPS, prev)), "", {}
    if provider == "fastcache_cpp":
        if not common.cpp_active():
            return None, common.cpp_skip_note(), {}
        from fastcache import ops

        prev = inp["prev"].clone()
        return (lambda: ops.modulated_rel_l1_sums(x, shift, scale, prev, EPS)), "", {}
    if provider in ("cpp_tview", "cpp_tview_copy"):
        if not common.cpp_active():
            return None, common.cpp_skip_note(), {}
        from fastcache import ops

        xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (N*D, 1, N)
        prev = inp["prev"].clone()
        if provider == "cpp_tview":
            return (lambda: ops.modulated_rel_l1_sums(xt, shift, scale, prev, EPS)), "", {}
        return (lambda: ops.modulated_rel_l1_sums(xt.contiguous(), shift, scale, prev, EPS)), "", {}
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def check_agreement(inp: dict[str, torch.Tensor]) -> float | None:
    """Relative difference of the rel-L1 between the C++ op and the eager formula on one
    step from the same ``prev`` (a sanity check that the timed work is the same work)."""
    if not common.cpp_active():
        return None
    from fastcache import ops

    x, sh, sc = inp["x"].float(), inp["shift"].float(), inp["scale"].float()
    prev = inp["prev"].float()
    want, _ = teacache_rel_l1(x, sh, sc, prev)
    sums = ops.modulated_rel_l1_sums(inp["x"], inp["shift"], inp["scale"], inp["prev"].clone(), EPS)
    got = sums[:, 0].sum() / sums[:, 1].sum()
    return abs(float(got) / float(want) - 1.0)


def run(args) -> list[common.Result]:
    common.setup_torch()
    busy = common.warn_if_busy()
    env = common.environment()
    if busy:
        env["warning"] = busy
    flusher = None if args.hot else common.CacheFlusher()
    copy_gbps = common.copy_bandwidth(flush=None)
    env["copy_gbps"] = copy_gbps
    env["cache"] = "hot" if args.hot else f"cold (flush reads {flusher.nbytes >> 20} MiB before each call)"
    print(common.describe_env(env, copy_gbps), flush=True)

    shapes = {"dit-xl2-256": SHAPES["dit-xl2-256"]} if args.quick else SHAPES
    reps = args.reps or (7 if args.quick else 15)
    providers = [p for p in PROVIDERS if not (args.no_compile and p == "teacache_compile")]
    results: list[common.Result] = []
    for shape_name, shape in shapes.items():
        for dname, dtype in DTYPES.items():
            inp = make_inputs(shape, dtype)
            nbytes = bytes_moved(shape, dtype)
            copy_here = common.copy_bandwidth(nbytes // 2, flush=flusher, reps=reps)
            agree = check_agreement(inp)
            for provider in providers:
                cfg = Config(NAME, OP, provider, shape_name, shape, dname)
                fn, note, extra = make_fn(provider, inp)
                if fn is None:
                    results.append(common.make_result(cfg, None, nbytes, copy_gbps, note))
                    print(f"  {cfg.id():55s} {note}", flush=True)
                    continue
                t = common.measure(fn, reps=reps, flush=flusher, max_seconds=3.0 if args.quick else 4.0)
                if provider == "fastcache_cpp" and agree is not None:
                    extra["rel_diff_vs_eager"] = agree
                res = common.make_result(cfg, t, nbytes, copy_gbps, note, copy_same_size_gbps=copy_here, **extra)
                results.append(res)
                print(f"  {cfg.id():55s} {t.median_us:12.1f} us  {res.gbps:7.2f} GB/s", flush=True)
    summary = summarize(results)
    common.report(
        NAME, results, env, format_summary(summary), {"targets": TARGETS, "cases": summary}, write=not args.no_write
    )
    return results


def summarize(results: list[common.Result]) -> list[dict]:
    rows = []
    for rs in common.group_by_case(results).values():
        c = next(iter(rs.values())).config
        row = {"shape": c.shape_name, "dims": "x".join(map(str, c.shape)), "dtype": c.dtype}
        for p in PROVIDERS:
            row[p] = rs[p].us if p in rs else None
        cpp = rs.get("fastcache_cpp")
        if cpp is not None and not cpp.skipped:
            row["cpp_gbps"] = cpp.gbps
            row["pct_copy"] = cpp.pct_copy
            extra = dict(cpp.extra)
            same = extra.get("copy_same_size_gbps")
            row["pct_copy_same_size"] = 100 * cpp.gbps / same if same else None
            for p, key in (("teacache_eager", "speedup_vs_eager"), ("teacache_compile", "speedup_vs_compile")):
                other = rs.get(p)
                row[key] = other.us / cpp.us if other is not None and not other.skipped else None
        tv, tc = rs.get("cpp_tview"), rs.get("cpp_tview_copy")
        if tv is not None and tc is not None and not tv.skipped and not tc.skipped:
            row["tview_vs_copy"] = tc.us / tv.us
            row["meets"] = " ".join(
                f"{k}:{'yes' if row.get(k) is not None and row[k] >= v else 'NO'}" for k, v in TARGETS.items()
            )
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = [
        ("shape", "shape"),
        ("dtype", "dtype"),
        ("teacache_eager", "eager us"),
        ("teacache_compile", "compile us"),
        ("fastcache_reference", "ref us"),
        ("fastcache_cpp", "cpp us"),
        ("cpp_gbps", "cpp GB/s"),
        ("pct_copy", "% copy"),
        ("pct_copy_same_size", "% copy@size"),
        ("speedup_vs_eager", "x eager"),
        ("speedup_vs_compile", "x compile"),
        ("cpp_tview", "tview us"),
        ("cpp_tview_copy", "tview+copy us"),
        ("tview_vs_copy", "x copy"),
    ]
    return common.format_table(rows, cols)


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("dtype", list(DTYPES))
    @pytest.mark.parametrize("shape_name", list(SHAPES))
    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_modulated_rel_l1(benchmark, provider, shape_name, dtype):
        common.setup_torch()
        shape = SHAPES[shape_name]
        fn, note, extra = make_fn(provider, make_inputs(shape, DTYPES[dtype]))
        if fn is None:
            pytest.skip(note)
        nbytes = bytes_moved(shape, DTYPES[dtype])
        benchmark.group = f"{OP}/{shape_name}/{dtype}"
        benchmark.extra_info.update(bytes_moved=nbytes, **extra)
        benchmark.pedantic(fn, setup=common.flush_caches, rounds=10, warmup_rounds=2)
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    run(common.base_parser(__doc__.splitlines()[0]).parse_args())
