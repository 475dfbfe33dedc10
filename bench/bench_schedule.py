"""Budgeted schedule search on the shipped digits DiT: for K computed steps of 50, the
searched schedule against every fixed placement at the same K, on held-out runs.

For each K in ``--budgets`` (default 10, 13, 15, 17, 19, 25; 15 and 19 are where
diffusers' TaylorSeer hook lands with intervals 4 and 3, around 17):

* ``fastcache.search_schedule`` on the calibration runs (2 runs x 8 images, seeds
  1000+k) — its cost in model calls and seconds, and its calibration PSNR;
* on held-out runs (``--held-out`` runs x 8 images, seeds 2000+k, other labels), PSNR
  against the same runs uncached, for: the searched schedule; the search's first stage
  alone (the proxy DP); TaylorSeer's fixed-interval placement (first 3 steps, then even
  spacing to the last step) with order 1 and with order 2; FORA's reuse on even spacing;
  TeaCache with its threshold searched (``fastcache.search_threshold``, fitted polynomial)
  to compute at most K/50 of the block work on the calibration runs; diffusers 0.42's
  TaylorSeer hook (order 1, 3 warm-up steps, the integer interval whose computed count is
  nearest K — both neighbours on a tie) on the same model converted to diffusers' DiT class;
* speed: process CPU time of a held-out run, searched schedule vs uncached, with the step
  announced (0 host reads) and without (the device schedule: one flag read per step).

Then, speed only, the search and its schedule on a random-weight diffusers family
(diffusers' DiTTransformer2DModel at DiT-S/2 width and depth, 16x16 latents, 50 DDIM
steps, batch 2, K=17): cost of
the search, ms per step uncached and with the searched schedule, announced and not.

    python bench/bench_schedule.py             # writes bench/results/schedule.{csv,json,png}
    python bench/bench_schedule.py --budgets 17 --held-out 2 --max-evals 12   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' support package (support.zoo, support.hostreads)

import fastcache  # noqa: E402
from fastcache.models import load_digits_dit, sample_digits  # noqa: E402
from fastcache.models.convert import DiffusersDiT  # noqa: E402
from fastcache.tuning.cli import digits_runs  # noqa: E402
from fastcache.tuning.evaluation import psnr, run_all  # noqa: E402
from fastcache.tuning.schedule_proxy import fixed_interval_plan, plan_config, schedule_from_profile  # noqa: E402
from fastcache.tuning.schedule_search import evaluate_schedule  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _cpu(fn):
    c = time.process_time()
    with torch.no_grad():
        out = fn()
    return out, time.process_time() - c


def _teacache(model, cal, held, refs_h, K, S, prof):
    res = fastcache.search_threshold(
        model, cal, "teacache", target_fraction=K / S, profile=prof, num_steps=S, progress=False, max_evals=10
    )
    h = fastcache.patch(model, res.config)
    try:
        got = run_all(held, "bench_schedule (held-out runs)", handle=h)
    finally:
        h.remove()
    return dict(
        setting=f"threshold {res.config.threshold:.3g}",
        computed_steps=round(S * got.computed_fraction(), 2),
        calibration_psnr_db=round(res.chosen.psnr_db, 2),
        held_out_psnr_db=round(psnr(got.outputs, refs_h, 2.0), 2),
    )


def _diffusers_taylorseer(ref, held_specs, refs_h, K, S):
    """diffusers' TaylorSeer hook on the converted model, the interval nearest K."""
    from bench_compare import _Counter
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    ids = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]

    def build(n):
        w = DiffusersDiT(ref)
        apply_taylorseer_cache(
            w.transformer,
            TaylorSeerCacheConfig(
                cache_interval=n, max_order=1, taylor_factors_dtype=torch.float32, cache_identifiers=ids
            ),
        )
        return w

    def run(n, specs):
        outs, computed = [], 0.0
        for labels, seed in specs:
            w = build(n)  # a fresh hook state per run
            cnt = _Counter(w.transformer)
            with torch.no_grad():
                outs.append(sample_digits(w, labels, num_steps=S, generator=torch.Generator().manual_seed(seed)))
            computed += cnt.n / cnt.total_per_call
            cnt.remove()
        return outs, computed / len(specs)

    ks = {n: run(n, held_specs[:1])[1] for n in range(2, 9)}
    gap = min(abs(k - K) for k in ks.values())
    out = []
    for n in sorted((n for n in ks if abs(ks[n] - K) == gap), reverse=True):  # both neighbours on a tie
        outs, k = run(n, held_specs)
        out.append(
            dict(
                setting=f"interval {n}, order 1, warm-up 3",
                computed_steps=round(k, 2),
                held_out_psnr_db=round(psnr(outs, refs_h, 2.0), 2),
            )
        )
    return out


def _speed(model, cfg, held, S, repeats):
    """Best-of CPU seconds of one held-out run: uncached, announced, device schedule."""
    r = held[0]

    def announced():
        return sample_digits_like(r, model, S)

    times = {"uncached": math.inf, "announced": math.inf, "device": math.inf}
    for _ in range(repeats):
        times["uncached"] = min(times["uncached"], _cpu(r)[1])
        with fastcache.patched(model, cfg):
            times["device"] = min(times["device"], _cpu(r)[1])
        with fastcache.patched(model, cfg):
            times["announced"] = min(times["announced"], _cpu(announced)[1])
    return times


def budcache_search(model, cal, refs_c, K, S, max_evals, seed=0, order=2):
    """A BudCache-style baseline: simulated annealing, then hill climbing, over the
    compute mask alone at K computed steps (every other step TaylorSeer order ``order``),
    scored by PSNR on the calibration runs, ``max_evals`` evaluations (the same model-call
    budget as fastcache's search). Start: TaylorSeer's fixed interval. Move: one computed
    step (not step 0) to a free step within +-3 (or anywhere, one move in four). The
    temperature falls linearly from 1 dB to 0 over the first 2/3 of the budget; the rest
    accepts only improvements."""
    import random

    rng = random.Random(seed)
    t0 = time.perf_counter()

    def score(plan):
        return evaluate_schedule(model, plan_config(plan, None), cal, refs_c)[0]

    cur = fixed_interval_plan(K, S, order)
    cur_p = score(cur)
    best, best_p, evals, seen = cur, cur_p, 1, {cur: cur_p}
    anneal = max(1, (2 * max_evals) // 3)
    tries = 0
    while evals < max_evals and tries < 50 * max_evals:
        tries += 1
        p = list(cur)
        comp = [s for s in range(1, S) if p[s] == "C"]
        free = [s for s in range(1, S) if p[s] != "C"]
        if not comp or not free:
            break
        s = rng.choice(comp)
        near = [t for t in free if abs(t - s) <= 3]
        t = rng.choice(free if (not near or rng.random() < 0.25) else near)
        p[s], p[t] = str(order), "C"
        q = "".join(p)
        if q in seen:
            continue
        q_p = seen[q] = score(q)
        evals += 1
        temp = max(0.0, 1.0 - evals / anneal)
        d = q_p - cur_p
        if d > 0 or (temp > 0 and rng.random() < math.exp(d / temp)):
            cur, cur_p = q, q_p
        if q_p > best_p:
            best, best_p = q, q_p
    return best, best_p, evals, time.perf_counter() - t0


def sample_digits_like(run, model, S):
    """The held-out run ``run`` with each step announced to the patch."""
    return run(step_context=lambda i: fastcache.context(model, "default", step_index=i, num_steps=S))


def _runs(model, S, n, batch, held_out):
    """Seeded digits runs taking an optional ``step_context``, and their (labels, seed)."""
    base = digits_runs(model, S, n, batch, held_out=held_out)  # the CLI's runs: same seeds and labels
    labels = torch.arange(batch) % 10
    seed0, shift = (2000, 5) if held_out else (1000, 1)
    specs = [((labels + 3 * k + shift) % 10, seed0 + k) for k in range(n)]

    def make(lab, seed):
        return lambda step_context=None: sample_digits(
            model, lab, num_steps=S, generator=torch.Generator().manual_seed(seed), step_context=step_context
        )

    runs = [make(lab, seed) for lab, seed in specs]
    with torch.no_grad():
        assert torch.equal(runs[0](), base[0]())  # the same runs as `python -m fastcache.tuning`
    return runs, specs


def _stored_search(path, K, model, prof):
    """Today's searched schedule for K from an earlier bench csv of the same setup (the
    search is deterministic: same runs, same profile, same plan), as a stand-in result."""
    import csv
    from types import SimpleNamespace

    for r in csv.DictReader(Path(path).open()):
        if r["method"] == "schedule (searched)" and int(r["K"]) == K:
            cfg = plan_config(r["setting"], prof)
            return SimpleNamespace(
                plan=r["setting"], calibration_psnr=float(r["calibration_psnr_db"]), config=cfg,
                model_calls=int(r["search_model_calls"]), computed_calls=int(r["search_computed_calls"]),
                seconds=float(r["search_s"]), trace=[None] * int(r["evaluations"]), stored_from=str(path),
            )  # fmt: skip
    return None


def run_digits(
    budgets,
    S,
    n_cal,
    n_held,
    batch,
    max_evals,
    repeats,
    methods=("reuse", "taylor1", "taylor2"),
    fit=False,
    lite=False,
    searched_from=None,
):
    torch.set_num_threads(2)
    model = load_digits_dit()
    cal, _ = _runs(model, S, n_cal, batch, False)
    held, held_specs = _runs(model, S, n_held, batch, True)
    t0 = time.perf_counter()
    refs_c = []
    prof = fastcache.calibrate(model, lambda: refs_c.extend(_cpu(r)[0] for r in cal), progress=False)
    calib_s = time.perf_counter() - t0
    refs_h = [_cpu(r)[0] for r in held]
    rows, searched, searched_fit = [], {}, {}
    for K in budgets:
        print(f"K={K}: searching ...", flush=True)
        res = _stored_search(searched_from, K, model, prof) if searched_from else None
        if res is None:
            res = fastcache.search_schedule(
                model, cal, K, methods=methods, profile=prof, max_evals=max_evals, progress=False
            )
            res.store(prof)
        print(res, flush=True)
        searched[K] = res

        def held_psnr(plan):
            return round(evaluate_schedule(model, plan_config(plan, prof), held, refs_h)[0], 2)

        def cal_psnr(plan):
            return round(evaluate_schedule(model, plan_config(plan, prof), cal, refs_c)[0], 2)

        dp_plan = schedule_from_profile(prof, K)[0].plan
        extra = []
        if fit:  # the fitted filler beside today's fillers, the same evaluation budget
            fm = tuple(dict.fromkeys((*methods, "fit")))
            res_f = fastcache.search_schedule(
                model, cal, K, methods=fm, profile=prof, max_evals=max_evals, progress=False
            )
            print(res_f, flush=True)
            searched_fit[K] = res_f
            bc_plan, bc_cal, bc_evals, bc_s = budcache_search(model, cal, refs_c, K, S, max_evals)
            print(f"  budcache-style: {bc_plan} cal {bc_cal:.2f} dB, {bc_evals} evals, {bc_s:.0f} s", flush=True)
            extra = [
                dict(
                    K=K,
                    provider="fastcache",
                    method="schedule (searched, fit filler)",
                    setting=res_f.plan,
                    computed_steps=K,
                    calibration_psnr_db=round(res_f.calibration_psnr, 2),
                    held_out_psnr_db=round(evaluate_schedule(model, res_f.config, held, refs_h)[0], 2),
                    search_model_calls=res_f.model_calls,
                    search_computed_calls=res_f.computed_calls,
                    search_s=round(res_f.seconds, 1),
                    search_s_with_calibration=round(res_f.seconds + calib_s, 1),
                    evaluations=len(res_f.trace),
                    fit_settings=json.dumps(res_f.fit_settings.as_dict()),
                ),
                dict(
                    K=K,
                    provider="baseline",
                    method="budcache-style (SA + hill climb over the mask, order 2)",
                    setting=bc_plan,
                    computed_steps=K,
                    calibration_psnr_db=round(bc_cal, 2),
                    held_out_psnr_db=held_psnr(bc_plan),
                    search_model_calls=(1 + bc_evals) * S * len(cal),
                    search_s=round(bc_s, 1),
                    evaluations=bc_evals,
                ),
            ]
            for r in extra:
                r["held_minus_calibration_db"] = round(r["held_out_psnr_db"] - r["calibration_psnr_db"], 2)
                print(f"  {r['method']:<36} held-out {r['held_out_psnr_db']:6.2f} dB (cal {r['calibration_psnr_db']})")
        plans = [
            ("fastcache", "schedule (searched)", res.plan, round(res.calibration_psnr, 2)),
            ("fastcache", "schedule (proxy DP only)", dp_plan, None),
            ("fastcache", "taylorseer order 1, fixed interval", fixed_interval_plan(K, S, 1), None),
            ("fastcache", "taylorseer order 2, fixed interval", fixed_interval_plan(K, S, 2), None),
            ("fastcache", "fora (reuse), even spacing", fixed_interval_plan(K, S, 0, warmup=1), None),
        ]
        if lite:  # the rows the fitted-filler comparison needs
            plans = [plans[0], plans[2], plans[3]]
        for prov, method, plan, cp in plans:
            row = dict(
                K=K,
                provider=prov,
                method=method,
                setting=plan,
                computed_steps=plan.count("C"),
                calibration_psnr_db=cal_psnr(plan) if cp is None else cp,
                held_out_psnr_db=held_psnr(plan),
            )
            if method == "schedule (searched)":
                row.update(
                    search_model_calls=res.model_calls,
                    search_computed_calls=res.computed_calls,
                    search_s=round(res.seconds + (0 if hasattr(res, "stored_from") else calib_s), 1),
                    evaluations=len(res.trace),
                    search_stored_from=getattr(res, "stored_from", None),
                    held_minus_calibration_db=round(row["held_out_psnr_db"] - row["calibration_psnr_db"], 2),
                )
            rows.append(row)
            k, p = row["computed_steps"], row["held_out_psnr_db"]
            print(f"  {method:<36} K {k:>5}  held-out {p:6.2f} dB", flush=True)
        tc = _teacache(model, cal, held, refs_h, K, S, prof)
        rows.append(dict(K=K, provider="fastcache", method="teacache (threshold searched)", **tc))
        print(f"  teacache {tc}", flush=True)
        first = len(rows) - len(plans) - 1  # the searched schedule's row
        rows[first:first] = extra
        first += len(extra)
        try:
            for dt in _diffusers_taylorseer(model, held_specs, refs_h, K, S):
                rows.append(dict(K=K, provider="diffusers", method="taylorseer hook", **dt))
                print(f"  diffusers taylorseer {dt}", flush=True)
        except ImportError as e:
            rows.append(dict(K=K, provider="diffusers", method="taylorseer hook", skipped=str(e)))
        if lite:
            continue
        t = _speed(model, res.config, held, S, repeats)
        rows[first].update(
            cpu_s_uncached=round(t["uncached"], 3),
            cpu_s_announced=round(t["announced"], 3),
            cpu_s_device=round(t["device"], 3),
            speedup_announced=round(t["uncached"] / t["announced"], 2),
            speedup_device=round(t["uncached"] / t["device"], 2),
            ideal_speedup=round(S / K, 2),
        )
        print(f"  speed {rows[first]}", flush=True)
    if methods == ("reuse", "taylor1", "taylor2") and not fit and not lite:  # the plans bench_compare.py runs
        prof_path = RESULTS / "digits50.schedules.json"
        prof_path.write_text(json.dumps({str(k): v for k, v in sorted(prof.schedules.items())}, indent=1) + "\n")
    return rows, searched, calib_s


def dit_s2_case(B=2):
    """diffusers' DiTTransformer2DModel at DiT-S/2 width and depth (12 layers, 6 heads x
    64) on 16x16x4 latents (64 tokens), random weights (tests/runtime/zoo.py), DDIM."""
    from support.zoo import dit_case

    return dit_case(
        B, num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16, num_embeds_ada_norm=1000
    )


def run_family(S, budget, max_evals, repeats):
    """Random-weight diffusers DiT at DiT-S/2 size: the search runs, and the schedule's speed."""
    case = dit_s2_case()
    m = case.model
    runs = [lambda s=s: case.sample(steps=S, seed=s) for s in (1, 2)]
    t0 = time.perf_counter()
    res = fastcache.search_schedule(m, runs, budget, max_evals=max_evals, progress=False)
    search_s = time.perf_counter() - t0

    def one(announce):
        ctx = (lambda i: fastcache.context(m, "default", step_index=i)) if announce else None
        c = time.process_time()
        case.sample(steps=S, context=ctx)
        return time.process_time() - c

    best = {"uncached": math.inf, "announced": math.inf, "device": math.inf}
    for _ in range(repeats):
        best["uncached"] = min(best["uncached"], one(False))
        with fastcache.patched(m, res.config):
            best["announced"] = min(best["announced"], one(True))
        with fastcache.patched(m, res.config):
            best["device"] = min(best["device"], one(False))
    row = dict(
        family="diffusers DiT, DiT-S/2 width and depth, 16x16 latents (random weights, batch 2)",
        K=budget,
        steps=S,
        plan=res.plan,
        search_model_calls=res.model_calls,
        search_s=round(search_s, 1),
        ms_per_step_uncached=round(1000 * best["uncached"] / S, 3),
        ms_per_step_announced=round(1000 * best["announced"] / S, 3),
        ms_per_step_device=round(1000 * best["device"] / S, 3),
        speedup_announced=round(best["uncached"] / best["announced"], 2),
        speedup_device=round(best["uncached"] / best["device"], 2),
        ideal_speedup=round(S / budget, 2),
    )
    print(f"family: {row}", flush=True)
    return row


def plot(rows, searched, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.5]})
    ax = axes[0]
    methods = []
    for r in rows:
        if "held_out_psnr_db" in r and (r["provider"], r["method"]) not in methods:
            methods.append((r["provider"], r["method"]))
    for prov, meth in methods:
        pts = sorted(
            (r["computed_steps"], r["held_out_psnr_db"])
            for r in rows
            if (r["provider"], r["method"]) == (prov, meth) and "held_out_psnr_db" in r
        )
        style = "o-" if prov == "fastcache" else "s--"
        lw = 2.5 if meth == "schedule (searched)" else 1.2
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=lw, ms=4, label=f"{prov}: {meth}")
    ax.set_xlabel("computed steps of 50")
    ax.set_ylabel("PSNR vs uncached, held-out runs (dB)")
    ax.set_title("digits DiT, DDIM 50 steps, CFG")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    colors = {"C": "tab:green", "0": "tab:gray", "1": "tab:blue", "2": "tab:purple"}
    Ks = sorted(searched)
    for j, K in enumerate(Ks):
        plan = searched[K].plan
        y0 = len(Ks) - 1 - j
        for s, c in enumerate(plan):
            ax.add_patch(plt.Rectangle((s, y0 + 0.1), 0.9, 0.8, color=colors.get(c, "tab:red")))
        ax.text(-0.5, y0 + 0.5, f"K={K}", ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.2, len(searched[Ks[0]].plan))
    ax.set_ylim(0, len(Ks))
    ax.set_yticks([])
    ax.set_xlabel("step (green computed; gray reuse, blue Taylor order 1, purple order 2)")
    ax.set_title("searched schedules")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="10,13,15,17,19,25")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2, help="calibration runs (8 images each)")
    ap.add_argument("--held-out", type=int, default=4, help="held-out runs (8 images each)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-evals", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-family", action="store_true")
    ap.add_argument("--methods", default="reuse,taylor1,taylor2", help="fillers the search may use (add eoc)")
    ap.add_argument("--out", default="schedule")
    ap.add_argument(
        "--searched-from",
        default=None,
        help="take today's searched plans from this earlier csv "
        "(the same setup; its calibration PSNR and search cost are reported from it)",
    )
    ap.add_argument("--fit", action="store_true", help="add the fitted filler's search and the BudCache-style baseline")
    ap.add_argument(
        "--lite",
        action="store_true",
        help="only the searched, fitted, BudCache-style, TaylorSeer, "
        "TeaCache and diffusers rows (no proxy-DP / FORA rows, no speed)",
    )
    a = ap.parse_args(argv)
    from common import environment

    budgets = [int(k) for k in a.budgets.split(",")]
    t0 = time.perf_counter()
    methods = tuple(m for m in a.methods.split(",") if m)
    rows, searched, calib_s = run_digits(
        budgets, a.steps, a.runs, a.held_out, a.batch, a.max_evals, a.repeats, methods, a.fit, a.lite, a.searched_from
    )
    family = None if a.no_family else run_family(a.steps, 17, 12, a.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    import csv

    with (RESULTS / f"{a.out}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    doc = dict(
        benchmark="schedule",
        environment=environment(),
        settings=vars(a),
        calibration_s=round(calib_s, 1),
        total_s=round(time.perf_counter() - t0, 1),
        results=rows,
        family=family,
    )
    (RESULTS / f"{a.out}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    plot(rows, searched, RESULTS / f"{a.out}.png")
    print(f"wrote bench/results/{a.out}.{{csv,json,png}} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
