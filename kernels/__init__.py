"""fastcache's Triton kernels (shipped as ``fastcache.kernels``).

One file per op family, three layers in each: ``@triton.jit _<op>_kernel`` -> a
launcher with the op's exact dispatcher-schema signature (checks the op's contract,
:mod:`fastcache.ops.contracts`, and Triton's own layout and device rules, from metadata
only; picks the grid; never reads a device value to the host) -> registration, done by
:mod:`fastcache.ops._library` from :data:`LAUNCHERS` (CUDA; CPU too under ``FASTCACHE_BACKEND=triton`` with
``TRITON_INTERPRET=1``).

=========================  ===========================
op                         file
=========================  ===========================
modulated_rel_l1_sums      modulated_rel_l1.py
rel_l1_sums                rel_l1.py
cache_decision             decision.py
timestep_guard             decision.py
gated_residual(_out)       gated_residual.py
apply_residual(_out)       residual.py
store_residual             residual.py
taylor_forecast / _update  taylor.py
forecast_residual          slots.py
taylor_update_slots        slots.py
history_combine            taylor.py
=========================  ===========================

Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)::

    from fastcache.kernels import LAUNCHERS
    sums = LAUNCHERS["rel_l1_sums"](x, prev, True)
"""

from __future__ import annotations

# Launchers are reached through LAUNCHERS (or their modules): re-exporting them here
# would shadow the module ``gated_residual`` with the function of the same name.
from . import decision, gated_residual, modulated_rel_l1, rel_l1, residual, slots, taylor

LAUNCHERS = {
    "modulated_rel_l1_sums": modulated_rel_l1.modulated_rel_l1_sums,
    "rel_l1_sums": rel_l1.rel_l1_sums,
    "cache_decision": decision.cache_decision,
    "timestep_guard": decision.timestep_guard,
    "gated_residual": gated_residual.gated_residual,
    "gated_residual_out": gated_residual.gated_residual_out,
    "apply_residual": residual.apply_residual,
    "apply_residual_out": residual.apply_residual_out,
    "store_residual": residual.store_residual,
    "taylor_forecast": taylor.taylor_forecast,
    "taylor_update": taylor.taylor_update,
    "forecast_residual": slots.forecast_residual,
    "taylor_update_slots": slots.taylor_update_slots,
    "history_combine": taylor.history_combine,
}

__all__ = [
    "LAUNCHERS",
    "decision",
    "gated_residual",
    "modulated_rel_l1",
    "rel_l1",
    "residual",
    "slots",
    "taylor",
]
