"""Threat models: what each adversary observes of a round."""

from gradaudit.threat.observe import (
    AGGREGATE_CLIENT,
    aggregate_indices,
    aggregate_view,
    describe_threat,
    observe,
    observe_batch,
    observe_fedavg,
)

__all__ = [
    "AGGREGATE_CLIENT",
    "aggregate_indices",
    "aggregate_view",
    "describe_threat",
    "observe",
    "observe_batch",
    "observe_fedavg",
]
