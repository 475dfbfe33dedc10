"""The rules that decide whether a missing backend skips or fails the op tests
(tests/ops/expected_backends.py), on simulated environments."""

from __future__ import annotations

import pytest
from expected_backends import cpp_expectation, triton_decision_backend

BROKEN_CPP = {"requested": "auto", "cpu": "eager", "cpp_error": "ImportError: undefined symbol: _ZN9fastcache3foo"}


def test_broken_cpp_build_fails_with_the_load_error():
    action, why = cpp_expectation(BROKEN_CPP, environ={})
    assert action == "fail"
    assert "undefined symbol: _ZN9fastcache3foo" in why and "Rebuild" in why


def test_forced_cpp_without_extension_fails():
    action, why = cpp_expectation(dict(BROKEN_CPP, requested="cpp", cpp_error="not built"), environ={})
    assert action == "fail" and "not built" in why


@pytest.mark.parametrize(
    "backend, environ, reason_part",
    [
        (BROKEN_CPP, {"FASTCACHE_SKIP_EXT": "1"}, "FASTCACHE_SKIP_EXT"),
        (dict(BROKEN_CPP, requested="eager", cpp_error=None), {}, "FASTCACHE_BACKEND=eager"),
        (dict(BROKEN_CPP, requested="triton", cpu="triton", cpp_error=None), {}, "FASTCACHE_BACKEND=triton"),
    ],
)
def test_deliberately_absent_cpp_skips_with_reason(backend, environ, reason_part):
    action, why = cpp_expectation(backend, environ)
    assert action == "skip" and reason_part in why


def test_loaded_cpp_runs():
    assert cpp_expectation({"requested": "auto", "cpu": "cpp", "cpp_error": None}, {}) == ("ok", "")


def test_missing_triton_package_is_a_visible_skip():
    def no_triton(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    param = triton_decision_backend(no_triton)
    (mark,) = param.marks
    assert mark.name == "skip" and "triton is not importable" in mark.kwargs["reason"]


def test_broken_kernel_package_is_not_swallowed():
    """Before the fix any exception while importing fastcache.kernels silently dropped
    the Triton backend from the decision tests; now it propagates."""

    def broken(name):
        if name == "triton":
            return object()
        raise RuntimeError("fastcache.kernels: a jit function failed to parse")

    with pytest.raises(RuntimeError, match="failed to parse"):
        triton_decision_backend(broken)
    # an ImportError raised inside fastcache.kernels (not by `import triton`) fails too

    def bad_inner_import(name):
        if name == "triton":
            return object()
        raise ImportError("cannot import name 'div_rn' from 'triton.language.math'")

    with pytest.raises(ImportError, match="div_rn"):
        triton_decision_backend(bad_inner_import)


def test_real_environment_finds_the_triton_launcher():
    pytest.importorskip("triton", reason="triton not installed here")
    param = triton_decision_backend()
    assert not param.marks and callable(param.values[1])


def test_test_cpp_fails_when_the_extension_does_not_load(tmp_path):
    """End to end: an extension that is built but refuses to import (here: an invalid
    FASTCACHE_CPU_CAPABILITY makes fastcache._C raise ImportError) must turn
    tests/ops/test_cpp.py into a failure that carries the load error, not a skip."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("fastcache._C") is None:
        pytest.skip("fastcache._C is not built here; this test needs a built extension to break")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCACHE_SKIP_EXT", "FASTCACHE_BACKEND")}
    env["FASTCACHE_CPU_CAPABILITY"] = "no-such-isa"
    test_cpp = Path(__file__).with_name("test_cpp.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_cpp), "-q", "-p", "no:cacheprovider", "--collect-only",
         "-W", "ignore::RuntimeWarning", f"--rootdir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"test_cpp.py should fail to collect, got rc 0:\n{out[-3000:]}"
    assert "no-such-isa" in out and "should be in use" in out, out[-3000:]
