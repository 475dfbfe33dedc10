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
        _check_decision_fields(self)


@config_type
@dataclasses.dataclass(frozen=True)
class FORAConfig(CacheConfig):
    """FORA (Selvaraju et al., arXiv 2407.01425; docs/methods.md "FORA"): every block's
    attention and MLP outputs (before gating) are computed on the first ``warmup_steps``
    steps and then every ``interval``-th step, and reused in between; the AdaLN
    modulation, and so every gate, is recomputed each step.

    Schedule: step ``s`` (0-based) is computed iff ``s < warmup_steps`` or
    ``(s - warmup_steps + 1) % interval == 0`` (warmup 1: steps 0, N, 2N, ... as in the
    paper). ``interval=1`` computes every step (bitwise the unpatched model).

    Args:
        interval: N >= 1 (paper default 3).
        warmup_steps: leading steps always computed (>= 1: step 0 has no cache).
        num_steps: steps per run, when known: flags runs of another length in stats.
            The eager path places steps on the host (no device read at all) when the caller
            gives the step index (``cache_context(name, step_index=i)`` or
            ``fastcache.context(model, name, step_index=i)``); otherwise it reads one flag
            per step.
        history: steps of decision timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "fora"

    interval: int = 3
    warmup_steps: int = 1
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))

    def computes(self, step: int) -> bool:
        """The host schedule: is step ``step`` computed?"""
        w, n = self.warmup_steps, self.interval
        return step < w or (step - w + 1) % n == 0


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


@config_type
@dataclasses.dataclass(frozen=True)
class EOCConfig(CacheConfig):
    """Error-Optimized Cache (Qiu et al., arXiv 2501.19243; docs/methods.md "EOC") on a
    base caching schedule: a reused branch output becomes ``cached * (1 + w * T)``
    inside the gated residual (Eq. 7), attention and MLP together, where the trend
    ``T = P[s] - P[s_prev]`` comes from the calibrated prior (Eq. 4-5,
    :func:`fastcache.calibrate`), and only (block, step) pairs whose priority passes
    the threshold are corrected (Eq. 6, see :mod:`fastcache.policies.eoc`).

    Args:
        base: the schedule to correct: a :class:`FORAConfig`, a :class:`TeaCacheConfig`
            (its decision, with branch-level reuse: the interior TeaCache variant) or a
            static boolean ``(steps x blocks)`` mask, True = compute (a training-based
            schedule such as Learning-to-Cache's).
        weight: w; None = the paper's default, 0.01 on a rule-based base (FORA,
            TeaCache), 0.005 on a static mask. ``0`` equals ``base`` bitwise.
        profile: a :class:`fastcache.Profile` (or a path to one) for this model and
            step count.
        regulation: lambda of the priority's step-position weight ``exp(-lambda * s / (S-1))``.
        threshold: tau; a cached (block, step) is corrected iff its priority > tau.
            Defaults lambda = 4, tau = 0.25: on the digits DiT this corrects the reused
            blocks of the first ~15% of the steps (bench/bench_quality.py).
        num_steps: steps per run; default the profile's (it must match).
    """

    kind: ClassVar[str] = "eoc"

    base: Any = None
    weight: float | None = None
    profile: Any = None
    regulation: float = 4.0
    threshold: float = 0.25
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        from .tuning.profile import Profile

        base = self.base
        if base is None:
            raise ValueError(
                "EOCConfig.base is required: a FORAConfig, a TeaCacheConfig or a (steps x blocks) bool mask"
            )
        if not isinstance(base, (FORAConfig, TeaCacheConfig)):
            mask = _as_mask(base)
            if mask is None:
                raise ValueError(
                    f"EOCConfig.base must be a FORAConfig, a TeaCacheConfig or a (steps x blocks) bool mask, "
                    f"got {type(base).__name__}"
                )
            _set(self, "base", mask)
        if self.weight is None:
            _set(self, "weight", 0.005 if isinstance(self.base, tuple) else 0.01)
        else:
            _set(self, "weight", _check_float("weight", self.weight, 0, " (0 = the base schedule unchanged)"))
        prof = self.profile
        if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
            prof = Profile.load(prof)
        if not isinstance(prof, Profile):
            raise ValueError(
                "EOCConfig.profile must be a fastcache.Profile (profile = fastcache.calibrate(model, run)) or a path "
                f"to a saved one, got {type(self.profile).__name__}"
            )
        _set(self, "profile", prof)
        _set(self, "regulation", _check_float("regulation", self.regulation, 0))
        _set(self, "threshold", _check_float("threshold", self.threshold, 0))
        n = _profile_steps(self, prof, "EOC")
        if isinstance(self.base, tuple) and len(self.base) != n:
            raise ValueError(f"EOCConfig.base: the static mask has {len(self.base)} rows (steps) but num_steps={n}")
        _set(self, "history", _check_int("history", self.history, 1))

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict() if isinstance(self.base, CacheConfig) else [list(r) for r in self.base]
        return {
            "kind": self.kind,
            "base": base,
            "weight": self.weight,
            "profile": self.profile.describe(),
            "regulation": self.regulation,
            "threshold": self.threshold,
            "num_steps": self.num_steps,
            "history": self.history,
        }


@config_type
@dataclasses.dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    """First-Block Cache (ParaAttention, diffusers ``FirstBlockCacheConfig``) and its DBCache
    generalisation (cache-dit): run the first ``fn`` blocks every step; skip the middle
    blocks when the relative-L1 change of the first blocks' residual since the last
    computed step stays below ``threshold`` and reuse the middle blocks' residual instead;
    the last ``bn`` blocks always run (docs/methods.md section 7, FB1-FB4).

    Args:
        threshold: relative-L1 threshold on ``d_s`` (diffusers 0.05; 0.08 for FLUX). ``0``
            disables skipping (every step computed, output identical to the unpatched model).
        fn: leading blocks that always run and give the indicator (>= 1; FBCache 1, DBCache 8).
        bn: trailing blocks that always run (>= 0; DBCache's ``Bn``).
        warmup_steps: initial steps always computed (>= 1: step 0 has no cache).
        max_consecutive_skips: compute after this many skips in a row (0 = no limit).
        num_steps: sampling steps per run; when given, the last step is always computed.
            Can also be set later with ``handle.set_num_steps``.
        history: steps of decision timeline kept on device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "first_block"

    threshold: float = 0.05
    fn: int = 1
    bn: int = 0
    warmup_steps: int = 1
    max_consecutive_skips: int = 0
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        _set(self, "fn", _check_int("fn", self.fn, 1, " (the indicator needs at least one leading block)"))
        _set(self, "bn", _check_int("bn", self.bn, 0))
        _check_decision_fields(self)


# --- Δ-DiT ---
@config_type
@dataclasses.dataclass(frozen=True)
class DeltaDiTConfig(CacheConfig):
    """Δ-DiT (Chen et al., arXiv 2406.01125; docs/methods.md section 3, D1-D5): cache the
    change ``Δ = F_range(h) - h`` a contiguous range of ``num_cached`` blocks makes to its
    input ``h``; refresh it every ``interval`` steps and otherwise output ``h + Δ`` for the
    range. Steps before ``boundary`` (outline stage) cache the last ``num_cached`` blocks,
    steps from ``boundary`` on (detail stage) the first ``num_cached``; blocks outside the
    range always run. Blocks are counted across segments in run order (Flux: dual-stream,
    then single-stream), so a range may cross them.

    Schedule (static, step index ``s`` within the run, 0-based): ``s`` refreshes (runs every
    block) iff ``(s - a) % interval == 0``, where ``a`` is the latest forced step ``<= s``;
    forced steps are ``0 .. warmup_steps-1`` and ``boundary`` (the detail stage's range has
    no Δ yet; not forced when ``num_cached`` covers the whole stack, the two ranges then
    being the same). See :meth:`computes` and :meth:`stage_of`.

    Args:
        interval: N >= 1, steps between refreshes (1 = every step computed, the output
            bitwise the unpatched model's). Required: the paper tunes it per model.
        num_cached: N_c >= 0 blocks in the cached range (0 = nothing cached, bitwise the
            unpatched model); at most the stack's depth (checked when patching). Required.
        boundary: b >= 0, the first step of the detail stage (front range). ``0`` caches the
            front range throughout, ``b >= num_steps`` the rear range throughout. The paper's
            PixArt-alpha setting is b = 12 of 20 DPM-Solver steps. Required.
        warmup_steps: leading steps always computed (>= 1: step 0 has no Δ).
        num_steps: steps per run, when known: runs of another length are flagged in stats.
            Eager calls given the step index (``cache_context(name, step_index=i)`` or
            ``fastcache.context(model, name, step_index=i)``) follow :meth:`computes` on the
            host with no device read; otherwise one flag is read per step.
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "delta_dit"

    interval: int | None = None
    num_cached: int | None = None
    boundary: int | None = None
    warmup_steps: int = 1
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        for name, hint in (
            ("interval", " (steps between refreshes of Δ; 1 = never cache)"),
            ("num_cached", " (blocks in the cached range; 0 = never cache)"),
            ("boundary", " (first step of the detail stage; the paper uses 12 of 20 steps on PixArt-alpha)"),
        ):
            if getattr(self, name) is None:
                raise ValueError(f"DeltaDiTConfig.{name} is required{hint}")
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "num_cached", _check_int("num_cached", self.num_cached, 0, " (0 = cache nothing)"))
        _set(self, "boundary", _check_int("boundary", self.boundary, 0))
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))

    @property
    def never_caches(self) -> bool:
        """True when no step can reuse Δ (``interval == 1`` or ``num_cached == 0``)."""
        return self.interval == 1 or self.num_cached == 0

    def stage_of(self, step: int) -> str:
        """``"rear"`` (outline stage, the last ``num_cached`` blocks cached) for ``step <
        boundary``, else ``"front"`` (detail stage, the first ``num_cached`` blocks)."""
        return "rear" if step < self.boundary else "front"

    def computes(self, step: int, num_blocks: int | None = None) -> bool:
        """The host schedule: does step ``step`` refresh Δ (run every block)?
        ``num_blocks``: the stack's depth (the boundary is not forced when ``num_cached``
        covers it); None = assume it does not."""
        if self.never_caches:
            return True
        switch = num_blocks is None or self.num_cached < num_blocks
        forced = list(range(min(self.warmup_steps, step + 1)))
        if switch and self.boundary <= step:
            forced.append(self.boundary)
        return (step - max(forced)) % self.interval == 0


# --- T-GATE ---
_TGATE_CFG = ("batched", "none")


@config_type
@dataclasses.dataclass(frozen=True)
class TGateConfig(CacheConfig):
    """T-GATE (Liu et al., arXiv 2404.02747; docs/methods.md section 5, Eq. G1-G6): for
    models with cross-attention (PixArt). Cross-attention runs on steps ``s < gate_step``;
    at ``s = gate_step - 1`` its output is cached as the mean of the two CFG halves and
    reused by both halves from ``gate_step`` on. Self-attention follows its own schedule:
    computed on steps ``0 .. warm_up``, then on steps with ``s % sp_interval == 0`` before
    the gate, at ``gate_step - 1`` (cached as the halves' mean too), and on steps with
    ``s % fi_interval == 0`` after it; reused in between. The MLP always runs.

    The schedule is the reference implementation's (``tgate_scheduler``), step indices
    0-based and absolute. Defaults: the published PixArt-Alpha setting (25 steps:
    gate 15, sp_interval 3, fi_interval 1, warm_up 2); the reference's generic defaults
    are gate 10, sp_interval 5.

    Args:
        gate_step: G >= 1; cross-attention is computed on steps 0 .. G-1 and reused after.
            ``gate_step = num_steps`` with ``sp_interval = 1`` never reuses anything
            (bitwise the unpatched model).
        warm_up: W >= 0; self-attention is computed on steps 0 .. W (the reference computes
            ``s < W`` and caches at ``s == W``).
        sp_interval: P_sp >= 1, self-attention refresh interval before the gate.
        fi_interval: P_fi >= 1, self-attention refresh interval after the gate.
        cfg: how classifier-free guidance reaches the model. ``"batched"``: one call per
            step with the batch ``[uncond; cond]`` (diffusers' PixArt pipeline); the batch
            must be even, and the gate caches the mean of the halves. ``"none"``: no CFG
            (or CFG as separate calls in their own cache contexts): each sample caches its
            own output, which is not T-GATE's mean over the CFG pair (docs/methods.md).
        num_steps: steps per run, when known (``gate_step <= num_steps``; runs of another
            length are flagged in stats).
        history: steps of timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "tgate"

    gate_step: int = 15
    warm_up: int = 2
    sp_interval: int = 3
    fi_interval: int = 1
    cfg: str = "batched"
    num_steps: int | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "gate_step", _check_int("gate_step", self.gate_step, 1, " (step 0 computes cross-attention)"))
        _set(self, "warm_up", _check_int("warm_up", self.warm_up, 0))
        _set(self, "sp_interval", _check_int("sp_interval", self.sp_interval, 1, " (1 = self-attention every step)"))
        _set(self, "fi_interval", _check_int("fi_interval", self.fi_interval, 1, " (1 = self-attention every step)"))
        if self.cfg not in _TGATE_CFG:
            raise ValueError(
                f"cfg must be one of {_TGATE_CFG} ('batched': one call per step with the batch [uncond; cond]; "
                f"'none': no classifier-free guidance in the batch), got {self.cfg!r}"
            )
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
            if self.gate_step > self.num_steps:
                raise ValueError(
                    f"gate_step={self.gate_step} > num_steps={self.num_steps}: the gate would never be reached; "
                    f"use gate_step <= {self.num_steps} (gate_step = num_steps keeps cross-attention on every step)"
                )
        _set(self, "history", _check_int("history", self.history, 1))

    def plan(self, step: int) -> tuple[bool, str]:
        """The host schedule of step ``step`` (0-based): ``(self-attention computed?,
        cross-attention mode)``, mode ``"compute"`` (s < G-1), ``"gate"`` (s = G-1:
        computed, cached as the CFG mean) or ``"reuse"`` (s >= G). At the gate step
        self-attention is computed and cached as the CFG mean as well (Eq. G1-G3)."""
        g, w = self.gate_step, self.warm_up
        if step < g - 1:
            return (step <= w or step % self.sp_interval == 0), "compute"
        if step == g - 1:
            return True, "gate"
        return step % self.fi_interval == 0, "reuse"


# --- TaylorSeer ---
@config_type
@dataclasses.dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer (Liu et al., arXiv 2503.06923; docs/methods.md section 8): on computed
    steps every block's attention / MLP outputs (before the AdaLN gate, one per (block,
    branch, stream) slot) update their finite differences up to ``order`` (Eq. TS1); on
    the other steps they are forecast by the Taylor series (Eq. TS2) and go through the
    same gated residual as FORA, with the gates recomputed every step.

    Schedule (the step index ``s`` is 0-based): ``compute_steps`` when given, else step
    ``s`` is computed iff ``s < warmup_steps`` or ``(s - warmup_steps + 1) % interval ==
    0`` (warm-up 3, interval 5: steps 0, 1, 2, 7, 12, ...); with ``num_steps`` known the
    last step is computed too. ``interval=1`` computes every step (bitwise the unpatched
    model); ``order=0`` is FORA on the same schedule.

    Args:
        interval: N >= 1, steps between computed steps after the warm-up (diffusers and
            the paper: 5; paper range 5-7).
        order: m >= 0, the highest finite difference kept (paper 1-2; diffusers 1).
        warmup_steps: leading steps always computed (>= 1; diffusers computes 3).
        num_steps: steps per run when known: the last step is computed (device schedules
            and explicit ``compute_steps`` included); runs of another length are flagged.
        compute_steps: explicit computed steps (e.g. from a schedule search), increasing,
            starting at 0; every other step is forecast. Overrides ``interval`` and
            ``warmup_steps`` (leave them at their defaults).
        history: steps of decision timeline kept for ``fastcache.stats``.

    Memory: ``(order + 1) x`` the branch outputs of one step (every slot), per cache
    context, in the model's dtype (``stats()["cache_bytes"]``).
    """

    kind: ClassVar[str] = "taylorseer"

    interval: int = 5
    order: int = 1
    warmup_steps: int = 3
    num_steps: int | None = None
    compute_steps: tuple[int, ...] | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "interval", _check_int("interval", self.interval, 1, " (1 = compute every step)"))
        _set(self, "order", _check_int("order", self.order, 0, " (0 = reuse, as FORA)"))
        if self.order > 4:
            raise ValueError(
                f"order must be <= 4, got {self.order}: higher finite differences of a few sampled steps "
                "amplify noise (the paper uses 1-2)"
            )
        _set(self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, 1, " (step 0 is always computed)"))
        if self.num_steps is not None:
            _set(self, "num_steps", _check_int("num_steps", self.num_steps, 1, " or None"))
        _set(self, "history", _check_int("history", self.history, 1))
        cs = self.compute_steps
        if cs is not None:
            if isinstance(cs, (str, bytes)) or not hasattr(cs, "__iter__"):
                raise ValueError(f"compute_steps must be a sequence of step indices, got {cs!r}")
            cs = tuple(cs)
            if not cs or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in cs):
                raise ValueError(f"compute_steps must be a non-empty sequence of integers, got {self.compute_steps!r}")
            cs = tuple(int(s) for s in cs)
            if cs[0] != 0 or any(b <= a for a, b in zip(cs, cs[1:])):
                raise ValueError(
                    f"compute_steps must be strictly increasing and start at 0 (step 0 has no cache), got {cs}"
                )
            if self.num_steps is not None and cs[-1] >= self.num_steps:
                raise ValueError(f"compute_steps holds step {cs[-1]} but num_steps={self.num_steps}")
            if (self.interval, self.warmup_steps) != (5, 3):
                raise ValueError(
                    "compute_steps replaces interval and warmup_steps; give either compute_steps or "
                    f"interval/warmup_steps, got interval={self.interval}, warmup_steps={self.warmup_steps}"
                )
            _set(self, "compute_steps", cs)

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        """The host schedule: is step ``step`` computed? (``num_steps`` defaults to the config's.)"""
        n = self.num_steps if num_steps is None else num_steps
        if n is not None and step == n - 1:
            return True
        if self.compute_steps is not None:
            return step in self.compute_steps
        w = self.warmup_steps
        return step < w or (step - w + 1) % self.interval == 0


# --- MagCache ---
def _load_profile(prof, owner: str):
    """A :class:`fastcache.Profile` from a Profile or a path to a saved one."""
    from .tuning.profile import Profile

    if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
        prof = Profile.load(prof)
    if not isinstance(prof, Profile):
        raise ValueError(
            f"{owner}.profile must be a fastcache.Profile (profile = fastcache.calibrate(model, run)) or a path to a "
            f"saved one, got {type(prof).__name__}"
        )
    return prof


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


@config_type
@dataclasses.dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache (Ma et al., arXiv 2506.09045; docs/methods.md section 9): skip the whole
    block stack and reuse its residual (as TeaCache) while the error accumulated from the
    calibrated magnitude-ratio curve gamma stays small. Per step s >= the retention steps
    (M2-M3, diffusers' ``MagCacheConfig`` hook exactly)::

        rho <- rho * gamma_s ;  k <- k + 1 ;  eps <- eps + |1 - rho|
        skip iff s > 0 and eps <= threshold and k <= max_skips, else compute and rho, eps, k <- 1, 0, 0

    The decision uses gamma only, never the current data, so the schedule is computed on
    the host once (:meth:`schedule`): with a host step index no device value is read.

    Args:
        threshold: on the accumulated error eps (diffusers 0.06; Wan2.1 1.3B 0.12). ``0``
            disables skipping (every step computed, bitwise the unpatched model; diffusers
            would still skip where gamma is exactly 1).
        max_skips: K, the most consecutive skipped steps (diffusers ``max_skip_steps`` 3;
            0 = never skip).
        retention_ratio: r; the first ``int(r * num_steps + 0.5)`` steps are always computed
            (diffusers 0.2).
        retention_steps: that number of steps directly (overrides ``retention_ratio``).
        num_steps: steps per run the schedule is made for; default the length of the curve.
            A curve of another length is resampled by nearest index (as diffusers does).
            ``handle.set_num_steps`` / a pipeline's ``num_inference_steps`` re-resample it.
        mag_ratios: gamma per step, gamma_0 first (e.g. diffusers' ``FLUX_MAG_RATIOS``), or
        profile: a :class:`fastcache.Profile` (or its path) whose ``mag_ratios`` curve
            :func:`fastcache.calibrate` recorded. Exactly one of the two.
        history: steps of decision timeline kept on the device for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "magcache"

    threshold: float = 0.06
    max_skips: int = 3
    retention_ratio: float = 0.2
    retention_steps: int | None = None
    num_steps: int | None = None
    mag_ratios: tuple[float, ...] | None = None
    profile: Any = None
    history: int = 1024

    def __post_init__(self) -> None:
        _set(self, "threshold", _check_float("threshold", self.threshold, 0, " (0 disables skipping)"))
        _set(self, "max_skips", _check_int("max_skips", self.max_skips, 0, " (0 = never skip)"))
        r = _check_float("retention_ratio", self.retention_ratio, 0, " and <= 1")
        if r > 1:
            raise ValueError(f"retention_ratio must be a finite number >= 0 and <= 1, got {self.retention_ratio!r}")
        _set(self, "retention_ratio", r)
        if self.retention_steps is not None:
            _set(self, "retention_steps", _check_int("retention_steps", self.retention_steps, 0, " or None"))
        if (self.mag_ratios is None) == (self.profile is None):
            raise ValueError(
                "MagCacheConfig needs exactly one of mag_ratios (a gamma per step) and profile (a fastcache.Profile "
                "from fastcache.calibrate(model, run)); got " + ("both" if self.mag_ratios is not None else "neither")
            )
        if self.profile is not None:
            prof = _load_profile(self.profile, "MagCacheConfig")
            _set(self, "profile", prof)
            curve = prof.require("mag_ratios", "MagCacheConfig").tolist()  # host-read-ok: config construction
        else:
            curve = self.mag_ratios
            if hasattr(curve, "tolist"):
                curve = curve.tolist()  # host-read-ok: a config argument, not the step path
            if isinstance(curve, (str, bytes)) or not hasattr(curve, "__iter__"):
                raise ValueError(f"mag_ratios must be a sequence of positive numbers, got {self.mag_ratios!r}")
            curve = list(curve)
        ok = all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) and c > 0 for c in curve)
        if not curve or not ok:
            raise ValueError(f"mag_ratios must hold one finite number > 0 per step, got {curve!r}")
        _set(self, "mag_ratios", tuple(float(c) for c in curve))
        n = len(curve) if self.num_steps is None else self.num_steps
        _set(self, "num_steps", _check_int("num_steps", n, 1, " or None (the curve's length)"))
        _set(self, "history", _check_int("history", self.history, 1))

    def retention(self, num_steps: int | None = None) -> int:
        """Leading steps always computed (M4): ``retention_steps`` or ``int(r * S + 0.5)``."""
        n = self.num_steps if num_steps is None else num_steps
        return self.retention_steps if self.retention_steps is not None else int(self.retention_ratio * n + 0.5)

    def ratios(self, num_steps: int | None = None) -> tuple[float, ...]:
        """gamma resampled to ``num_steps`` (default the config's) by nearest index."""
        return nearest_interp(self.mag_ratios, self.num_steps if num_steps is None else num_steps)

    def schedule(self, num_steps: int | None = None) -> tuple[bool, ...]:
        """The host schedule, True = compute, one entry per step (M2-M4). The arithmetic is
        diffusers' own: fp32 tensor scalars for rho and eps, the comparison in fp32, so the
        decisions are the same bit for bit."""
        import torch

        n = self.num_steps if num_steps is None else num_steps
        g = torch.tensor(self.ratios(n), dtype=torch.float32)
        keep = self.retention(n)
        out: list[bool] = []
        rho, eps, k = 1.0, 0.0, 0
        for s in range(n):
            if s < keep or self.threshold == 0:
                out.append(True)
                continue
            rho = rho * g[s]
            k += 1
            eps = eps + abs(1.0 - rho)
            if s > 0 and bool(eps <= self.threshold) and k <= self.max_skips:  # host-read-ok: config time, CPU
                out.append(False)
            else:
                out.append(True)
                rho, eps, k = 1.0, 0.0, 0
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kind"] = self.kind
        d["mag_ratios"] = list(self.mag_ratios)
        d["profile"] = None if self.profile is None else self.profile.describe()
        return d


# --- Block Caching ---
@config_type
@dataclasses.dataclass(frozen=True)
class BlockCacheConfig(CacheConfig):
    """Block Caching (Wimbauer et al., arXiv 2312.03209, CVPR 2024; docs/methods.md
    section 6): a static per-block refresh schedule from the calibrated per-block change
    curves ``Delta_i(s)`` (B1, :func:`fastcache.calibrate`). Block i is refreshed at step s
    when its change accumulated since its last refresh reaches ``delta`` (B2); otherwise
    every branch of the block is reused, its gates recomputed (the fused gated residual;
    it stands in for the paper's learned scale-shift B3). Step 0 computes every block.

    The ``(steps x blocks)`` mask is computed here, once (:attr:`mask`, True = compute);
    EOC's correction composes with it: ``EOCConfig(base=cfg.mask, profile=cfg.profile)``.

    Args:
        delta: the refresh threshold on the accumulated relative change. ``0`` refreshes
            every block every step (bitwise the unpatched model).
        profile: a :class:`fastcache.Profile` (or its path) with the ``block_change`` curves.
        num_steps: steps per run; default (and it must be) the profile's.
        history: steps of decision timeline kept for ``fastcache.stats``.
    """

    kind: ClassVar[str] = "block_cache"

    delta: float = 0.1
    profile: Any = None
    num_steps: int | None = None
    history: int = 1024
    mask: tuple[tuple[bool, ...], ...] = dataclasses.field(init=False, default=(), compare=False)

    def __post_init__(self) -> None:
        _set(self, "delta", _check_float("delta", self.delta, 0, " (0 = refresh every block every step)"))
        prof = _load_profile(self.profile, "BlockCacheConfig")
        _set(self, "profile", prof)
        change = prof.require("block_change", "BlockCacheConfig").tolist()  # host-read-ok: config construction
        _profile_steps(self, prof, "Block Caching")
        _set(self, "history", _check_int("history", self.history, 1))
        _set(self, "mask", block_schedule(change, self.delta))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "delta": self.delta,
            "profile": self.profile.describe(),
            "num_steps": self.num_steps,
            "history": self.history,
            "computed_fraction": sum(map(sum, self.mask)) / (len(self.mask) * len(self.mask[0])),
        }


def block_schedule(change, delta: float) -> tuple[tuple[bool, ...], ...]:
    """B2 on the host: ``change[s][i] = Delta_i(s)``; block i computes at step s iff s == 0
    or ``sum_{s'=last_i+1}^{s} Delta_i(s') >= delta`` (then ``last_i = s``). Python floats
    (fp64), summed in step order."""
    L = len(change[0])
    acc = [0.0] * L
    rows = [tuple([True] * L)]
    for s in range(1, len(change)):
        row = []
        for i in range(L):
            acc[i] += float(change[s][i])
            hit = acc[i] >= delta
            if hit:
                acc[i] = 0.0
            row.append(hit)
        rows.append(tuple(row))
    return tuple(rows)


# --- Schedule ---
# "C": computed; a digit: forecast with the Taylor series to that order (0 = reuse);
# "E": reuse corrected by EOC's trend (docs/methods.md section 4, Eq. E4), needs a profile
SCHEDULE_CODES = "C01234E"


@config_type
@dataclasses.dataclass(frozen=True)
class ScheduleConfig(CacheConfig):
    """A static per-step schedule (docs/methods.md section 12), usually found by
    :func:`fastcache.search_schedule`: which steps run the blocks, and how each other step
    is filled from the cached branch outputs (TaylorSeer's forecast, section 8, with a
    per-step order; order 0 is FORA's reuse).

    ``plan`` has one character per step of the run: ``"C"`` computes the step; a digit
    ``k`` forecasts it with the Taylor series to order ``k`` from the history of the last
    computed steps (``"0"`` = reuse the last computed step's outputs); ``"E"`` reuses them
    corrected by EOC's trend, ``f * (1 + eoc_weight * (P[s] - P[c]))`` with ``P`` the
    ``profile``'s prior and ``c`` the last computed step (section 4, Eq. E4). Example, 10
    steps, 4 computed: ``"CC11C1E2C1"``.

    The run length is ``len(plan)``; a pipeline announcing another step count is refused,
    and steps past the plan's end are computed. The schedule never reads the model's
    values: with the step index given by the caller (``cache_context(name,
    step_index=i)`` / ``fastcache.context(model, name, step_index=i)``) nothing is read to
    the host in eager mode or under torch.compile (see the policy's docstring).

    Memory: ``(max order + 1) x`` the branch outputs of one step (every slot), per cache
    context, as TaylorSeer.
    """

    kind: ClassVar[str] = "schedule"

    plan: str = ""
    profile: Any = None
    eoc_weight: float = 1.0
    history: int = 1024

    def __post_init__(self) -> None:
        from .tuning.profile import Profile

        p = self.plan
        if not isinstance(p, str) or not p:
            raise ValueError(
                f"plan must be a non-empty string, one character per step ('C' computed, '0'-'4' forecast order), "
                f"got {p!r}"
            )
        p = p.upper()
        bad = sorted({c for c in p if c not in SCHEDULE_CODES})
        if bad:
            raise ValueError(
                f"plan holds {''.join(bad)!r}; use 'C' for a computed step, a digit 0-4 for the forecast order "
                f"of a cached step (0 = reuse) and 'E' for an EOC-corrected reuse, got {self.plan!r}"
            )
        if p[0] != "C":
            raise ValueError(f"plan must start with 'C': step 0 has nothing cached, got {self.plan!r}")
        _set(self, "plan", p)
        _set(self, "history", _check_int("history", self.history, 1))
        _set(self, "eoc_weight", _check_float("eoc_weight", self.eoc_weight, 0))
        prof = self.profile
        if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
            prof = Profile.load(prof)
        if prof is not None and not isinstance(prof, Profile):
            raise ValueError(
                f"ScheduleConfig.profile must be a fastcache.Profile or a path to one, got {type(prof).__name__}"
            )
        if "E" in p:
            if prof is None:
                raise ValueError(
                    "plan holds 'E' (EOC-corrected reuse): give the model's profile, ScheduleConfig(plan=..., "
                    "profile=fastcache.calibrate(model, run)), whose prior gives the trend"
                )
            if prof.num_steps != len(p):
                raise ValueError(
                    f"ScheduleConfig: the plan has {len(p)} steps but the profile was recorded over "
                    f"{prof.num_steps}-step runs; calibrate with {len(p)}-step runs"
                )
        _set(self, "profile", prof)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "plan": self.plan,
            "profile": None if self.profile is None else self.profile.describe(),
            "eoc_weight": self.eoc_weight,
            "history": self.history,
        }

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def compute_steps(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.plan) if c == "C")

    @property
    def order(self) -> int:
        """The highest forecast order the plan uses (the history kept)."""
        return max((int(c) for c in self.plan if c not in "CE"), default=0)

    @property
    def budget(self) -> int:
        return self.plan.count("C")

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        """Is step ``step`` computed? Past the plan's end: yes."""
        return step >= len(self.plan) or self.plan[step] == "C"

    def order_at(self, step: int) -> int:
        """The forecast order of a cached step (0 for computed, EOC-corrected and past-the-end steps)."""
        return 0 if self.computes(step) or self.plan[step] == "E" else int(self.plan[step])

    def corrects(self, step: int) -> bool:
        """Is step ``step`` an EOC-corrected reuse?"""
        return step < len(self.plan) and self.plan[step] == "E"

    @classmethod
    def from_steps(cls, compute_steps, num_steps: int, order: int = 1, **kw) -> ScheduleConfig:
        """A plan computing ``compute_steps`` (must hold 0) and forecasting every other step
        of ``num_steps`` with ``order`` (e.g. a fixed-interval TaylorSeer or FORA schedule)."""
        n = _check_int("num_steps", num_steps, 1)
        o = _check_int("order", order, 0)
        cs = {int(s) for s in compute_steps}
        if any(s < 0 or s >= n for s in cs):
            raise ValueError(f"compute_steps {sorted(cs)} must lie in [0, {n})")
        if o > 4:
            raise ValueError(f"order must be <= 4, got {o}")
        return cls(plan="".join("C" if s in cs else str(o) for s in range(n)), **kw)
