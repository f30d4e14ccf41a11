"""Deep Leakage from Gradients: L2 gradient matching with L-BFGS (Zhu et al. 2019)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    attacker_model,
    checked_update,
    client_trains_batchnorm,
    gradient_estimate,
    not_applicable,
    sent_positions,
)
from gradaudit.attacks.inversion.search import BestSoFar
from gradaudit.attacks.inversion.simulate import (
    LocalReplay,
    LossFn,
    UnrollMode,
    labelled_loss,
    local_replay,
    simulated_update,
)
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction

logger = logging.getLogger(__name__)


class DLGParams(BaseModel):
    """Parameters of `dlg`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(300, ge=1, description="L-BFGS steps per restart (as in DLG's code)")
    inner: int = Field(20, ge=1, description="L-BFGS iterations in each step (torch's default)")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget for all restarts")
    restarts: int = Field(
        4,
        ge=1,
        description="random starts at most; a start that stalls (see patience) gives way to the "
        "next, and the best candidate of all is kept",
    )
    patience: int = Field(
        5,
        ge=1,
        description="abandon a start whose distance has not fallen by 1 % in this many L-BFGS "
        "steps, while starts remain",
    )
    lr: float = Field(1.0, gt=0, description="L-BFGS step size")
    history: int = Field(100, ge=1, description="L-BFGS history size")
    max_images: int = Field(8, ge=1, description="refuse updates computed on more examples")
    unroll: UnrollMode = Field(
        "auto",
        description="FedAvg deltas: unroll the local steps (auto: when local hyperparameters are "
        "known), always, or never (treat the delta as one gradient)",
    )
    snapshots: int = Field(
        16, ge=0, description="best-so-far reconstructions kept for the PSNR-vs-seconds curve"
    )
    client_mode: Literal["auto", "train", "eval"] = Field(
        "auto",
        description="BatchNorm mode of the client's update: auto reads the granted local "
        "hyperparameters, else assumes train",
    )


def soft_cross_entropy(logits: Tensor, label_logits: Tensor) -> Tensor:
    """Cross-entropy against the soft labels ``softmax(label_logits)`` (DLG's joint labels).

    Example:
        >>> x = torch.tensor([[2.0, 0.0]]); y = torch.tensor([[50.0, -50.0]])
        >>> hard = nn.functional.cross_entropy(x, torch.tensor([0]))
        >>> bool(torch.isclose(soft_cross_entropy(x, y), hard))
        True
    """
    targets = torch.softmax(label_logits, dim=-1)
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _gradient_distance(
    model: nn.Module,
    replay: LocalReplay,
    target: list[Tensor],
    x: Tensor,
    loss: LossFn,
    *,
    create_graph: bool,
    keep: tuple[int, ...],
) -> Tensor:
    """Squared L2 distance between the candidates' simulated update and the observed one, over
    the parameters at positions `keep` (those the client sent)."""
    simulated = simulated_update(model, x, loss, replay, create_graph=create_graph)
    dummy = [simulated[i] for i in keep]
    return torch.stack([(g - t).pow(2).sum() for g, t in zip(dummy, target, strict=True)]).sum()


def _lbfgs_closure(
    optimiser: torch.optim.Optimizer,
    model: nn.Module,
    replay: LocalReplay,
    target: list[Tensor],
    x: Tensor,
    loss: LossFn,
    keep: tuple[int, ...],
) -> Callable[[], Tensor]:
    """The L-BFGS closure: the distance, with the gradients of the variables filled in."""

    def closure() -> Tensor:
        optimiser.zero_grad(set_to_none=True)
        distance = _gradient_distance(model, replay, target, x, loss, create_graph=True, keep=keep)
        distance.backward()
        return distance

    return closure


def _candidate_loss(label_logits: Tensor, fixed_labels: Tensor | None) -> LossFn:
    """Cross-entropy on the granted labels, else on DLG's soft dummy labels."""
    if fixed_labels is not None:
        return labelled_loss(fixed_labels)

    def loss(logits: Tensor, index: Tensor) -> Tensor:
        return soft_cross_entropy(logits, label_logits[index])

    return loss


class DLGAttack(Reconstructs):
    """Reconstruct inputs and labels by matching the gradient in Euclidean distance with L-BFGS.

    Dummy inputs and dummy label logits start from noise and are optimised together so that the
    gradient of the soft-label cross-entropy matches the observed one; the reported labels are
    the optimised ones (argmax), unless the threat model grants the true labels, which are then
    used as they are. After each L-BFGS step the candidate is scored by its gradient distance,
    and the best one seen is kept.

    Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019.
    Threat model: an honest-but-curious server that sees the individual update.
    """

    name: ClassVar[str] = "dlg"

    def __init__(self, params: DLGParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """Needs an individual image-model update, the architecture and a small batch."""
        return checked_update(
            obs, attack=self.name, modality="image", limit=("max_images", self.params.max_images)
        )

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Match the gradient with L-BFGS from `restarts` random starts."""
        update, reason = self._update(obs)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        started = time.perf_counter()
        p = self.params
        assert obs.task.normalization is not None
        count = update.num_examples
        norm = obs.task.normalization
        grads, grad_source = gradient_estimate(update, obs)
        try:
            replay = local_replay(update, obs, p.unroll)
        except ValueError as error:
            return not_applicable(self.name, obs, str(error))
        attacker = attacker_model(model, obs)
        attacker.train(client_trains_batchnorm(obs, p.client_mode))
        names = [n for n, _ in attacker.named_parameters()]
        keep = sent_positions(attacker, grads)  # withheld tensors never reached the adversary
        target = [grads[names[i]].detach() for i in keep]
        granted = obs.side_info.get("labels")
        fixed_labels = granted.clone() if isinstance(granted, Tensor) else None
        deadline = started + p.max_seconds if p.max_seconds else None
        shape = (count, *obs.task.input_shape)

        search = BestSoFar(
            started=started,
            total=p.iterations * p.restarts,
            to_pixels=lambda z: norm.denormalize(z).clamp(0.0, 1.0),
            snapshots=p.snapshots,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        best_label_logits: Tensor | None = None
        for restart in range(p.restarts):
            x = torch.randn(shape, generator=rng).requires_grad_(True)
            label_logits = torch.randn((count, obs.task.num_classes), generator=rng)
            variables = [x] if fixed_labels is not None else [x, label_logits.requires_grad_(True)]
            optimiser = torch.optim.LBFGS(
                variables,
                lr=p.lr,
                max_iter=p.inner,
                history_size=p.history,
                tolerance_grad=0.0,  # tiny gradients are normal here; never stop on them
                tolerance_change=0.0,
            )
            loss = _candidate_loss(label_logits, fixed_labels)
            closure = _lbfgs_closure(optimiser, attacker, replay, target, x, loss, keep)

            restart_best: list[float] = []  # this start's best distance after each step
            for step in range(1, p.iterations + 1):
                optimiser.step(closure)
                distance = float(  # score where the step ended (no backward needed)
                    _gradient_distance(
                        attacker, replay, target, x, loss, create_graph=False, keep=keep
                    )
                )
                if not math.isfinite(distance):
                    logger.info("dlg restart %d diverged at step %d", restart, step)
                    break
                if distance < search.lowest:
                    best_label_logits = label_logits.detach().clone()
                out_of_time = deadline is not None and time.perf_counter() >= deadline
                search.offer(x, distance, final=out_of_time)
                if out_of_time:
                    break
                restart_best.append(min(distance, restart_best[-1]) if restart_best else distance)
                if (
                    restart + 1 < p.restarts
                    and len(restart_best) > p.patience
                    and restart_best[-1] > 0.99 * restart_best[-1 - p.patience]
                ):
                    logger.info("dlg restart %d stalled at step %d; starting again", restart, step)
                    break
            else:
                break  # this start used all its iterations: no further start
            if deadline is not None and time.perf_counter() >= deadline:
                break
        if best_label_logits is None:
            return AttackResult(
                self.name,
                obs.round,
                obs.target_client,
                "failed",
                reason="every restart diverged (non-finite gradient distance)",
                seconds=time.perf_counter() - started,
            )
        x_best, distance = search.best()
        labels = fixed_labels if fixed_labels is not None else best_label_logits.argmax(dim=1)
        images = norm.denormalize(x_best).clamp(0.0, 1.0)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(
                images=images,
                labels=labels,
                confidence=torch.full((count,), -distance, dtype=torch.float64),
            ),
            seconds=time.perf_counter() - started,
            details={
                "labels": "granted by the threat model"
                if fixed_labels is not None
                else "optimised jointly (argmax of the dummy labels)",
                "gradient": grad_source,
                "replay": replay.description,
                "iterations_run": search.done,
                "objective": distance,
                "recipe": p.model_dump(),
            },
            trace=tuple(search.trace),
            snapshots=search.final_snapshots(),
        )
