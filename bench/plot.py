"""Plots of the benchmark result files (run the benchmarks first).

Reads ``bench/results/<name>.json`` and writes ``bench/results/<name>.png``:

* ``modulated_rel_l1`` and ``residual``: achieved GB/s per provider and case, with the
  copy bandwidth measured in the same run as a line;
* ``decision``: per-call microseconds per provider (op alone and op + flag read);
* ``step_overhead``: per-step milliseconds per measurement, eager and compiled.

Run::

    python bench/plot.py                 # every result file present
    python bench/plot.py residual        # one of them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _grouped_bars(ax, cases: list[str], providers: list[str], value) -> None:
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [value(c, p) or 0.0 for c in cases], width, label=p)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)


def plot_bandwidth(name: str, doc: dict) -> Path:
    rows = [r for r in doc["results"] if r.get("gbps") is not None]
    key = lambda r: "/".join(x for x in (r["op"], r["variant"], r["shape_name"], r["dtype"]) if x)  # noqa: E731
    cases = list(dict.fromkeys(key(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    table = {(key(r), r["provider"]): r["gbps"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 4.5))
    _grouped_bars(ax, cases, providers, lambda c, p: table.get((c, p)))
    copy = doc["environment"].get("copy_gbps")
    if copy:
        ax.axhline(copy, color="k", ls="--", lw=1, label=f"copy {copy:.1f} GB/s")
        ax.axhline(0.6 * copy, color="k", ls=":", lw=1, label="60% of copy")
    ax.set_ylabel("GB/s (ideal bytes / median time)")
    ax.set_title(f"{name}  ({doc['environment'].get('cpu')}, {doc['environment'].get('date', '')[:10]})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS_DIR / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_decision(doc: dict) -> Path:
    rows = [r for r in doc["results"] if r.get("median_us") is not None]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    table = {(r["provider"], r["variant"]): r["median_us"] for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4))
    _grouped_bars(ax, providers, variants, lambda p, v: table.get((p, v)))
    ax.set_yscale("log")
    ax.set_ylabel("us per call (median)")
    ax.set_title("cache_decision")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS_DIR / "decision.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_step(doc: dict) -> Path:
    rows = [r for r in doc["results"] if r.get("median_us") is not None]
    cases = list(dict.fromkeys(f"{r['shape_name']}/{r['op']}" for r in rows))
    modes = list(dict.fromkeys(r["provider"] for r in rows))
    table = {(f"{r['shape_name']}/{r['op']}", r["provider"]): r["median_us"] / 1e3 for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 4.5))
    _grouped_bars(ax, cases, modes, lambda c, m: table.get((c, m)))
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("per-step cost of the caching machinery")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS_DIR / "step_overhead.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(names: list[str]) -> None:
    names = names or ["modulated_rel_l1", "residual", "decision", "step_overhead"]
    for name in names:
        doc = _load(name)
        if doc is None:
            print(f"{name}: no bench/results/{name}.json (run bench/bench_{name}.py first)")
            continue
        if name == "decision":
            out = plot_decision(doc)
        elif name == "step_overhead":
            out = plot_step(doc)
        else:
            out = plot_bandwidth(name, doc)
        print(f"wrote {out.relative_to(RESULTS_DIR.parent.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
