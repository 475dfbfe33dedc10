"""The device-state layouts of the decision ops: the one Python definition.

:mod:`fastcache.ops.reference`, :mod:`fastcache.ops.contracts` and the Triton kernels
(``kernels/decision.py``, as ``tl.constexpr`` globals) import these numbers; the C++
kernels keep their own copy (``csrc/ops.h``), exported as ``fastcache._C.STATE_INDEX``,
``AUX_INDEX``, ``STATE_HEADER``, ``MAX_COEFFS`` and ``AUX_SIZE`` and checked against
this file by tests/ops/test_contracts.py.

Decision state (a flat fp32 tensor, :func:`fastcache.ops.new_state`):

=======  ==========  ============================================================
index    name        meaning
=======  ==========  ============================================================
0        ACC         accumulated rescaled distance since the last computed step
1        STEP        index of the next step within the current sampling run
2        SKIPS       consecutive skipped steps so far
3        PREV_T      timestep of the previous call (-inf before the first call)
4        RATIO       last raw relative-L1 ratio (NaN if undefined)
5        RESCALED    last polynomial-rescaled ratio
6        FLAG        last decision, 1.0 = compute, 0.0 = reuse the cache
7        N_COMPUTED  computed steps in the current run
8        N_SKIPPED   skipped steps in the current run
9        N_RUNS      sampling runs seen (a run starts when the timestep rises)
10..15   reserved    zero
16..     history     three rows of H entries: ratio[s], acc[s], flag[s]
=======  ==========  ============================================================
"""

from __future__ import annotations

ACC, STEP, SKIPS, PREV_T, RATIO, RESCALED, FLAG, N_COMPUTED, N_SKIPPED, N_RUNS = range(10)
STATE_INDEX = {
    "ACC": ACC,
    "STEP": STEP,
    "SKIPS": SKIPS,
    "PREV_T": PREV_T,
    "RATIO": RATIO,
    "RESCALED": RESCALED,
    "FLAG": FLAG,
    "N_COMPUTED": N_COMPUTED,
    "N_SKIPPED": N_SKIPPED,
    "N_RUNS": N_RUNS,
}
STATE_HEADER = 16  # header values before the three history rows
MAX_COEFFS = 8  # rescaling polynomial coefficients cache_decision accepts

# Sampling-run counters kept on the device next to the decision state (a flat fp32
# tensor of AUX_SIZE values, :func:`fastcache.ops.new_aux`), updated in place by
# timestep_guard: repeated calls, steps of the last finished run, finished runs whose
# length was not num_steps, jitter (a timestep within the tolerance of the previous one).
AUX_REPEATS, AUX_LAST_RUN_STEPS, AUX_RUN_LENGTH_MISMATCHES, AUX_JITTER = range(4)
AUX_INDEX = {
    "AUX_REPEATS": AUX_REPEATS,
    "AUX_LAST_RUN_STEPS": AUX_LAST_RUN_STEPS,
    "AUX_RUN_LENGTH_MISMATCHES": AUX_RUN_LENGTH_MISMATCHES,
    "AUX_JITTER": AUX_JITTER,
}
AUX_SIZE = 4

# Timestep guard: two timesteps closer than ``TIMESTEP_RTOL * max(|t|, |prev_t|) +
# TIMESTEP_ATOL`` are the same step.
TIMESTEP_RTOL = 1e-5
TIMESTEP_ATOL = 1e-7


def history_len(numel: int) -> int:
    """History steps H of a decision state of ``numel`` values."""
    return (numel - STATE_HEADER) // 3
