"""Threat models: what each adversary observes of a round."""

from gradaudit.threat.observe import describe_threat, observe

__all__ = ["describe_threat", "observe"]
