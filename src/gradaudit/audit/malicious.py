"""A malicious server's own copy of the federation: it sends the target an edited model.

An attack that changes what the server sends (e.g. ``membership_active``, Nasr et al. 2019)
cannot run on the honest run's transcript. The runner replays the federation, with the same
seed, data and defenses, up to the target round, in which the server sends the target client
the model the attack's ``edit`` makes; the other clients and every other round are honest. The
attack then sees that round as the malicious server does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
from torch import nn

from gradaudit.config import Scenario
from gradaudit.data.base import Dataset
from gradaudit.defenses import build_defenses
from gradaudit.defenses.base import DefenseContext
from gradaudit.federation import run_federation
from gradaudit.threat import observe
from gradaudit.threat.challenge import Challenge
from gradaudit.threat.observe import PublicData
from gradaudit.types import Observation, TensorDict, Visibility

logger = logging.getLogger(__name__)


@runtime_checkable
class EditsModel(Protocol):
    """An attack whose server changes the model it sends the target client (it declares
    ``edits_model = True`` and says what to send with :meth:`edit`)."""

    edits_model: ClassVar[bool]

    def edit(self, obs: Observation, model: nn.Module) -> TensorDict:
        """The model to send the target instead of ``obs.global_params``."""
        ...


def malicious_observation(
    attack: EditsModel,
    scenario: Scenario,
    dataset: Dataset,
    clients: Sequence[np.ndarray],
    challenge: Challenge,
    *,
    build_model: Callable[[], nn.Module],
    public_data: PublicData,
) -> Observation | str:
    """The target round as a malicious server that ran `attack`'s edit sees it.

    The federation is replayed from a fresh model with freshly built defenses (both hold state)
    for ``threat.target.round`` rounds; in the target round the target client receives
    ``attack.edit`` of the honest global model. The observation's ``global_params`` is the model
    the target received; ``side_info["honest_global_params"]`` is the honest one, which the
    server computed too.

    Returns:
        The observation, or the reason the attack cannot run (the server is not malicious, the
        protocol hides individual updates, or the target did not take part in the round).
    """
    threat = scenario.threat
    if threat.behaviour != "malicious":
        return (
            "the attack changes the model the server sends, and the threat model's server is "
            "honest-but-curious (set threat.behaviour: malicious)"
        )
    target = threat.target
    model = build_model()
    sizes = tuple(len(c) for c in clients)
    context = DefenseContext(model, scenario.federation, sizes, dataset.info, scenario.seed)
    defenses, protocol = build_defenses(scenario.defenses, context)
    if protocol is not None and protocol.visibility is not Visibility.INDIVIDUAL:
        return (
            f"the server sees only the aggregate under {protocol.name}, so it cannot see how the "
            "target answered the edited model"
        )
    side = {"candidates": challenge.public}  # all the edit reads besides the global model

    def server_edit(rnd: int, state: TensorDict) -> dict[int, TensorDict]:
        if rnd != target.round:
            return {}
        before = Observation(rnd, target.client, state, (), None, side, dataset.info)
        return {target.client: attack.edit(before, build_model())}

    logger.info("replaying %d rounds as a malicious server", target.round)
    fed = run_federation(
        model,
        dataset,
        clients,
        scenario.federation.model_copy(update={"rounds": target.round}),
        seed=scenario.seed,
        capture_rounds={target.round},
        defenses=defenses,
        protocol=protocol,
        server_edit=server_edit,
    )
    capture = fed.captures.get(target.round)
    if capture is None:
        return f"the replayed federation stopped before round {target.round}: {fed.stopped}"
    seen = observe(
        threat,
        capture,
        scenario.federation,
        dataset.info,
        dataset.y_train,
        public_data=public_data,
    )
    return replace(
        seen,
        global_params=capture.received(target.client),
        side_info={
            **seen.side_info,
            "candidates": challenge.public,
            "honest_global_params": capture.global_state,
        },
    )
