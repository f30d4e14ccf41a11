"""gradaudit: audit what federated-learning updates leak, and what each defense costs."""

from __future__ import annotations

__version__ = "0.1.0"
