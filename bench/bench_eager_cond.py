"""Eager mode: the cache skip as a Python branch on ``flag.item()`` vs as a cond.

Why eager fastcache reads its one decision flag and branches in Python instead of using
``torch.cond`` (docs/modes.md). Measured (fp32, no grad, hot caches, median per call):

* ``branch``       — one tiny two-way choice, ``(B, N, D) = (2, 256, 64)``, branches
  ``x + 1`` / ``x * 2``:
  ``python_branch`` = ``f(x) if flag.item() else g(x)``;
  ``cond_op`` = ``torch.ops.higher_order.cond(flag, f, g, (x,))`` (the operator called
  directly: what fastcache's cond path does outside torch.compile);
  ``torch_cond`` = ``torch.cond(flag, f, g, (x,))`` in eager, which runs a dynamo-compiled
  wrapper on every call.
* ``skipped_step`` — one skipped denoising step of the shipped digits DiT
  (``fastcache.models.load_digits_dit``), TeaCache with a threshold no distance reaches and a
  fixed timestep, so every call after the first skips: the model's eager Python branch
  (``python_branch``), the cond path (``force_cond``: ``cond_op``), and the cond path with the
  operator replaced by ``torch.cond`` (``torch_cond``, fastcache's cond path before the
  direct operator call). New branch closures every step: dynamo guards on them.

The three run round-robin (``common.measure_interleaved``; a ``branch`` sample is 100
calls); each row is also reported as the median of per-round ratios to ``python_branch``
and as the ratio of the minima (the least disturbed samples). One torch thread by default
(``--threads``): what differs between the three is single-threaded Python and dispatch
work, and on the project's shared 2-core machine two OpenMP threads stall for ~100 ms
whenever another process holds the second core, which buries a 0.3 ms step.

Run::

    python bench/bench_eager_cond.py            # table + bench/results/eager_cond.{csv,json}
    python bench/bench_eager_cond.py --quick
"""

from __future__ import annotations

import contextlib

import common
import torch
from common import Config

NAME = "eager_cond"
BATCH = 2
SKIP_ALL = 1e9
PROVIDERS = ("python_branch", "cond_op", "torch_cond")


def branch_fns(shape) -> dict[str, callable]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    flag = torch.tensor(False)

    def f(a):
        return (a + 1,)

    def g(a):
        return (a * 2,)

    cond_op = torch.ops.higher_order.cond
    return {
        "python_branch": lambda: (f if flag.item() else g)(x),
        "cond_op": lambda: cond_op(flag, f, g, (x,)),
        "torch_cond": lambda: torch.cond(flag, f, g, (x,)),
    }


@contextlib.contextmanager
def cond_as_torch_cond():
    """fastcache's cond path with ``torch.cond`` in place of the direct operator call."""
    import fastcache.tracing as graphs

    saved = graphs._COND
    graphs._COND = torch.cond
    try:
        yield
    finally:
        graphs._COND = saved


def skipped_step_fns(model) -> dict[str, callable]:
    import fastcache
    from fastcache.policies.base import force_cond

    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.arange(BATCH) % c.num_classes
    t = torch.full((BATCH,), 500.0)
    fastcache.patch(model, fastcache.TeaCacheConfig(threshold=SKIP_ALL))
    contexts = {"python_branch": contextlib.nullcontext, "cond_op": force_cond}

    def torch_cond_ctx():
        stack = contextlib.ExitStack()
        stack.enter_context(force_cond())
        stack.enter_context(cond_as_torch_cond())
        return stack

    contexts["torch_cond"] = torch_cond_ctx

    def make(ctx):
        def fn():
            with ctx():
                return model(x, t, y)

        return fn

    fastcache.reset(model)
    with torch.no_grad():
        model(x, t, y)  # step 0: forced compute; every later call with the same t skips
    return {name: make(ctx) for name, ctx in contexts.items()}


def repeat(fn, n: int):
    """``n`` calls of ``fn`` as one timed sample (tiny calls: timer resolution amortised)."""

    def run():
        for _ in range(n):
            fn()

    return run


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    env = common.environment()
    reps = args.reps or (5 if args.quick else 15)
    results = []
    cases = [("branch", "2x256x64", (BATCH, 256, 64), branch_fns((BATCH, 256, 64)), 100)]
    try:
        from fastcache.models import load_digits_dit

        model = load_digits_dit()
        c = model.config
        tokens = (BATCH, (c.input_size // c.patch_size) ** 2, c.hidden_size)
        cases.append(("skipped_step", "digits-dit", tokens, skipped_step_fns(model), 1))
    except (ImportError, FileNotFoundError, OSError) as e:
        print(f"digits DiT unavailable ({type(e).__name__}: {e}); skipped-step rows left out")
    rows = []
    for op, shape_name, shape, fns, inner in cases:
        with torch.no_grad():
            timings, samples = common.measure_interleaved(
                {p: repeat(fns[p], inner) for p in PROVIDERS}, warmup=3, reps=reps, max_seconds=20.0
            )
        base = timings["python_branch"]
        for provider in PROVIDERS:
            t = timings[provider]
            ratio = common.paired_ratio(samples[provider], samples["python_branch"])
            min_ratio = t.min_us / base.min_us
            cfg = Config(NAME, op, provider, shape_name, shape, "fp32")
            us = t.median_us / inner
            results.append(
                common.make_result(
                    cfg, t, per_call_us=us, ratio_to_python_branch=ratio, min_ratio=min_ratio, inner=inner
                )
            )
            rows.append(
                {
                    "op": op,
                    "model/shape": shape_name,
                    "provider": provider,
                    "us/call": f"{us:.1f}",
                    "p20-p80 us/call": f"{t.p20_us / inner:.1f}-{t.p80_us / inner:.1f}",
                    "min us/call": f"{t.min_us / inner:.1f}",
                    "x python_branch": f"{ratio:.1f}",
                    "x of mins": f"{min_ratio:.1f}",
                }
            )
    keys = ("op", "model/shape", "provider", "us/call", "p20-p80 us/call", "min us/call")
    cols = [(k, k) for k in (*keys, "x python_branch", "x of mins")]
    text = common.format_table(rows, cols) + "\n" + common.describe_env(env)
    common.report(NAME, results, env, text, {}, write=not args.no_write)


if __name__ == "__main__":
    main()
