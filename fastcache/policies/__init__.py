"""Caching policies: one file per method; each registers itself for its config type."""

from .base import Policy, StackRunner, policy_for, register_policy
from .block_cache import BlockCachePolicy
from .eoc import EOCPolicy
from .first_block import FirstBlockCachePolicy
from .fora import FORAPolicy, InteriorCachePolicy
from .magcache import MagCachePolicy
from .teacache import TeaCachePolicy

__all__ = [
    "BlockCachePolicy",
    "MagCachePolicy",
    "EOCPolicy",
    "FirstBlockCachePolicy",
    "FORAPolicy",
    "InteriorCachePolicy",
    "Policy",
    "StackRunner",
    "TeaCachePolicy",
    "policy_for",
    "register_policy",
]
