"""Reference models for fastcache: a small class-conditional DiT trained on digits,
its shipped weights, a DDIM + CFG sampler and quality measures.

Example::

    from fastcache.models import load_digits_dit, sample_digits, psnr
    model = load_digits_dit()
    images = sample_digits(model, torch.arange(10), num_steps=20)   # (10, 1, 16, 16) in [-1, 1]
"""

from .digits import (
    TRAIN_SCHEDULE,
    WEIGHTS_DIR,
    class_means,
    load_digits_16,
    load_digits_dit,
    read_digits_dit_metadata,
    save_digits_dit,
)
from .dit import DiT, DiTBlock, DiTConfig, modulate
from .metrics import class_match_accuracy, nearest_class, psnr
from .sampling import (
    DEFAULT_CFG_SCALE,
    image_grid,
    make_ddim_scheduler,
    sample_digits,
    save_image_grid,
)

__all__ = [
    "DEFAULT_CFG_SCALE",
    "TRAIN_SCHEDULE",
    "WEIGHTS_DIR",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "class_match_accuracy",
    "class_means",
    "image_grid",
    "load_digits_16",
    "load_digits_dit",
    "make_ddim_scheduler",
    "modulate",
    "nearest_class",
    "psnr",
    "read_digits_dit_metadata",
    "sample_digits",
    "save_digits_dit",
    "save_image_grid",
]
