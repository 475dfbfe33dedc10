"""fastcache: kernel-fused, sync-free caching for diffusion transformers."""

from . import ops

__version__ = "0.1.0"
