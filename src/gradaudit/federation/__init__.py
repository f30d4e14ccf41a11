"""Simulated federations: local training (FedSGD/FedAvg), sampling, dropouts, the round loop."""

from gradaudit.federation.local import (
    LocalPlan,
    plan_local_batches,
    train_clients_loop,
    train_clients_vectorised,
)
from gradaudit.federation.loop import (
    Capture,
    FederationResult,
    RoundRecord,
    evaluate,
    run_federation,
)

__all__ = [
    "Capture",
    "FederationResult",
    "LocalPlan",
    "RoundRecord",
    "evaluate",
    "plan_local_batches",
    "run_federation",
    "train_clients_loop",
    "train_clients_vectorised",
]
