"""Network doubles shared by the tests of the one-stage protocols (ckks, paillier)."""

from __future__ import annotations

import numpy as np

from gradaudit.config import NetworkSpec
from gradaudit.defenses.server.network import Network


def upload_network(dropout: float = 0.0, seed: int = 0) -> Network:
    """A network for the single ``upload`` stage (reliable unless `dropout`)."""
    spec = NetworkSpec(dropout=dropout) if dropout else None
    return Network(spec, ("upload",), np.random.default_rng(seed))


class Tamper:
    """A reliable network that rewrites one client's upload on its way."""

    def __init__(self, client: int, change) -> None:
        self.inner = upload_network()
        self.client = client
        self.change = change

    def deliver(self, stage, messages):
        arrived = self.inner.deliver(stage, messages)
        if self.client in arrived:
            arrived[self.client] = self.change(arrived[self.client])
        return arrived

    def __getattr__(self, name):
        return getattr(self.inner, name)
