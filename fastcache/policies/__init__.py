"""Caching policies: one file per method; each registers itself for its config type."""

from .base import Policy, StackRunner, policy_for, register_policy
from .eoc import EOCPolicy
from .fora import FORAPolicy, InteriorCachePolicy
from .teacache import TeaCachePolicy

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
