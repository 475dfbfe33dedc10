"""Cache configurations: frozen, validated dataclasses, one per policy.

A registry maps each config type to the policy class that runs it
(:func:`fastcache.policies.policy_for`), so a new method is a new config + policy file.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Base of every policy config."""

    kind: ClassVar[str] = "base"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CacheConfig:
        d = dict(d)
        kind = d.pop("kind", None)
        for cls in _CONFIG_TYPES:
            if cls.kind == kind:
                return cls(**d)
        raise ValueError(f"unknown config kind {kind!r}; known: {[c.kind for c in _CONFIG_TYPES]}")


_CONFIG_TYPES: list[type[CacheConfig]] = []


def config_type(cls):
    _CONFIG_TYPES.append(cls)
    return cls


def _check_int(name: str, v: Any, lo: int, hint: str = "") -> int:
    """An integer >= lo (numpy integers accepted, bools and floats refused); returns an int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{hint}, got {v!r}")
    return int(v)


def _check_float(name: str, v: Any, lo: float, hint: str = "") -> float:
    """A finite real >= lo (numpy floats accepted, bools and strings refused); returns a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < lo:
        raise ValueError(f"{name} must be a finite number >= {lo}{hint}, got {v!r}")
    return float(v)


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


def _check_decision_fields(cfg) -> None:
    """The fields every config driving the fused decision op shares: warmup_steps,
    max_consecutive_skips, num_steps (and warmup < num_steps), history."""
    _set(cfg, "warmup_steps", _check_int("warmup_steps", cfg.warmup_steps, 1, " (step 0 is always computed)"))
    _set(
        cfg,
        "max_consecutive_skips",
        _check_int("max_consecutive_skips", cfg.max_consecutive_skips, 0, " (0 = unlimited)"),
    )
    if cfg.num_steps is not None:
        _set(cfg, "num_steps", _check_int("num_steps", cfg.num_steps, 1, " or None"))
        if cfg.warmup_steps >= cfg.num_steps:
            raise ValueError(
                f"warmup_steps={cfg.warmup_steps} >= num_steps={cfg.num_steps}: every step would be "
                "computed; lower warmup_steps or raise num_steps"
            )
    _set(cfg, "history", _check_int("history", cfg.history, 1))


# the step codes of a static schedule plan (fastcache.ScheduleConfig): C computes, a digit k
# forecasts with a Taylor series of order k (0 = reuse), E reuses with EOC's correction, F
# forecasts with coefficients fitted to the calibration Gram (ScheduleConfig.fit)
SCHEDULE_CODES = "C01234EF"


def _profile_steps(cfg, prof, method: str) -> int:
    """``cfg.num_steps`` checked against the run length ``prof`` was recorded over (default:
    the profile's); sets and returns it."""
    n = cfg.num_steps if cfg.num_steps is not None else prof.num_steps
    n = _check_int("num_steps", n, 2, f" ({method} needs the run length its profile was made for)")
    if n != prof.num_steps:
        raise ValueError(
            f"{type(cfg).__name__}.num_steps={n} but the profile was recorded over {prof.num_steps}-step runs; "
            f"calibrate again with {n}-step runs (fastcache.calibrate) or sample with {prof.num_steps} steps"
        )
    _set(cfg, "num_steps", n)
    return n


def _as_mask(base) -> tuple[tuple[bool, ...], ...] | None:
    """A (steps x blocks) boolean schedule as nested tuples, or None if ``base`` is not one."""
    if hasattr(base, "tolist") and not isinstance(base, CacheConfig):
        base = base.tolist()  # host-read-ok: a config argument, not the step path
    if isinstance(base, (list, tuple)) and base and all(isinstance(r, (list, tuple)) for r in base):
        rows = []
        for r in base:
            if not all(isinstance(v, bool) or (isinstance(v, numbers.Integral) and int(v) in (0, 1)) for v in r):
                raise ValueError("EOCConfig.base: a static schedule must hold booleans (True = compute the block)")
            rows.append(tuple(bool(v) for v in r))
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError("EOCConfig.base: a static schedule must be a rectangular (steps x blocks) boolean mask")
        if not all(rows[0]):
            raise ValueError("EOCConfig.base: row 0 of the schedule must compute every block (step 0 has no cache)")
        return tuple(rows)
    return None


def nearest_interp(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """Resample a per-step curve to ``n`` steps by nearest index, exactly as diffusers'
    ``hooks.mag_cache.nearest_interp`` (fp32 grid, ``torch.round``: half to even)."""
    import torch

    src = torch.tensor(values, dtype=torch.float32)
    if n == len(values):
        return tuple(float(v) for v in src)
    if n == 1:
        return (float(src[-1]),)
    scale = (len(values) - 1) / (n - 1)
    idx = torch.round(torch.arange(n, dtype=torch.float32) * scale).long()
    return tuple(float(v) for v in src[idx])  # host-read-ok: config construction, off the step path
