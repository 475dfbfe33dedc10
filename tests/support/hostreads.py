"""Counting host reads (device value -> Python value) from what actually runs.

``HostReadMode`` is a TorchDispatchMode that sees every op turning a device value into a
Python value (``_local_scalar_dense`` behind ``.item()`` / ``float(t)``, ``is_nonzero``
behind ``bool(t)``, ``equal``), including those issued by compiled code: it declares
``ignore_compile_internals``, so dynamo keeps running compiled frames under it instead of
falling back to eager (``torch/_dynamo/convert_frame.py``). ``tolist`` and ``numpy``
bypass the dispatcher: :func:`python_level_reads` wraps them at the Python level.

torch's cond operator reaches the mode as a whole (``supports_higher_order_operators``).
The mode then does what the operator's dense kernel does (``cond_op_dense`` in
``torch/_higher_order_ops/cond.py``: ``if pred:``, then one branch), counts that ``pred``
read, and runs the branch with the mode re-entered so reads inside it are counted too.

Each read is attributed to the innermost frame of fastcache or of inductor's generated
code (``inductor:<line>``), ``None`` when neither is on the stack.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcache

PKG = os.path.dirname(fastcache.__file__)
READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}
COND = torch.ops.higher_order.cond


def _inductor_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.realpath(cache_dir())


def where() -> str | None:
    """The innermost fastcache or inductor-generated frame on the Python stack."""
    ind = _inductor_dir()
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename.startswith(PKG):
            return f"{os.path.relpath(fr.filename, PKG)}:{fr.name}:{(fr.line or '').strip()}"
        if os.path.realpath(fr.filename).startswith(ind):
            return f"inductor:{(fr.line or '').strip()}"
    return None


class HostReadMode(TorchDispatchMode):
    """``reads``: one entry per host read (its attribution); ``conds``: one entry per cond
    operator dispatched, ``(type of true branch, type of false branch)``."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True
        self.reads: list[str | None] = []
        self.conds: list[tuple[type, type]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is COND:
            pred, true_fn, false_fn, operands = args
            self.conds.append((type(true_fn), type(false_fn)))
            if isinstance(pred, torch.Tensor):
                self.reads.append(f"cond-kernel:if pred @ {where()}")
            take = bool(pred)  # the mode is popped here: this read is the one just counted
            with self:
                return (true_fn if take else false_fn)(*operands)
        if func in READ_OPS:
            self.reads.append(where())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def python_level_reads():
    """Yields a list that collects the attribution of every ``Tensor.tolist`` / ``numpy``."""
    seen: list[str | None] = []
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(orig):
        def wrapped(self, *a, **k):
            seen.append(where())
            return orig(self, *a, **k)

        return wrapped

    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, wrap(orig))
        yield seen
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
