"""Sampling-run bookkeeping on the device, shared by every policy that keeps a decision state.

Before each decision: the timestep the decision op should see (float jitter removed)
and whether the call repeats the previous call's timestep (a repeated evaluation of
the same step). No value is read to the host.
"""

from __future__ import annotations

import torch

from ..ops.reference import N_RUNS, PREV_T, STEP

# Two timesteps closer than this (relative to the larger magnitude) are the same step.
TIMESTEP_RTOL = 1e-5
TIMESTEP_ATOL = 1e-7

# Runtime counters kept on the device next to the decision state (fp32 slots).
AUX_REPEATS, AUX_LAST_RUN_STEPS, AUX_RUN_LENGTH_MISMATCHES, AUX_JITTER = range(4)
AUX_SIZE = 4


def timestep_guard(state: torch.Tensor, aux: torch.Tensor, timestep: torch.Tensor, num_steps: int = 0):
    """(timestep the decision op sees, repeated-call flag), both on the device.

    ``state``: a decision state (``fastcache.ops.new_state``) that the decision op will
    update right after; ``aux``: the ``AUX_*`` counters (updated here, in place).

    A rise within the tolerance is float jitter: the op sees the previous timestep,
    so the run goes on. A timestep equal (within the tolerance) to the previous
    call's is a repeated evaluation of the same step."""
    f32 = torch.float32
    t0 = timestep.detach().reshape(-1)[:1].to(state.device, f32)
    prev_t = state[PREV_T : PREV_T + 1]
    seen = torch.isfinite(prev_t)
    scale = torch.maximum(t0.abs(), torch.where(seen, prev_t, 0.0).abs())
    diff = t0 - prev_t
    same = seen & (diff.abs() <= scale * TIMESTEP_RTOL + TIMESTEP_ATOL)
    rep = same & (state[STEP : STEP + 1] > 0)
    new_run = ~seen | (diff > scale * TIMESTEP_RTOL + TIMESTEP_ATOL)
    had_run = state[N_RUNS : N_RUNS + 1] > 0
    jitter = same & (diff != 0)
    counts = torch.cat([rep, jitter]).to(f32)
    aux[AUX_REPEATS : AUX_REPEATS + 1].add_(counts[:1])
    aux[AUX_JITTER : AUX_JITTER + 1].add_(counts[1:])
    ended = new_run & had_run
    last = state[STEP : STEP + 1]
    aux[AUX_LAST_RUN_STEPS : AUX_LAST_RUN_STEPS + 1].copy_(
        torch.where(ended, last, aux[AUX_LAST_RUN_STEPS : AUX_LAST_RUN_STEPS + 1])
    )
    if num_steps > 0:
        aux[AUX_RUN_LENGTH_MISMATCHES : AUX_RUN_LENGTH_MISMATCHES + 1].add_((ended & (last != num_steps)).to(f32))
    return torch.where(same, prev_t, t0), rep.reshape(())
