"""Frame layouts of video families (``ModelSpec.frame_layout``): how many frames the
video tokens of a model call hold and how many tokens each frame has, read from the
call's latents and the model's patch sizes (shapes and config only: no device value)."""

from __future__ import annotations

import torch


def patched_layout(x, pt: int, ph: int, pw: int, frames_dim: int = 2) -> tuple[int, int] | None:
    """Latents ``x`` (5-D: batch, then channels and frames in either order, then height,
    width; ``frames_dim`` says where the frames are) cut into ``pt x ph x pw`` patches,
    frame-major: ``(F // pt, (H // ph) * (W // pw))``; None when ``x`` is not 5-D latents."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    f, h, w = x.shape[frames_dim], x.shape[3], x.shape[4]
    return f // (pt or 1), (h // ph) * (w // pw)


def config_layout(model, x, spatial: str = "patch_size", temporal: str | None = "patch_size_t", frames_dim: int = 2):
    """:func:`patched_layout` with the patch sizes from ``model.config`` (``temporal``
    None or unset: 1)."""
    cfg = model.config
    p = getattr(cfg, spatial)
    pt = (getattr(cfg, temporal, None) if temporal else None) or 1
    return patched_layout(x, pt, p, p, frames_dim)
