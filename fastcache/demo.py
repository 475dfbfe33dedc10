"""The demo: four ways to spend the same K computed steps of the shipped digits DiT, on CPU.

    python -m fastcache.demo [--steps 50] [--budget 17] [--batch 10] [--seed 0] [--out demo_out]
                             [--repeats 2] [--threads 1] [--profile PATH] [--max-evals 40]

The same ``--batch`` digits (labels 0..9 repeated, initial noise from ``--seed``; DDIM,
batched classifier-free guidance 3.0) are sampled with:

* ``uncached``: all S steps, the reference;
* ``teacache``: TeaCache with the polynomial fitted on the profile's calibration pairs
  (``Profile.fit_teacache(4)``), its threshold bisected on these very runs until it
  computes K steps (or the count nearest K that the thresholds tried reach: the table
  prints the actual count, the threshold and the counts tried);
* ``taylorseer``: TaylorSeer's fixed placement at K (3 warm-up steps, then evenly spaced
  to the last step, :func:`fastcache.tuning.schedule_proxy.fixed_interval_plan`) with the
  search's highest order, 2, on every other step — what ``python -m fastcache.tuning
  --budget K`` compares against;
* ``schedule``: the searched :class:`fastcache.ScheduleConfig` for K
  (:func:`fastcache.search_schedule`), read from the profile;
* ``ddim K``: plain K-step DDIM, the same number of model calls and no cache.

Table: computed steps / total, wall time (best of ``--repeats`` rounds, methods
interleaved), wall speedup against the uncached run, PSNR against the uncached images.
A cached step is not free (the forecast, the gates, the sampler), so the wall speedup stays
below S / K. One torch thread by default (``--threads``): the model is tiny, and on 2 shared
cores two threads stall each other (measured on the project's machine under load: the
whole demo 283 s with two threads, 67 s with one).
Written to ``--out``: ``demo_images.png`` (one row of images per method),
``demo_timeline.png`` (which steps each method computed, and how it filled the others)
and ``demo_table.txt``.

The profile: ``fastcache/models/weights/digits_dit_profile50.safetensors`` (shipped; made
on other seeds and labels than the demo's by ``python -m fastcache.tuning --model digits
--steps 50 --budget 17 --out fastcache/models/weights/digits_dit_profile50.safetensors``)
holds the schedule for 50 steps, K = 17; ``--profile`` takes another one made the same
way. For a step count or budget the profile does not hold, the demo calibrates and
searches first, on the tuning command's calibration runs (2 runs x 8 digits, seeds
1000+k), and prints how long that took.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import torch

import fastcache
from fastcache.models import DEFAULT_CFG_SCALE, WEIGHTS_DIR, load_digits_dit, psnr, sample_digits
from fastcache.tuning.profile import atomic_path
from fastcache.tuning.schedule_proxy import fixed_interval_plan, plan_config

SHIPPED_PROFILE = WEIGHTS_DIR / "digits_dit_profile50.safetensors"
SHIPPED_COMMAND = (
    "python -m fastcache.tuning --model digits --steps 50 --budget 17 "
    "--out fastcache/models/weights/digits_dit_profile50.safetensors"
)
FIXED_ORDER = 2  # the highest order the search may place ("reuse,taylor1,taylor2"): the CLI's comparison
CALIBRATION_RUNS, CALIBRATION_BATCH = 2, 8  # the tuning command's defaults
TEACACHE_MAX_EVALS = 12  # threshold bisection: runs at most


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table; ``psnr_db`` is ``inf`` for the uncached reference."""

    name: str
    setting: str
    computed: int
    total: int
    wall_s: float
    speedup: float
    psnr_db: float


@dataclasses.dataclass
class DemoResult:
    """What :func:`run` measured.

    ``rows``: the printed table. ``images``: the ``(B, 1, 16, 16)`` samples in [-1, 1]
    per row name. ``timelines``: per method (not ``ddim K``), one code per step, as run
    (read from ``fastcache.stats``): ``"C"`` computed, ``"R"`` TeaCache's residual reused,
    a digit the Taylor order that forecast the step. ``threshold``: TeaCache's, with
    ``teacache_trace`` the ``(threshold, computed)`` pairs tried. ``plan``: the searched
    schedule; ``fixed_plan``: TaylorSeer's. ``schedule_source``: where the schedule came
    from (the profile file, or the search the demo ran). ``table``: the printed text.
    """

    rows: list[Row]
    images: dict[str, torch.Tensor]
    timelines: dict[str, str]
    threshold: float
    teacache_trace: list[tuple[float, int]]
    plan: str
    fixed_plan: str
    schedule_source: str
    table: str


class DemoError(ValueError):
    """A setting the demo cannot run with (raised before any sampling)."""


def check_settings(steps: int, budget: int, batch: int, seed: int, repeats: int, out: Path) -> None:
    """Every setting checked before any work; one line naming the argument, the cause, the fix."""
    if steps < 3:
        raise DemoError(f"--steps {steps}: must be >= 3 (step 0 and the last step always compute; a cache needs more)")
    if not 2 <= budget < steps:
        raise DemoError(
            f"--budget {budget}: must be in [2, {steps - 1}] (computed steps of the --steps {steps} run: step 0 "
            "and the last one always compute, and at K = S nothing is cached)"
        )
    if batch < 1:
        raise DemoError(f"--batch {batch}: must be >= 1 (digits sampled per method)")
    if seed < 0:
        raise DemoError(f"--seed {seed}: must be >= 0 (torch.Generator seed of the initial noise)")
    if repeats < 1:
        raise DemoError(f"--repeats {repeats}: must be >= 1 (timed rounds; the best is reported)")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out}: is a file; give a directory (created if missing), e.g. demo_out")
    up = out
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir() or not os.access(up, os.W_OK | os.X_OK):
        raise DemoError(
            f"--out {out}: {up} is not a writable directory, so nothing can be written there; choose another"
        )


def _load_profile(path: Path, model) -> fastcache.Profile:
    prof = fastcache.Profile.load(path)
    prof.check(model)  # made for this model (class, config hash): else a ValueError naming the fix
    return prof


def _schedule(model, prof, steps: int, budget: int, max_evals: int, progress: bool):
    """(ScheduleConfig, where it came from, the profile used for TeaCache's polynomial)."""
    if prof is not None and prof.num_steps == steps and budget in prof.schedules:
        return prof.schedule(budget), f"profile {prof.source}", prof
    from fastcache.tuning.cli import digits_runs

    t0 = time.perf_counter()
    runs = digits_runs(model, steps, CALIBRATION_RUNS, CALIBRATION_BATCH)
    if prof is None or prof.num_steps != steps or prof.step_gram is None:
        prof = fastcache.calibrate(model, lambda: [r() for r in runs], progress=progress)
    res = fastcache.search_schedule(model, runs, budget, profile=prof, max_evals=max_evals, progress=progress)
    took = time.perf_counter() - t0
    print(
        f"no stored schedule for {steps} steps, K = {budget}: calibrated and searched here in {took:.1f} s "
        f"({res.model_calls} model calls; {CALIBRATION_RUNS} runs x {CALIBRATION_BATCH} digits, seeds 1000+k)"
    )
    return res.config, f"searched here ({len(res.trace)} evaluations, {took:.1f} s)", prof


def _sample(model, labels, steps, seed, announce):
    g = torch.Generator().manual_seed(seed)
    ctx = (lambda i: fastcache.context(model, "default", step_index=i, num_steps=steps)) if announce else None
    return sample_digits(model, labels, num_steps=steps, cfg_scale=DEFAULT_CFG_SCALE, generator=g, step_context=ctx)


def _run_with(model, config, labels, steps, seed):
    """(images, seconds, the context's stats) of one run under ``config`` (None = uncached)."""
    if config is None:
        t0 = time.perf_counter()
        imgs = _sample(model, labels, steps, seed, announce=False)
        return imgs, time.perf_counter() - t0, None
    announce = isinstance(config, fastcache.ScheduleConfig)  # placed on the host: 0 reads per step
    with fastcache.patched(model, config):
        t0 = time.perf_counter()
        imgs = _sample(model, labels, steps, seed, announce)
        dt = time.perf_counter() - t0
        st = fastcache.stats(model)["contexts"]["default"]
    return imgs, dt, st


def _teacache_threshold(model, coeffs, labels, steps, budget, seed):
    """The TeaCache threshold whose run computes ``budget`` steps on these runs, or the
    nearest count reached (ties: the smaller count, not more compute than the others):
    double / halve from 0.1 to bracket, then bisect geometrically. Returns (threshold,
    [(threshold, computed)] tried)."""
    trace: list[tuple[float, int]] = []

    def count(thr: float) -> int:
        cfg = fastcache.TeaCacheConfig(threshold=thr, coefficients=coeffs, num_steps=steps)
        n = _run_with(model, cfg, labels, steps, seed)[2]["computed"]
        trace.append((thr, n))
        return n

    lo = hi = None  # lo computes more than the budget, hi fewer
    thr = 0.1
    while len(trace) < TEACACHE_MAX_EVALS:
        n = count(thr)
        if n == budget:
            break
        if n > budget:
            lo = thr
            if hi is not None:
                break
            thr *= 2
        else:
            hi = thr
            if lo is not None:
                break
            thr /= 2
        if not 1e-6 < thr < 1e6:
            break
    while trace[-1][1] != budget and lo is not None and hi is not None and len(trace) < TEACACHE_MAX_EVALS:
        mid = math.sqrt(lo * hi)
        n = count(mid)
        if n == budget:
            break
        lo, hi = (mid, hi) if n > budget else (lo, mid)
    best = min(trace, key=lambda e: (abs(e[1] - budget), e[1], e[0]))
    return best[0], trace


def _codes(st: dict, plan: str | None) -> str:
    """The run's timeline as codes: "C" computed; the plan's digit (schedules) or "R"
    (TeaCache's reused residual) on the others."""
    return "".join("C" if c else ("R" if plan is None else plan[s]) for s, c in enumerate(st["timeline"]))


def run(
    steps: int = 50,
    budget: int = 17,
    batch: int = 10,
    out: Path = Path("demo_out"),
    seed: int = 0,
    repeats: int = 2,
    profile: Path | None = SHIPPED_PROFILE,
    max_evals: int = 40,
    progress: bool = False,
) -> DemoResult:
    out = Path(out)
    check_settings(steps, budget, batch, seed, repeats, out)
    if profile is not None and not Path(profile).is_file():
        raise DemoError(f"--profile {profile}: no such file; make one with {SHIPPED_COMMAND} (--out PATH)")
    model = load_digits_dit()
    prof = None if profile is None else _load_profile(Path(profile), model)
    labels = torch.arange(batch) % 10

    sched, source, prof = _schedule(model, prof, steps, budget, max_evals, progress)
    coeffs = prof.fit_teacache(4)
    fixed = fixed_interval_plan(budget, steps, FIXED_ORDER)
    _sample(model, labels[:2], 2, seed, announce=False)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    thr, trace = _teacache_threshold(model, coeffs, labels, steps, budget, seed)
    print(
        f"teacache threshold {thr:.4g} ({time.perf_counter() - t0:.1f} s; computed steps per threshold tried: "
        + ", ".join(f"{t:.3g} -> {n}" for t, n in trace)
        + ")"
    )

    tea = fastcache.TeaCacheConfig(threshold=thr, coefficients=coeffs, num_steps=steps)
    methods = [
        ("uncached", "all steps", None, steps),
        ("teacache", f"threshold {thr:.3g}", tea, steps),
        ("taylorseer", f"fixed, order {FIXED_ORDER}", plan_config(fixed, prof), steps),
        ("schedule", "searched", sched, steps),
        (f"ddim {budget}", f"{budget}-step DDIM", None, budget),
    ]
    best: dict[str, tuple] = {}
    for _ in range(repeats):  # rounds, methods interleaved: load changes hit every method alike
        for name, _, cfg, n in methods:
            imgs, dt, st = _run_with(model, cfg, labels, n, seed)
            if name not in best or dt < best[name][1]:
                best[name] = (imgs, dt, st)

    base, base_t, _ = best["uncached"]
    rows, images, timelines = [], {}, {}
    for name, setting, cfg, n in methods:
        imgs, dt, st = best[name]
        computed = n if st is None else int(st["computed"])
        plan = getattr(cfg, "plan", None)
        if st is not None:
            timelines[name] = _codes(st, plan)
            if plan is not None and timelines[name] != plan:
                raise RuntimeError(
                    f"fastcache.demo: the {name} run computed {timelines[name]} but its plan is {plan}; "
                    "the schedule did not replay (a bug: please report it)"
                )
        elif name == "uncached":
            timelines[name] = "C" * steps
        db = math.inf if name == "uncached" else float(psnr(imgs, base, reduction="mean"))
        rows.append(Row(name, setting, computed, steps, dt, base_t / dt, db))
        images[name] = imgs

    table = format_table(rows)
    print(table)
    print(f"schedule: {source}\n  searched   {sched.plan}\n  taylorseer {fixed}")
    out.mkdir(parents=True, exist_ok=True)
    _write_grids(rows, images, out / "demo_images.png")
    _write_timeline(timelines, out / "demo_timeline.png")
    with atomic_path(out / "demo_table.txt") as tmp:
        tmp.write_text(table + "\n")
    print(f"wrote {out / 'demo_images.png'}, {out / 'demo_timeline.png'}, {out / 'demo_table.txt'}")
    return DemoResult(rows, images, timelines, thr, trace, sched.plan, fixed, source, table)


def format_table(rows: list[Row]) -> str:
    header = f"{'method':<12}{'setting':<18}{'computed':>9}{'wall s':>9}{'speedup':>9}{'PSNR dB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ps = "exact" if r.psnr_db == math.inf else f"{r.psnr_db:.2f}"
        lines.append(
            f"{r.name:<12}{r.setting:<18}{f'{r.computed}/{r.total}':>9}{r.wall_s:>9.2f}{r.speedup:>8.2f}x{ps:>9}"
        )
    return "\n".join(lines)


def _write_grids(rows: list[Row], images: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastcache.models import image_grid

    n = min(20, len(next(iter(images.values()))))
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.5 * n + 2.4, 0.8 * len(rows) + 0.4), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        grid = image_grid(images[r.name][:n], nrow=n)[:, :, 0].numpy()  # host-read-ok: plotting after sampling
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ps = "reference" if r.psnr_db == math.inf else f"{r.psnr_db:.1f} dB"
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{r.name}\n{r.computed}/{r.total}, {ps}", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# a step's code -> colour: computed, TeaCache's reused residual, forecast by Taylor order
COLOURS = {"C": "#1b7837", "R": "#d73027", "0": "#fdae61", "1": "#abd9e9", "2": "#4575b4", "E": "#984ea3"}
LABELS = {"C": "computed", "R": "residual reused", "0": "reuse", "1": "order-1 forecast", "2": "order-2 forecast"}


def _write_timeline(timelines: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(timelines)
    steps = len(timelines[names[0]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * steps + 2.0), 0.5 * len(names) + 1.0))
    for y, name in enumerate(names):
        codes = timelines[name]
        for s, c in enumerate(codes):
            ax.add_patch(plt.Rectangle((s, y + 0.1), 0.9, 0.8, color=COLOURS.get(c, "grey"), lw=0))
        ax.text(steps + 0.5, y + 0.5, f"{codes.count('C')}/{steps}", va="center", fontsize=8)
    used = sorted({c for codes in timelines.values() for c in codes}, key=list(COLOURS).index)
    ax.legend(
        handles=[Patch(color=COLOURS[c], label=LABELS.get(c, c)) for c in used],
        fontsize=7,
        ncol=len(used),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
    )
    ax.set_xlim(0, steps + 3)
    ax.set_ylim(len(names), 0)
    ax.set_yticks([y + 0.5 for y in range(len(names))], names)
    ax.set_xlabel("sampling step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fastcache.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=50, help="DDIM steps S (default 50)")
    p.add_argument("--budget", type=int, default=17, help="computed steps K each cached method gets (default 17)")
    p.add_argument("--batch", type=int, default=10, help="digits sampled per method (default 10: one of each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; the best is reported (default 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the model is tiny, and two threads stall each other on shared cores)",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    p.add_argument(
        "--profile", type=Path, default=SHIPPED_PROFILE, help="a profile made by python -m fastcache.tuning --budget"
    )
    p.add_argument("--max-evals", type=int, default=40, help="evaluations when the demo searches a schedule itself")
    a = p.parse_args(argv)
    try:
        check_settings(a.steps, a.budget, a.batch, a.seed, a.repeats, a.out)
        if a.threads < 1:
            raise DemoError(f"--threads {a.threads}: must be >= 1 (torch intra-op threads)")
        if a.max_evals < 1:
            raise DemoError(f"--max-evals {a.max_evals}: must be >= 1 (evaluations of the schedule search)")
        if not a.profile.is_file():
            raise DemoError(f"--profile {a.profile}: no such file; make one with {SHIPPED_COMMAND} (--out PATH)")
    except DemoError as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    run(a.steps, a.budget, a.batch, a.out, a.seed, a.repeats, a.profile, a.max_evals, progress=False)
    print(f"demo: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
