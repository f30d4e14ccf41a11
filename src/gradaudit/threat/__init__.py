"""Threat models: what each adversary observes of a round."""

from gradaudit.threat.observe import describe_threat, observe, observe_batch, observe_fedavg

__all__ = ["describe_threat", "observe", "observe_batch", "observe_fedavg"]
