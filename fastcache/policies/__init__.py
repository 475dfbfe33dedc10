"""Caching policies: one file per method; each registers itself for its config type."""

from .base import Policy, StackRunner, policy_for, register_policy
from .teacache import TeaCachePolicy

__all__ = ["Policy", "StackRunner", "TeaCachePolicy", "policy_for", "register_policy"]
