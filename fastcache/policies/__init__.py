"""Caching policies: one file per method; each registers itself for its config type."""

from .adacache import AdaCachePolicy
from .auto_branch import AutoBranchPolicy  # noqa: F401  (the automatic path's FORA, TaylorSeer, ScheduleConfig)
from .auto_stack import AutoFirstBlockPolicy  # noqa: F401  (registers the automatic First-Block Cache)
from .base import Policy, StackRunner, policy_for, register_policy
from .block_cache import BlockCachePolicy
from .delta_dit import DeltaDiTPolicy
from .eoc import EOCPolicy
from .first_block import FirstBlockCachePolicy
from .fora import FORAPolicy
from .interior_engine import InteriorCachePolicy
from .magcache import MagCachePolicy
from .schedule import SchedulePolicy
from .smoothcache import SmoothCachePolicy
from .taylorseer import TaylorSeerPolicy
from .teacache import TeaCachePolicy
from .tgate import TGatePolicy

__all__ = [
    "AdaCachePolicy",
    "BlockCachePolicy",
    "DeltaDiTPolicy",
    "EOCPolicy",
    "FirstBlockCachePolicy",
    "FORAPolicy",
    "InteriorCachePolicy",
    "MagCachePolicy",
    "Policy",
    "SchedulePolicy",
    "SmoothCachePolicy",
    "StackRunner",
    "TaylorSeerPolicy",
    "TeaCachePolicy",
    "TGatePolicy",
    "policy_for",
    "register_policy",
]
