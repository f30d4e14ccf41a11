"""What every attack implements, and the helpers attacks share."""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Callable, Mapping
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gradaudit.models import classifier_keys
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TaskInfo

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` during long attacks."""

Question = Literal["membership", "source", "attribute", "property"]
"""What an inference attack answers about the candidate records (see `threat.challenge`)."""


@runtime_checkable
class Attack(Protocol):
    """An adversary's algorithm: it gets an Observation (and the architecture) and nothing else."""

    name: ClassVar[str]
    question: ClassVar[Question | None]
    """None for an attack that reconstructs; else the inference question it answers, for which
    the runner puts the candidate records into ``side_info["candidates"]`` and scores the
    returned ``Reconstruction.scores``."""
    needs_history: ClassVar[bool]
    """Whether the attack reads ``Observation.history`` (every round, not only the target's)."""

    def applicable(self, obs: Observation) -> str | None:
        """None when the attack can run on `obs`, else the reason it cannot."""
        ...

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Attack the observation. `model` is the architecture; its weights are not meaningful."""
        ...


class Reconstructs:
    """Base of the attacks that reconstruct the target's examples (they answer no question).

    A subclass states its preconditions once, in `_update` (by default those of
    :func:`checked_update`), and those that need the architecture in `_target`; `applicable`
    and the subclass's `run` both read them from there.
    """

    name: ClassVar[str]
    question: ClassVar[Question | None] = None
    needs_history: ClassVar[bool] = False

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """The target's update if this attack can run on `obs`, else the reason."""
        return checked_update(obs, attack=self.name)

    def _target(self, obs: Observation, model: nn.Module) -> tuple[object, ...] | str:
        """What `run` needs once the architecture is known, or the reason the attack cannot
        run; by default the update of `_update`."""
        update, reason = self._update(obs)
        return (update,) if update is not None else str(reason)

    def applicable(self, obs: Observation, model: nn.Module | None = None) -> str | None:
        """None when the attack can run on `obs` (and, when given, on `model`), else the
        reason it cannot."""
        if model is None:
            return self._update(obs)[1]
        found = self._target(obs, model)
        return found if isinstance(found, str) else None


class Infers(abc.ABC):
    """Base of the inference attacks: `run` checks `applicable`, then times `infer` and hands
    its float64 scores to the runner, which scores them against the challenge's truth."""

    name: ClassVar[str]
    question: ClassVar[Question | None]
    needs_history: ClassVar[bool] = False

    @abc.abstractmethod
    def applicable(self, obs: Observation) -> str | None:
        """None when the attack can run on `obs`, else the reason it cannot."""

    @abc.abstractmethod
    def infer(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, dict[str, object]]:
        """One score per candidate (``side_info["candidates"]`` order) and facts for the report."""

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Answer the question on `obs` (or say why it cannot be asked there)."""
        reason = self.applicable(obs)
        if reason is not None:
            return not_applicable(self.name, obs, reason)
        started = time.perf_counter()
        scores, details = self.infer(obs, model, rng=rng, progress=progress)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(scores=scores.to(torch.float64)),
            seconds=time.perf_counter() - started,
            details=details,
        )


def target_update(obs: Observation) -> tuple[ClientUpdate | None, str | None]:
    """The target client's individual update, or the reason the adversary does not have it."""
    update = obs.update_of(obs.target_client)
    if update is not None and update.num_examples == 0:
        return None, (
            f"client {obs.target_client}'s update in round {obs.round} was computed from no "
            "examples (an empty Poisson-sampled batch): it holds nothing but noise"
        )
    if update is not None:
        return update, None
    if obs.aggregate is not None and not obs.updates:
        return None, "the server sees only the aggregate of the clients' updates"
    return None, f"client {obs.target_client} sent no update in round {obs.round}"


RECONSTRUCTED: dict[str, str] = {
    "image": "images",
    "tabular": "tabular rows",
    "text": "token sequences",
    "multimodal": "records with fields and a note",
}
"""What an attack that needs a modality reconstructs, in its refusal."""


def has_modality(task: TaskInfo, modality: str) -> bool:
    """Whether `task`'s inputs are of `modality`, with the schema an attack on it reads.

    Example:
        >>> from gradaudit.types import TextSchema
        >>> task = TaskInfo("t", "text", (4,), 2, None, ("a", "b"), text=TextSchema(("<pad>",), 4))
        >>> has_modality(task, "text"), has_modality(task, "multimodal")
        (True, False)
    """
    if modality == "image":
        return task.modality == "image" and task.normalization is not None
    if modality == "tabular":
        return task.modality == "tabular" and task.tabular is not None
    if modality == "text":
        return task.modality == "text" and task.text is not None
    if modality == "multimodal":
        return task.tabular is not None and task.text is not None
    raise ValueError(f"unknown modality {modality!r}; use one of {sorted(RECONSTRUCTED)}")


def checked_update(
    obs: Observation,
    *,
    attack: str,
    modality: str | None = None,
    limit: tuple[str, int] | None = None,
) -> tuple[ClientUpdate | None, str | None]:
    """The target's update if the preconditions shared by attacks hold, else the reason.

    Every attack on one client's update needs that update and the architecture. An attack that
    reconstructs inputs of one `modality` (a key of `RECONSTRUCTED`) also needs a task of that
    modality; one that scales with the batch refuses more examples than its `limit`, given as
    the parameter's name and value (``("max_rows", 32)``) so the refusal names the knob.

    Returns:
        ``(update, None)``, or ``(None, reason)``.
    """
    update, reason = target_update(obs)
    if update is None:
        return None, reason
    task = obs.task
    if modality is not None and not has_modality(task, modality):
        return (
            None,
            f"{attack} reconstructs {RECONSTRUCTED[modality]}; {task.dataset} is {task.modality}",
        )
    if not obs.side_info.get("architecture"):
        return None, "the adversary does not know the model architecture"
    if limit is not None and update.num_examples > limit[1]:
        return None, (
            f"the update was computed on {update.num_examples} examples, more than "
            f"{limit[0]}={limit[1]}"
        )
    return update, None


def gradient_estimate(update: ClientUpdate, obs: Observation) -> tuple[dict[str, Tensor], str]:
    """A gradient-like view of the update: the gradient itself, or the negated FedAvg delta.

    Only the keys the client sent appear: tensors it withheld (a private head) never reached the
    adversary, so every attack that reads the update through this function ignores them.

    A FedAvg delta after several local steps is only approximately a multiple of one gradient;
    cosine-based attacks are invariant to the scale, so ``-delta`` is used as is. When the
    adversary knows the local hyperparameters the delta is rescaled by ``1 / (lr * steps)`` so
    magnitude-based methods (label counts) stay calibrated.

    Returns:
        The tensors and a short description of how they were obtained.
    """
    sent = {k: update.tensors[k] for k in update.sent_keys}
    if update.kind == "gradient":
        return sent, "the client's gradient"
    hyper = obs.side_info.get("local_hyperparameters")
    scale = 1.0
    how = "the negated FedAvg model change (one-step approximation)"
    if isinstance(hyper, dict) and hyper.get("lr") and hyper.get("num_steps"):
        scale = 1.0 / (float(hyper["lr"]) * float(hyper["num_steps"]))
        how += ", rescaled by 1/(lr*steps)"
    return {k: -v * scale for k, v in sent.items()}, how


HEAD_WITHHELD = "the classifier head is private (withheld by private_head)"
"""Why an attack that reads the classifier head's gradient cannot run."""


def withheld_head_reason(update: ClientUpdate, model: nn.Module) -> str | None:
    """:data:`HEAD_WITHHELD` when the client withheld any of the classifier head's tensors."""
    head = {key for key in classifier_keys(model) if key is not None}
    return HEAD_WITHHELD if head & update.withheld else None


def sent_positions(model: nn.Module, grads: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Positions in ``model.named_parameters()`` of the parameters present in `grads`.

    Gradient-matching attacks compare only these: a withheld tensor never reached the adversary
    (`gradient_estimate` leaves it out), so it cannot enter the comparison.

    Raises:
        ValueError: `grads` holds none of the model's parameters.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> sent_positions(net, {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)})
        (0, 1)
    """
    keep = tuple(i for i, (name, _) in enumerate(model.named_parameters()) if name in grads)
    if not keep:
        raise ValueError("the update carries none of the model's parameters")
    return keep


def client_trains_batchnorm(obs: Observation, assumed: str) -> bool:
    """Whether the client's BatchNorm used batch statistics (True) or running ones (False).

    ``assumed`` is an attack's ``client_mode`` parameter: ``train`` or ``eval`` force the answer;
    ``auto`` reads the granted local hyperparameters and otherwise assumes training mode.
    """
    if assumed != "auto":
        return assumed == "train"
    hyper = obs.side_info.get("local_hyperparameters")
    return not (isinstance(hyper, dict) and hyper.get("batchnorm") == "frozen")


def attacker_model(model: nn.Module, obs: Observation) -> nn.Module:
    """A private copy of the architecture holding the global model the server sent."""
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(obs.global_params)
    for p in copy_.parameters():
        p.requires_grad_(True)
    return copy_


def not_applicable(name: str, obs: Observation, reason: str) -> AttackResult:
    """The result of an attack that could not run on this observation."""
    return AttackResult(name, obs.round, obs.target_client, "not_applicable", reason=reason)
