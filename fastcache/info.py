"""What fastcache runs on: versions, machine and backends (``python -m fastcache.info``).

For every backend (the C++ CPU kernels of ``fastcache._C``, Triton, the eager reference)
it reports whether it is available, whether it is active on CPU / CUDA, and why not when
it is not. :func:`collect` returns the same as a JSON-serialisable dict, which ``bench/``
writes into its result files.

Example::

    $ python -m fastcache.info
    fastcache 0.1.0 (commit 1d8b575)  python 3.11.2  Linux-6.1-x86_64
    torch 2.13.0+cpu  triton 3.9.0  diffusers 0.42.1
    ...
    cpp     active on CPU  (variant avx512; compiled baseline, avx2, avx512)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys

import torch

import fastcache
from fastcache import ops

_ENV_VARS = (
    "FASTCACHE_BACKEND",
    "FASTCACHE_CPU_CAPABILITY",
    "FASTCACHE_SKIP_EXT",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastcache.__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpp_info(backend: dict) -> dict:
    info = {
        "available": False,
        "active": backend["cpu"] == "cpp",
        "cpu_capability": None,
        "compiled_capabilities": None,
        "supported_capabilities": None,
        "reason": backend["cpp_error"],
    }
    if "fastcache._C" in sys.modules:
        # Only ask the module when fastcache already loaded it: importing it here would
        # register its CPU kernels behind the back of FASTCACHE_BACKEND=eager / triton.
        _C = sys.modules["fastcache._C"]
        info.update(
            available=True,
            cpu_capability=_C.cpu_capability(),
            compiled_capabilities=list(_C.compiled_cpu_capabilities()),
            supported_capabilities=list(_C.supported_cpu_capabilities()),
        )
    elif info["reason"] is None:
        built = importlib.util.find_spec("fastcache._C") is not None
        info["available"] = built
        info["reason"] = (
            f"built but not loaded: FASTCACHE_BACKEND={backend['requested']}"
            if built
            else "not built (FASTCACHE_SKIP_EXT=1, or run `pip install -e . --no-build-isolation`)"
        )
    return info


def _triton_info(backend: dict) -> dict:
    version = _dist_version("triton")
    importable, reason = False, None
    if version is None:
        reason = "triton is not installed (pip install triton)"
    else:
        try:
            import triton  # noqa: F401

            importable = True
        except Exception as e:  # a broken install must not break the report
            reason = f"{type(e).__name__}: {e}"
    return {
        "importable": importable,
        "version": version,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "active_cpu": backend["cpu"] == "triton",
        "active_cuda": backend["cuda"] == "triton",
        "reason": backend["triton_error"] or reason,
    }


def _cuda_info() -> dict:
    available = torch.cuda.is_available()
    return {
        "available": available,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if available else None,
        "device_count": torch.cuda.device_count() if available else 0,
    }


def collect() -> dict:
    """Versions, machine, environment and backend status as a JSON-serialisable dict."""
    backend = ops.BACKEND.as_dict()
    return {
        "fastcache": fastcache.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
        "triton": _dist_version("triton"),
        "diffusers": _dist_version("diffusers"),
        "numpy": _dist_version("numpy"),
        "env": {k: os.environ.get(k) for k in _ENV_VARS},
        "backend": backend,
        "backends": {
            "cpp": _cpp_info(backend),
            "triton": _triton_info(backend),
            "cuda": _cuda_info(),
            "eager": {
                "available": True,
                "active_cpu": backend["cpu"] == "eager",
                "active_cuda": backend["cuda"] == "eager",
            },
        },
    }


def _format(info: dict) -> str:
    b = info["backends"]
    cpp, tri, cuda, eager = b["cpp"], b["triton"], b["cuda"], b["eager"]
    lines = [
        f"fastcache {info['fastcache']} (commit {info['commit'] or 'unknown'})  python {info['python']}  "
        f"{info['platform']}",
        f"torch {info['torch']}  triton {info['triton'] or '-'}  diffusers {info['diffusers'] or '-'}  "
        f"numpy {info['numpy'] or '-'}",
        f"cpu: {info['cpu']} ({info['cpu_count']} logical, torch uses {info['torch_num_threads']} threads, "
        f"ATen capability {info['torch_cpu_capability']})",
        f"cuda: {cuda['device'] + ' x' + str(cuda['device_count']) if cuda['available'] else 'no device'}"
        f" (torch built with CUDA {cuda['torch_cuda'] or '-'})",
        f"requested backend: {info['backend']['requested']}  ->  CPU: {info['backend']['cpu']}, "
        f"CUDA: {info['backend']['cuda']}",
        "",
    ]
    if cpp["cpu_capability"] is not None:
        state = "active on CPU" if cpp["active"] else "loaded, not active"
        lines.append(
            f"  cpp     {state}  (variant {cpp['cpu_capability']}; compiled {', '.join(cpp['compiled_capabilities'])}; "
            f"this CPU runs {', '.join(cpp['supported_capabilities'])})"
        )
    else:
        lines.append(f"  cpp     unavailable: {cpp['reason']}")
    active = [dev for dev, on in (("CPU", tri["active_cpu"]), ("CUDA", tri["active_cuda"])) if on]
    tri_state = (
        f"active on {' and '.join(active)}"
        if active
        else ("importable, not active" if tri["importable"] else "unavailable")
    )
    tri_line = (
        f"  triton  {tri_state}  (version {tri['version'] or '-'}, interpreter {'on' if tri['interpreter'] else 'off'})"
    )
    if tri["reason"] and not active:
        tri_line += f": {tri['reason']}"
    lines.append(tri_line)
    active = [dev for dev, on in (("CPU", eager["active_cpu"]), ("CUDA", eager["active_cuda"])) if on]
    lines.append(f"  eager   {'active on ' + ' and '.join(active) if active else 'available (fallback)'}")
    set_env = {k: v for k, v in info["env"].items() if v is not None}
    lines.append("")
    lines.append(
        "env: "
        + (", ".join(f"{k}={v}" for k, v in set_env.items()) if set_env else "(no fastcache/triton variables set)")
    )
    return "\n".join(lines)


def main() -> None:
    print(_format(collect()))


if __name__ == "__main__":
    main()
