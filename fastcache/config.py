"""Cache configurations: frozen, validated dataclasses, one per policy.

A registry maps each config type to the policy class that runs it
(:func:`fastcache.policies.policy_for`), so a new method is a new config + policy file.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

from .ops.reference import MAX_COEFFS


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


@config_type
@dataclasses.dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache (Liu et al., arXiv 2411.19108): skip the whole block stack when the
    accumulated, polynomial-rescaled relative-L1 change of the first block's modulated
    input stays below ``threshold``; reuse the stack residual instead.

    Args:
        threshold: accumulated-distance threshold (paper/reference: FLUX 0.25 / 0.4 /
            0.6 / 0.8 for ~1.5x / 1.8x / 2.0x / 2.25x). ``0`` disables skipping (every
            step is computed, output identical to the unpatched model).
        coefficients: rescaling polynomial, highest power first (``numpy.poly1d``
            order), at most 8 values. ``None`` takes the model's published coefficients
            (FLUX) and otherwise the identity ``poly(x) = x`` — the raw relative-L1, a
            sound default for models without published fits (DiT, PixArt, SD3); fit your
            own with ``numpy.polyfit`` as the authors do (docs/methods.md, TeaCache).
        warmup_steps: initial steps always computed (>= 1: step 0 has no cache).
        max_consecutive_skips: compute after this many skips in a row (0 = no limit).
        num_steps: sampling steps per run; when given, the last step is always computed
            (as in the reference). Can also be set later with ``handle.set_num_steps``.
        history: steps of decision timeline kept on device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "teacache"

    threshold: float = 0.1
    coefficients: tuple[float, ...] | None = None
    warmup_steps: int = 1
    max_consecutive_skips: int = 0
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        if self.coefficients is not None:
            cs = self.coefficients
            if isinstance(cs, (str, bytes)) or not hasattr(cs, "__iter__"):
                raise ValueError(
                    f"coefficients must be a sequence of numbers (numpy.poly1d order), got {self.coefficients!r}"
                )
            cs = tuple(cs)
            if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in cs):
                raise ValueError(
                    f"coefficients must be a sequence of numbers (numpy.poly1d order), got {self.coefficients!r}"
                )
            cs = tuple(float(c) for c in cs)
            if not 1 <= len(cs) <= MAX_COEFFS or not all(math.isfinite(c) for c in cs):
                raise ValueError(
                    f"coefficients must hold 1..{MAX_COEFFS} finite numbers (highest power first), got {cs}"
                )
            _set(self, "coefficients", cs)
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        _set(
            self,
            "max_consecutive_skips",
            _check_int("max_consecutive_skips", self.max_consecutive_skips, 0, " (0 = unlimited)"),
        )
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
            if self.warmup_steps >= self.num_steps:
                raise ValueError(
                    f"warmup_steps={self.warmup_steps} >= num_steps={self.num_steps}: every step would be "
                    "computed; lower warmup_steps or raise num_steps"
                )
        _set(self, "history", _check_int("history", self.history, 1))
