"""Label recovery from a client's update: exact at batch 1 (iDLG) and label counts in a batch."""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import numpy as np
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
    target_update,
    withheld_head_reason,
)
from gradaudit.models import classifier_head, classifier_keys
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TaskInfo

LabelMethod = Literal["auto", "idlg", "bias", "llg"]


def idlg_label(weight_grad: Tensor, bias_grad: Tensor | None) -> int:
    """The label of a single example from the gradient of the last layer (iDLG).

    For softmax cross-entropy, the bias gradient is ``p - onehot(y)``, negative only at the
    true class; the weight gradient's rows are that times the (non-negative, after ReLU or
    sigmoid) features, so the row with a negative sum marks the label when there is no bias.

    Zhao, Mopuri & Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv:2001.02610, 2020.

    Example:
        >>> idlg_label(torch.tensor([[0.1, 0.2], [-0.3, -0.1], [0.2, 0.0]]), None)
        1
    """
    if bias_grad is not None:
        return int(torch.argmin(bias_grad))
    return int(torch.argmin(weight_grad.sum(dim=1)))


def round_counts(raw: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integer counts summing to `total`, each step going where most is missing.

    Example:
        >>> round_counts(np.array([1.4, 0.3, 2.3]), 4).tolist()
        [2, 0, 2]
        >>> round_counts(np.array([-0.2, 3.9]), 4).tolist()
        [0, 4]
    """
    raw = np.clip(np.asarray(raw, dtype=np.float64), 0.0, None)
    counts = np.zeros(raw.size, dtype=np.int64)
    for _ in range(total):
        counts[int(np.argmax(raw - counts))] += 1
    return counts


def bias_label_counts(bias_grad: Tensor, mean_probs: Tensor, batch_size: int) -> np.ndarray:
    """Label counts from the classifier bias gradient of a mean-reduced cross-entropy.

    ``grad_b[c] = mean_i p_ic - n_c / B``, so ``n_c = B * (mean p_c - grad_b[c])`` with the mean
    softmax estimated from dummy inputs (the model is known to the server).

    Geng et al., "Towards General Deep Leakage in Federated Learning", arXiv:2110.09074, 2021;
    the same idea underlies LLG (Wainakh et al., PoPETs 2022).
    """
    raw = batch_size * (mean_probs.double() - bias_grad.double())
    return round_counts(raw.numpy(), batch_size)


def llg_label_counts(
    weight_grad: Tensor, mean_probs: Tensor, mean_feature_sum: float, batch_size: int
) -> np.ndarray:
    """Label counts from the classifier weight gradient when the head has no bias (LLG*).

    Each row sums to ``mean_i (p_ic - y_ic) s_i`` with ``s_i`` the example's feature sum;
    replacing ``s_i`` by its mean over dummy inputs gives ``n_c = B (p_c - row_c / s)``.

    Wainakh et al., "User-Level Label Leakage from Gradients in Federated Learning", PoPETs 2022.
    """
    rows = weight_grad.double().sum(dim=1)
    raw = batch_size * (mean_probs.double() - rows / max(mean_feature_sum, 1e-12))
    return round_counts(raw.numpy(), batch_size)


def dummy_inputs(task: TaskInfo, count: int, rng: torch.Generator) -> Tensor:
    """Inputs an adversary can make without data, laid out as the task lays out ``x``.

    Uniform pixels for images; for rows, standard-normal numeric fields and uniform codes; for
    text (alone or after the fields of a multimodal row), sentences of uniform random tokens
    (never padding or the unknown word) with uniform random lengths, right-padded. Token ids
    must stay valid ids: a random float in a token column would index past the embedding table.
    """
    if task.modality == "image" and task.normalization is not None:
        pixels = torch.rand((count, *task.input_shape), generator=rng)
        return task.normalization.normalize(pixels)
    if task.text is None:
        x = torch.randn((count, *task.input_shape), generator=rng)
        if task.tabular is not None:
            first_cat = len(task.tabular.numeric)
            for j, card in enumerate(task.tabular.cardinalities):
                x[:, first_cat + j] = torch.randint(card, (count,), generator=rng).float()
        return x
    parts: list[Tensor] = []
    if task.tabular is not None:
        parts.append(torch.randn((count, len(task.tabular.numeric)), generator=rng))
        parts += [
            torch.randint(card, (count, 1), generator=rng).float()
            for card in task.tabular.cardinalities
        ]
    text = task.text
    first_word = max(text.pad_id, text.unk_id) + 1
    tokens = torch.randint(first_word, text.vocab_size, (count, text.max_length), generator=rng)
    lengths = torch.randint(1, text.max_length + 1, (count,), generator=rng)
    padded = torch.arange(text.max_length) >= lengths.unsqueeze(1)
    parts.append(tokens.masked_fill(padded, text.pad_id).float())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def output_statistics(
    model: nn.Module,
    task: TaskInfo,
    rng: torch.Generator,
    *,
    samples: int = 256,
    batch_size: int | None = None,
    train_mode: bool = True,
) -> tuple[Tensor, float]:
    """Mean softmax and mean feature-sum entering the head, over dummy inputs.

    The dummies go through the model in the mode the client trained in, in batches of the
    client's size, so BatchNorm normalises them the way it normalised the real batch.
    """
    _, head = classifier_head(model)
    seen: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train(train_mode)
    chunk = max(batch_size or samples, 2 if train_mode else 1)
    probs: list[Tensor] = []
    try:
        for start in range(0, samples, chunk):
            x = dummy_inputs(task, min(chunk, samples - start), rng)
            if train_mode and x.shape[0] < 2:
                break
            probs.append(torch.softmax(model(x), dim=1))
    finally:
        hook.remove()
        model.load_state_dict(state)  # running statistics are not the attacker's to change
        model.train(was_training)
    return torch.cat(probs).mean(dim=0), float(torch.cat(seen).sum(dim=1).mean())


def recover_labels(
    obs: Observation,
    model: nn.Module,
    *,
    count: int,
    method: LabelMethod = "auto",
    rng: torch.Generator,
    samples: int = 256,
    train_mode: bool = True,
) -> tuple[Tensor, str]:
    """Recover the multiset of `count` labels behind the target's update.

    Returns:
        The labels, sorted, and the name of the method used.

    Raises:
        ValueError: no update of the target, or its classifier head was withheld.
    """
    update, reason = target_update(obs)
    if update is None:
        raise ValueError(reason)
    reason = withheld_head_reason(update, model)
    if reason is not None:
        raise ValueError(reason)
    grads, _ = gradient_estimate(update, obs)
    attacker = attacker_model(model, obs)
    weight_key, bias_key = classifier_keys(attacker)
    weight_grad = grads[weight_key]
    bias_grad = grads[bias_key] if bias_key is not None else None
    if method == "auto":
        method = "idlg" if count == 1 else ("bias" if bias_grad is not None else "llg")
    if method == "idlg":
        if count != 1:
            raise ValueError("iDLG recovers the label of a single example; use bias or llg")
        return torch.tensor([idlg_label(weight_grad, bias_grad)]), "idlg"
    probs, feature_sum = output_statistics(
        attacker, obs.task, rng, samples=samples, batch_size=count, train_mode=train_mode
    )
    if method == "bias":
        if bias_grad is None:
            raise ValueError("the classifier head has no bias; use llg")
        counts = bias_label_counts(bias_grad, probs, count)
    else:
        counts = llg_label_counts(weight_grad, probs, feature_sum, count)
    labels = np.repeat(np.arange(counts.size), counts)
    return torch.as_tensor(labels, dtype=torch.long), method


def unknown_labels_reason(obs: Observation, update: ClientUpdate, model: nn.Module) -> str | None:
    """Why an inversion attack has no labels to optimise with, or None when it has them.

    Labels come from the threat model or from the classifier head's gradient; with neither (the
    labels are not granted and the head was withheld) the attack cannot run.
    """
    if isinstance(obs.side_info.get("labels"), Tensor):
        return None
    reason = withheld_head_reason(update, model)
    if reason is None:
        return None
    return f"the labels are not granted and cannot be recovered: {reason}"


def labels_for_inversion(
    obs: Observation,
    model: nn.Module,
    *,
    count: int,
    method: LabelMethod,
    rng: torch.Generator,
    train_mode: bool,
) -> tuple[Tensor, str]:
    """The labels an inversion attack optimises with, and where they came from.

    The granted labels when the threat model grants them, else :func:`recover_labels`.

    Returns:
        The labels and a phrase for the report (``granted by the threat model`` or
        ``recovered (<method>)``).
    """
    granted = obs.side_info.get("labels")
    if isinstance(granted, Tensor):
        return granted.clone(), "granted by the threat model"
    labels, used = recover_labels(
        obs, model, count=count, method=method, rng=rng, train_mode=train_mode
    )
    return labels, f"recovered ({used})"


class LabelRecoveryParams(BaseModel):
    """Parameters of `label_recovery`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: LabelMethod = Field(
        "auto", description="idlg at batch 1; bias (head bias gradient) or llg (weights) above"
    )
    dummy_samples: int = Field(128, ge=1, description="dummy inputs for the softmax estimate")
    client_mode: Literal["auto", "train", "eval"] = Field(
        "auto",
        description="BatchNorm mode of the client's update: auto reads the granted local "
        "hyperparameters, else assumes train",
    )


class LabelRecoveryAttack(Reconstructs):
    """Recover the labels of the target client's examples from its update.

    Batch 1: iDLG (Zhao et al. 2020), exact for softmax cross-entropy. Batches: label counts,
    repeats included, from the classifier's bias gradient (Geng et al. 2021) or, without a bias,
    its weight rows (LLG*, Wainakh et al. 2022), with the mean softmax estimated on dummy inputs.
    Threat model: an honest-but-curious server that sees the individual update.
    """

    name: ClassVar[str] = "label_recovery"

    def __init__(self, params: LabelRecoveryParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        update, reason = checked_update(obs, attack=self.name)
        if update is None:
            return None, reason
        if (
            update.kind == "delta"
            and "local_hyperparameters" not in obs.side_info
            and self.params.method != "idlg"
            and update.num_examples > 1
        ):
            return None, (
                "counting labels from a FedAvg model change needs the local "
                "hyperparameters (grant 'local_hyperparameters' in threat.knows)"
            )
        return update, None

    def _target(self, obs: Observation, model: nn.Module) -> tuple[ClientUpdate] | str:
        """The update, or the reason the attack cannot run: it needs the target's individual
        update, the architecture and the classifier head's part of the update."""
        update, reason = self._update(obs)
        if update is None:
            return str(reason)
        reason = withheld_head_reason(update, model)
        return (update,) if reason is None else reason

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Recover the label multiset of the target's update."""
        found = self._target(obs, model)
        if isinstance(found, str):
            return not_applicable(self.name, obs, found)
        (update,) = found
        started = time.perf_counter()
        labels, method = recover_labels(
            obs,
            model,
            count=update.num_examples,
            method=self.params.method,
            rng=rng,
            samples=self.params.dummy_samples,
            train_mode=client_trains_batchnorm(obs, self.params.client_mode),
        )
        if progress is not None:
            progress(1, 1)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(labels=labels),
            seconds=time.perf_counter() - started,
            details={"method": method, "count": update.num_examples},
        )
