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

The file is safetensors (tensors ``prior``, ``teacache_pairs``, ``mag_ratios``,
``block_change``, ``step_gram``) with JSON metadata: model class, a hash of the model's
config and parameter shapes, the number of steps per run, the scheduler and its
timesteps, the slot keys, the granularity, the schedules. Format-1 and -2 files still
load (format 1: ``mag_ratios = block_change = None``; both: ``step_gram = None``, no
schedules); the configs and searches that need a curve refuse such a profile and say to
calibrate again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 3
READABLE_FORMATS = ("1", "2", "3")  # format 1: no mag_ratios / block_change; 2: no step_gram / schedules
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
    ):
        if meta.get("granularity") not in GRANULARITIES:
            raise ValueError(f"profile granularity must be one of {GRANULARITIES}, got {meta.get('granularity')!r}")
        want_dim = 3 if meta["granularity"] == "channel" else 4
        if prior.dim() != want_dim or prior.shape[1] != len(slots):
            raise ValueError(
                f"profile prior has shape {tuple(prior.shape)}; expected {want_dim} dims with {len(slots)} slots"
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
        self.schedules: dict[int, dict] = {int(k): dict(v) for k, v in (schedules or {}).items()}

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
    def check(self, model: nn.Module, slots: list[str] | None = None) -> None:
        """Refuse a profile made for another model (class, config) or another block layout."""
        cls, h = model_fingerprint(model)
        if cls != self.meta.get("model_class") or h != self.meta.get("config_hash"):
            raise ValueError(
                f"fastcache: this profile was made for {self.meta.get('model_class')} "
                f"(config hash {self.meta.get('config_hash')}), not for this {cls} (config hash {h}); "
                "calibrate this model: profile = fastcache.calibrate(model, run)"
            )
        if slots is not None and list(slots) != self.slots:
            raise ValueError(
                f"fastcache: the profile's {len(self.slots)} slots do not match the model's {len(slots)} "
                "(block, branch, stream) slots; calibrate again"
            )

    # -- I/O -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
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
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no profile at {path}; make one with fastcache.calibrate(model, run).save(path)")
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") not in READABLE_FORMATS:
                raise ValueError(
                    f"{path} is not a fastcache profile this version reads (format {md.get('format')!r}; readable: "
                    f"{', '.join(READABLE_FORMATS)}); make it again with fastcache.calibrate(model, run).save(path)"
                )
            prior = f.get_tensor("prior")
            pairs = f.get_tensor("teacache_pairs").numpy()  # host-read-ok: loading a profile
            keys = set(f.keys())
            mag = f.get_tensor("mag_ratios") if "mag_ratios" in keys else None
            change = f.get_tensor("block_change") if "block_change" in keys else None
            gram = f.get_tensor("step_gram") if "step_gram" in keys else None
        schedules = json.loads(md.get("schedules", "{}"))
        return cls(prior, json.loads(md["slots"]), json.loads(md["meta"]), pairs, mag, change, gram, schedules)

    def schedule(self, budget: int):
        """The :class:`fastcache.ScheduleConfig` searched for ``budget`` computed steps and
        stored in this profile (:meth:`fastcache.ScheduleSearchResult.store`)."""
        from .config import ScheduleConfig

        if int(budget) not in self.schedules:
            have = sorted(self.schedules) or "none"
            raise KeyError(
                f"this profile holds no schedule for {budget} computed steps (it holds: {have}); search one with "
                "fastcache.search_schedule(model, runs, budget, profile=profile) and store it"
            )
        plan = self.schedules[int(budget)]["plan"]
        return ScheduleConfig(plan=plan, profile=self if "E" in plan else None)

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
