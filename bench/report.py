"""Markdown summary tables of the result files in ``bench/results/`` (for bench/README.md).

Run::

    python bench/report.py            # prints the tables of every result file present
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _env_line(doc: dict) -> str:
    e = doc["environment"]
    cpp = e.get("backends", {}).get("cpp", {})
    line = (
        f"{e.get('date', '')[:16]}, {e.get('cpu')} ({e.get('cpu_count')} cpus, {e.get('torch_num_threads')} threads), "
        f"torch {e.get('torch')}, commit {e.get('commit')}{' +local changes' if e.get('tree_dirty') else ''}, "
        f"CPU backend {e.get('backend', {}).get('cpu')} ({cpp.get('cpu_capability')}), "
        f"load avg {e.get('loadavg_start')} -> {e.get('loadavg_end')}, scheduler {e.get('sched_policy', '-')}"
    )
    if e.get("copy_gbps"):
        line += f", copy bandwidth {e['copy_gbps']:.2f} GB/s"
    if e.get("cache"):
        line += f", cache {e['cache'].split(' (')[0]}"
    return line


def modulated(doc: dict) -> str:
    rows = [
        [
            c["shape"],
            c["dtype"],
            c.get("teacache_eager"),
            c.get("teacache_compile"),
            c.get("fastcache_reference"),
            c.get("fastcache_cpp"),
            c.get("cpp_gbps"),
            c.get("pct_copy"),
            c.get("pct_copy_same_size"),
            c.get("speedup_vs_eager"),
            c.get("speedup_vs_compile"),
            c.get("cpp_tview"),
            c.get("cpp_tview_copy"),
            c.get("tview_vs_copy"),
        ]
        for c in doc["summary"]["cases"]
    ]
    header = [
        "shape (B,N,D)",
        "dtype",
        "TeaCache eager us",
        "TeaCache compile us",
        "reference us",
        "cpp us",
        "cpp GB/s",
        "% copy",
        "% copy@size",
        "cpp vs eager",
        "cpp vs compile",
        "cpp transposed x us",
        "cpp x.contiguous() us",
        "in place vs copy",
    ]
    return _table(header, rows)


def residual(doc: dict) -> str:
    rows = [
        [
            c["op"],
            c["shape"],
            c["dtype"],
            c.get("eager"),
            c.get("eager_out"),
            c.get("compile"),
            c.get("fastcache_reference"),
            c.get("fastcache_cpp"),
            c.get("fastcache_cpp_out"),
            c.get("cpp_gbps"),
            c.get("pct_copy"),
            c.get("x_eager"),
            c.get("x_eager_out"),
            c.get("x_compile"),
        ]
        for c in doc["summary"]["cases"]
    ]
    header = [
        "op",
        "shape",
        "dtype",
        "eager us",
        "eager out= us",
        "compile us",
        "reference us",
        "cpp us",
        "cpp out= us",
        "cpp GB/s",
        "% copy",
        "cpp vs eager",
        "cpp out= vs eager out=",
        "cpp vs compile",
    ]
    return _table(header, rows)


def decision(doc: dict) -> str:
    rows = [[r["provider"], r.get("op"), r.get("op+read"), r.get("vs_host")] for r in doc["summary"]["rows"]]
    return _table(["provider", "op us", "op + flag read us", "speed-up vs host"], rows)


def step_overhead(doc: dict) -> str:
    rows = [
        [r["model"], r["tokens"], r["mode"], r["measurement"], r["ms"], r["pct_of_full"], r["overhead_pct"]]
        for r in doc["summary"]["rows"]
    ]
    return _table(["model", "B x N x D", "mode", "measurement", "ms", "% of full step", "overhead %"], rows)


SECTIONS = {
    "modulated_rel_l1": modulated,
    "decision": decision,
    "residual": residual,
    "step_overhead": step_overhead,
}


def main() -> None:
    for name, fn in SECTIONS.items():
        doc = _load(name)
        if doc is None:
            print(f"### {name}\n\n(no results: run bench/bench_{name}.py)\n")
            continue
        print(f"### {name}\n\n{_env_line(doc)}\n\n{fn(doc)}\n")


if __name__ == "__main__":
    main()
