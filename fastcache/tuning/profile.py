"""EOC's prior (Qiu et al., arXiv 2501.19243, Eq. 4; docs/methods.md "EOC"), saved and
loaded with the model it was made for.

``P[s, k]`` is the mean over the calibration runs of slot ``k``'s branch output
(a (block, branch, stream) triple, see :class:`fastcache.interior.Slot`) at step ``s``,
before gating. Two granularities:

* ``"channel"`` (default): also averaged over batch rows and tokens, ``(S, K, D)``.
  Size ``S * K * D * 4`` bytes: digits DiT (50 steps, 6 blocks x 2 branches, D=128)
  307 KB; FLUX.1 (28 steps, 19 dual blocks x 4 slots + 38 single, D=3072) 39 MB.
* ``"token"``: per token position as in the paper, ``(S, K, N, D)`` — N times larger
  (FLUX at 4096 image tokens: ~160 GB, impossible), so only for small models whose
  slots all have the same token count N (single-stream DiTs).

Two per-step curves of the same runs ride along (format 2; small: S and S x L floats):

* ``mag_ratios`` ``(S,)``: MagCache's magnitude ratio (docs/methods.md section 9, M1),
  ``gamma_s = mean over tokens of ||R_s||_2 / (||R_{s-1}||_2 + 1e-8)`` of the stack
  residual ``R`` on the first cached stream, ``gamma_0 = 1``, averaged over the runs;
* ``block_change`` ``(S, L)``: Block Caching's per-block relative change (section 6, B1),
  ``Delta_i(s) = ||o_i(s) - o_i(s-1)||_1 / ||o_i(s)||_1`` of block i's output streams,
  ``Delta_i(0) = 0``, averaged over the runs.

Format 3 adds the schedule search's material (docs/methods.md section 12):

* ``step_gram`` ``(K, S, S)`` fp64: per slot, ``<F_k(i), F_k(j)>`` of the branch
  outputs at steps i and j, summed over the runs (a CountSketch of slots larger than
  ``gram_dim``); every forecast error of a static schedule is a quadratic form in it;
* ``schedules`` (JSON): searched schedules by budget, each with its plan and scores.

Format 4: a schedule may hold fitted steps (plan code ``F``, docs/methods.md section 12,
"Fitted filler"); its entry then carries ``fit`` (``{"step": coefficients}``, newest
computed step first) and ``fit_settings``. Format-3 files load unchanged.

The file is safetensors (tensors ``prior``, ``teacache_pairs``, ``mag_ratios``,
``block_change``, ``step_gram``) with JSON metadata: model class, a hash of the model's
config and parameter shapes, the number of steps per run, the scheduler and its
timesteps, the slot keys, the granularity, the schedules. Format-1 and -2 files still
load (format 1: ``mag_ratios = block_change = None``; both: ``step_gram = None``, no
schedules); the configs and searches that need a curve refuse such a profile and say to
calibrate again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import SCHEDULE_CODES, CacheConfig

FORMAT_VERSION = 4
# format 1: no mag_ratios / block_change; 2: no step_gram / schedules; 3: no fitted schedules ("F" steps, "fit")
READABLE_FORMATS = ("1", "2", "3", "4")
GRANULARITIES = ("channel", "token")


def model_fingerprint(model: nn.Module) -> tuple[str, str]:
    """(class name, 16-hex hash of the model's config and parameter names/shapes)."""
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif cfg is not None:
        try:
            cfg = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
        except (TypeError, ValueError):
            cfg = repr(cfg)
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps({"config": cfg, "params": shapes}, sort_keys=True, default=str)
    return type(model).__name__, hashlib.sha256(blob.encode()).hexdigest()[:16]


class _NotAProfile(Exception):
    pass


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; moved onto ``path`` with
    ``os.replace`` when the block ends without error, else removed (``path`` untouched)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # the umask's permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def model_width(model: nn.Module) -> int | None:
    """The hidden width of ``model``'s streams when the model states it (diffusers'
    ``inner_dim``, a ``config.hidden_size``), else None (then checked at the first call)."""
    w = getattr(model, "inner_dim", None)
    if w is None:
        cfg = getattr(model, "config", None)
        w = cfg.get("hidden_size") if isinstance(cfg, dict) else getattr(cfg, "hidden_size", None)
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


def timesteps_message(profile: Profile, run, method: str) -> str:
    """The warning for a run whose timesteps are not the profile's (both named)."""
    return (
        f"{method}: the run's timesteps {_short(run)} are not those {profile._who()} was recorded over "
        f"{_short(profile.meta.get('timesteps') or [])}; its prior is indexed by step, so the trend it gives is "
        "another schedule's. Calibrate with the sampler, step count and timestep spacing you sample with"
    )


class Profile:
    """Calibrated per-(step, slot) branch-output means, plus TeaCache calibration pairs.

    Attributes:
        prior: fp32 ``(S, K, D)`` (channel) or ``(S, K, N, D)`` (token).
        slots: the K slot keys ``"block.branch.stream"``.
        meta: model_class, config_hash, num_steps, scheduler, timesteps, granularity, runs.
        teacache_pairs: ``(n, 2)`` float64 (input rel-L1, output rel-L1) of the same runs.
        mag_ratios: fp32 ``(S,)`` MagCache's gamma curve, or None (a format-1 profile).
        block_change: fp32 ``(S, L)`` Block Caching's Delta curves, or None (format 1).
    """

    def __init__(
        self,
        prior: torch.Tensor,
        slots: list[str],
        meta: dict[str, Any],
        teacache_pairs=None,
        mag_ratios: torch.Tensor | None = None,
        block_change: torch.Tensor | None = None,
        step_gram: torch.Tensor | None = None,
        schedules: dict | None = None,
        *,
        source: str | None = None,
    ):
        self.source = None if source is None else str(source)
        self._warned: set = set()  # timestep mismatches already warned about
        who = self._who()
        if meta.get("granularity") not in GRANULARITIES:
            raise ValueError(
                f"{who}: meta field 'granularity' must be one of {GRANULARITIES}, got {meta.get('granularity')!r}; "
                "calibrate again (fastcache.calibrate(model, run, granularity='channel'))"
            )
        want_dim = 3 if meta["granularity"] == "channel" else 4
        if prior.dim() != want_dim or prior.shape[1] != len(slots):
            raise ValueError(
                f"{who}: prior has shape {tuple(prior.shape)}; expected {want_dim} dims with {len(slots)} slots "
                f"(one per entry of 'slots'); calibrate again"
            )
        self.prior = prior.detach().to(torch.float32).contiguous()
        self.slots = list(slots)
        self.meta = dict(meta)
        self.meta["num_steps"] = int(prior.shape[0])
        pairs = np.zeros((0, 2)) if teacache_pairs is None else np.asarray(teacache_pairs, dtype=np.float64)
        self.teacache_pairs = pairs.reshape(-1, 2)
        S = int(prior.shape[0])
        if mag_ratios is not None:
            mag_ratios = torch.as_tensor(mag_ratios).detach().to(torch.float32).reshape(-1).contiguous()
            if mag_ratios.shape != (S,):
                raise ValueError(f"profile mag_ratios has shape {tuple(mag_ratios.shape)}; expected ({S},)")
        self.mag_ratios = mag_ratios
        if block_change is not None:
            block_change = torch.as_tensor(block_change).detach().to(torch.float32).contiguous()
            if block_change.dim() != 2 or block_change.shape[0] != S:
                raise ValueError(f"profile block_change has shape {tuple(block_change.shape)}; expected ({S}, blocks)")
        self.block_change = block_change
        if step_gram is not None:
            step_gram = torch.as_tensor(step_gram).detach().to(torch.float64).contiguous()
            if step_gram.shape != (len(slots), S, S):
                raise ValueError(
                    f"profile step_gram has shape {tuple(step_gram.shape)}; expected ({len(slots)}, {S}, {S})"
                )
        self.step_gram = step_gram
        self.schedules: dict[int, dict] = self._read_schedules(schedules)
        self.validate()

    @property
    def num_steps(self) -> int:
        return self.meta["num_steps"]

    @property
    def granularity(self) -> str:
        return self.meta["granularity"]

    def nbytes(self) -> int:
        ts = [t for t in (self.prior, self.mag_ratios, self.block_change, self.step_gram) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in self.meta.items() if k != "timesteps"}
        d["slots"] = len(self.slots)
        d["bytes"] = self.nbytes()
        return d

    def fit_teacache(self, degree: int = 4) -> tuple[float, ...]:
        """TeaCache polynomial from the same runs: ``numpy.polyfit(in_rel_l1, out_rel_l1, degree)``."""
        p = self.teacache_pairs
        if len(p) <= degree:
            raise ValueError(f"the profile holds {len(p)} TeaCache pairs, too few to fit degree {degree}")
        return tuple(float(c) for c in np.polyfit(p[:, 0], p[:, 1], degree))

    # -- validation ---------------------------------------------------------------------
    def _file(self) -> str:
        return "" if self.source is None else f" (profile file: {self.source})"

    def _who(self) -> str:
        return "the profile" if self.source is None else f"profile {self.source}"

    def _read_schedules(self, schedules) -> dict[int, dict]:
        if schedules is None:
            return {}
        if not isinstance(schedules, dict):
            raise ValueError(
                f"{self._who()}: 'schedules' must map a budget to a schedule, got {type(schedules).__name__}; "
                "store schedules with ScheduleSearchResult.store(profile)"
            )
        out = {}
        for k, v in schedules.items():
            try:
                budget = int(k)
            except (TypeError, ValueError):
                budget = None
            if budget is None or not isinstance(v, dict):
                raise ValueError(
                    f"{self._who()}: 'schedules' entry {k!r} is not budget -> {{'plan': ...}}; store schedules with "
                    "ScheduleSearchResult.store(profile) (or delete the entry)"
                )
            out[budget] = dict(v)
        return out

    def _finite(self, name: str, t, where) -> None:
        """Refuse a NaN / inf in the tensor ``name``; ``where(index)`` names the entry."""
        if t is None:
            return
        t = torch.as_tensor(t)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):  # host-read-ok: profile validation, off the step path
            idx = tuple(int(i) for i in bad.nonzero()[0])  # host-read-ok: validation
            n = int(bad.sum())  # host-read-ok: validation
            raise ValueError(
                f"{self._who()}: {name} holds {n} non-finite value(s) (NaN or inf), the first at {where(idx)}: the "
                "calibration runs produced non-finite outputs or the file was edited; a correction or schedule "
                "from it would be NaN. Calibrate again on runs whose outputs are finite: "
                "profile = fastcache.calibrate(model, run)"
            )

    def validate(self) -> None:
        """Refuse a profile that cannot be right whatever model it meets: a non-finite
        value in any curve, timesteps that are not one per step, a stored schedule whose
        plan does not fit the profile's step count. Runs at construction and load."""
        S = self.num_steps
        slot = lambda i: f"slot {self.slots[i]!r}" if 0 <= i < len(self.slots) else f"slot {i}"  # noqa: E731
        self._finite("prior", self.prior, lambda i: f"step {i[0]}, {slot(i[1])}, index {i[2:]}")
        self._finite("mag_ratios", self.mag_ratios, lambda i: f"step {i[0]}")
        self._finite("block_change", self.block_change, lambda i: f"step {i[0]}, block {i[1]}")
        self._finite("step_gram", self.step_gram, lambda i: f"{slot(i[0])}, steps ({i[1]}, {i[2]})")
        self._finite("teacache_pairs", torch.from_numpy(self.teacache_pairs), lambda i: f"pair {i[0]}")
        ts = self.meta.get("timesteps")
        if ts is not None:
            ok = isinstance(ts, (list, tuple)) and len(ts) == S
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in ts)
            if not ok:
                raise ValueError(
                    f"{self._who()}: meta field 'timesteps' must hold {S} finite numbers (one per step of the "
                    f"{S}-step runs the prior was recorded over), got {ts!r}; calibrate again"
                )
        for budget, entry in sorted(self.schedules.items()):
            plan = entry.get("plan")
            why = None
            if not isinstance(plan, str) or not plan:
                why = f"has no plan string (got {plan!r})"
            elif len(plan) != S:
                why = f"plans {len(plan)} steps but the profile was recorded over {S}-step runs"
            elif set(plan.upper()) - set(SCHEDULE_CODES) or plan[0].upper() != "C":
                why = f"plan {plan!r} is not a schedule ('C' first, then codes of {SCHEDULE_CODES!r})"
            elif plan.upper().count("C") != budget:
                why = f"plan {plan!r} computes {plan.upper().count('C')} steps, not {budget}"
            elif "F" in plan.upper() and not isinstance(entry.get("fit"), dict):
                why = f"plan {plan!r} has fitted steps ('F') but no 'fit' coefficients (got {entry.get('fit')!r:.80})"
            if why:
                raise ValueError(
                    f"{self._who()}: the stored schedule for budget {budget} {why}; search it again "
                    f"(fastcache.search_schedule(model, runs, {budget}, profile=profile).store(profile)) or delete "
                    f"profile.schedules[{budget}]"
                )

    def check(self, model: nn.Module, slots: list[str] | None = None) -> None:
        """Refuse a profile made for another model (class, config) or another block layout."""
        self.check_fits(model, slots=slots)

    def check_fits(
        self,
        model: nn.Module | None = None,
        *,
        slots: list[str] | None = None,
        num_steps: int | None = None,
        timesteps=None,
        streams: dict | None = None,
        uses_prior: bool = True,
        method: str = "fastcache",
    ) -> None:
        """Does this profile fit where it is used? One place for every consumer (EOC,
        ScheduleConfig's 'E' steps, Block Caching, MagCache, the schedule search):

        * ``model``: made for this model (class and config hash); with ``uses_prior``,
          the prior's width against the model's hidden width when the model states it
          (``inner_dim`` / ``config.hidden_size``);
        * ``slots``: the model's (block, branch, stream) slot keys;
        * ``num_steps``: the run's step count (refused when it differs);
        * ``timesteps``: the run's timesteps (a RuntimeWarning, once per profile, naming
          both when they differ: the prior is indexed by step, not by timestep);
        * ``streams``: the call's streams ``{name: (B, N, D) tensor}`` at the first call,
          before any work: the prior's width (and token count, token granularity) against
          the shapes of the streams its slots belong to.

        Raises ValueError naming the mismatch and the fix."""
        who = self._who()
        if model is not None:
            cls, h = model_fingerprint(model)
            if cls != self.meta.get("model_class") or h != self.meta.get("config_hash"):
                raise ValueError(
                    f"{method}: this profile was made for {self.meta.get('model_class')} "
                    f"(config hash {self.meta.get('config_hash')}), not for this {cls} (config hash {h}); "
                    f"calibrate this model: profile = fastcache.calibrate(model, run){self._file()}"
                )
            width = model_width(model)
            if uses_prior and width is not None and int(self.prior.shape[-1]) != width:
                raise ValueError(
                    f"{method}: {who} has a prior of width {int(self.prior.shape[-1])} (its last dimension) but "
                    f"{cls}'s hidden width is {width}; the profile was edited or made for another model: "
                    "calibrate this model: profile = fastcache.calibrate(model, run)"
                )
        if slots is not None and list(slots) != self.slots:
            raise ValueError(
                f"{method}: {who}'s {len(self.slots)} slots do not match the model's {len(slots)} "
                "(block, branch, stream) slots; calibrate again: profile = fastcache.calibrate(model, run)"
            )
        if num_steps is not None and int(num_steps) != self.num_steps:
            raise ValueError(
                f"{method}: the run has {int(num_steps)} steps but {who} was recorded over {self.num_steps}-step "
                f"runs (its prior is indexed by step); calibrate again with {int(num_steps)}-step runs "
                f"(fastcache.calibrate) or sample with {self.num_steps} steps"
            )
        if timesteps is not None:
            self._check_timesteps(timesteps, method)
        if streams is not None and uses_prior:
            self._check_streams(streams, method)

    def _check_timesteps(self, timesteps, method: str) -> bool:
        """Warn once (RuntimeWarning) when the run's timesteps are not the profile's; True if they match."""
        mine = self.meta.get("timesteps")
        if mine is None:
            return True
        run = [float(v) for v in timesteps]
        same = len(run) == len(mine) and all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(run, mine))
        if not same:
            key = (tuple(round(v, 6) for v in run), method)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(timesteps_message(self, run, method), RuntimeWarning, stacklevel=3)
        return same

    def _check_streams(self, streams: dict, method: str) -> None:
        tok = self.granularity == "token"
        want = tuple(int(v) for v in self.prior.shape[2:])  # (D,) or (N, D)
        for key in self.slots:
            name = key.split(".", 2)[-1]
            t = streams.get(name)
            if t is None:
                continue
            got = tuple(int(v) for v in t.shape[1:]) if tok else (int(t.shape[-1]),)
            if got != want:
                what = "tokens x width (N, D)" if tok else "width D"
                fix = (
                    "a token-granularity profile holds one row per token, so it fits one resolution only: "
                    "calibrate at this resolution, or use granularity='channel'"
                    if tok
                    else "calibrate this model: profile = fastcache.calibrate(model, run)"
                )
                raise ValueError(
                    f"{method}: {self._who()}'s prior has {what} {want} for slot {key!r} but this call's stream "
                    f"{name!r} has {got} (shape {tuple(t.shape)}); {fix}"
                )

    # -- I/O -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the profile to ``path`` atomically (a temporary file in the same folder,
        then ``os.replace``): an interrupted or failed write leaves any earlier file whole."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": str(FORMAT_VERSION),
            "meta": json.dumps(self.meta, sort_keys=True),
            "slots": json.dumps(self.slots),
            "schedules": json.dumps({str(k): v for k, v in sorted(self.schedules.items())}, sort_keys=True),
        }
        tensors = {
            "prior": self.prior.cpu(),  # host-read-ok: saving a profile, off the step path
            "teacache_pairs": torch.from_numpy(self.teacache_pairs.copy()),
        }
        if self.mag_ratios is not None:
            tensors["mag_ratios"] = self.mag_ratios.cpu()  # host-read-ok: saving a profile
        if self.block_change is not None:
            tensors["block_change"] = self.block_change.cpu()  # host-read-ok: saving a profile
        if self.step_gram is not None:
            tensors["step_gram"] = self.step_gram.cpu()  # host-read-ok: saving a profile
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a saved profile; every defect is a ValueError naming the file, the field
        and the fix (never a bare safetensors / JSON / key error)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no profile at {path}; make one with fastcache.calibrate(model, run).save(path)")
        remake = "make it again: fastcache.calibrate(model, run).save(path)"
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                keys = set(f.keys())
                if md.get("format") not in READABLE_FORMATS:
                    raise _NotAProfile(
                        f"{path} is not a fastcache profile this version reads (format {md.get('format')!r}; readable: "
                        f"{', '.join(READABLE_FORMATS)}); {remake}"
                    )
                missing = [k for k in ("prior", "teacache_pairs") if k not in keys]
                if missing:
                    raise _NotAProfile(f"profile {path}: the tensor {missing[0]!r} is missing; {remake}")
                prior = f.get_tensor("prior")
                pairs = f.get_tensor("teacache_pairs").numpy()  # host-read-ok: loading a profile
                mag = f.get_tensor("mag_ratios") if "mag_ratios" in keys else None
                change = f.get_tensor("block_change") if "block_change" in keys else None
                gram = f.get_tensor("step_gram") if "step_gram" in keys else None
        except _NotAProfile as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # safetensors' own errors: empty, truncated, not safetensors at all
            size = path.stat().st_size
            raise ValueError(
                f"profile {path} cannot be read as safetensors ({size} bytes; {type(e).__name__}: {e}): the file is "
                f"empty, truncated (an interrupted copy or write) or not a profile (e.g. plain JSON); {remake}"
            ) from None

        def field(name: str, default=None, kind=None):
            if name not in md:
                if default is not None:
                    return default
                raise ValueError(f"profile {path}: the metadata has no {name!r} field; {remake}")
            try:
                v = json.loads(md[name])
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"profile {path}: the metadata field {name!r} is not valid JSON ({e}); {remake}"
                ) from None
            if kind is not None and not isinstance(v, kind):
                raise ValueError(
                    f"profile {path}: the metadata field {name!r} must be a JSON {kind.__name__}, got "
                    f"{type(v).__name__}; {remake}"
                )
            return v

        slots = field("slots", kind=list)
        meta = field("meta", kind=dict)
        for k in ("model_class", "config_hash", "granularity"):
            if k not in meta:
                raise ValueError(f"profile {path}: the metadata field 'meta' has no {k!r}; {remake}")
        schedules = field("schedules", {}, dict)
        return cls(prior, slots, meta, pairs, mag, change, gram, schedules, source=str(path))

    def schedule(self, budget: int):
        """The :class:`fastcache.ScheduleConfig` searched for ``budget`` computed steps and
        stored in this profile (:meth:`fastcache.ScheduleSearchResult.store`)."""
        if int(budget) not in self.schedules:
            have = sorted(self.schedules) or "none"
            raise KeyError(
                f"this profile holds no schedule for {budget} computed steps (it holds: {have}); search one with "
                "fastcache.search_schedule(model, runs, budget, profile=profile) and store it"
            )
        self.validate()  # a schedule edited in memory since the load is checked as a stored one
        entry = self.schedules[int(budget)]
        plan = entry["plan"]
        # through the config registry: the profile does not import the policies
        d = {"kind": "schedule", "plan": plan, "profile": self if "E" in plan else None}
        if "F" in plan.upper():
            d["fit"] = entry["fit"]  # {"step": coefficients} (format 4); ScheduleConfig checks them
        return CacheConfig.from_dict(d)

    def require(self, curve: str, method: str) -> torch.Tensor:
        """The calibrated curve ``curve`` ("mag_ratios" or "block_change"), or a clear error
        for a profile that lacks it (a format-1 file, made before the curve existed)."""
        t = getattr(self, curve)
        if t is None:
            raise ValueError(
                f"{method}: this profile has no {curve} curve (made by an older fastcache, profile format 1); "
                "calibrate again: profile = fastcache.calibrate(model, run)"
            )
        return t

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Profile({m.get('model_class')}, {m.get('num_steps')} steps, {len(self.slots)} slots, "
            f"{m.get('granularity')}, {self.nbytes()} bytes)"
        )


class TimestepWatch:
    """The run's timesteps against the profile's, on the device (no host read on the step
    path): :meth:`observe` counts the steps whose timestep is not the profile's at that
    step index and keeps the first such pair; :meth:`report` (stats, off the step path)
    turns them into a warning naming both. A profile without recorded timesteps is not
    watched."""

    def __init__(self, profile: Profile, method: str):
        self.profile, self.method = profile, method
        ts = profile.meta.get("timesteps")
        self.timesteps = None if ts is None else [float(v) for v in ts]
        self._tables: dict[torch.device, torch.Tensor] = {}

    def new_record(self, dev) -> torch.Tensor | None:
        """``(4,)`` fp32: mismatched steps, the first one's run timestep, profile timestep, step."""
        return None if self.timesteps is None else torch.zeros(4, dtype=torch.float32, device=dev)

    def observe(self, rec: torch.Tensor | None, t: torch.Tensor | None, s_idx: torch.Tensor) -> None:
        """Device ops only: compare ``t`` (the call's timestep) with the profile's at step ``s_idx``."""
        if rec is None or t is None:
            return
        dev = rec.device
        table = self._tables.get(dev)
        if table is None:
            table = self._tables[dev] = torch.tensor(self.timesteps, dtype=torch.float32, device=dev)
        s = s_idx.reshape(-1)[:1].to(device=dev, dtype=torch.long)
        want = table.index_select(0, s.clamp(min=0, max=table.numel() - 1))
        got = t.reshape(-1)[:1].to(device=dev, dtype=torch.float32)
        bad = ((got - want).abs() > 1e-4 * want.abs().clamp(min=1.0)) | (s >= table.numel())
        first = bad & (rec[:1] == 0)
        new = torch.cat([rec[:1] + bad.to(torch.float32), got, want, s.to(torch.float32)])
        rec.copy_(torch.where(first, new, torch.cat([new[:1], rec[1:]])))

    def report(self, rec: torch.Tensor | None) -> tuple[int, str | None]:
        """(mismatched steps, a warning or None); reads ``rec`` (stats only)."""
        if rec is None:
            return 0, None
        n, got, want, s = rec.detach().cpu().tolist()  # host-read-ok: stats are read off the step path
        if not n:
            return 0, None
        return int(n), (
            f"{self.method}: {int(n)} step(s) ran at a timestep that is not the profile's: at step {int(s)} the "
            f"run's timestep was {got:g} where {self.profile._who()} has {want:g} (its timesteps: "
            f"{_short(self.timesteps)}); the prior is indexed by step, so its trend there is another schedule's. "
            "Calibrate with the sampler, step count and timestep spacing you sample with"
        )


def _short(ts) -> str:
    ts = [round(float(v), 4) for v in ts]
    return "[" + ", ".join(f"{v:g}" for v in ts[:6]) + (", ..." if len(ts) > 6 else "") + f"] ({len(ts)} steps)"


def load_profile(prof, owner: str):
    """A :class:`fastcache.Profile` from a Profile or a path to a saved one."""
    if isinstance(prof, (str, bytes)) or hasattr(prof, "__fspath__"):
        prof = Profile.load(prof)
    if not isinstance(prof, Profile):
        raise ValueError(
            f"{owner}.profile must be a fastcache.Profile (profile = fastcache.calibrate(model, run)) or a path to a "
            f"saved one, got {type(prof).__name__}"
        )
    return prof
