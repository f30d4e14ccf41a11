"""The question an inference attack answers: the candidates it is shown and the private truth.

A membership attack is a game (Yeom et al. 2018; Carlini et al. 2022): the adversary is shown
records, some of which a client trained on, and scores each. The records it is shown are public
to it by the rules of the game; which of them are members is not, and stays here for scoring.

Each question has a builder, registered by name in :data:`CHALLENGES`; the runner builds one
challenge per question the scenario's attacks ask, so every attack on the same question is scored
on the same records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from gradaudit.config import Scenario
from gradaudit.data.base import Dataset
from gradaudit.federation import FederationResult
from gradaudit.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChallengeInputs:
    """PRIVATE: what a challenge builder may read (the scenario's data and the finished run).

    Attributes:
        scenario: the scenario.
        dataset: the dataset, private training split included.
        clients: per client, its indices into the training split.
        federation: the finished federation (its captured rounds hold the local plans).
        rng: the challenge's random stream.
    """

    scenario: Scenario
    dataset: Dataset
    clients: Sequence[np.ndarray]
    federation: FederationResult
    rng: np.random.Generator


@dataclass(frozen=True)
class Challenge:
    """One inference question, ready to be asked and scored.

    Attributes:
        question: ``membership``, ``source``, ``attribute`` or ``property``.
        kind: ``binary`` (scores (N,), truth bool: higher should mean True) or ``choice``
            (scores (N, K), truth an answer index in [0, K)).
        public: what the adversary is shown, put into ``side_info["candidates"]``; at least
            ``x`` and ``y`` (tensors in model space) for questions about records.
        truth: PRIVATE: the answer per candidate.
        record_ids: a stable name per candidate for the per-record scores file (e.g.
            ``train:17``, ``test:3``).
        baseline: for ``choice``: the answer a predictor that never saw the model gives per
            candidate (the report states the attack's gain over it); None when chance is the
            baseline.
        held_out: indices into the test split the challenge uses as non-members; the runner
            withholds them from the adversary's public data.
        notes: sentences for the report (e.g. too few non-members for a false-positive rate).
    """

    question: str
    kind: Literal["binary", "choice"]
    public: Mapping[str, object]
    truth: np.ndarray
    record_ids: tuple[str, ...]
    baseline: np.ndarray | None = None
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.record_ids) != len(self.truth):
            raise ValueError(f"{len(self.record_ids)} record ids for {len(self.truth)} candidates")


ChallengeBuilder = Callable[[ChallengeInputs], Challenge]

CHALLENGES: Registry[ChallengeBuilder] = Registry("inference question")
"""Every inference question, by name, with the builder of its challenge."""


@CHALLENGES.register(
    "membership",
    summary="the target client's training records mixed with as many held-out records; "
    "was each one trained on?",
)
def membership_challenge(inputs: ChallengeInputs) -> Challenge:
    """Members: the target client's records; non-members: records of the held-out test split.

    ``threat.candidates.members`` caps the members (a random subset), and
    ``threat.candidates.non_members`` sets the non-members (default: as many as members). The
    candidates are shuffled so their order says nothing.
    """
    spec = inputs.scenario.threat.candidates
    target = inputs.scenario.threat.target.client
    rng = inputs.rng
    owned = np.asarray(inputs.clients[target], dtype=np.int64)
    if owned.size == 0:
        raise ValueError(f"client {target} holds no records: there are no members to test")
    members = owned
    if spec.members is not None and spec.members < owned.size:
        members = np.sort(rng.choice(owned, size=spec.members, replace=False))
    wanted = spec.non_members if spec.non_members is not None else members.size
    available = len(inputs.dataset.y_test)
    notes: list[str] = []
    if wanted > available:
        notes.append(
            f"only {available} held-out records exist, fewer than the {wanted} non-members asked "
            "for; all of them are used"
        )
        wanted = available
    held_out = np.sort(rng.choice(available, size=wanted, replace=False)).astype(np.int64)
    data = inputs.dataset
    x = torch.cat([data.x_train[torch.as_tensor(members)], data.x_test[torch.as_tensor(held_out)]])
    y = torch.cat([data.y_train[torch.as_tensor(members)], data.y_test[torch.as_tensor(held_out)]])
    truth = np.concatenate([np.ones(members.size, bool), np.zeros(held_out.size, bool)])
    ids = [f"train:{i}" for i in members] + [f"test:{j}" for j in held_out]
    order = rng.permutation(truth.size)
    index = torch.as_tensor(order)
    return Challenge(
        question="membership",
        kind="binary",
        public={"x": x[index].clone(), "y": y[index].clone()},
        truth=truth[order],
        record_ids=tuple(ids[i] for i in order),
        held_out=held_out,
        notes=tuple(notes),
    )


def public_records(dataset: Dataset, challenges: Sequence[Challenge]) -> tuple[torch.Tensor, ...]:
    """The held-out split without the records any challenge uses as non-members.

    Public data is, by definition, data no client trained on; a non-member candidate inside it
    would tell the adversary the answer.
    """
    withheld = np.unique(np.concatenate([c.held_out for c in challenges] or [np.zeros(0)]))
    keep = np.setdiff1d(np.arange(len(dataset.y_test)), withheld.astype(np.int64))
    index = torch.as_tensor(keep, dtype=torch.long)
    return dataset.x_test[index], dataset.y_test[index]


__all__ = [
    "CHALLENGES",
    "Challenge",
    "ChallengeBuilder",
    "ChallengeInputs",
    "membership_challenge",
    "public_records",
]
