"""Caching policies: one file per method; each registers itself for its config type."""

from .base import Policy, StackRunner, policy_for, register_policy
from .teacache import TeaCachePolicy
from .fora import FORAPolicy, InteriorCachePolicy
from .eoc import EOCPolicy

__all__ = [
    "EOCPolicy",
    "FORAPolicy",
    "InteriorCachePolicy",
    "Policy",
    "StackRunner",
    "TeaCachePolicy",
    "policy_for",
    "register_policy",
]
