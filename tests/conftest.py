"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined or run, so
it is set here, before fastcache (and with it fastcache.kernels) is imported: on this
CPU-only project every Triton kernel is exercised on CPU tensors by the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastcache._shadow import prefer_installed_kernels  # noqa: E402

# transformers (the tiny pipelines' text encoders) imports the Hugging Face ``kernels``
# package, which the checkout's kernels/ folder shadows under ``python -m pytest``.
prefer_installed_kernels()

# The test models are tiny: one intra-op thread runs them as fast as two, and on a shared
# machine two threads wait on each other (measured: tests/contracts -k "never_skip and (pixart
# or flux)" 13 s with one thread, 38 s with two, on the 2 loaded cores). Override with
# FASTCACHE_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("FASTCACHE_TEST_THREADS", "1")))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_configure(config):
    for name, doc in (
        ("slow", "long-running end-to-end tests"),
        ("compile", "tests that run torch.compile"),
        ("gpu", "tests that need a CUDA device"),
    ):
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
