"""Schemas, fake (meta) implementations and backend registration of the fused ops.

Every op lives in the ``fastcache`` namespace of the dispatcher:

* ``CompositeExplicitAutograd``: the eager reference (:mod:`fastcache.ops.reference`),
  the fallback for any device without a faster kernel.
* ``CPU``: the C++ kernels of ``fastcache._C`` (``csrc/``), registered by the extension
  itself with ``TORCH_LIBRARY_IMPL(fastcache, CPU, m)`` when it is imported.
* ``CUDA``: the Triton launchers of :mod:`fastcache.kernels`.
* fake: shape/dtype propagation for ``torch.compile`` and ``opcheck``.

``FASTCACHE_BACKEND`` forces the choice at import time:

``auto`` (default)  CPU -> C++ if the extension loads, else reference; CUDA -> Triton
                     if importable, else reference.
``cpp``             like auto, but a missing extension is an error.
``triton``          Triton launchers for CPU *and* CUDA (CPU needs TRITON_INTERPRET=1,
                     set before anything imports triton); the C++ extension is not loaded.
``eager``           the reference everywhere.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference

NAMESPACE = "fastcache"

SCHEMAS = {
    "modulated_rel_l1_sums": (
        "modulated_rel_l1_sums(Tensor x, Tensor shift, Tensor scale, float eps, Tensor(a!) prev, "
        "Tensor? hold=None) -> Tensor"
    ),
    "rel_l1_sums": "rel_l1_sums(Tensor x, Tensor(a!) prev, bool write_prev, Tensor? hold=None) -> Tensor",
    "cache_decision": (
        "cache_decision(Tensor sums, Tensor timestep, Tensor coeffs, Tensor(a!) state, "
        "float threshold, int warmup, int max_skips, int num_steps, Tensor? hold=None, bool accumulate=True) -> Tensor"
    ),
    "timestep_guard": (
        "timestep_guard(Tensor timestep, Tensor state, Tensor(a!) aux, float rtol, float atol, int num_steps) "
        "-> (Tensor, Tensor)"
    ),
    "gated_residual": "gated_residual(Tensor x, Tensor gate, Tensor cached, Tensor? trend, float w) -> Tensor",
    "gated_residual_out": (
        "gated_residual_out(Tensor x, Tensor gate, Tensor cached, Tensor? trend, float w, Tensor(a!) out) -> ()"
    ),
    "apply_residual": "apply_residual(Tensor x, Tensor r) -> Tensor",
    "apply_residual_out": "apply_residual_out(Tensor x, Tensor r, Tensor(a!) out) -> ()",
    "store_residual": "store_residual(Tensor out, Tensor x_in, Tensor flag, Tensor(a!) r) -> ()",
    "taylor_forecast": "taylor_forecast(Tensor history, Tensor dx) -> Tensor",
    "taylor_update": ("taylor_update(Tensor(a!) history, Tensor f, Tensor dx, Tensor valid, Tensor store) -> ()"),
    "history_combine": "history_combine(Tensor history, Tensor weights) -> Tensor",
}

BACKENDS = ("auto", "cpp", "triton", "eager")

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

for _name in SCHEMAS:
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")

# Multi-slot ops: a whole stack's forecast / reused residuals of one stream in one op, and
# every slot's Taylor history update in one op (docs: fastcache/policies/interior_engine.py).
_SLOT_SCHEMAS = {
    "forecast_residual": "forecast_residual(Tensor x, Tensor?[] gates, Tensor[] histories, Tensor dx) -> Tensor",
    "taylor_update_slots": (
        "taylor_update_slots(Tensor(a!)[] histories, Tensor[] fs, Tensor dx, Tensor valid, Tensor store) -> ()"
    ),
}
for _name, _schema in _SLOT_SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")
SCHEMAS.update(_SLOT_SCHEMAS)


# ----------------------------------------------------------------------------- fakes
@torch.library.register_fake("fastcache::modulated_rel_l1_sums")
def _(x, shift, scale, eps, prev, hold=None):
    return x.new_empty((x.shape[0], 2), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("fastcache::rel_l1_sums")
def _(x, prev, write_prev, hold=None):
    return x.new_empty((x.shape[0], 2), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("fastcache::cache_decision")
def _(sums, timestep, coeffs, state, threshold, warmup, max_skips, num_steps, hold=None, accumulate=True):
    return state.new_empty((), dtype=torch.bool)


@torch.library.register_fake("fastcache::timestep_guard")
def _(timestep, state, aux, rtol, atol, num_steps):
    return state.new_empty((1,), dtype=torch.float32), state.new_empty((), dtype=torch.bool)


@torch.library.register_fake("fastcache::gated_residual")
def _(x, gate, cached, trend, w):
    return torch.empty_like(x)


@torch.library.register_fake("fastcache::gated_residual_out")
def _(x, gate, cached, trend, w, out):
    return None


@torch.library.register_fake("fastcache::apply_residual")
def _(x, r):
    return torch.empty_like(x)


@torch.library.register_fake("fastcache::apply_residual_out")
def _(x, r, out):
    return None


@torch.library.register_fake("fastcache::store_residual")
def _(out, x_in, flag, r):
    return None


@torch.library.register_fake("fastcache::taylor_forecast")
def _(history, dx):
    return history.new_empty(history.shape[1:])


@torch.library.register_fake("fastcache::taylor_update")
def _(history, f, dx, valid, store):
    return None


@torch.library.register_fake("fastcache::forecast_residual")
def _(x, gates, histories, dx):
    return x.new_empty(x.shape)


@torch.library.register_fake("fastcache::taylor_update_slots")
def _(histories, fs, dx, valid, store):
    return None


@torch.library.register_fake("fastcache::history_combine")
def _(history, weights):
    return history.new_empty(history.shape[1:])


# ----------------------------------------------------------------------------- backends
class BackendInfo:
    """What was registered at import, and why the others were not (for fastcache.info)."""

    def __init__(self) -> None:
        self.requested = os.environ.get("FASTCACHE_BACKEND", "auto").strip().lower() or "auto"
        self.cpu = "eager"
        self.cuda = "eager"
        self.cpp_error: str | None = None
        self.triton_error: str | None = None

    def as_dict(self) -> dict:
        return {
            "requested": self.requested,
            "cpu": self.cpu,
            "cuda": self.cuda,
            "cpp_error": self.cpp_error,
            "triton_error": self.triton_error,
        }


BACKEND = BackendInfo()
_impl_lib = torch.library.Library(NAMESPACE, "IMPL")


def _load_cpp() -> bool:
    import importlib
    import importlib.util

    if importlib.util.find_spec("fastcache._C") is None:
        BACKEND.cpp_error = (
            "the extension fastcache._C is not built (pip install -e . --no-build-isolation builds it; "
            "FASTCACHE_SKIP_EXT=1 was set at build time, or the build failed)"
        )
        return False
    try:
        importlib.import_module("fastcache._C")  # registers the CPU kernels on import
    except Exception as e:  # ImportError, OSError (bad .so), undefined symbols...
        BACKEND.cpp_error = f"{type(e).__name__}: {e}"
        return False
    return True


def _triton_launchers() -> dict | None:
    try:
        from fastcache.kernels import LAUNCHERS
    except Exception as e:
        BACKEND.triton_error = f"{type(e).__name__}: {e}"
        return None
    missing = sorted(set(SCHEMAS) - set(LAUNCHERS))
    if missing:
        BACKEND.triton_error = f"fastcache.kernels lacks launchers for {missing}"
        return None
    return LAUNCHERS


def _register(launchers: dict, key: str) -> None:
    for name in SCHEMAS:
        _impl_lib.impl(name, launchers[name], key)


def _select_backends() -> None:
    req = BACKEND.requested
    if req not in BACKENDS:
        raise ValueError(
            f"FASTCACHE_BACKEND={req!r} is not a backend; use one of {', '.join(BACKENDS)} (unset it for 'auto')."
        )
    if req == "eager":
        return
    if req == "triton":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "FASTCACHE_BACKEND=triton runs the Triton kernels on CPU tensors too, which needs "
                "the interpreter: set TRITON_INTERPRET=1 before importing fastcache (and triton)."
            )
        launchers = _triton_launchers()
        if launchers is None:
            raise RuntimeError(f"FASTCACHE_BACKEND=triton but Triton is unusable: {BACKEND.triton_error}")
        _register(launchers, "CPU")
        _register(launchers, "CUDA")
        BACKEND.cpu = BACKEND.cuda = "triton"
        return
    # auto / cpp
    if _load_cpp():
        BACKEND.cpu = "cpp"
    elif req == "cpp":
        raise ImportError(
            f"FASTCACHE_BACKEND=cpp but the C++ extension fastcache._C did not load "
            f"({BACKEND.cpp_error}). Rebuild it with `pip install -e . --no-build-isolation` "
            "(ninja and a C++ compiler are needed), or unset FASTCACHE_BACKEND."
        )
    else:
        if not os.environ.get("FASTCACHE_SKIP_EXT"):
            warnings.warn(
                f"fastcache: C++ CPU kernels unavailable ({BACKEND.cpp_error}); using the eager "
                "reference on CPU. Run `python -m fastcache.info` for details.",
                RuntimeWarning,
                stacklevel=3,
            )
    if torch.cuda.is_available():
        launchers = _triton_launchers()
        if launchers is not None:
            _register(launchers, "CUDA")
            BACKEND.cuda = "triton"
    else:
        BACKEND.triton_error = BACKEND.triton_error or "no CUDA device (Triton kernels run on CUDA)"


_select_backends()
