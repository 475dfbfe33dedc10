"""The digits data set (scikit-learn ``load_digits``, offline) at 16x16, and the shipped
digits DiT weights: saving and loading.

The shipped model lives in ``fastcache/models/weights/``:

* ``digits_dit.safetensors``: the EMA weights in float16 (pos_embed is a fixed buffer
  rebuilt at construction, so it is not stored);
* ``digits_dit.json``: ``{"model": DiTConfig.to_dict(), "schedule": {...}, "training": {...}}``.

Both are produced by ``bench/train_digits_dit.py``.

Example::

    model = load_digits_dit()                 # DiT in eval mode, float32, CPU
    images, labels = load_digits_16()         # (1797, 1, 16, 16) in [-1, 1], (1797,)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .dit import DiT, DiTConfig

__all__ = [
    "TRAIN_SCHEDULE",
    "WEIGHTS_CONFIG",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "class_means",
    "load_digits_16",
    "load_digits_dit",
    "read_digits_dit_metadata",
    "save_digits_dit",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "digits_dit.safetensors"
WEIGHTS_CONFIG = WEIGHTS_DIR / "digits_dit.json"

# The DDPM noise schedule the shipped model was trained with (DDPM paper defaults);
# samplers must use the same one (see fastcache.models.sampling.make_ddim_scheduler).
TRAIN_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

_RETRAIN_HINT = "regenerate it with `python bench/train_digits_dit.py` (about 20 minutes on 2 CPU cores)"


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits, bilinearly upsampled to 16x16 and scaled to [-1, 1].

    Returns ``(images (1797, 1, 16, 16) float32, labels (1797,) int64)``. Works offline:
    the data ships inside scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_16 needs scikit-learn (it ships the digits data): pip install scikit-learn"
        ) from e
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.from_numpy(digits.target).long()
    return x.contiguous(), y


def class_means(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Per-class mean image: ``(N, C, H, W), (N,) -> (num_classes, C, H, W)``."""
    missing = [k for k in range(num_classes) if not bool((labels == k).any())]
    if missing:
        raise ValueError(f"class_means: no image with label(s) {missing}; every class 0..{num_classes - 1} needs one")
    return torch.stack([images[labels == k].mean(dim=0) for k in range(num_classes)])


def save_digits_dit(
    model: DiT,
    metadata: dict[str, Any] | None = None,
    directory: Path | str = WEIGHTS_DIR,
    dtype: torch.dtype = torch.float16,
) -> tuple[Path, Path]:
    """Write ``model``'s state_dict (cast to ``dtype``) and its config JSON into ``directory``.

    ``metadata`` may carry ``"schedule"`` and ``"training"`` entries; the model config is
    always written under ``"model"``. Returns ``(weights_path, config_path)``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_FILE.name
    config_path = directory / WEIGHTS_CONFIG.name
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": "pt", "dtype": str(dtype)})
    doc = {"model": model.config.to_dict(), "schedule": dict(TRAIN_SCHEDULE)}
    doc.update(metadata or {})
    doc["model"] = model.config.to_dict()
    config_path.write_text(json.dumps(doc, indent=2) + "\n")
    return weights_path, config_path


def read_digits_dit_metadata(directory: Path | str = WEIGHTS_DIR) -> dict[str, Any]:
    """The JSON written next to the shipped weights (model config, schedule, training log)."""
    config_path = Path(directory) / WEIGHTS_CONFIG.name
    if not config_path.is_file():
        raise FileNotFoundError(f"digits DiT config {config_path} is missing: {_RETRAIN_HINT}")
    return json.loads(config_path.read_text())


def load_digits_dit(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    directory: Path | str = WEIGHTS_DIR,
) -> DiT:
    """Load the shipped class-conditional digits DiT (offline), in eval mode.

    Weights are stored in float16 and cast to ``dtype`` on ``device``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    weights_path = directory / WEIGHTS_FILE.name
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"digits DiT weights {weights_path} are missing: reinstall fastcache with its package data "
            f"(fastcache/models/weights/*.safetensors) or {_RETRAIN_HINT}"
        )
    meta = read_digits_dit_metadata(directory)
    if "model" not in meta:
        raise ValueError(f"{directory / WEIGHTS_CONFIG.name} has no 'model' entry (the DiTConfig): {_RETRAIN_HINT}")
    model = DiT.from_config(DiTConfig.from_dict(meta["model"]))
    state = load_file(str(weights_path))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"digits DiT weights {weights_path} do not match the config in {WEIGHTS_CONFIG.name}: {_RETRAIN_HINT}"
        ) from e
    return model.to(device=device, dtype=dtype).eval()
