"""Which backends the op tests must find, and how a missing one is reported.

A backend that is absent for a legitimate reason (triton not installed; the C++ build
skipped on purpose) is a visible skip that says why. Anything else (a broken kernel
module, a C++ extension that should have been built but does not load) must FAIL, with
the underlying error: a blanket ``except Exception: skip`` would hide exactly the
breakage these tests exist to catch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def triton_decision_backend(import_module: Callable[[str], object] = importlib.import_module):
    """``("triton", launcher)`` for the decision-semantics tests, or a skipped
    ``pytest.param`` when the triton package itself is not importable.

    Only an ImportError of ``import triton`` skips; an error while importing
    ``fastcache.kernels`` (a kernel that no longer compiles under the interpreter, a bad
    import inside the package) propagates and fails the test collection.
    """
    import pytest

    try:
        import_module("triton")
    except ImportError as e:
        reason = f"triton is not importable ({type(e).__name__}: {e}); install it to test the Triton launcher"
        return pytest.param("triton", None, marks=pytest.mark.skip(reason=reason), id="triton")
    launchers = import_module("fastcache.kernels").LAUNCHERS
    return pytest.param("triton", launchers["cache_decision"], id="triton")


def cpp_expectation(backend: Mapping[str, object], environ: Mapping[str, str]) -> tuple[str, str]:
    """``("ok" | "skip" | "fail", reason)`` for the C++ kernel tests.

    ``backend``: ``fastcache.ops.BACKEND.as_dict()``. The extension should be in use unless
    its build was skipped on purpose (``FASTCACHE_SKIP_EXT`` set) or another backend was
    forced (``FASTCACHE_BACKEND=eager|triton``). When it should be and is not, the reason
    is ``cpp_error`` (why ``fastcache._C`` did not load), and the tests fail.
    """
    if backend.get("cpu") == "cpp":
        return "ok", ""
    requested = str(backend.get("requested") or "auto")
    if environ.get("FASTCACHE_SKIP_EXT"):
        return "skip", "FASTCACHE_SKIP_EXT is set: the C++ extension was not built on purpose"
    if requested in ("eager", "triton"):
        return "skip", f"FASTCACHE_BACKEND={requested} selects another CPU backend; the C++ kernels are not loaded"
    why = backend.get("cpp_error") or "no error recorded"
    return "fail", (
        f"the C++ extension fastcache._C should be in use (FASTCACHE_SKIP_EXT unset, FASTCACHE_BACKEND={requested}) "
        f"but is not: {why}. Rebuild it with `./dev info` or `pip install -e . --no-build-isolation`."
    )
