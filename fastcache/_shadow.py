"""The checkout's ``kernels/`` folder and the Hugging Face ``kernels`` package.

fastcache's Triton sources live in a top-level ``kernels/`` folder of the checkout and are
installed as ``fastcache.kernels`` (no top-level ``kernels`` package ships). transformers 5
depends on the Hugging Face ``kernels`` distribution and imports it at import time. When a
checkout's root is on ``sys.path`` (``python -m ...`` run from the root, ``PYTHONPATH=<checkout>``),
``import kernels`` would find the checkout's folder instead and transformers fails with
``cannot import name 'CUDAProperties' from 'kernels'``. :func:`prefer_installed_kernels`
imports the installed package first (the checkout roots left out of ``sys.path`` for that one
import), so every later ``import kernels`` gets it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path


def _is_checkout(entry: str) -> bool:
    root = Path(entry or os.getcwd())
    return (root / "kernels" / "__init__.py").is_file() and (root / "fastcache" / "__init__.py").is_file()


def prefer_installed_kernels() -> None:
    """Import the installed ``kernels`` distribution (if any) ahead of a checkout's folder.
    A no-op (a few stat calls) unless a checkout is on ``sys.path``."""
    if not any(_is_checkout(p) for p in sys.path):
        return
    mod = sys.modules.get("kernels")
    if mod is not None and not _is_checkout(str(Path(getattr(mod, "__file__", "") or ".").parent.parent)):
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if not _is_checkout(p)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
