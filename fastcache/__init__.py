"""fastcache: kernel-fused caching for diffusion transformers (host reads per execution mode: docs/modes.md).

import fastcache
handle = fastcache.patch(transformer, fastcache.TeaCacheConfig(threshold=0.25))
...  # sample as usual; fastcache.stats(transformer) afterwards
handle.remove()
"""

from . import (
    families,  # noqa: F401  (registers the built-in model families)
    interior,  # noqa: F401  (fastcache.interior: the block-program API)
    ops,  # noqa: F401  (fastcache.ops: the fused ops)
    tuning,  # noqa: F401  (fastcache.tuning: calibration and search)
)
from ._shadow import prefer_installed_kernels
from .config import CacheConfig
from .pipeline import disable, enable, report
from .policies.adacache import AdaCacheConfig
from .policies.block_cache import BlockCacheConfig
from .policies.delta_dit import DeltaDiTConfig
from .policies.eoc import EOCConfig
from .policies.first_block import FirstBlockCacheConfig
from .policies.fora import FORAConfig
from .policies.magcache import MagCacheConfig
from .policies.schedule import ScheduleConfig
from .policies.smoothcache import SmoothCacheConfig
from .policies.taylorseer import TaylorSeerConfig
from .policies.teacache import TeaCacheConfig
from .policies.tgate import TGateConfig
from .runtime import Patch, announce_steps, context, get_patch, patch, patched, reset, stats, unpatch
from .specs import ModelSpec, register
from .tuning.calibration import calibrate
from .tuning.profile import Profile
from .tuning.schedule_search import ScheduleSearchResult, search_schedule
from .tuning.thresholds import search_threshold

__version__ = "0.1.0"

# run from a checkout (python -m, PYTHONPATH, spawned workers), the checkout's kernels/ folder
# would shadow the Hugging Face kernels package that transformers imports (fastcache._shadow)
prefer_installed_kernels()

__all__ = [
    "AdaCacheConfig",
    "BlockCacheConfig",
    "announce_steps",
    "CacheConfig",
    "DeltaDiTConfig",
    "MagCacheConfig",
    "EOCConfig",
    "FirstBlockCacheConfig",
    "FORAConfig",
    "Profile",
    "ScheduleConfig",
    "SmoothCacheConfig",
    "ScheduleSearchResult",
    "calibrate",
    "ModelSpec",
    "Patch",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "TGateConfig",
    "context",
    "disable",
    "enable",
    "get_patch",
    "patch",
    "patched",
    "register",
    "report",
    "reset",
    "search_schedule",
    "search_threshold",
    "stats",
    "unpatch",
]
