"""Which clients take part in a round, and which of them drop out before sending."""

from __future__ import annotations

import numpy as np


def sample_clients(
    num_clients: int,
    *,
    clients_per_round: int | None,
    sample_rate: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """The sorted ids of the clients asked to train this round.

    A fixed-size uniform sample without replacement when `clients_per_round` is set; Poisson
    sampling (each client independently with probability `sample_rate`, so the cohort may be
    empty) when `sample_rate` is set; otherwise every client.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> sample_clients(5, clients_per_round=None, sample_rate=None, rng=rng)
        array([0, 1, 2, 3, 4])
    """
    if clients_per_round is not None:
        return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))
    if sample_rate is not None:
        return np.flatnonzero(rng.random(num_clients) < sample_rate)
    return np.arange(num_clients)


def drop_clients(
    sampled: np.ndarray, *, dropout_rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split the sampled clients into (survivors, dropped); each drops with `dropout_rate`."""
    if dropout_rate <= 0 or sampled.size == 0:
        return sampled, sampled[:0]
    dropped = rng.random(sampled.size) < dropout_rate
    return sampled[~dropped], sampled[dropped]
