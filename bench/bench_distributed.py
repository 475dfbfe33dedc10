"""Cost of the multi-device decision reduction per step (fastcache.distributed), gloo, CPU, eager.

With ``fastcache.patch(model, config, process_group=group)`` a data-driven policy (TeaCache,
First-Block Cache) reduces its indicator sums over the group once per model call before
deciding: a fixed-order fp64 sum of this rank's ``(B, 2)`` sums, an all-gather of one
``(1, 2)`` fp64 row per rank (functional ``all_gather_single`` + ``wait_tensor``), and a
rank-order sum. This measures, in 2 processes on one machine:

* ``reduce``: :meth:`fastcache.distributed.DecisionGroup.reduce` on ``(2, 2)`` fp32 sums,
  alone (what a step pays on top of the single-process decision), and its local arithmetic
  without the collective (the fixed-order fp64 sums and the concatenation a gather does);
* ``funcol all_gather``: the collective alone (functional all-gather + wait of the ``(1, 2)`` row);
* ``funcol all_reduce``: a functional all-reduce + wait of the same ``(1, 2)`` row, and
  ``c10d all_reduce``: ``dist.all_reduce`` in place, for comparison with the peers' usual
  collective (they add ``.item()`` after it);
* ``step``: one eager TeaCache step of the reference DiT (``fastcache.models.DiT``, B=2,
  256 tokens, 6 blocks) sampled with and without the group: the difference is the
  reduction's cost in a real step (noisy: both ranks share a 2-core machine).

Medians of ``--samples`` samples of ``--calls`` calls each (after warm-up), per rank, in us.
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


def _time_us(fn, calls: int, samples: int, warmup: int = 50) -> dict:
    for _ in range(warmup):
        fn()
    per = []
    for _ in range(samples):
        dist.barrier()  # both ranks start each sample together
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    q = statistics.quantiles(per, n=5)
    return {"median_us": statistics.median(per), "p20_us": q[0], "p80_us": q[-1]}


def _step_us(group, steps: int, repeats: int) -> float:
    """Per-step time (us) of a TeaCache sampling loop on the reference DiT, best of ``repeats``."""
    import fastcache
    from fastcache.models import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT.from_config(
        DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=192, depth=6, num_heads=3, num_classes=10)
    ).eval()
    labels = torch.arange(2) % 10
    ts = torch.linspace(999, 0, steps)
    cfg = fastcache.TeaCacheConfig(threshold=0.2, num_steps=steps)
    best = float("inf")
    with fastcache.patched(model, cfg, process_group=group), torch.no_grad():
        for _ in range(repeats + 1):  # the first run allocates and warms up
            x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            dist.barrier()
            t0 = time.perf_counter()
            for t in ts:
                x = x - 0.02 * model(x, t.expand(2), labels)[:, :4]
            best = min(best, (time.perf_counter() - t0) / steps * 1e6)
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
    res = {
        "reduce": _time_us(lambda: group.reduce(sums), args.calls, args.samples),
        "reduce without the collective": _time_us(
            lambda: group.combine(torch.cat([group.local_sum(sums), rows[1:]])), args.calls, args.samples
        ),
        "funcol all_gather": _time_us(
            lambda: fc.wait_tensor(fc.all_gather_single(row, 0, dist.group.WORLD)), args.calls, args.samples
        ),
        "funcol all_reduce": _time_us(
            lambda: fc.wait_tensor(fc.all_reduce(row, "sum", dist.group.WORLD)), args.calls, args.samples
        ),
        "c10d all_reduce": _time_us(lambda: dist.all_reduce(row.clone()), args.calls, args.samples),
    }
    if args.steps:
        alone = _step_us(None, args.steps, args.repeats)
        grouped = _step_us(dist.group.WORLD, args.steps, args.repeats)
        res["step (TeaCache, reference DiT)"] = {"no group us": alone, "group us": grouped, "diff us": grouped - alone}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per sample")
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the end-to-end run (0: skip it)")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs per setting (best kept)")
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
