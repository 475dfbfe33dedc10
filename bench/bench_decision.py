"""Per-call cost of TeaCache's caching decision: fastcache's device op vs the peers' host math.

The decision (TeaCache, Liu et al. arXiv 2411.19108, Sec. 3.3; docs/methods.md "TeaCache"):
``ratio = sum num / sum den``; ``acc += poly(ratio)`` (numpy.poly1d order, degree 4);
compute iff forced (first / last step) or ``acc >= threshold``; on compute ``acc = 0``.

Providers (input: the per-sample sums ``(B, 2)`` fp32, or for the peers the rel-L1 as a
0-dim tensor, both already on the device):

* ``teacache_host``        TeaCache's reference code: ``.cpu().item()`` of the rel-L1, a
  fresh ``np.poly1d(coefficients)`` per step and Python float math on host counters;
* ``fastcache_reference``  the eager reference op (a dozen small tensor ops);
* ``fastcache_cpp``        the public wrapper ``fastcache.ops.cache_decision`` (argument
  checks in Python, then the dispatcher, then the C++ kernel);
* ``fastcache_cpp_dispatcher``  ``torch.ops.fastcache.cache_decision`` called directly;
* ``fastcache_cpp_pybind`` ``fastcache._C.cache_decision`` (no dispatcher: the kernel's floor).

Variants: ``op`` (the decision alone, the flag stays a device tensor) and ``op+read``
(plus ``flag.item()``, what fastcache's eager runtime does once per step). The host
approach always reads. On CPU ``.item()`` costs no device sync; on a GPU the read is a
sync, which is what fastcache's device-resident decision avoids under compile / graphs.

Run::

    python bench/bench_decision.py                # table + bench/results/decision.{csv,json}
    pytest bench/bench_decision.py --benchmark-only
"""

from __future__ import annotations

import common
import numpy as np
import torch
from common import Config

NAME = "decision"
OP = "cache_decision"
# FLUX's published coefficients (docs/methods.md) and threshold 0.25
COEFFS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
THRESHOLD = 0.25
NUM_STEPS = 28
PROVIDERS = (
    "teacache_host",
    "fastcache_reference",
    "fastcache_cpp",
    "fastcache_cpp_dispatcher",
    "fastcache_cpp_pybind",
)
VARIANTS = ("op", "op+read")
BATCHES = (2,)


def make_inputs(B: int) -> dict[str, torch.Tensor]:
    from fastcache import ops

    g = torch.Generator().manual_seed(0)
    den = 1000.0 + torch.rand(B, generator=g)
    num = 0.05 * den * (1 + 0.1 * torch.rand(B, generator=g))  # ratio ~ 0.05: a mix of skips and computes
    sums = torch.stack([num, den], dim=1).float()
    return {
        "sums": sums,
        "rel": (sums[:, 0].sum() / sums[:, 1].sum()).reshape(()),
        "timestep": torch.full((B,), 500.0),
        "coeffs": torch.tensor(COEFFS, dtype=torch.float32),
        "state": ops.new_state(1024),
    }


def teacache_host_step(rel: torch.Tensor, st: dict) -> bool:
    """TeaCache's per-step decision, transcribed from its reference forward."""
    if st["cnt"] == 0 or st["cnt"] == st["num_steps"] - 1:
        should_calc = True
        st["acc"] = 0
    else:
        rescale_func = np.poly1d(COEFFS)
        st["acc"] += rescale_func(rel.cpu().item())
        if st["acc"] < st["thresh"]:
            should_calc = False
        else:
            should_calc = True
            st["acc"] = 0
    st["cnt"] += 1
    if st["cnt"] == st["num_steps"]:
        st["cnt"] = 0
    return should_calc


def make_fn(provider: str, variant: str, inp: dict[str, torch.Tensor]):
    """``(fn, note)``; ``fn`` is None when the provider is unavailable or the variant
    does not apply."""
    sums, t, coeffs, state = inp["sums"], inp["timestep"], inp["coeffs"], inp["state"].clone()
    args = (THRESHOLD, 1, 0, 0)
    if provider == "teacache_host":
        if variant != "op+read":
            return None, "n/a: the host approach always reads the value back"
        # cnt starts at 1 and num_steps is never reached: every timed call takes the
        # .item() + poly1d path (the forced first/last steps are the cheap ones).
        st = {"cnt": 1, "num_steps": 10**12, "acc": 0.0, "thresh": THRESHOLD}
        rel = inp["rel"]
        return (lambda: teacache_host_step(rel, st)), ""
    if provider == "fastcache_reference":
        from fastcache.ops import reference

        def op():
            return reference.cache_decision(sums, t, coeffs, state, *args)
    else:
        if not common.cpp_active():
            return None, common.cpp_skip_note()
        if provider == "fastcache_cpp":
            from fastcache import ops

            def op():
                return ops.cache_decision(sums, t, coeffs, state, *args)
        elif provider == "fastcache_cpp_dispatcher":
            raw = torch.ops.fastcache.cache_decision.default

            def op():
                return raw(sums, t, coeffs, state, *args)
        elif provider == "fastcache_cpp_pybind":
            from fastcache import _C

            def op():
                return _C.cache_decision(sums, t, coeffs, state, *args)
        else:
            raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")
    if variant == "op":
        return op, ""
    return (lambda: op().item()), ""


def run(args) -> list[common.Result]:
    common.setup_torch()
    busy = common.warn_if_busy()
    env = common.environment()
    if busy:
        env["warning"] = busy
    env["cache"] = "hot (tiny tensors; samples loop the call for >= 2 ms)"
    print(common.describe_env(env), flush=True)
    reps = args.reps or (9 if args.quick else 21)
    results = []
    for B in BATCHES:
        inp = make_inputs(B)
        for variant in VARIANTS:
            for provider in PROVIDERS:
                cfg = Config(NAME, OP, provider, f"B={B}", (B, 2), "fp32", variant)
                fn, note = make_fn(provider, variant, inp)
                if fn is None:
                    if not note.startswith("n/a"):
                        results.append(common.make_result(cfg, None, note=note))
                    continue
                t = common.measure(fn, reps=reps, min_sample_us=2000.0, max_seconds=2.0)
                results.append(common.make_result(cfg, t, note=note))
                print(f"  {cfg.id():60s} {t.median_us:9.2f} us", flush=True)
    summary = summarize(results)
    common.report(NAME, results, env, format_summary(summary), {"rows": summary}, write=not args.no_write)
    return results


def summarize(results: list[common.Result]) -> list[dict]:
    host = next((r.us for r in results if r.config.provider == "teacache_host" and not r.skipped), None)
    rows = []
    for provider in PROVIDERS:
        row = {"provider": provider}
        for r in results:
            if r.config.provider == provider:
                row[r.config.variant] = r.us
                if r.skipped:
                    row["note"] = r.note
        if row.get("op+read") and host:
            row["vs_host"] = host / row["op+read"]
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = [("provider", "provider"), ("op", "op us"), ("op+read", "op + flag read us"), ("vs_host", "x host")]
    return common.format_table(rows, cols)


# ----------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("provider", PROVIDERS)
    def test_decision(benchmark, provider, variant):
        common.setup_torch()
        fn, note = make_fn(provider, variant, make_inputs(BATCHES[0]))
        if fn is None:
            pytest.skip(note)
        benchmark.group = f"{OP}/{variant}"
        benchmark(fn)


if __name__ == "__main__":
    run(common.base_parser(__doc__.splitlines()[0]).parse_args())
