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

The file is safetensors (tensors ``prior``, ``teacache_pairs``) with JSON metadata:
model class, a hash of the model's config and parameter shapes, the number of steps
per run, the scheduler and its timesteps, the slot keys, the granularity.
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

FORMAT_VERSION = 1
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
    """

    def __init__(self, prior: torch.Tensor, slots: list[str], meta: dict[str, Any], teacache_pairs=None):
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

    @property
    def num_steps(self) -> int:
        return self.meta["num_steps"]

    @property
    def granularity(self) -> str:
        return self.meta["granularity"]

    def nbytes(self) -> int:
        return self.prior.numel() * self.prior.element_size()

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
        }
        tensors = {
            "prior": self.prior.cpu(),  # host-read-ok: saving a profile, off the step path
            "teacache_pairs": torch.from_numpy(self.teacache_pairs.copy()),
        }
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
            if md.get("format") != str(FORMAT_VERSION):
                raise ValueError(f"{path} is not a fastcache profile of format {FORMAT_VERSION} (metadata: {md})")
            prior = f.get_tensor("prior")
            pairs = f.get_tensor("teacache_pairs").numpy()  # host-read-ok: loading a profile
        return cls(prior, json.loads(md["slots"]), json.loads(md["meta"]), pairs)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Profile({m.get('model_class')}, {m.get('num_steps')} steps, {len(self.slots)} slots, "
            f"{m.get('granularity')}, {self.nbytes()} bytes)"
        )
