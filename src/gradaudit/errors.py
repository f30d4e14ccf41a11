"""The exceptions gradaudit raises; each names what went wrong and where."""

from __future__ import annotations


class GradauditError(Exception):
    """Base class of every error gradaudit raises on purpose."""


class ConfigError(GradauditError):
    """A scenario, an override or a component's parameters are invalid (exit code 2)."""


class DataError(GradauditError):
    """A dataset file is missing, unreadable or malformed."""


class UnknownComponentError(ConfigError, KeyError):
    """A registry lookup named a component that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""
