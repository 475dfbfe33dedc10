"""One GPU check of fastcache: build, GPU tests, kernel parity, CUDA-graph replays, per-step costs.

Run on a CUDA machine from a checkout (nothing is installed and nothing is downloaded; torch,
triton, diffusers and pytest must already be importable)::

    python bench/gpu_check.py --out /tmp/gpu_check.json          # the whole check, <= --budget-s
    python bench/gpu_check.py --cpu                               # the dry run on CPU (no GPU needed)
    python bench/gpu_check.py --sections triton_parity,pytest_gpu # a subset

Sections, in order (docs/gpu_check.md describes each and the JSON):

``environment``             versions, device, missing packages, how Triton runs
``build``                   builds the C++ extension in place if missing or older than csrc/,
                            imports fastcache, checks which backend serves CPU and CUDA
``cpp_parity``              the C++ CPU kernels (fastcache._C) vs the eager reference
``triton_parity``           the Triton kernels vs the reference, fp32/bf16/fp16 on
                            tests/ops/cases.py's shapes (compiled on CUDA; the interpreter
                            on tiny shapes with --cpu), and the decision ops bit for bit
``cuda_graph_step``         CUDAGraphStep captured and replayed (CPU: the capture stand-in)
``static_schedule_graphs``  an announced ScheduleConfig under torch.compile(mode="reduce-overhead"), then
                            StaticScheduleGraphs (one CUDA graph per step kind) on DiT-XL/2 fp32
                            (CPU: dynamo + aot graphs, and which inputs each graph mutates)
``step_costs``              eager per-step costs on DiT-XL/2 and FLUX-sized random-weight models
                            (CPU: tiny models)
``graph_step_costs``        per-replay costs of CUDAGraphStep on DiT-XL/2 (GPU only)
``pytest_gpu``              ``pytest -m gpu`` on the test files that have GPU tests, with
                            compiled kernels (TRITON_INTERPRET=0) (GPU only)

Every section runs in its own try/except; the JSON is rewritten atomically after each one, so
a run cut short still leaves the sections it finished. ``--budget-s`` bounds the whole run:
a section that would start past it is skipped with the reason, and one that overruns it is
interrupted (SIGALRM) and reported as an error. Exit status: 0 when no section failed or
errored, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TESTS = REPO / "tests"
SCHEMA = "fastcache-gpu-check/1"
SECTIONS = (
    "environment",
    "build",
    "cpp_parity",
    "triton_parity",
    "cuda_graph_step",
    "static_schedule_graphs",
    "step_costs",
    "graph_step_costs",
    "pytest_gpu",
)
GPU_ONLY = ("graph_step_costs", "pytest_gpu")
# the most seconds a section may take (its share of --budget-s); loops stop early and
# report "partial" when their share runs out
CAPS = {
    "environment": 30,
    "build": 180,
    "cpp_parity": 60,
    "triton_parity": 150,
    "cuda_graph_step": 120,
    "static_schedule_graphs": 120,
    "step_costs": 120,
    "graph_step_costs": 90,
    "pytest_gpu": 300,
}
REQUIRED = ("torch", "triton", "diffusers", "numpy", "pytest")
OPTIONAL = ("transformers", "ninja", "accelerate")
GRACE_S = 20  # past a section's share, SIGALRM interrupts it
PYTEST_REPORT_ENV = "FASTCACHE_GPU_CHECK_PYTEST_REPORT"

# DiT-XL/2 at 256px (diffusers' DiTTransformer2DModel): 28 blocks of 16 x 72 = 1152, 32x32x4
# latent, patch 2 -> 256 tokens; FLUX.1 at 1024px: 24 x 128 = 3072 wide, 4096 image tokens,
# 512 text tokens (T5 4096 channels), 19 dual-stream + 38 single-stream blocks at full depth.
DIT_XL2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TOKENS = (4096, 512)  # image, text
# token grids (B, N, D) of video models, next to bench/common.py's image ones: HunyuanVideo
# 720x1280, 129 frames (33 x 45 x 80 tokens, 3072 wide); Wan 2.1 14B 720x1280, 81 frames
# (21 x 45 x 80, 5120 wide), CFG as a batch of 2
VIDEO_GRIDS = {"hunyuanvideo-720p-129f": (1, 33 * 45 * 80, 3072), "wan2.1-14b-720p-81f": (2, 21 * 45 * 80, 5120)}
CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)  # gridDim.x, .y, .z
SKIP_ALL = 1e9  # a TeaCache threshold no accumulated distance reaches: every step after the first skips


# ============================================================================ plumbing
class SectionTimeout(Exception):
    """Raised by SIGALRM when a section overruns its share of the budget."""


class Check:
    """Records named checks of one section; a failing check does not stop the section."""

    def __init__(self, sec: dict, ctx: Context):
        self.sec, self.ctx = sec, ctx

    def __call__(self, name: str, ok: bool, detail=None) -> bool:
        entry = {"name": name, "status": "pass" if ok else "fail"}
        if detail is not None:
            entry["detail"] = detail
        self.sec["checks"].append(entry)
        return ok

    def run(self, name: str, fn, *args, **kwargs):
        """Run ``fn``; an AssertionError is a failed check, any other exception an error
        check (with its message). Returns fn's result, or None."""
        t0 = time.perf_counter()
        entry = {"name": name}
        try:
            out = fn(*args, **kwargs)
            entry["status"] = "pass"
        except AssertionError as e:
            out = None
            entry.update(status="fail", detail=_short(str(e) or "assertion failed"))
        except SectionTimeout:
            raise
        except Exception as e:
            out = None
            entry.update(status="error", detail=_short(f"{type(e).__name__}: {e}"), where=_where(e))
        entry["ms"] = round(1e3 * (time.perf_counter() - t0), 2)
        self.sec["checks"].append(entry)
        return out

    def partial(self, why: str) -> None:
        self.sec["partial"] = why


def _short(s: str, n: int = 1500) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2 :]


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb[-4:]))


def _clean(obj):
    """JSON-safe: non-finite floats as strings, tuples as lists, unknown objects as str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(data), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Context:
    """What every section needs: the mode, the device, the deadlines, the lazy imports."""

    def __init__(self, args, mode: str, interpret_note: str | None):
        self.args = args
        self.mode = mode  # "cuda" | "cpu"
        self.device = "cuda" if mode == "cuda" else "cpu"
        self.interpret_note = interpret_note
        self.t_start = time.monotonic()
        self.deadline = self.t_start + args.budget_s
        self.section_deadline = self.deadline
        self._fastcache = None

    @property
    def cuda(self) -> bool:
        return self.mode == "cuda"

    def remaining(self) -> float:
        return min(self.deadline, self.section_deadline) - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        return self.remaining() <= reserve

    def fastcache(self):
        """Import fastcache from this checkout (its kernels/ as fastcache.kernels), once."""
        if self._fastcache is None:
            ensure_kernels_package()
            import fastcache
            from fastcache._shadow import prefer_installed_kernels

            prefer_installed_kernels()  # diffusers -> transformers imports HF's `kernels`
            for p in (str(TESTS), str(TESTS / "ops")):
                if p not in sys.path:
                    sys.path.append(p)
            self._fastcache = fastcache
        return self._fastcache

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """``fastcache.kernels`` -> this checkout's ``kernels/`` (setup.py's package_dir does the
    same for an install; a bare checkout, or an editable install of another checkout,
    would otherwise give no or someone else's kernels)."""

    def find_spec(self, name, path=None, target=None):
        if name != "fastcache.kernels":
            return None
        init = REPO / "kernels" / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def ensure_kernels_package() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsFinder())


@contextlib.contextmanager
def _alarm(seconds: float):
    """SIGALRM after ``seconds`` raises SectionTimeout in the main thread (no-op elsewhere)."""
    usable = hasattr(signal, "SIGALRM") and threading_is_main()
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"interrupted after its share of the budget ({seconds:.0f} s incl. {GRACE_S} s grace)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ============================================================================ timing
class Timer:
    """Per-call times in ms: CUDA events on the current stream (CUDA), perf_counter (CPU).

    The events do not synchronize: callers synchronize before (``ctx.sync()``, so a call is
    timed from an idle GPU: host launch overhead included) and :meth:`collect` after, both
    outside any :func:`count_syncs` region."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list = []

    def time(self, fn):
        if self.cuda:
            import torch

            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            self.pending.append((a, b))
            return out, None
        t0 = time.perf_counter()
        out = fn()
        return out, 1e3 * (time.perf_counter() - t0)

    def collect(self) -> list[float]:
        import torch

        torch.cuda.synchronize()
        out = [a.elapsed_time(b) for a, b in self.pending]
        self.pending = []
        return out


def _stats(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    s = sorted(ms)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"n": len(s), "median_ms": statistics.median(s), "p20_ms": q(0.2), "p80_ms": q(0.8), "min_ms": s[0]}


def time_round_robin(ctx: Context, fns: dict, rounds: int, warmup: int = 2, reserve: float = 5.0):
    """Each fn once per round, ``rounds`` rounds (fewer if the section's time runs out).
    Returns ({name: stats}, {name: median of per-round ratios to the first fn}, rounds run)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ctx.sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    done = 0
    for _ in range(rounds):
        if ctx.out_of_time(reserve):
            break
        timers = {k: Timer(ctx.cuda) for k in fns}
        for k, fn in fns.items():
            ctx.sync()
            _, ms = timers[k].time(fn)
            if ms is not None:
                samples[k].append(ms)
        if ctx.cuda:
            for k, t in timers.items():
                samples[k] += t.collect()
        done += 1
    base = next(iter(fns))
    ratios = {
        k: statistics.median(a / b for a, b in zip(v, samples[base])) if v and samples[base] else None
        for k, v in samples.items()
    }
    return {k: _stats(v) for k, v in samples.items()}, ratios, done


@contextlib.contextmanager
def count_syncs(cuda: bool):
    """Counts CUDA synchronizations (torch.cuda.set_sync_debug_mode("warn")); the yielded
    list gets one entry per warning. On CPU it stays empty (host reads are counted with
    tests/support/hostreads.py there)."""
    seen: list[str] = []
    if not cuda:
        yield seen
        return
    import torch

    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(old)
    seen += [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]


# ============================================================================ sections
def sec_environment(ctx: Context, sec: dict, check: Check) -> None:
    import torch

    res = sec["results"]
    versions, missing = {}, []
    for name in REQUIRED + OPTIONAL:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
            if name in REQUIRED:
                missing.append(name)
    res.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        versions=versions,
        missing=missing,
        missing_optional=[n for n in OPTIONAL if versions[n] is None],
        cxx_compiler=shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"),
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"),
        triton_mode="interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled",
        note=ctx.interpret_note,
        git_commit=_git("rev-parse", "HEAD"),
        git_changes=_git("status", "--porcelain", "--untracked-files=no"),
    )
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "conditional_nodes": hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"),
        }
    check("required packages importable", not missing, {"missing": missing} if missing else None)
    if ctx.cuda:
        check("CUDA device", torch.cuda.is_available(), res.get("device"))
    try:
        import triton
    except Exception as e:
        check("triton imports", False, f"{type(e).__name__}: {e}")
        return
    interp = bool(triton.knobs.runtime.interpret)
    want = "the interpreter (dry run)" if not ctx.cuda else "compiled kernels"
    check(f"Triton runs {want}", interp == (not ctx.cuda), {"TRITON_INTERPRET": res["TRITON_INTERPRET"]})


def _run_group(cmd, timeout: float, **kw) -> tuple:
    """``(returncode or "timeout", output)``; on timeout the whole process group is killed
    (ninja's compilers, inductor's compile workers), not just the child."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException:  # the timeout, or SIGALRM's SectionTimeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        if isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            return "timeout", f"timed out after {timeout:.0f} s\n{out}"
        raise


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _extension_files() -> list[Path]:
    return sorted(p for p in (REPO / "fastcache").glob("_C*") if p.suffix in (".so", ".pyd"))


def _build_reason(policy: str) -> str | None:
    """Why the extension must be built now (None: it need not)."""
    if policy == "never":
        return None
    if policy == "always":
        return "--build always"
    exts = _extension_files()
    if not exts:
        return "fastcache/_C*.so is missing"
    sources = [REPO / "setup.py", *sorted((REPO / "csrc").glob("*"))]
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime > min(p.stat().st_mtime for p in exts):
        return f"{newest.relative_to(REPO)} is newer than {exts[0].name}"
    # built elsewhere (another torch, another Python): it must load here
    code = "import sys; sys.path.insert(0, sys.argv[1]); import fastcache.ops"
    env = dict(os.environ, FASTCACHE_BACKEND="cpp")  # a missing or broken extension raises
    rc, out = _run_group([sys.executable, "-c", code, str(REPO)], 120, env=env)
    if rc != 0:
        last = out.strip().splitlines()[-1] if out.strip() else f"exit status {rc}"
        return f"{exts[0].name} does not load here: {_short(last, 400)}"
    return None


def sec_build(ctx: Context, sec: dict, check: Check) -> None:
    res = sec["results"]
    reason = _build_reason(ctx.args.build)
    res["build_reason"] = reason
    if "fastcache" in sys.modules and reason:
        raise RuntimeError(
            "fastcache was imported before the build section; run the build first (--sections build,...)"
        )
    if reason:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        t0 = time.perf_counter()
        rc, out = _run_group(cmd, max(ctx.remaining() - 5, 5), cwd=REPO, env=env)
        res["build"] = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        res["build"]["output_tail"] = _short(out, 3000)
        check("C++ extension builds (setup.py build_ext --inplace)", rc == 0, f"rc={rc}")
    fastcache = ctx.fastcache()
    from fastcache.ops import BACKEND

    backend = BACKEND.as_dict()
    res["backend"] = backend
    res["fastcache"] = str(Path(fastcache.__file__).parent)
    check("fastcache comes from this checkout", Path(fastcache.__file__).parent == REPO / "fastcache", res["fastcache"])
    kernels = check.run("fastcache.kernels imports (triton)", importlib.import_module, "fastcache.kernels")
    if kernels is not None:
        res["fastcache_kernels"] = str(Path(kernels.__file__).parent)
        check("fastcache.kernels is this checkout's kernels/", Path(kernels.__file__).parent == REPO / "kernels")
    check("CPU ops run the C++ kernels", backend["cpu"] == "cpp", backend.get("cpp_error"))
    if ctx.cuda:
        check("CUDA ops run the Triton kernels", backend["cuda"] == "triton", backend.get("triton_error"))


# ------------------------------------------------------------------ op parity (C++, Triton)
def _tt():
    """tests/ops/test_triton.py: its parity helpers and decision sequences (reused, not copied)."""
    return importlib.import_module("test_triton")


def _parity_cases(shape, dtype, gen, trend_modes=("none", "per_token", "per_channel")):
    """(label, op, args, up, outputs) for every op on CPU tensors. ``up``: indices of the
    data arguments the oracle upcasts; ``outputs``: (key, kind) with key "ret" or an
    argument index; kind "sums" (fp32 results), "value" (dtype results), "stepwise" (dtype
    results rounded after every slot) or "bitwise" (equal to the reference run in the same
    dtype)."""
    import torch

    B, N, D = shape

    def r(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=gen) * scale + offset).to(dtype)

    x, prev = r(B, N, D, scale=2.0, offset=0.5), r(B, N, D)
    shift, scale = r(B, D, scale=0.5), r(B, D, scale=0.2)
    xt = r(B, D, N, scale=2.0, offset=0.5).transpose(1, 2)  # a strided view, read in place
    cached, gate, other = r(B, N, D), r(B, D), r(B, N, D)
    out = [
        ("modulated_rel_l1_sums", "modulated_rel_l1_sums", [x, shift, scale, 1e-6, prev], (0, 1, 2, 4),
         [("ret", "sums"), (4, "value")]),
        ("modulated_rel_l1_sums[tview]", "modulated_rel_l1_sums", [xt, shift, scale, 1e-6, prev], (0, 1, 2, 4),
         [("ret", "sums"), (4, "value")]),
    ]  # fmt: skip
    for write in (True, False):
        out.append((f"rel_l1_sums[write_prev={write}]", "rel_l1_sums", [x, prev, write], (0, 1),
                    [("ret", "sums"), (1, "bitwise")]))  # fmt: skip
    for mode in trend_modes:
        trend = {"none": None, "per_token": r(N, D, scale=3.0), "per_channel": r(D, scale=3.0)}[mode]
        up = (0, 1, 2) if trend is None else (0, 1, 2, 3)
        out.append(
            (f"gated_residual[{mode}]", "gated_residual", [x, gate, cached, trend, 0.05], up, [("ret", "value")])
        )
    out += [
        ("gated_residual_out", "gated_residual_out", [x, gate, cached, None, 0.05, torch.empty_like(x)], (0, 1, 2, 5),
         [(5, "value")]),
        ("apply_residual", "apply_residual", [x, cached], (0, 1), [("ret", "value")]),
        ("apply_residual[tview]", "apply_residual", [xt, cached], (0, 1), [("ret", "value")]),
        ("apply_residual_out[in place]", "apply_residual_out", [x, cached, x], (0, 1, 2), [(0, "value")]),
        ("store_residual[flag=True]", "store_residual", [other, x, torch.tensor(True), cached], (0, 1, 3),
         [(3, "value")]),
        ("store_residual[flag=False]", "store_residual", [other, x, torch.tensor(False), cached], (0, 1, 3),
         [(3, "bitwise")]),
    ]  # fmt: skip
    dx = torch.tensor([2.0])
    for order in (0, 1, 2):
        hist, f = r(order + 1, B, N, D), r(B, N, D)
        out.append((f"taylor_forecast[order={order}]", "taylor_forecast", [hist, dx], (0,), [("ret", "value")]))
        valid = torch.tensor([float(order)])
        out.append((f"taylor_update[order={order}]", "taylor_update", [hist, f, dx, valid, torch.tensor(True)],
                    (0, 1), [(0, "value")]))  # fmt: skip
        w = torch.tensor([1.0, 1.5, -0.25][: order + 1])  # the fitted filler (docs/methods.md section 12)
        out.append((f"history_combine[order={order}]", "history_combine", [hist, w], (0,), [("ret", "value")]))
    # the multi-slot ops (lists of tensors): a Taylor slot, a gated and an ungated cached slot
    hists, fs = [r(2, B, N, D, scale=0.3), r(3, B, N, D, scale=0.3)], [r(B, N, D), r(B, N, D)]
    out.append(("forecast_residual", "forecast_residual",
                [x, [gate, r(B, 1, D), None], [hists[0], cached, other], dx], (0, 1, 2),
                [("ret", "stepwise")]))  # fmt: skip
    out.append(("taylor_update_slots", "taylor_update_slots", [hists, fs, dx, torch.tensor([1.0]), torch.tensor(True)],
                (0, 1), [(0, "value")]))  # fmt: skip
    return out


def _clone_args(args, device, convert=None, up=()):
    """Clones (aliasing kept: one tensor passed twice stays one tensor), moved to
    ``device``; ``convert`` applied to the arguments at the indices in ``up``."""
    import torch

    memo, res = {}, []
    for i, a in enumerate(args):
        if isinstance(a, list):  # a Tensor[] / Tensor?[] argument: its tensors, cloned alike
            res.append(_clone_args(a, device, convert, range(len(a)) if i in up else ()))
            continue
        if not isinstance(a, torch.Tensor):
            res.append(a)
            continue
        key = (id(a), convert is not None and i in up)
        if key not in memo:
            t = a.to(device=device, copy=True)
            memo[key] = convert(t) if key[1] else t
        res.append(memo[key])
    return res


def _check_parity(impl, name, args, up, outputs, dtype, device, cast, one_ulp):
    """Run the kernel on ``device``; compare with the fp64 oracle and the reference run in
    fp32 and cast to ``dtype`` by ``cast`` (round to nearest on compiled kernels and C++;
    the interpreter truncates to bf16): tests/ops' rules, cases.assert_within_lowp_bound for
    every backend, and (``one_ulp``, tests/ops/test_triton.py's rule for the Triton kernels)
    within one ulp of the reference in that dtype."""
    import cases
    import torch

    from fastcache.ops import reference as ref

    T = _tt()
    k_args = _clone_args(args, device)
    k_ret = impl[name](*k_args)
    e_args = _clone_args(args, "cpu", lambda t: t.double(), up)
    e_ret = getattr(ref, name)(*e_args)
    l_args = _clone_args(args, "cpu", lambda t: t.float(), up)
    l_ret = getattr(ref, name)(*l_args)
    s_args = _clone_args(args, "cpu")
    s_ret = getattr(ref, name)(*s_args)
    flat = []
    for key, kind in outputs:
        got = k_ret if key == "ret" else k_args[key]
        if isinstance(got, list):  # a list argument written in place: every tensor of it
            flat += [((key, j), kind) for j in range(len(got))]
        else:
            flat.append((key, kind))
    for key, kind in flat:

        def pick(ret, a, key=key):
            if key == "ret":
                return ret
            return a[key[0]][key[1]] if isinstance(key, tuple) else a[key]

        got = pick(k_ret, k_args).cpu()
        what = f"{name}[{'ret' if key == 'ret' else f'arg {key}'}]"
        if kind == "bitwise":
            want = pick(s_ret, s_args)
            assert got.dtype == want.dtype and torch.equal(got, want), f"{what}: differs from the reference"
            continue
        exact = pick(e_ret, e_args)
        if kind == "sums" or dtype == torch.float32:
            T._assert_fp32_close(got, exact, what)
        else:
            assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
            lowp = cast(pick(l_ret, l_args), dtype)
            cases.assert_within_lowp_bound(got, lowp, exact, dtype, what)
            if one_ulp and kind == "stepwise":
                # rounded to the dtype after every slot (forecast_residual): the one-ulp rule holds
                # against the reference run in the dtype, which rounds where the kernel does. The
                # interpreter truncates its bf16 casts, so there only the bound above applies
                if cast is _nearest or dtype != torch.bfloat16:
                    T._assert_within_one_ulp(got, pick(s_ret, s_args), dtype, what)
            elif one_ulp:
                T._assert_within_one_ulp(got, lowp, dtype, what)


def _decision_sequence(impl, device, variant: dict):
    """cache_decision step by step on ``device`` vs the reference on CPU: flag and state bit for bit."""
    import torch

    from fastcache.ops import reference as ref

    T = _tt()
    n = variant["n"]
    g = torch.Generator().manual_seed(variant.get("seed", 7))
    ratios = (torch.rand(n, generator=g) * variant["scale"]).tolist()
    sums, ts = T._sums_for(ratios), T._timesteps(n)
    cs = torch.tensor(variant["coeffs"], dtype=torch.float32)
    st_k, st_r = ref.new_state(64, device=device), ref.new_state(64)
    flags = []
    for i, (s, t) in enumerate(zip(sums, ts)):
        a = (variant["threshold"], variant["warmup"], variant["max_skips"], n, None, variant["accumulate"])
        f_k = impl["cache_decision"](s.to(device), t.to(device), cs.to(device), st_k, *a)
        f_r = ref.cache_decision(s, t, cs, st_r, *a)
        assert bool(f_k.cpu()) == bool(f_r), f"step {i}: flag {bool(f_k)} != reference {bool(f_r)}"
        diff = (T._bits(st_k.cpu()) != T._bits(st_r)).nonzero().flatten().tolist()
        assert not diff, f"step {i}: state differs at {diff[:8]}"
        flags.append(bool(f_r))
    assert any(flags) and not all(flags), f"the sequence must both compute and skip (flags {flags})"
    return flags


def _guard_sequence(impl, device):
    """timestep_guard + cache_decision(hold=) on a sequence with a repeat, a jitter and a new run."""
    import torch

    from fastcache.ops import reference as ref

    T = _tt()
    base = [999.0, 958.0, 958.0, 917.0, 917.0 * (1 + ref.TIMESTEP_RTOL / 4), 876.0, 835.0, 999.0, 958.0, 958.0]
    cs = torch.tensor(T.FLUX, dtype=torch.float32)
    sums = T._sums_for([0.0, 0.05, 0.05, 0.08, 0.01, 0.2, 0.03, 0.1, 0.02, 0.02])
    k = (ref.new_state(64, device=device), ref.new_state(64), ref.new_aux(device=device), ref.new_aux())
    st_k, st_r, aux_k, aux_r = k
    holds = []
    for i, (tv, s) in enumerate(zip(base, sums)):
        t = torch.tensor([tv], dtype=torch.float32)
        to_k, h_k = impl["timestep_guard"](t.to(device), st_k, aux_k, ref.TIMESTEP_RTOL, ref.TIMESTEP_ATOL, 6)
        to_r, h_r = ref.timestep_guard(t, st_r, aux_r, ref.TIMESTEP_RTOL, ref.TIMESTEP_ATOL, 6)
        assert torch.equal(T._bits(to_k.cpu()), T._bits(to_r)) and bool(h_k.cpu()) == bool(h_r), f"step {i}: guard"
        f_k = impl["cache_decision"](s.to(device), to_k, cs.to(device), st_k, 0.4, 1, 0, 6, h_k, True)
        f_r = ref.cache_decision(s, to_r, cs, st_r, 0.4, 1, 0, 6, h_r, True)
        assert bool(f_k.cpu()) == bool(f_r), f"step {i}: flag"
        assert torch.equal(T._bits(st_k.cpu()), T._bits(st_r)), f"step {i}: state differs"
        assert torch.equal(T._bits(aux_k.cpu()), T._bits(aux_r)), f"step {i}: aux differs"
        holds.append(bool(h_r))
    assert sum(holds) >= 2, f"the sequence must hold on its repeats (holds {holds})"


DECISION_VARIANTS = {
    "teacache": dict(n=28, scale=0.3, coeffs="FLUX", threshold=0.4, warmup=1, max_skips=0, accumulate=True),
    "max_skips": dict(n=12, scale=1e-4, coeffs="FLUX", threshold=100.0, warmup=3, max_skips=2, accumulate=True),
    "first_block": dict(n=20, scale=0.3, coeffs=(), threshold=0.15, warmup=1, max_skips=0, accumulate=False),
}


def _run_parity(ctx: Context, check: Check, impl: dict, device: str, shapes, dtypes, cast, one_ulp: bool) -> None:
    import torch

    for shape in shapes:
        for dtype in dtypes:
            seed = 1000 * sum(shape) + [torch.float32, torch.bfloat16, torch.float16, torch.float64].index(dtype)
            gen = torch.Generator().manual_seed(seed)
            for label, name, args, up, outputs in _parity_cases(shape, dtype, gen):
                if ctx.out_of_time():
                    check.partial(f"time ran out at {label} {shape} {dtype}")
                    return
                tag = f"{label}[{'x'.join(map(str, shape))},{str(dtype).removeprefix('torch.')}]"
                check.run(tag, _check_parity, impl, name, args, up, outputs, dtype, device, cast, one_ulp)
    T = _tt()
    for vname, v in DECISION_VARIANTS.items():
        v = dict(v, coeffs=T.FLUX if v["coeffs"] == "FLUX" else v["coeffs"])
        check.run(f"cache_decision[{vname}] bit for bit", _decision_sequence, impl, device, v)
    check.run("timestep_guard + cache_decision(hold) bit for bit", _guard_sequence, impl, device)


def _nearest(t, dtype):
    return t.to(dtype)


def _tiny(shapes):
    """The dry run's shapes: the smallest (1 element) and the largest the interpreter runs
    in well under a second per op (odd sizes, several samples and tokens)."""
    small = [s for s in shapes if s[0] * s[1] * s[2] <= 6000]
    return sorted({min(small, key=lambda s: s[0] * s[1] * s[2]), max(small, key=lambda s: s[0] * s[1] * s[2])})


def sec_cpp_parity(ctx: Context, sec: dict, check: Check) -> None:
    fastcache = ctx.fastcache()  # puts tests/ops (cases) on sys.path
    import cases

    backend = fastcache.ops.BACKEND.as_dict()
    if not check("fastcache._C loaded", backend["cpu"] == "cpp", backend.get("cpp_error")):
        return
    import torch

    from fastcache import _C

    # the list-taking ops have no pybind entry: the dispatcher runs their C++ kernel on CPU
    impl = {n: getattr(_C, n, None) or getattr(torch.ops.fastcache, n).default for n in fastcache.ops.SCHEMAS}
    # the dry run checks the script: tests/ops/test_cpp.py checks the kernels on every shape
    shapes = cases.SHAPES if ctx.cuda else _tiny(cases.SHAPES)
    sec["results"].update(shapes=shapes, dtypes=[str(d) for d in cases.DTYPES], cpu_capability=_C.cpu_capability())
    _run_parity(ctx, check, impl, "cpu", shapes, cases.DTYPES, _nearest, one_ulp=False)


def sec_triton_parity(ctx: Context, sec: dict, check: Check) -> None:
    ctx.fastcache()  # puts tests/ops (cases) on sys.path
    import cases
    import torch
    import triton
    from fastcache.kernels import LAUNCHERS

    interp = bool(triton.knobs.runtime.interpret)
    T = _tt()
    if ctx.cuda:
        check("kernels compiled, not interpreted", not interp, os.environ.get("TRITON_INTERPRET"))
        shapes, cast = cases.SHAPES, _nearest
        # the dispatcher serves CUDA tensors with these launchers (ops/_library.py)
        from fastcache.ops import SCHEMAS

        missing = [n for n in SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcache::{n}", "CUDA")]
        check("every op has a CUDA kernel in the dispatcher", not missing, missing)
    else:
        if not check("interpreter on (TRITON_INTERPRET=1 before triton was imported)", interp):
            return
        # the interpreter needs seconds per op on the larger shapes, and ~40 ms per launch
        # on any (it patches triton.language on every launch): one tiny shape
        shapes = _tiny(cases.SHAPES)[-1:]
        cast = lambda t, dtype: T._bf16_truncate(t) if dtype == torch.bfloat16 else t.to(dtype)  # noqa: E731
    sec["results"].update(
        triton=triton.__version__,
        mode="interpreter" if interp else "compiled",
        shapes=shapes,
        dtypes=[str(d) for d in cases.DTYPES],
    )
    _run_parity(ctx, check, LAUNCHERS, ctx.device, shapes, cases.DTYPES, cast, one_ulp=True)
    _launch_grids(ctx, sec, check)


def _model_grids() -> dict:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import common

    return {**common.SHAPES, **VIDEO_GRIDS}


def _planned_grids(shape) -> dict:
    """op -> the grid its launcher plans for a (B, N, D) bf16 stream (meta tensors: nothing
    is allocated), from the launchers' own plan functions (as tests/ops/test_ptx.py)."""
    import torch
    from fastcache.kernels import _partials, gated_residual, modulated_rel_l1, rel_l1, residual, taylor

    B, N, D = shape
    x = torch.empty(B, N, D, device="meta", dtype=torch.bfloat16)
    v = torch.empty(B, D, device="meta", dtype=torch.bfloat16)
    one, flag = torch.empty(1, device="meta"), torch.empty((), device="meta", dtype=torch.bool)
    hist = torch.empty(3, B, N, D, device="meta", dtype=torch.bfloat16)
    launch, partials = rel_l1.plan_rel_l1(x, x.clone(), True)
    return {
        "modulated_rel_l1_sums": modulated_rel_l1.plan_modulated_rel_l1(x, v, v, 1e-6, x.clone())[0].grid,
        "rel_l1_sums": launch.grid,
        "sum_partials": _partials.plan_finish_sums(partials)[0].grid,
        "gated_residual": gated_residual.plan_gated_residual(x, v, x, None, 0.0, torch.empty_like(x)).grid,
        "apply_residual": residual.plan_apply_residual(x, x, torch.empty_like(x)).grid,
        "store_residual": residual.plan_store_residual(x, x, flag, x.clone()).grid,
        "taylor_forecast": taylor.plan_taylor_forecast(hist, one, torch.empty_like(x)).grid,
        "taylor_update": taylor.plan_taylor_update(hist, x, one, one, flag).grid,
        "history_combine": taylor.plan_history_combine(hist, torch.empty(3, device="meta"), torch.empty_like(x)).grid,
    }


def _launch_grids(ctx: Context, sec: dict, check: Check) -> None:
    """Every launcher's grid at published models' token grids against CUDA's limits
    (gridDim.y and .z <= 65535; the interpreter has none, so only a GPU launch shows it).
    Over-limit grids are a warning everywhere; on CUDA the two indicator ops are then
    launched at that grid and compared with the reference on the GPU."""
    over = []
    for model, shape in _model_grids().items():
        for op, grid in _planned_grids(shape).items():
            if any(g > lim for g, lim in zip(grid, CUDA_GRID_MAX)):
                over.append({"op": op, "model": model, "shape": list(shape), "grid": list(grid)})
    sec["results"]["launch_grids_over_cuda_limits"] = over
    if over:
        sec["warnings"].append(
            "launch grids over CUDA's limits (gridDim.y/.z <= 65535; a launch fails with 'Triton Error [CUDA]: "
            "invalid argument'): " + "; ".join(f"{o['op']} at {o['model']} {tuple(o['grid'])}" for o in over)
        )
    if not ctx.cuda:
        return
    for o in over:
        if o["op"] in ("modulated_rel_l1_sums", "rel_l1_sums") and not ctx.out_of_time(20):
            what = f"{o['op']} launches at {o['model']} {tuple(o['shape'])} (grid {tuple(o['grid'])})"
            check.run(what, _launch_large, o["op"], tuple(o["shape"]))


def _launch_large(op: str, shape) -> None:
    """The Triton launcher on a (B, N, D) bf16 stream on the GPU vs the reference run there."""
    import torch
    from fastcache.kernels import LAUNCHERS

    from fastcache.ops import reference as ref

    B, N, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    prev = torch.randn(B, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    if op == "modulated_rel_l1_sums":
        shift = torch.randn(B, D, generator=g, device="cuda", dtype=torch.bfloat16)
        scale = torch.randn(B, D, generator=g, device="cuda", dtype=torch.bfloat16)
        want = ref.modulated_rel_l1_sums(x, shift, scale, 1e-6, prev.clone())
        got = LAUNCHERS[op](x, shift, scale, 1e-6, prev)
    else:
        want = ref.rel_l1_sums(x, prev.clone(), False)
        got = LAUNCHERS[op](x, prev, False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    del x, prev
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ CUDAGraphStep
class _CountingStandIn:
    """fastcache.cuda_graphs' CPU stand-in of the capture (both branches from inside the
    cond operator's dispatch, selected with torch.where), counting the conds it runs."""

    def __new__(cls):
        from fastcache.cuda_graphs import _BothBranchesMode
        from fastcache.tracing import _COND

        class Mode(_BothBranchesMode):
            def __init__(self):
                super().__init__()
                self.conds = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is _COND:
                    self.conds += 1
                return super().__torch_dispatch__(func, types, args, kwargs)

        return Mode()


def sec_cuda_graph_step(ctx: Context, sec: dict, check: Check) -> None:
    """The tiny reference DiT with TeaCache: an eager 10-step loop, then the same loop as
    CUDAGraphStep replays (CPU: every step under the capture stand-in)."""
    import torch

    fastcache = ctx.fastcache()
    from support.zoo import CASES

    from fastcache.cuda_graphs import CUDAGraphStep, conditional_nodes_available, uncompile_stack
    from fastcache.policies.base import force_cond

    dev, steps = ctx.device, 10
    case = CASES["fastcache-dit"]()
    m = case.model.to(dev)
    sch = case.scheduler()
    sch.set_timesteps(steps)
    labels = torch.arange(case.batch, device=dev) % 10
    x0 = case.latents(torch.Generator().manual_seed(1)).to(dev)
    ts = [t.expand(case.batch).to(dev) for t in sch.timesteps]
    res = sec["results"]
    if ctx.cuda:
        ok, why = conditional_nodes_available()
        if not check("conditional nodes available", ok, why):
            return
    cfg = fastcache.TeaCacheConfig(threshold=0.3, num_steps=steps)
    timeline = lambda: fastcache.stats(m)["contexts"]["default"]["timeline"]  # noqa: E731
    with torch.no_grad(), fastcache.patched(m, cfg):
        x, eager_ms = x0.clone(), []
        for t, tt in zip(sch.timesteps, ts):
            timer = Timer(ctx.cuda)
            ctx.sync()
            out, ms = timer.time(lambda x=x, tt=tt: m(x, tt, labels))
            eager_ms += timer.collect() if ctx.cuda else [ms]
            x = sch.step(out, t, x).prev_sample
        eager, tl = x, timeline()
        res["eager_step"] = _stats(eager_ms)
        res["timeline"] = tl
        check("the eager loop both computes and skips", 0 < sum(tl) < steps, tl)
        variants = (False, True) if ctx.cuda else (False,)
        for compile_stack in variants:
            tag = f"compile_stack={compile_stack}"
            if ctx.out_of_time(30):
                check.partial(f"time ran out before {tag}")
                break
            fastcache.reset(m)
            x, ms_all, syncs, reads, conds = x0.clone(), [], [], [], []
            try:
                if ctx.cuda:
                    t0 = time.perf_counter()
                    step = check.run(
                        f"capture [{tag}]",
                        CUDAGraphStep,
                        lambda a, t: m(a, t, labels),
                        x0,
                        ts[0],
                        model=m,
                        compile_stack=compile_stack,
                    )
                    if step is None:
                        continue
                    res[f"capture_s[{tag}]"] = round(time.perf_counter() - t0, 2)
                    for t, tt in zip(sch.timesteps, ts):
                        timer = Timer(True)
                        ctx.sync()
                        with count_syncs(True) as s:
                            out, _ = timer.time(lambda step=step, x=x, tt=tt: step(x, tt).clone())
                        syncs += s
                        ms_all += timer.collect()
                        x = sch.step(out, t, x).prev_sample
                else:
                    from support.hostreads import HostReadMode, python_level_reads

                    for t, tt in zip(sch.timesteps, ts):
                        reader, standin = HostReadMode(), _CountingStandIn()
                        t0 = time.perf_counter()
                        with python_level_reads() as py, reader, force_cond(), standin:
                            out = m(x, tt, labels)
                        ms_all.append(1e3 * (time.perf_counter() - t0))
                        reads += reader.reads + py
                        conds.append(standin.conds)
                        x = sch.step(out, t, x).prev_sample
            finally:
                if compile_stack:
                    uncompile_stack(m)
            kind = "replay" if ctx.cuda else "stand-in step"
            res[f"{kind}[{tag}]"] = _stats(ms_all)
            check(f"timeline equals eager [{tag}]", timeline() == tl, {"graph": timeline(), "eager": tl})
            tol = 1e-3 if compile_stack else (1e-4 if ctx.cuda else 1e-5)
            check.run(
                f"latents equal eager within {tol} [{tag}]", torch.testing.assert_close, x, eager, rtol=tol, atol=tol
            )
            if ctx.cuda:
                check(f"0 syncs in {steps} replays [{tag}]", not syncs, syncs[:5])
                if res["eager_step"].get("n") and ms_all:
                    res[f"replay_vs_eager[{tag}]"] = statistics.median(ms_all) / res["eager_step"]["median_ms"]
            else:
                check(f"0 host reads in {steps} stand-in steps [{tag}]", not reads, reads[:5])
                check(f"one cond per step [{tag}]", conds == [1] * steps, conds)


# ------------------------------------------------------------------ static-schedule graphs
@contextlib.contextmanager
def _cudagraph_tree_log():
    """Counts what inductor's CUDA-graph trees do (records, replays, eager runs) and
    collects every "skipping cudagraphs" reason."""
    import torch._inductor.cudagraph_trees as trees
    import torch._inductor.cudagraph_utils as utils

    log = {"record": 0, "replay": 0, "eager": 0, "skips": []}
    mgr = trees.CUDAGraphTreeManager
    saved = {n: getattr(mgr, n) for n in ("record_function", "execute_node", "run_eager")}
    names = {"record_function": "record", "execute_node": "replay", "run_eager": "eager"}

    def counting(attr):
        orig = saved[attr]

        def wrapped(self, *a, **k):
            log[names[attr]] += 1
            return orig(self, *a, **k)

        return wrapped

    mods = [utils, trees]
    for modname in ("torch._inductor.output_code", "torch._dynamo.backends.cudagraphs"):
        with contextlib.suppress(ImportError):
            mods.append(importlib.import_module(modname))
    orig_skip = utils.log_cudagraph_skip_and_bump_counter

    def skip(msg, *a, **k):
        log["skips"].append(str(msg)[:600])
        return orig_skip(msg, *a, **k)

    patched = [m for m in mods if getattr(m, "log_cudagraph_skip_and_bump_counter", None) is orig_skip]
    try:
        for attr in saved:
            setattr(mgr, attr, counting(attr))
        for m in patched:
            m.log_cudagraph_skip_and_bump_counter = skip
        yield log
    finally:
        for attr, f in saved.items():
            setattr(mgr, attr, f)
        for m in patched:
            m.log_cudagraph_skip_and_bump_counter = orig_skip


def _mutation_backend(graphs: list):
    """A dynamo backend (aot graphs run as they are, like aot_eager) that records, per graph,
    which inputs it mutates and whether they are static (parameters, buffers, marked
    static addresses): inductor's CUDA-graph trees run a graph whose non-static inputs it
    mutates without a CUDA graph (torch/_inductor/cudagraph_utils.py check_for_mutation),
    unless those tensors were allocated by a recorded graph."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext

    def backend(gm, example_inputs):
        def fw(g, ins):
            meta = TracingContext.get().fw_metadata
            mutated = [i for i, info in enumerate(meta.input_info) if info.mutates_data or info.mutates_metadata]
            static = set(meta.static_input_indices)
            graphs.append(
                {
                    "inputs": len(ins),
                    "mutated": len(mutated),
                    "mutated_non_static": [
                        list(ins[i].shape) for i in mutated if i not in static and hasattr(ins[i], "shape")
                    ],
                }
            )
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    return backend


def sec_static_schedule_graphs(ctx: Context, sec: dict, check: Check) -> None:
    """ScheduleConfig(plan="CC1C20C1") announced at context entry, on the tiny reference DiT:
    torch.compile(fullgraph=True, mode="reduce-overhead") replays CUDA graphs with no sync
    (CUDA); on CPU the same loop through dynamo and aot graphs: 3 graphs, no cond, no host
    read, bitwise the eager output, and which inputs each graph mutates."""
    import torch
    import torch._dynamo

    fastcache = ctx.fastcache()
    from support.zoo import reference_dit_case

    dev, plan = ctx.device, "CC1C20C1"
    steps = len(plan)
    case = reference_dit_case()
    if not ctx.cuda:
        # dynamo's tracing time grows with the blocks (5 s for 3 on the dry run's CPU, 3 s
        # for 1): one block shows the graphs as well
        torch.manual_seed(0)
        case.model = type(case.model).from_config(dict(case.model.config.to_dict(), depth=1)).eval()
        _randomize_zero_init(case.model)
    m = case.model.to(dev)
    labels = torch.arange(case.batch, device=dev) % 10
    x0 = case.latents(torch.Generator().manual_seed(1)).to(dev)
    res = sec["results"]

    def loop(model, timed=False, mode_cls=None):
        sch = case.scheduler()
        sch.set_timesteps(steps)
        ts = [t.expand(case.batch).to(dev) for t in sch.timesteps]
        x, ms, syncs, reads, conds = x0.clone(), [], [], [], []
        for i, (t, tt) in enumerate(zip(sch.timesteps, ts)):
            timer = Timer(ctx.cuda)
            mode = mode_cls() if mode_cls else contextlib.nullcontext()
            ctx.sync()
            with count_syncs(ctx.cuda and timed) as s, mode, fastcache.context(m, "default", step_index=i):
                if ctx.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out, w = timer.time(lambda x=x, tt=tt: model(x, tt, labels))
            syncs += s
            if mode_cls:
                reads += mode.reads
                conds += mode.conds
            ms += timer.collect() if ctx.cuda else [w]
            x = sch.step(out, t, x).prev_sample
        return x, _stats(ms), syncs, reads, conds

    with torch.no_grad(), fastcache.patched(m, fastcache.ScheduleConfig(plan=plan)):
        eager, res["eager_step"], *_ = loop(m)
        tl = fastcache.stats(m)["contexts"]["default"]["timeline"]
        check("eager timeline follows the plan", tl == [c == "C" for c in plan], tl)
        torch._dynamo.reset()
        fastcache.reset(m)
        if ctx.cuda:
            from torch._dynamo.utils import counters

            skips0 = counters["inductor"]["cudagraph_skips"]
            compiled = torch.compile(m, fullgraph=True, mode="reduce-overhead")
            with _cudagraph_tree_log() as log:
                t0 = time.perf_counter()
                loop(compiled)  # compiles; the trees warm up
                loop(compiled)  # the trees record
                res["compile_and_record_s"] = round(time.perf_counter() - t0, 1)
                before = dict(log, skips=list(log["skips"]))
                out, res["replay_step"], syncs, _, _ = loop(compiled, timed=True)
            res["cudagraph_trees"] = {"before_timed_run": before, "total": log}
            steady = {k: log[k] - before[k] for k in ("record", "replay", "eager")}
            res["timed_run"] = steady
            res["cudagraph_skips_counter"] = counters["inductor"]["cudagraph_skips"] - skips0
            ok = not log["skips"] and res["cudagraph_skips_counter"] == 0
            check(
                "no 'skipping cudagraphs'", ok, {"counter": res["cudagraph_skips_counter"], "reasons": log["skips"][:4]}
            )
            check(f"every call of the timed run replays a CUDA graph ({steps})", steady["replay"] == steps, steady)
            check("0 syncs in the timed run", not syncs, syncs[:5])
            check.run("output equals eager within 1e-3", torch.testing.assert_close, out, eager, rtol=1e-3, atol=1e-3)
            if res["eager_step"].get("n") and res["replay_step"].get("n"):
                res["replay_vs_eager"] = res["replay_step"]["median_ms"] / res["eager_step"]["median_ms"]
        else:
            from support.hostreads import HostReadMode

            graphs: list = []
            compiled = torch.compile(m, fullgraph=True, backend=_mutation_backend(graphs))
            loop(compiled)  # compiles
            out, res["compiled_step"], _, reads, conds = loop(compiled, mode_cls=HostReadMode)
            res["graphs"] = graphs
            check("3 graphs (first call, computed step, forecast step), none recompiled", len(graphs) == 3, len(graphs))
            check("no cond in the graphs", not conds, len(conds))
            check("0 host reads", not [r for r in reads if r is not None], reads[:5])
            check("bitwise equal to eager", torch.equal(out, eager))
            bad = [g for g in graphs if g["mutated_non_static"]]
            res["cudagraph_forecast"] = (
                f"{len(bad)} of {len(graphs)} graphs mutate inputs that are neither parameters, buffers nor "
                "static addresses: inductor's CUDA-graph trees run such graphs without a CUDA graph "
                "('skipping cudagraphs due to mutated inputs') unless a recorded graph allocated those tensors"
                if bad
                else "no graph mutates a non-static input"
            )
            if bad:
                sec["warnings"].append(res["cudagraph_forecast"])
        torch._dynamo.reset()
    if ctx.out_of_time(20):
        if ctx.cuda:
            check.partial("time ran out before the StaticScheduleGraphs replays")
        else:  # the dry run's budget is tight on a loaded machine: say so, do not fail the run for it
            sec["warnings"].append("StaticScheduleGraphs stand-in replays skipped: less than 20 s of the budget left")
        return
    _static_graphs_replays(ctx, sec, check)


def _static_graphs_replays(ctx: Context, sec: dict, check: Check) -> None:
    """fastcache.cuda_graphs.StaticScheduleGraphs: one CUDA graph per step kind of an announced
    mixed-order plan, on DiT-XL/2-sized random-weight blocks in fp32 (CPU: the tiny DiT under
    the graph stand-in). A whole announced loop replayed against the eager loop (fp32
    tolerance), then per step kind the replay against the eager step, round-robin (CUDA)."""
    import torch
    from diffusers import DiTTransformer2DModel

    fastcache = ctx.fastcache()
    from fastcache.cuda_graphs import StaticScheduleGraphs

    dev, plan = ctx.device, "CC1C20C1"
    steps = len(plan)
    cfg = (
        dict(DIT_XL2)
        if ctx.cuda
        else dict(DIT_XL2, num_attention_heads=2, attention_head_dim=16, num_layers=3, sample_size=8)
    )
    torch.manual_seed(0)
    with torch.device(dev):
        m = DiTTransformer2DModel(**cfg)
    _randomize_zero_init(m)
    m = m.float().eval()
    B, s, c = 2, cfg["sample_size"], cfg["in_channels"]
    g = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.randn(B, c, s, s, generator=g, device=dev)
    y = torch.arange(B, device=dev) % cfg["num_embeds_ada_norm"]
    ts = [torch.full((B,), 999.0 - 999.0 * i / steps, device=dev) for i in range(steps)]
    fn = lambda x, t: m(hidden_states=x, timestep=t, class_labels=y).sample.chunk(2, dim=1)[0]  # noqa: E731
    # a fixed update in place of a scheduler: the next input depends on the step's output
    advance = lambda x, eps: x - 0.1 * eps  # noqa: E731
    res = sec["results"]["static_graphs"] = {"model": f"DiTTransformer2DModel {cfg}, B={B}, fp32", "plan": plan}
    timeline = lambda: fastcache.stats(m)["contexts"]["default"]["timeline"]  # noqa: E731
    with torch.no_grad(), fastcache.patched(m, fastcache.ScheduleConfig(plan=plan)):
        x = x0.clone()
        for i in range(steps):
            with fastcache.context(m, "default", step_index=i, num_steps=steps):
                x = advance(x, fn(x, ts[i]))
        eager, tl = x, timeline()
        t0 = time.perf_counter()
        graphs = check.run(
            "StaticScheduleGraphs capture",
            StaticScheduleGraphs,
            fn,
            x0,
            ts[0],
            model=m,
            backend="cuda" if ctx.cuda else "stand-in",
        )
        if graphs is None:
            return
        ctx.sync()
        res["capture_s"] = round(time.perf_counter() - t0, 2)
        check(
            "one graph per step kind (computed, forecast)",
            sorted(graphs.graphs) == ["computed", "forecast"],
            sorted(graphs.graphs),
        )
        x, syncs = x0.clone(), []
        for i in range(steps):
            with count_syncs(ctx.cuda) as sy:
                out = graphs(x, ts[i], step=i)
            syncs += sy
            x = advance(x, out)
        check("timeline equals eager", timeline()[-steps:] == tl, {"graphs": timeline()[-steps:], "eager": tl})
        res["max_abs_diff"] = float((x - eager).abs().max())  # host-read-ok: the check's result, off the step path
        res["bitwise_equal"] = bool(torch.equal(x, eager))
        check.run("latents equal eager within 1e-4 (fp32)", torch.testing.assert_close, x, eager, rtol=1e-4, atol=1e-4)
        if ctx.cuda:
            check(f"0 syncs in {steps} graph steps", not syncs, syncs[:5])
        if not ctx.cuda or ctx.out_of_time(15):
            if ctx.cuda:
                check.partial("time ran out before the per-kind timing")
            return

        # per step kind: step 1 is computed, step 2 a forecast (order 1), each after step 1
        def eager_at(i):
            def f():
                with fastcache.context(m, "default", step_index=i, num_steps=steps):
                    return fn(x0, ts[i])

            return f

        fns = {
            "eager_computed": eager_at(1),
            "graph_computed": lambda: graphs(x0, ts[1], step=1),
            "eager_forecast": eager_at(2),
            "graph_forecast": lambda: graphs(x0, ts[2], step=2),
        }
        timings, _, rounds = time_round_robin(ctx, fns, ctx.args.rounds or 20, reserve=5.0)
        res["timings"], res["rounds"] = timings, rounds
        for kind in ("computed", "forecast"):
            e, r = timings[f"eager_{kind}"], timings[f"graph_{kind}"]
            if e.get("n") and r.get("n"):
                res[f"replay_vs_eager[{kind}]"] = r["median_ms"] / e["median_ms"]


# ------------------------------------------------------------------ per-step costs
def _randomize_zero_init(m, seed: int = 123) -> None:
    """adaLN-Zero leaves an untrained block the identity: random values for zero-initialised
    parameters (same FLOPs either way, but no all-zero operands)."""
    import torch

    p0 = next(m.parameters())
    g = torch.Generator(device=p0.device).manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.05)


class Model:
    """A random-weight transformer and one step of it at timestep ``v`` (fixed inputs)."""

    def __init__(self, name, model, call, token_shape, t_scale, note):
        self.name, self.model, self.call, self.token_shape = name, model, call, token_shape
        self.t_scale, self.note = t_scale, note


def build_models(ctx: Context) -> list:
    """CUDA: DiT-XL/2 (28 blocks, B=2) and FLUX-sized blocks (B=1, --flux-double/--flux-single
    deep) in bf16. CPU: the test suite's tiny DiT and Flux in fp32."""
    import torch
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    dev = ctx.device
    out = []

    def make(cls, cfg, dtype):
        torch.manual_seed(0)
        with torch.device(dev):
            m = cls(**cfg)
        _randomize_zero_init(m)
        return m.to(dtype).eval()

    if ctx.cuda:
        dtype, B = torch.bfloat16, 2
        dit_cfg = dict(DIT_XL2)
        flux_cfg = dict(FLUX, num_layers=ctx.args.flux_double, num_single_layers=ctx.args.flux_single)
        n_img, n_txt, Bf = *FLUX_TOKENS, 1
    else:
        dtype, B = torch.float32, 2
        dit_cfg = dict(DIT_XL2, num_attention_heads=2, attention_head_dim=16, num_layers=3, sample_size=8)
        flux_cfg = dict(
            FLUX,
            in_channels=8,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=16,
            axes_dims_rope=(4, 6, 6),
        )
        n_img, n_txt, Bf = 16, 6, 2
    g = torch.Generator(device=dev).manual_seed(0)
    if "dit" in ctx.args.models:
        m = make(DiTTransformer2DModel, dit_cfg, dtype)
        s, c = dit_cfg["sample_size"], dit_cfg["in_channels"]
        x = torch.randn(B, c, s, s, generator=g, device=dev).to(dtype)
        y = torch.arange(B, device=dev) % dit_cfg["num_embeds_ada_norm"]
        n_tok = (s // dit_cfg["patch_size"]) ** 2
        width = dit_cfg["num_attention_heads"] * dit_cfg["attention_head_dim"]
        call = lambda model, t: model(hidden_states=x, timestep=t, class_labels=y).sample  # noqa: E731
        note = f"DiTTransformer2DModel {dit_cfg}, B={B}, {dtype}"
        out.append(Model("dit-xl2" if ctx.cuda else "dit-tiny", m, call, (B, n_tok, width), 1.0, note))
    if "flux" in ctx.args.models:
        m = make(FluxTransformer2DModel, flux_cfg, dtype)
        width = flux_cfg["num_attention_heads"] * flux_cfg["attention_head_dim"]
        hs = torch.randn(Bf, n_img, flux_cfg["in_channels"], generator=g, device=dev).to(dtype)
        txt = torch.randn(Bf, n_txt, flux_cfg["joint_attention_dim"], generator=g, device=dev).to(dtype)
        pooled = torch.randn(Bf, flux_cfg["pooled_projection_dim"], generator=g, device=dev).to(dtype)
        side = int(math.isqrt(n_img))
        img_ids = torch.zeros(n_img, 3, device=dev)
        img_ids[:, 1] = torch.arange(n_img, device=dev) // side
        img_ids[:, 2] = torch.arange(n_img, device=dev) % side
        txt_ids = torch.zeros(n_txt, 3, device=dev)

        def call(model, t):
            return model(
                hidden_states=hs,
                encoder_hidden_states=txt,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
            ).sample

        note = f"FluxTransformer2DModel {flux_cfg}, B={Bf}, {n_img}+{n_txt} tokens, {dtype}"
        out.append(Model("flux" if ctx.cuda else "flux-tiny", m, call, (Bf, n_img, width), 1e-3, note))
    return out


def _step_fn(ctx: Context, bm: Model, model, mode: str):
    """``rising``: every call a new sampling run (step 0: computed); ``falling``: one run
    (steps can skip); ``fixed``: the unpatched baseline."""
    import itertools

    import torch

    counter = itertools.count()
    B = bm.token_shape[0]

    def fn():
        i = next(counter)
        fn.calls = i + 1
        # steps of 5 on the 0-1000 scale: distinct in bf16 on FLUX's 0-1 scale as well
        v = {"rising": 100.0 + 5 * i, "falling": 900.0 - 5 * i, "fixed": 500.0}[mode]
        return bm.call(model, torch.full((B,), v * bm.t_scale, device=ctx.device))

    fn.calls = 0
    return fn


def _decision_fn(ctx: Context, shape, dtype):
    import torch

    from fastcache import ops

    B, N, D = shape
    g = torch.Generator(device=ctx.device).manual_seed(1)
    x = torch.randn(B, N, D, generator=g, device=ctx.device).to(dtype)
    shift = (0.1 * torch.randn(B, D, generator=g, device=ctx.device)).to(dtype)
    scale = (0.1 * torch.randn(B, D, generator=g, device=ctx.device)).to(dtype)
    prev = torch.randn(B, N, D, generator=g, device=ctx.device).to(dtype)
    state = ops.new_state(1024, device=ctx.device)
    coeffs = torch.empty(0, device=ctx.device)
    t = torch.full((B,), 500.0, device=ctx.device)

    def fn():
        sums = ops.modulated_rel_l1_sums(x, shift, scale, prev, 1e-6)
        flag = ops.cache_decision(sums, t, coeffs, state, SKIP_ALL, 1, 0, 0)
        return flag.item()  # host-read-ok: the eager step reads its flag once, timed as part of it

    r = torch.randn(B, N, D, generator=g, device=ctx.device).to(dtype)
    return fn, lambda: ops.apply_residual(x, r)


def _release(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def _run_stats(fastcache, model) -> dict:
    """runs (since the patch), and the last run's computed / skipped steps."""
    st = fastcache.stats(model)["contexts"]["default"]
    return {k: st[k] for k in ("runs", "computed", "skipped")}


def sec_step_costs(ctx: Context, sec: dict, check: Check) -> None:
    """Eager per-step costs, timed round-robin (ratios: medians of per-round ratios to the
    unpatched model): full, patched computed (TeaCache, every call a new run), patched
    skipped (threshold 1e9, falling timesteps), the decision alone (indicator + decision +
    flag read) and the skipped step's residual add at the model's token shape."""
    import torch

    fastcache = ctx.fastcache()
    rounds = ctx.args.rounds or (20 if ctx.cuda else 4)
    res = sec["results"]
    for bm in build_models(ctx):
        if ctx.out_of_time(10):
            check.partial(f"time ran out before {bm.name}")
            break
        row = res[bm.name] = {"note": bm.note, "tokens": "x".join(map(str, bm.token_shape))}
        cfg = fastcache.TeaCacheConfig(threshold=SKIP_ALL)
        computed, skipped = copy.deepcopy(bm.model), copy.deepcopy(bm.model)
        with torch.no_grad(), fastcache.patched(computed, cfg), fastcache.patched(skipped, cfg):
            dtype = next(bm.model.parameters()).dtype
            decision, residual = _decision_fn(ctx, bm.token_shape, dtype)
            fns = {
                "full": _step_fn(ctx, bm, bm.model, "fixed"),
                "patched_computed": _step_fn(ctx, bm, computed, "rising"),
                "patched_skipped": _step_fn(ctx, bm, skipped, "falling"),
                "decision": decision,
                "apply_residual": residual,
            }
            timings, ratios, done = time_round_robin(ctx, fns, rounds)
            row.update(rounds=done, timings=timings, pct_of_full={k: 100 * v for k, v in ratios.items() if v})
            if ratios.get("patched_computed"):
                row["overhead_pct"] = 100 * (ratios["patched_computed"] - 1)
            n_c, n_s = fns["patched_computed"].calls, fns["patched_skipped"].calls
            st_c = _run_stats(fastcache, computed)
            st_s = _run_stats(fastcache, skipped)
            row["stats"] = {"computed": dict(st_c, calls=n_c), "skipped": dict(st_s, calls=n_s)}
            # each rising call starts a run of its own whose one step computes
            ok = st_c["runs"] == n_c and st_c["computed"] == 1 and st_c["skipped"] == 0
            check(f"{bm.name}: every rising call computed", ok, row["stats"]["computed"])
            ok = st_s["runs"] == 1 and st_s["computed"] == 1 and st_s["skipped"] == n_s - 1
            check(f"{bm.name}: every falling call after the first skipped", ok, row["stats"]["skipped"])
            out = fns["full"]()
            check(f"{bm.name}: finite output", bool(torch.isfinite(out).all()))
            check(f"{bm.name}: timed {done} rounds", done > 0)
        del computed, skipped, fns
        bm.model = None
        _release(ctx)


def sec_graph_step_costs(ctx: Context, sec: dict, check: Check) -> None:
    """Per-replay cost of CUDAGraphStep on DiT-XL/2 (bf16, B=2): the unpatched model
    captured as a plain graph, a patched model replaying computed steps (every call a new
    run) and one replaying skipped steps (threshold 1e9, falling timesteps). 0 syncs."""
    try:
        _graph_step_costs(ctx, sec, check)
    finally:
        _release(ctx)


def _graph_step_costs(ctx: Context, sec: dict, check: Check) -> None:
    import torch

    fastcache = ctx.fastcache()
    from fastcache.cuda_graphs import CUDAGraphStep

    args = copy.copy(ctx.args)
    args.models = ("dit",)
    sub = copy.copy(ctx)
    sub.args = args
    (bm,) = build_models(sub)
    res = sec["results"]
    res["note"] = bm.note
    B = bm.token_shape[0]
    cfg = fastcache.TeaCacheConfig(threshold=SKIP_ALL)
    computed, skipped = copy.deepcopy(bm.model), copy.deepcopy(bm.model)
    rounds = ctx.args.rounds or 20
    with torch.no_grad(), fastcache.patched(computed, cfg), fastcache.patched(skipped, cfg):
        t0 = torch.full((B,), 900.0, device="cuda")
        steps = {}
        for name, model in (("graph_full", bm.model), ("graph_computed", computed), ("graph_skipped", skipped)):
            fn = lambda t, model=model: bm.call(model, t)  # noqa: E731
            steps[name] = check.run(
                f"capture {name}", CUDAGraphStep, fn, t0, model=None if model is bm.model else model
            )
        if any(s is None for s in steps.values()):
            return
        after_capture = {"computed": _run_stats(fastcache, computed), "skipped": _run_stats(fastcache, skipped)}
        t_rise = [torch.full((B,), 100.0 + 5 * i, device="cuda") for i in range(rounds + 4)]
        t_fall = [torch.full((B,), 900.0 - 5 * i, device="cuda") for i in range(rounds + 4)]
        it = {"graph_full": iter(t_fall), "graph_computed": iter(t_rise), "graph_skipped": iter(t_fall)}
        fns = {k: (lambda k=k: steps[k](next(it[k]))) for k in steps}
        with count_syncs(True) as syncs:  # the warm-up replay of each graph, not timed
            for fn in fns.values():
                fn()
        timings, ratios, done = time_round_robin(ctx, fns, rounds, warmup=0)
        calls = done + 1  # the warm-up replay and the timed ones
        res.update(rounds=done, timings=timings, pct_of_graph_full={k: 100 * v for k, v in ratios.items() if v})
        check("0 syncs in a replay of each graph", not syncs, syncs[:5])
        st_c, st_s = _run_stats(fastcache, computed), _run_stats(fastcache, skipped)
        res["stats"] = {"after_capture": after_capture, "computed": st_c, "skipped": st_s, "replays": calls}
        new_runs = st_c["runs"] - after_capture["computed"]["runs"]
        ok = new_runs == calls and st_c["computed"] == 1 and st_c["skipped"] == 0
        check("computed graph: every replay a new run that computes", ok, res["stats"])
        ok = st_s["computed"] == 1 and st_s["skipped"] == calls - 1
        check("skipped graph: every replay after the first skipped", ok, res["stats"])


# ------------------------------------------------------------------ pytest -m gpu
def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (``pytest.mark.gpu``), relative to the checkout."""
    out = []
    for p in sorted(TESTS.rglob("test_*.py")):
        if "pytest.mark.gpu" in p.read_text(encoding="utf-8", errors="replace"):
            out.append(str(p.relative_to(REPO)))
    return out


class _PytestRecorder:
    """A pytest plugin (in the child process): the environment the tests saw and each outcome."""

    def __init__(self):
        self.env: dict = {}
        self.tests: list = []

    def pytest_collection_finish(self, session):
        env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "collected": len(session.items)}
        try:
            import triton

            env["triton_interpret"] = bool(triton.knobs.runtime.interpret)
        except Exception as e:
            env["triton_interpret"] = f"triton unusable: {type(e).__name__}: {e}"
        try:
            import fastcache.ops

            env["backend"] = fastcache.ops.BACKEND.as_dict()
            env["fastcache"] = str(Path(fastcache.__file__).parent)
        except Exception as e:
            env["backend"] = f"{type(e).__name__}: {e}"
        self.env = env

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and report.outcome == "passed":
            return
        entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
        entry["seconds"] = round(report.duration, 2)
        if report.outcome != "passed":
            lr = report.longrepr
            entry["detail"] = _short(lr[2] if isinstance(lr, tuple) else str(lr), 3000)
        self.tests.append(entry)


def pytest_child(argv: list[str]) -> int:
    """Entry point of the child process: pytest with this checkout's kernels and the recorder."""
    ensure_kernels_package()
    import pytest

    rec = _PytestRecorder()
    rc = pytest.main(argv, plugins=[rec])
    path = os.environ.get(PYTEST_REPORT_ENV)
    if path:
        write_json_atomic(Path(path), {"rc": int(rc), "env": rec.env, "tests": rec.tests})
    return int(rc)


class PytestRun:
    """pytest on ``selection`` in a child process of its own process group, started at
    construction; :meth:`wait` returns the recorder's report plus the exit code, the time and
    the output's tail (the child is killed with its group past ``timeout``)."""

    def __init__(self, selection: list[str], env_overrides: dict, timeout: float, markexpr: str | None = None):
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        self.report, self.log_path = tmp / "pytest.json", tmp / "output.txt"
        env = dict(os.environ, **env_overrides)
        env[PYTEST_REPORT_ENV] = str(self.report)
        boot = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(Path(__file__).resolve())!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "sys.exit(mod.pytest_child(sys.argv[1:]))\n"
        )
        self.args = ["-q", "-rs", "-p", "no:cacheprovider", *(["-m", markexpr] if markexpr else []), *selection]
        self.timeout, self.t0 = timeout, time.perf_counter()
        self.deadline = time.monotonic() + timeout
        self._log = open(self.log_path, "w")  # a file, not a pipe: nobody reads while it runs
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, *self.args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self) -> dict:
        try:
            rc = self.proc.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
        except BaseException as e:  # the timeout, or SIGALRM's SectionTimeout
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                self._close()
                raise
            rc = "timeout"
        text = self.log_path.read_text(errors="replace")
        if rc == "timeout":
            text = f"timed out after {self.timeout:.0f} s\n{text}"
        out = json.loads(self.report.read_text()) if self.report.exists() else {"env": {}, "tests": []}
        out.update(rc=rc, seconds=round(time.perf_counter() - self.t0, 1), args=self.args, output_tail=text[-6000:])
        self._close()
        return out

    def _close(self) -> None:
        self._log.close()
        self._tmp.cleanup()


def run_pytest(selection: list[str], env_overrides: dict, timeout: float, markexpr: str | None = None) -> dict:
    """:class:`PytestRun`, waited for."""
    return PytestRun(selection, env_overrides, timeout, markexpr).wait()


def _pytest_gpu_start(ctx: Context, sec: dict, check: Check) -> PytestRun | None:
    files = gpu_test_files()
    sec["results"]["files"] = files
    if not check("GPU test files found", bool(files)):
        return None
    return PytestRun(files, {"TRITON_INTERPRET": "0"}, timeout=max(ctx.remaining() - 5, 10), markexpr="gpu")


def _pytest_gpu_finish(sec: dict, check: Check, run: PytestRun) -> None:
    out = run.wait()
    res = sec["results"]
    res.update(out)
    env = out.get("env") or {}
    check("pytest saw TRITON_INTERPRET=0 (compiled kernels)", env.get("TRITON_INTERPRET") == "0", env)
    check("Triton not interpreted in the pytest process", env.get("triton_interpret") is False)
    by = {}
    for t in out.get("tests", []):
        by.setdefault(t["outcome"], []).append(t["nodeid"])
    res["outcomes"] = {k: len(v) for k, v in by.items()}
    check("pytest exit code 0", out["rc"] == 0, out["rc"])
    check("no GPU test failed", not by.get("failed"), by.get("failed"))
    check("no GPU test skipped on a CUDA machine", not by.get("skipped"), by.get("skipped"))
    check("GPU tests ran", bool(by.get("passed")), env.get("collected"))


def sec_pytest_gpu(ctx: Context, sec: dict, check: Check) -> None:
    """``pytest -m gpu`` on the files holding GPU tests, with compiled kernels; run in the
    background next to the parity sections unless --no-overlap (see main)."""
    run = _pytest_gpu_start(ctx, sec, check)
    if run is not None:
        _pytest_gpu_finish(sec, check, run)


# ============================================================================ driver
RUNNERS = {
    "environment": sec_environment,
    "build": sec_build,
    "cpp_parity": sec_cpp_parity,
    "triton_parity": sec_triton_parity,
    "cuda_graph_step": sec_cuda_graph_step,
    "static_schedule_graphs": sec_static_schedule_graphs,
    "step_costs": sec_step_costs,
    "graph_step_costs": sec_graph_step_costs,
    "pytest_gpu": sec_pytest_gpu,
}


def _status(sec: dict) -> str:
    states = {c["status"] for c in sec["checks"]}
    if "error" in states:
        return "error"
    if "fail" in states:
        return "fail"
    if sec.get("partial"):
        return "partial"
    return "pass" if states else "error"


def run_section(ctx: Context, report: dict, name: str, out: Path) -> None:
    sec = report["sections"][name]
    remaining = ctx.deadline - time.monotonic()
    if remaining <= 1:
        sec.update(status="skipped", reason=f"budget: --budget-s {ctx.args.budget_s:g} spent before this section")
        return
    ctx.section_deadline = time.monotonic() + min(CAPS[name], remaining)
    t0 = time.perf_counter()
    sec["status"] = "running"
    write_json_atomic(out, report)
    check = Check(sec, ctx)
    try:
        with _alarm(ctx.section_deadline - time.monotonic() + GRACE_S):
            RUNNERS[name](ctx, sec, check)
        sec["status"] = _status(sec)
        if sec["status"] == "error" and not sec["checks"]:
            sec["error"] = "the section recorded no check"
    except SectionTimeout as e:
        sec.update(status="error", error=str(e))
    except Exception as e:
        sec.update(status="error", error=_short(f"{type(e).__name__}: {e}"), traceback=_short(traceback.format_exc()))
    finally:
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        ctx.section_deadline = ctx.deadline


# the sections a concurrent pytest child would disturb (they time things or use the whole
# GPU): a pytest_gpu run started in the background after `build` is waited for before them
UNDISTURBED = ("cuda_graph_step", "static_schedule_graphs", "step_costs", "graph_step_costs")


def start_background_pytest(ctx: Context, report: dict):
    """Start pytest_gpu's child now; returns what finish_background_pytest needs, or None."""
    sec = report["sections"]["pytest_gpu"]
    if ctx.deadline - time.monotonic() <= 15:
        return None  # its slot reports the budget
    ctx.section_deadline = time.monotonic() + min(CAPS["pytest_gpu"], ctx.deadline - time.monotonic())
    check = Check(sec, ctx)
    try:
        run = _pytest_gpu_start(ctx, sec, check)
    finally:
        ctx.section_deadline = ctx.deadline
    if run is None:
        return None
    sec["status"] = "running"
    sec["results"]["background"] = "started after build, next to the parity sections"
    return run, check, time.perf_counter()


def finish_background_pytest(report: dict, started) -> None:
    run, check, t0 = started
    sec = report["sections"]["pytest_gpu"]
    try:
        _pytest_gpu_finish(sec, check, run)
        sec["status"] = _status(sec)
    except Exception as e:
        sec.update(status="error", error=_short(f"{type(e).__name__}: {e}"), traceback=_short(traceback.format_exc()))
    sec["seconds"] = round(time.perf_counter() - t0, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="dry run on CPU: Triton interpreter, tiny sizes, no GPU section")
    p.add_argument("--budget-s", type=float, default=280.0, help="the whole run's time limit (default 280)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_check.json", help="the JSON written")
    p.add_argument("--sections", default="all", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--build", choices=("auto", "always", "never"), default="auto",
                   help="auto: build fastcache._C in place when missing or older than csrc/ (default)")  # fmt: skip
    p.add_argument("--models", default="dit,flux", help="step_costs models: dit, flux (default both)")
    p.add_argument("--flux-double", type=int, default=4, help="FLUX dual-stream blocks in step_costs (full: 19)")
    p.add_argument("--flux-single", type=int, default=8, help="FLUX single-stream blocks in step_costs (full: 38)")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 20 on CUDA, 4 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-overlap", action="store_true", help="run pytest_gpu at its slot, not in the background")
    args = p.parse_args(argv)
    wanted = SECTIONS if args.sections == "all" else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = wanted
    args.models = tuple(s.strip() for s in args.models.split(",") if s.strip())
    if set(args.models) - {"dit", "flux"}:
        p.error(f"--models: choose from dit, flux (got {args.models})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Triton reads TRITON_INTERPRET when it is imported: decide before anything imports it.
    prior = os.environ.get("TRITON_INTERPRET")
    import torch  # torch does not import triton

    mode = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    want = "1" if mode == "cpu" else "0"
    note = None
    if prior not in (None, want):
        note = f"TRITON_INTERPRET was {prior!r} in the environment; set to {want!r} for the {mode} mode"
    if "triton" in sys.modules and prior != want:
        note = (note or "") + "; triton was already imported, so the setting may not take effect"
    os.environ["TRITON_INTERPRET"] = want
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args, mode, note)
    report = {
        "schema": SCHEMA,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "mode": mode,
        "device": "cuda" if mode == "cuda" else "cpu",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "budget_s": args.budget_s,
        "elapsed_s": None,
        "sections": {
            n: {"status": "pending", "reason": None, "seconds": 0.0, "checks": [], "results": {}, "warnings": []}
            for n in SECTIONS
        },
        "summary": None,
    }
    no_cuda = "--cpu: dry run on CPU" if args.cpu else "torch.cuda.is_available() is False"

    def emit(name: str) -> None:
        sec = report["sections"][name]
        counts = {}
        for s in report["sections"].values():
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        report["elapsed_s"] = round(time.monotonic() - ctx.t_start, 1)
        report["summary"] = dict(
            counts, ok=not any(s["status"] in ("fail", "error") for s in report["sections"].values())
        )
        write_json_atomic(args.out, report)
        why = sec.get("reason") or ""
        print(f"gpu_check: {name:24s} {sec['status']:8s} {sec['seconds']:7.1f} s  {why}", flush=True)

    background = None
    for name in SECTIONS:
        sec = report["sections"][name]
        if background is not None and (name in UNDISTURBED or name == "pytest_gpu"):
            finish_background_pytest(report, background)
            background = None
            emit("pytest_gpu")
        if name == "pytest_gpu" and sec["status"] != "pending":
            continue  # it ran in the background
        if name not in args.sections:
            sec.update(status="skipped", reason="not selected (--sections)")
        elif name in GPU_ONLY and mode != "cuda":
            sec.update(status="skipped", reason=f"no CUDA ({no_cuda})")
        else:
            run_section(ctx, report, name, args.out)
        emit(name)
        if name == "build" and mode == "cuda" and "pytest_gpu" in args.sections and not args.no_overlap:
            background = start_background_pytest(ctx, report)
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(args.out, report)
    print(f"gpu_check: {report['summary']} -> {args.out}", flush=True)
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
