"""Caching policies: one file per method; each registers itself for its config type."""

from .base import Policy, StackRunner, policy_for, register_policy
from .eoc import EOCPolicy
from .first_block import FirstBlockCachePolicy
from .fora import FORAPolicy, InteriorCachePolicy
from .teacache import TeaCachePolicy
from .tgate import TGatePolicy

__all__ = [
    "EOCPolicy",
    "FirstBlockCachePolicy",
    "FORAPolicy",
    "InteriorCachePolicy",
    "Policy",
    "StackRunner",
    "TeaCachePolicy",
    "TGatePolicy",
    "policy_for",
    "register_policy",
]
