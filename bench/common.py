"""Shared machinery of fastcache's benchmarks: configs, timing, copy bandwidth, result files.

Every ``bench/bench_<op>.py`` builds a list of frozen :class:`Config` (one per
provider x shape x dtype), times each with :func:`measure`, turns the timing into a
:class:`Result` (time, bytes moved, GB/s, % of the copy bandwidth measured in the same
run) and writes ``bench/results/<name>.csv`` and ``.json`` with :func:`write_results`,
together with the machine, the versions, the git commit and the active backend.

Conventions (STYLE.md, Benchmarks):

* ``torch.set_num_threads(2)`` (this project's reference machine has 2 cores);
* warm-up calls, then the median of N samples (p20/p80 kept alongside);
* memory-bound ops run cold-cache by default: before every timed call a buffer larger
  than the last-level cache is *read* (a read leaves clean lines, so the op does not pay
  for someone else's write-back), like ``triton.testing.do_bench`` flushing L2;
* GB/s counts the bytes an ideal kernel must move (each input read once, each output
  written once); ``copy GB/s`` is ``dst.copy_(src)`` on buffers much larger than the
  cache, counted as ``2 * bytes / time``.

Example::

    python bench/bench_modulated_rel_l1.py            # writes bench/results/modulated_rel_l1.{csv,json}
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
NUM_THREADS = 2

# Token grids of the published models the ops serve: (B, N, D), B = 2 (one CFG pair).
SHAPES: dict[str, tuple[int, int, int]] = {
    "dit-xl2-256": (2, 256, 1152),  # DiT-XL/2, 256px: 32x32 latent, patch 2
    "pixart-1024": (2, 4096, 1152),  # PixArt-alpha, 1024px: 128x128 latent, patch 2
    "flux-1024": (2, 4096, 3072),  # FLUX.1, 1024px: image tokens only
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(REPO_ROOT))


def setup_torch(threads: int = NUM_THREADS) -> None:
    """Fix the thread count and the seed so runs compare."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Config:
    """One measured case: ``op`` run by ``provider`` on ``shape`` in ``dtype``.

    ``variant`` distinguishes modes of one op (e.g. ``"trend"`` for the EOC gated
    residual); ``shape_name`` is a key of :data:`SHAPES` or a free label.
    """

    bench: str
    op: str
    provider: str
    shape_name: str
    shape: tuple[int, ...]
    dtype: str
    variant: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype not in ("-", "fp64", "fp16"):
            raise ValueError(f"Config.dtype={self.dtype!r}: use one of {sorted(DTYPES)} or '-'")
        if not self.provider:
            raise ValueError("Config.provider must be a non-empty name (e.g. 'fastcache_cpp')")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def case(self) -> str:
        """Provider-independent key: results with equal ``case`` are compared side by side."""
        parts = [self.op, self.variant, self.shape_name, self.dtype]
        return "/".join(p for p in parts if p)

    def id(self) -> str:
        return f"{self.case}/{self.provider}"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times in microseconds over ``reps`` samples of ``inner`` calls each."""

    median_us: float
    p20_us: float
    p80_us: float
    min_us: float
    reps: int
    inner: int


@dataclasses.dataclass(frozen=True)
class Result:
    """A :class:`Config` with its timing and derived throughput.

    ``bytes_moved`` is the ideal traffic of one call; ``gbps = bytes_moved / time``;
    ``pct_copy`` compares that with the copy bandwidth measured in the same run.
    ``note`` says why a case was skipped or anything unusual about it.
    """

    config: Config
    timing: Timing | None
    bytes_moved: int | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    note: str = ""
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def skipped(self) -> bool:
        return self.timing is None

    @property
    def us(self) -> float | None:
        return None if self.timing is None else self.timing.median_us

    def row(self) -> dict[str, Any]:
        c, t = self.config, self.timing
        row: dict[str, Any] = {
            "bench": c.bench,
            "op": c.op,
            "variant": c.variant,
            "shape_name": c.shape_name,
            "shape": "x".join(str(s) for s in c.shape),
            "dtype": c.dtype,
            "provider": c.provider,
            "median_us": _round(t.median_us) if t else None,
            "p20_us": _round(t.p20_us) if t else None,
            "p80_us": _round(t.p80_us) if t else None,
            "min_us": _round(t.min_us) if t else None,
            "reps": t.reps if t else 0,
            "inner": t.inner if t else 0,
            "bytes_moved": self.bytes_moved,
            "gbps": _round(self.gbps),
            "pct_copy": _round(self.pct_copy),
        }
        row.update({k: _round(v) if isinstance(v, float) else v for k, v in self.extra})
        row["note"] = self.note
        return row


def make_result(
    config: Config,
    timing: Timing | None,
    bytes_moved: int | None = None,
    copy_gbps: float | None = None,
    note: str = "",
    **extra: Any,
) -> Result:
    gbps = pct = None
    if timing is not None and bytes_moved:
        gbps = bytes_moved / (timing.median_us * 1e-6) / 1e9
        if copy_gbps:
            pct = 100.0 * gbps / copy_gbps
    return Result(config, timing, bytes_moved, gbps, pct, note, tuple(extra.items()))


def _round(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.{digits}g}") if abs(v) < 1e4 else round(v, 1)
    return v


# ----------------------------------------------------------------------------- timing
class CacheFlusher:
    """Evicts the data caches by reading a buffer larger than the last-level cache.

    The buffer is twice the LLC size reported by sysfs (clamped to [64 MiB, 1 GiB]).
    Reading, not writing: the evicted lines are clean, so the measured op does not pay
    for writing back the flusher's data.
    """

    def __init__(self, nbytes: int | None = None):
        if nbytes is None:
            nbytes = min(max(2 * llc_bytes(), 64 << 20), 1 << 30)
        self.nbytes = nbytes
        self._buf = torch.ones(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buf.sum()


_SHARED_FLUSHER: list[CacheFlusher] = []


def flush_caches() -> None:
    """Evict the data caches with one lazily-made, shared :class:`CacheFlusher`
    (a ``setup=`` hook for pytest-benchmark's pedantic mode)."""
    if not _SHARED_FLUSHER:
        _SHARED_FLUSHER.append(CacheFlusher())
    _SHARED_FLUSHER[0]()


def llc_bytes() -> int:
    """Size of the largest data/unified cache of cpu0 (sysfs), 32 MiB if unknown."""
    best = 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in root.glob("index*"):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or (32 << 20)


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    reps: int = 15,
    min_reps: int = 5,
    max_seconds: float = 4.0,
    min_sample_us: float = 1000.0,
    flush: Callable[[], None] | None = None,
) -> Timing:
    """Median per-call time of ``fn()`` in microseconds.

    ``warmup`` untimed calls, then up to ``reps`` samples (at least ``min_reps``, fewer
    than ``reps`` once ``max_seconds`` of timed work has passed). Without ``flush`` a
    sample loops ``inner`` calls so that it lasts at least ``min_sample_us`` (tiny ops:
    timer resolution and loop overhead amortised); with ``flush`` every sample is one
    call preceded by an untimed ``flush()`` (cold cache).
    """
    for _ in range(warmup):
        fn()
    inner = 1
    if flush is None:
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, math.ceil(min_sample_us * 1e-6 / once))
    samples: list[float] = []
    spent = 0.0
    while len(samples) < reps and (len(samples) < min_reps or spent < max_seconds):
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt / inner * 1e6)
    return _timing(samples, inner)


def _timing(samples: list[float], inner: int = 1) -> Timing:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return Timing(statistics.median(samples), q[0], q[3], samples[0], len(samples), inner)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    reps: int = 21,
    min_reps: int = 5,
    max_seconds: float = 10.0,
    flush: Callable[[], None] | None = None,
    min_sample_us: float = 0.0,
) -> tuple[dict[str, Timing], dict[str, list[float]]]:
    """Time several callables round-robin (one sample each per round, the order rotated
    every round), so that drift of the machine (frequency, other load) hits all of them
    alike. Returns per-name :class:`Timing` and the raw per-round samples in us, for
    paired comparisons (``median(a[i] / b[i])``).

    ``flush``: called (untimed) before every sample, which is then one call (cold cache,
    as in :func:`measure`). Without it a sample of a tiny op loops the call until it lasts
    ``min_sample_us`` (the loop count is chosen per callable after the warm-up)."""
    names = list(fns)
    inner = dict.fromkeys(names, 1)
    for name in names:
        for _ in range(warmup):
            fns[name]()
        if flush is None and min_sample_us > 0:
            t0 = time.perf_counter()
            fns[name]()
            once = max(time.perf_counter() - t0, 1e-7)
            inner[name] = max(1, math.ceil(min_sample_us * 1e-6 / once))
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    rnd = 0
    while rnd < reps and (rnd < min_reps or spent < max_seconds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            if flush is not None:
                flush()
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            spent += dt
            samples[name].append(dt / n * 1e6)
        rnd += 1
    return {n: _timing(v, inner[n]) for n, v in samples.items()}, samples


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios ``a[i] / b[i]`` (see :func:`measure_interleaved`)."""
    return statistics.median(x / y for x, y in zip(a, b))


def copy_bandwidth(nbytes: int = 1 << 30, flush: Callable[[], None] | None = None, reps: int = 7) -> float:
    """``dst.copy_(src)`` bandwidth in GB/s, counted as ``2 * nbytes / time``.

    The default 1 GiB buffers are several times the last-level cache, so this is the
    DRAM copy bandwidth the memory-bound ops are compared with. With a small ``nbytes``
    and ``flush`` it is the cold-cache copy of an op-sized buffer.
    """
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.zeros(n, dtype=torch.float32)
    t = measure(lambda: dst.copy_(src), warmup=2, reps=reps, min_reps=3, max_seconds=3.0, flush=flush)
    return 2 * n * 4 / (t.median_us * 1e-6) / 1e9


# ----------------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sched_policy() -> str:
    """The scheduling policy of this process (SCHED_FIFO when run under ``chrt -f``)."""
    try:
        pol = os.sched_getscheduler(0)
    except (AttributeError, OSError):
        return "unknown"
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE")}
    name = names.get(pol, str(pol))
    if pol in (getattr(os, "SCHED_FIFO", -1), getattr(os, "SCHED_RR", -1)):
        name += f" priority {os.sched_getparam(0).sched_priority}"
    return name


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def environment() -> dict[str, Any]:
    """Machine, versions, git commit and backends: the header of every result file.

    Uses :func:`fastcache.info.collect` when it exists and adds what a benchmark needs
    on top (load average, cache size, dirty tree, thread count).
    """
    import fastcache  # noqa: F401  (registers the ops and loads the C++ kernels)
    from fastcache import ops

    try:
        from fastcache import info as fc_info

        info = fc_info.collect()
    except ImportError:
        info = {
            "fastcache": getattr(sys.modules.get("fastcache"), "__version__", None),
            "torch": torch.__version__,
            "triton": _dist_version("triton"),
            "backend": ops.BACKEND.as_dict(),
        }
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info.update(
        {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit_full": _git("rev-parse", "HEAD"),
            "tree_dirty": bool(dirty),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "llc_bytes": llc_bytes(),
            "mem_total_gib": _mem_total_gib(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "sched_policy": _sched_policy(),
            "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "argv": sys.argv,
        }
    )
    if "triton" not in info:
        info["triton"] = _dist_version("triton")
    return info


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpp_active() -> bool:
    from fastcache import ops

    return ops.BACKEND.cpu == "cpp"


def cpp_skip_note() -> str:
    from fastcache import ops

    b = ops.BACKEND.as_dict()
    why = b["cpp_error"] or f"FASTCACHE_BACKEND={b['requested']}"
    return f"skipped: CPU backend is {b['cpu']!r}, not 'cpp' ({why})"


# ----------------------------------------------------------------------------- output
def write_results(
    name: str, results: Sequence[Result], env: dict[str, Any], summary: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``bench/results/<name>.csv`` (one row per result) and ``<name>.json``
    (environment, summary and the same rows)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    env = dict(env)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    csv_path = RESULTS_DIR / f"{name}.csv"
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    json_path = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "environment": env, "summary": summary or {}, "results": rows}
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return csv_path, json_path


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width text table. ``columns``: (key, header) pairs; floats get 4 digits."""
    rows = list(rows)

    def cell(v: Any) -> str:
        if v is None or v == "":
            return "-"
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    out = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(cr, widths)) for cr in cells]
    return "\n".join(out)


def describe_env(env: dict[str, Any], copy_gbps: float | None = None) -> str:
    b = env.get("backend", {})
    cpp = env.get("backends", {}).get("cpp", {})
    s = (
        f"{env.get('date')}  {env.get('cpu')} ({env.get('cpu_count')} cpus, {env.get('torch_num_threads')} threads)  "
        f"torch {env.get('torch')}  triton {env.get('triton')}  commit {env.get('commit') or env.get('commit_full')}"
        f"{' (dirty)' if env.get('tree_dirty') else ''}\n"
        f"backend: CPU={b.get('cpu')} (cpp variant {cpp.get('cpu_capability')})  load avg at start "
        f"{env.get('loadavg_start')}  scheduler {env.get('sched_policy')}"
    )
    if copy_gbps is not None:
        s += f"\nmeasured copy bandwidth (dst.copy_(src), 2 x 1 GiB, 2*bytes/time): {copy_gbps:.2f} GB/s"
    return s


def warn_if_busy(threshold: float = 1.0) -> str | None:
    """A warning string when the 1-minute load average says other work shares the CPUs."""
    load = os.getloadavg()[0]
    if load > threshold:
        msg = (
            f"WARNING: load average {load:.2f} > {threshold}: other processes share the {os.cpu_count()} CPUs; "
            "timings will be noisy and slow (`chrt -f 1 python ...` preempts them for the run)."
        )
        print(msg, file=sys.stderr)
        return msg
    return None


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every bench script accepts (``./dev bench`` passes the same to all)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and the smallest shape only")
    p.add_argument("--hot", action="store_true", help="do not flush the caches between timed calls")
    p.add_argument("--reps", type=int, default=None, help="timed samples per case (default per bench)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--no-write", action="store_true", help="print only, do not write bench/results/")
    return p


def group_by_case(results: list[Result]) -> dict[str, dict[str, Result]]:
    """Results keyed by case, then by provider (for side-by-side summary rows)."""
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.config.case, {})[r.config.provider] = r
    return by_case


def report(name: str, results: list[Result], env: dict, summary_text: str, extra: dict, write: bool) -> None:
    """Print the summary table and, unless ``write`` is False, write the result files."""
    print()
    print(summary_text)
    if write:
        paths = write_results(name, results, env, extra)
        print("\nwrote " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in paths))
