"""A searched static schedule on TaylorSeer's machinery (docs/methods.md section 12).

:class:`fastcache.ScheduleConfig` names, for every step of the run, whether the blocks run
(``"C"``) or which Taylor order fills the step from the cached branch outputs (``"0"``
reuse, ``"1"``, ``"2"``, ...). The history is kept to the plan's highest order; a step
forecast with a lower order uses the leading rows of the same history (the lower
finite differences do not depend on the higher ones), so every order of the plan shares
one history and one :func:`fastcache.ops.taylor_update` per computed step.

Where the step is decided (nothing here reads a value the model computed):

* eager with the step index given by the caller: on the host, 0 reads (TaylorSeer's
  host path with the per-step order);
* otherwise the device step counter indexes two device tables, the compute mask and the
  per-step order (TaylorSeer's explicit-schedule path): eager reads the one flag per
  step; under torch.compile the forecast of each order the plan uses is computed before
  the cond and the step's order is selected with ``torch.where``.

Past the plan's end every step is computed (never forecast from a schedule that did not
plan it); a run announcing another step count is refused.
"""

from __future__ import annotations

import torch

from .. import ops
from ..config import ScheduleConfig
from ..ops.reference import STEP
from .base import StepInfo, register_policy
from .taylorseer import TaylorSeerPolicy, TaylorState


class ScheduleState(TaylorState):
    def __init__(self, history: int):
        super().__init__(history)
        self.order_now: int | None = None  # host path: this step's forecast order


@register_policy(ScheduleConfig)
class SchedulePolicy(TaylorSeerPolicy):
    """Runs a :class:`fastcache.ScheduleConfig`; see the module docstring."""

    def __init__(self, config: ScheduleConfig, spec, model):
        super().__init__(config, spec, model)
        self.order = config.order
        self.orders_used = sorted({int(c) for c in config.plan if c != "C"})
        self._orders: dict[torch.device, torch.Tensor] = {}

    def new_state(self) -> ScheduleState:
        return ScheduleState(self.config.history)

    def _check_steps(self, n: int | None) -> None:
        if n and n != self.config.num_steps:
            raise ValueError(
                f"fastcache: the schedule plans {self.config.num_steps} steps but the run has {n}; search a "
                f"schedule for {n} steps (fastcache.search_schedule) or sample with {self.config.num_steps} steps"
            )

    def set_num_steps(self, num_steps: int | None) -> None:
        self._check_steps(num_steps)
        super().set_num_steps(num_steps or self.config.num_steps)
        self._orders.clear()

    def host_compute(self, step: StepInfo) -> bool:
        self._check_steps(step.num_steps)
        return self.config.computes(step.index)

    def _host_taylor_step(self, st: ScheduleState, call, streams, s: int):
        st.order_now = self.config.order_at(s)
        try:
            return super()._host_taylor_step(st, call, streams, s)
        finally:
            st.order_now = None

    # -- device tables --------------------------------------------------------------
    def _device_mask(self, dev) -> torch.Tensor:
        m = self._mask.get(dev)
        if m is None:
            flags = [self.config.computes(s) for s in range(self.config.num_steps)]
            m = self._mask[dev] = torch.tensor(flags + [True], dtype=torch.bool, device=dev)  # past the end: compute
        return m

    def _device_orders(self, dev) -> torch.Tensor:
        o = self._orders.get(dev)
        if o is None:
            rows = [self.config.order_at(s) for s in range(self.config.num_steps)]
            o = self._orders[dev] = torch.tensor(rows + [0], dtype=torch.long, device=dev)
        return o

    def _forecast(self, st: ScheduleState, dx: torch.Tensor) -> list[torch.Tensor]:
        if st.order_now is not None:  # host path: the step's order is known
            k = st.order_now
            return [ops.taylor_forecast(h[: k + 1], dx) for h in st.hist]
        if len(self.orders_used) <= 1:
            k = self.orders_used[0] if self.orders_used else 0
            return [ops.taylor_forecast(h[: k + 1], dx) for h in st.hist]
        # device step (the decision op has counted this call): its order from the table
        table = self._device_orders(dx.device)
        s_raw = (st.state[STEP : STEP + 1] - 1).clamp(min=0, max=table.numel() - 1).to(torch.long)
        k_now = table.index_select(0, s_raw)
        out = []
        for h in st.hist:
            f = ops.taylor_forecast(h[: self.orders_used[-1] + 1], dx)
            for k in self.orders_used[:-1]:
                f = torch.where(k_now == k, ops.taylor_forecast(h[: k + 1], dx), f)
            out.append(f)
        return out

    def state_stats(self, st: ScheduleState) -> dict:
        out = super().state_stats(st)
        out["plan"] = self.config.plan
        return out
