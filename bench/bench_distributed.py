"""Cost of the multi-device decision reduction per step (fastcache.distributed), gloo, CPU, eager.

With ``fastcache.patch(model, config, process_group=group)`` a data-driven policy (TeaCache,
First-Block Cache) reduces its indicator sums over the group once per model call before
deciding: a fixed-order fp64 sum of this rank's ``(B, 2)`` sums, an all-gather of one
``(1, 2)`` fp64 row per rank (eager: c10d ``all_gather_into_tensor``; under torch.compile
the functional ``all_gather_single`` + ``wait_tensor``), and a rank-order sum. This
measures, in 2 processes on one machine:

* ``reduce``: :meth:`fastcache.distributed.DecisionGroup.reduce` on ``(2, 2)`` fp32 sums,
  alone (what a step pays on top of the single-process decision), and its local arithmetic
  without the collective (the fixed-order fp64 sums and the concatenation a gather does);
* ``c10d all_gather``: the eager collective alone; ``funcol all_gather``: the functional
  all-gather + wait eager would pay if it used the compiled path's collective;
* ``funcol all_reduce`` / ``c10d all_reduce``: an all-reduce of the same ``(1, 2)`` row, for
  comparison with the peers' usual collective (they add ``.item()`` after it);
* ``step``: one eager TeaCache step of the reference DiT (``fastcache.models.DiT``, B=2,
  256 tokens, 6 blocks) sampled with and without the group: the difference is the
  reduction's cost in a real step (noisy: both ranks share a 2-core machine).

Medians of ``--samples`` samples of ``--calls`` calls each (after warm-up, the functions
timed round-robin), per rank, in us.
Every process uses one thread (two processes on the 2-core reference machine). On GPUs
with NCCL the collective's latency differs (not measured here: no GPU).

Run::

    python bench/bench_distributed.py            # prints a table, writes bench/results/distributed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(BENCH_DIR.parent))


def _time_us(fns: dict, calls: int, samples: int, warmup: int = 50) -> dict:
    """Median / p20 / p80 us per call of each function, timed round-robin (a burst of load
    from other jobs on the shared machine then hits one sample of every function)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            dist.barrier()  # both ranks start each sample together
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
    out = {}
    for name, v in per.items():
        q = statistics.quantiles(v, n=5)
        out[name] = {"median_us": statistics.median(v), "p20_us": q[0], "p80_us": q[-1]}
    return out


def _step_us(steps: int, repeats: int) -> dict:
    """Per-step time (us) of a TeaCache sampling loop on the reference DiT without and with
    the group, best of ``repeats`` each, the two settings alternated (load bursts from
    other jobs on the shared machine then hit both)."""
    import fastcache
    from fastcache.models import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT.from_config(
        DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=3, num_classes=10)
    ).eval()
    labels = torch.arange(2) % 10
    ts = torch.linspace(999, 0, steps)
    cfg = fastcache.TeaCacheConfig(threshold=0.2, num_steps=steps)
    best = {"no group us": float("inf"), "group us": float("inf")}
    for i in range(repeats + 1):  # the first round warms up
        for key, group in (("no group us", None), ("group us", dist.group.WORLD)):
            with fastcache.patched(model, cfg, process_group=group), torch.no_grad():
                x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
                model(x, ts[:1].expand(2), labels)  # allocate the cache buffers
                fastcache.reset(model)
                dist.barrier()
                t0 = time.perf_counter()
                for t in ts:
                    x = x - 0.02 * model(x, t.expand(2), labels)[:, :4]
                if i:
                    best[key] = min(best[key], (time.perf_counter() - t0) / steps * 1e6)
    best["diff us"] = best["group us"] - best["no group us"]
    return best


def _job(rank: int, world: int, init: str, out: str, args) -> None:
    import torch.distributed._functional_collectives as fc

    from fastcache.distributed import DecisionGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = DecisionGroup(dist.group.WORLD)
    sums = torch.rand(2, 2) + rank
    row = torch.rand(1, 2, dtype=torch.float64)
    rows = row.expand(world, 2).contiguous()
    res = _time_us(
        {
            "reduce": lambda: group.reduce(sums),
            "reduce without the collective": lambda: group.combine(torch.cat([group.local_sum(sums), rows[1:]])),
            "c10d all_gather": lambda: dist.all_gather_into_tensor(torch.empty(world, 2, dtype=torch.float64), row),
            "funcol all_gather": lambda: fc.wait_tensor(fc.all_gather_single(row, 0, dist.group.WORLD)),
            "funcol all_reduce": lambda: fc.wait_tensor(fc.all_reduce(row, "sum", dist.group.WORLD)),
            "c10d all_reduce": lambda: dist.all_reduce(row.clone()),
        },
        args.calls,
        args.samples,
    )
    if args.steps:
        res["step (TeaCache, reference DiT)"] = _step_us(args.steps, args.repeats)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=100, help="calls per sample")
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the end-to-end run (0: skip it)")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per setting (best kept)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_job, args=(world, os.path.join(d, "init"), d, args), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    print(f"gloo, {world} processes x 1 thread, CPU, eager (torch {torch.__version__})")
    for name in ranks[0]:
        cells = []
        for r in range(world):
            v = ranks[r][name]
            if "median_us" in v:
                cells.append(f"rank{r} {v['median_us']:8.1f} us (p20 {v['p20_us']:.1f}, p80 {v['p80_us']:.1f})")
            else:
                cells.append(f"rank{r} {v['no group us']:9.0f} -> {v['group us']:9.0f} us/step ({v['diff us']:+.0f})")
        print(f"{name:32s} " + "   ".join(cells))
    if not args.no_write:
        out = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "backend": "gloo",
            "world_size": world,
            "threads_per_process": 1,
            "ranks": ranks,
        }
        path = BENCH_DIR / "results" / "distributed.json"
        path.write_text(json.dumps(out, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
