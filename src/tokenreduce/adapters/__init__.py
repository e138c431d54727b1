"""Adapters place reducers at the integration points of real model families."""

from .base import ADAPTERS, Handle, Stats, find_adapter

__all__ = ["ADAPTERS", "Handle", "Stats", "find_adapter"]
