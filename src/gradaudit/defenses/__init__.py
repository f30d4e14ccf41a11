"""Defenses: client-side update transforms and server-side aggregation protocols."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradaudit.registry import Registry

CLIENT_DEFENSES: Registry[Callable[..., Any]] = Registry("client defense")
"""UpdateTransform factories, applied by each client to its update before sending."""

SERVER_DEFENSES: Registry[Callable[..., Any]] = Registry("server defense")
"""Aggregation protocols (secure aggregation, homomorphic encryption, robust aggregation)."""

__all__ = ["CLIENT_DEFENSES", "SERVER_DEFENSES"]
