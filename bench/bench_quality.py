"""Quality vs speed of the caching methods on the shipped digits DiT.

For a 50-step and a 20-step DDIM run (batched classifier-free guidance, the same
labels and noise for every config) this measures, side by side:

* TeaCache (stack residual) at three thresholds, with a polynomial fitted on the same
  calibration runs (``Profile.fit_teacache``);
* static whole-stack caching every 2nd / 3rd step (TeaCache's stack policy with an
  unreachable threshold and ``max_consecutive_skips = N - 1``; the last step is forced);
* FORA interval 2 / 3 (branch-level reuse, gates recomputed);
* the same TeaCache and static schedules with branch-level reuse (gates recomputed,
  FORA-style) and no correction = EOC with weight 0 on them ("interior"): EOC changes
  the reuse granularity of a stack schedule as well as correcting it, and these rows
  separate the two effects;
* EOC on each base: the paper's default weight (w = 0.01, our rule defaults lambda = 4,
  tau = 0.25) and a weight tuned on this model (w = 1, every reused block corrected:
  lambda = 0, tau = 0).

Columns: block work computed (fraction of block evaluations), wall and process-CPU
time (best of ``--repeats``; the machine is shared, so the CPU-time speedup is the
robust one), speedups vs uncached (best of its runs at the start and the end), PSNR
of the final images vs the uncached ones.
The EOC profile comes from two uncached runs on other seeds and labels.

    python bench/bench_quality.py          # writes bench/results/quality.{csv,json,png}
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastcache  # noqa: E402
from fastcache.models import load_digits_dit, psnr, sample_digits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# per step count: the fitted polynomial accumulates over more, smaller steps at 50
TEACACHE_THRESHOLDS = {50: (0.05, 0.1, 0.2), 20: (0.1, 0.2, 0.4)}
EOC_VARIANTS = {"eoc w=0.01": dict(weight=0.01), "eoc w=1 all": dict(weight=1.0, regulation=0.0, threshold=0.0)}


def _sample(model, labels, steps, seed):
    """(images, wall seconds, process CPU seconds). CPU time is the robust one on a
    shared machine: other jobs stretch the wall time, not this process's CPU time."""
    g = torch.Generator().manual_seed(seed)
    t, c = time.perf_counter(), time.process_time()
    x = sample_digits(model, labels, num_steps=steps, generator=g)
    return x, time.perf_counter() - t, time.process_time() - c


def _bases(steps, coeffs, L):
    out = {}
    for thr in TEACACHE_THRESHOLDS.get(steps, TEACACHE_THRESHOLDS[20]):
        out[f"teacache {thr:g}"] = fastcache.TeaCacheConfig(threshold=thr, coefficients=coeffs, num_steps=steps)
    for n in (2, 3):
        out[f"static every-{n}"] = fastcache.TeaCacheConfig(threshold=1e9, max_consecutive_skips=n - 1, num_steps=steps)
    for n in (2, 3):
        out[f"fora {n}"] = fastcache.FORAConfig(interval=n, num_steps=steps)
    return out


def _eoc_base(name, cfg, steps, L):
    """The base EOC corrects: FORA as is, TeaCache's decision on the interior, and the
    static whole-stack schedule as a (steps x blocks) mask with the same steps computed."""
    if name.startswith("static"):
        n = cfg.max_consecutive_skips + 1
        rows = [s % n == 0 or s == steps - 1 for s in range(steps)]
        return [[r] * L for r in rows]
    if name.startswith("teacache"):
        return fastcache.TeaCacheConfig(threshold=cfg.threshold, coefficients=cfg.coefficients)
    return cfg


def run(steps_list, batch, repeats, seed):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_digits_dit()
    L = len(model.blocks)
    labels = torch.arange(batch) % 10
    _sample(model, labels[:2], 2, seed)  # warm-up
    rows = []
    for steps in steps_list:
        t0 = time.perf_counter()
        prof = fastcache.calibrate(
            model,
            lambda: [_sample(model, (labels + 3 * k + 1) % 10, steps, 1000 + k) for k in range(2)],
            scheduler="DDIMScheduler(trailing)",
            progress=False,
        )
        coeffs = prof.fit_teacache(4)
        print(f"{steps} steps: calibrated in {time.perf_counter() - t0:.1f} s ({prof})", flush=True)

        def timed():
            runs = [_sample(model, labels, steps, seed) for _ in range(repeats)]
            return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)

        base, base_t, base_c = timed()
        group = [dict(steps=steps, config="uncached", base="-", computed=1.0, psnr_db=None, corrected=0)]
        times = [(base_t, base_c)]

        def measure(label, base_name, cfg):
            with fastcache.patched(model, cfg):
                imgs, t, c = timed()
                st = fastcache.stats(model)["contexts"]["default"]
            frac = st.get("computed_fraction", st["computed"] / max(1, st["computed"] + st["skipped"]))
            r = dict(
                steps=steps,
                config=label,
                base=base_name,
                computed=round(frac, 4),
                psnr_db=round(float(psnr(imgs, base, reduction="mean")), 3),
                corrected=st.get("corrected", 0),
            )
            group.append(r)
            times.append((t, c))
            print(
                f"  {label:<30} computed {r['computed']:.2f}  wall {t:6.2f} s  cpu {c:6.2f} s  "
                f"{r['psnr_db']:6.2f} dB  corrected {r['corrected']}",
                flush=True,
            )

        for name, cfg in _bases(steps, coeffs, L).items():
            measure(name, name, cfg)
            eb = _eoc_base(name, cfg, steps, L)
            if not name.startswith("fora"):
                # the same schedule with branch-level reuse and no correction (EOC weight 0)
                measure(f"{name} interior", name, fastcache.EOCConfig(base=eb, profile=prof, weight=0.0))
            for vname, kw in EOC_VARIANTS.items():
                measure(f"{vname} on {name}", name, fastcache.EOCConfig(base=eb, profile=prof, **kw))
        # the baseline again at the end; the best of all its runs is the reference
        _, t2, c2 = timed()
        base_t, base_c = min(base_t, t2), min(base_c, c2)
        print(f"  uncached: wall {base_t:.2f} s, cpu {base_c:.2f} s", flush=True)
        for r, (t, c) in zip(group, times):
            if r["config"] == "uncached":
                t, c = base_t, base_c
            r.update(
                wall_s=round(t, 4),
                cpu_s=round(c, 4),
                speedup_wall=round(base_t / t, 3),
                speedup_cpu=round(base_c / c, 3),
            )
            rows.append(r)
    return rows


def write(rows, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out / "quality.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join("" if r[k] is None else str(r[k]) for k in keys) + "\n")
    meta = {"torch": torch.__version__, "backend": fastcache.ops.BACKEND.as_dict(), "threads": torch.get_num_threads()}
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r["steps"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(steps_list), figsize=(6.2 * len(steps_list), 4.6), squeeze=False)
    style = {"teacache": "o", "static": "s", "fora": "^"}
    for ax, steps in zip(axes[0], steps_list):
        for r in rows:
            if r["steps"] != steps or r["psnr_db"] is None:
                continue
            fam = r["base"].split()[0]
            kind = (
                "eoc w=1"
                if "w=1 all" in r["config"]
                else "eoc w=0.01"
                if "w=0.01" in r["config"]
                else ("interior" if "interior" in r["config"] else "base")
            )
            color = {"base": "tab:blue", "interior": "tab:purple", "eoc w=0.01": "tab:orange", "eoc w=1": "tab:red"}[
                kind
            ]
            # x: measured speedup in process CPU time (the wall time on the shared machine is noisy; both in the CSV)
            ax.scatter(r["speedup_cpu"], r["psnr_db"], marker=style[fam], color=color, s=36)
        for kind, color in (
            ("base", "tab:blue"),
            ("interior: branch reuse, w=0", "tab:purple"),
            ("EOC w=0.01", "tab:orange"),
            ("EOC w=1, all reused blocks", "tab:red"),
        ):
            ax.scatter([], [], color=color, label=kind)
        for fam, mk in style.items():
            ax.scatter([], [], marker=mk, color="gray", label=fam)
        ax.set_title(f"digits DiT, {steps} DDIM steps, CFG")
        ax.set_xlabel("speedup vs uncached (process CPU time)")
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 20])
    p.add_argument("--batch", type=int, default=10, help="labels per run (x2 rows with CFG)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per config (best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true", help="rewrite the files from <out>/quality.json, no sampling")
    a = p.parse_args(argv)
    if a.replot:
        write(json.loads((a.out / "quality.json").read_text())["rows"], a.out)
        return
    t0 = time.perf_counter()
    rows = run(a.steps, a.batch, a.repeats, a.seed)
    write(rows, a.out)
    print(f"wrote {a.out / 'quality.csv'}, quality.json, quality.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
