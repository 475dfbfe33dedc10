"""Sampling-run bookkeeping on the device, shared by every policy that keeps a decision state.

Before each decision: the timestep the decision op should see (float jitter removed)
and whether the call repeats the previous call's timestep (a repeated evaluation of
the same step, ``hold``: the indicator and decision ops then leave the cache state as
it was). One fused op (:func:`fastcache.ops.timestep_guard`); no value is read to the
host.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import (  # noqa: F401  (re-exported for the policies' stats)
    AUX_JITTER,
    AUX_LAST_RUN_STEPS,
    AUX_REPEATS,
    AUX_RUN_LENGTH_MISMATCHES,
    AUX_SIZE,
    TIMESTEP_ATOL,
    TIMESTEP_RTOL,
)


def timestep_guard(state: torch.Tensor, aux: torch.Tensor, timestep: torch.Tensor, num_steps: int = 0):
    """``(t_op, hold)`` for the decision about to run on ``state``; ``aux`` (the AUX_*
    counters) is updated in place. See :func:`fastcache.ops.timestep_guard`."""
    return ops.timestep_guard(timestep, state, aux, num_steps)
