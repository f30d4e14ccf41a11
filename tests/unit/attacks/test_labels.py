"""Label recovery: iDLG is exact at batch 1; the count methods recover repeated labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradaudit.attacks.labels import (
    LabelRecoveryAttack,
    LabelRecoveryParams,
    bias_label_counts,
    dummy_inputs,
    idlg_label,
    llg_label_counts,
)
from gradaudit.data import load_dataset
from gradaudit.metrics import label_accuracy
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch
from gradaudit.types import TabularSchema, TaskInfo, TextSchema


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _attack(method: str = "auto") -> LabelRecoveryAttack:
    return LabelRecoveryAttack(LabelRecoveryParams(method=method))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "params"),
    [("mlp", {"hidden": [64]}), ("lenet", {}), ("mlp", {"hidden": [32], "activation": "sigmoid"})],
)
def test_idlg_exact_at_batch_one(digits, kind, params) -> None:
    model = build_model(kind, params, digits.info, generator=torch_generator(1, "m"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(digits.y_train), size=20, replace=False):
        obs = observe_batch(
            model, digits.x_train[i : i + 1], digits.y_train[i : i + 1], digits.info
        )
        result = _attack().run(obs, model, rng=torch_generator(0, "a"))
        assert result.status == "ok" and result.details["method"] == "idlg"
        assert result.reconstruction.labels.tolist() == [int(digits.y_train[i])]


def test_idlg_without_bias_uses_weight_rows() -> None:
    # Prepare: softmax-CE head gradient with non-negative features; class 2 is the label
    p = torch.tensor([0.2, 0.3, 0.5])
    features = torch.tensor([0.5, 1.0, 2.0])
    weight_grad = (p - torch.tensor([0.0, 0.0, 1.0]))[:, None] * features[None, :]
    # Execute / Assert
    assert idlg_label(weight_grad, None) == 2


def test_count_formulas_are_exact_when_probabilities_are_known() -> None:
    # Prepare: 4 examples with labels [0, 0, 2, 3] and known softmax outputs
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 3]), 4).float()
    bias_grad = (probs - onehot).mean(dim=0)
    feature_sum = 3.0
    weight_rows = ((probs - onehot) * feature_sum).mean(dim=0)[:, None]  # one feature column
    # Execute
    from_bias = bias_label_counts(bias_grad, probs.mean(dim=0), 4)
    from_weights = llg_label_counts(weight_rows, probs.mean(dim=0), feature_sum, 4)
    # Assert
    assert from_bias.tolist() == [2, 0, 1, 1]
    assert from_weights.tolist() == [2, 0, 1, 1]


@pytest.mark.parametrize("method", ["bias", "llg"])
def test_counts_with_repeats_on_untrained_mlp(digits, method) -> None:
    model = build_model("mlp", {"hidden": [128]}, digits.info, generator=torch_generator(2, "m"))
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(10):
        classes = rng.choice(10, size=3, replace=False)
        wanted = rng.choice(classes, size=8)  # repeats guaranteed
        idx = np.array([rng.choice(np.flatnonzero(digits.y_train.numpy() == c)) for c in wanted])
        obs = observe_batch(model, digits.x_train[idx], digits.y_train[idx], digits.info)
        result = _attack(method).run(obs, model, rng=torch_generator(0, "a"))
        scores.append(label_accuracy(result.reconstruction.labels, digits.y_train[idx]))
    assert np.mean(scores) >= 0.95


def test_not_applicable_without_architecture(digits) -> None:
    model = build_model("mlp", {}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(model, digits.x_train[:2], digits.y_train[:2], digits.info, knows=())
    result = _attack().run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "not_applicable"
    assert "architecture" in result.reason


@pytest.mark.data
def test_idlg_cifar10_convnet_twenty_images(shared_data_dir) -> None:
    cifar = load_dataset("cifar10", shared_data_dir)
    model = build_model("convnet", {"width": 64}, cifar.info, generator=torch_generator(0, "m"))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(cifar.y_test), size=20, replace=False):
        obs = observe_batch(model, cifar.x_test[i : i + 1], cifar.y_test[i : i + 1], cifar.info)
        result = _attack().run(obs, model, rng=torch_generator(0, "a"))
        assert result.reconstruction.labels.tolist() == [int(cifar.y_test[i])]


def test_client_mode_auto_follows_granted_hyperparameters(digits) -> None:
    from gradaudit.attacks.base import client_trains_batchnorm

    model = build_model("mlp", {}, digits.info, generator=torch_generator(0, "m"))
    x, y = digits.x_train[:2], digits.y_train[:2]
    frozen = observe_batch(
        model, x, y, digits.info, knows=("local_hyperparameters",), train_mode=False
    )
    hidden = observe_batch(model, x, y, digits.info, knows=(), train_mode=False)
    assert client_trains_batchnorm(frozen, "auto") is False
    assert client_trains_batchnorm(hidden, "auto") is True  # not granted: assume training mode
    assert client_trains_batchnorm(hidden, "eval") is False


TEXT = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(38))), max_length=12)
TABULAR = TabularSchema(("age",), ("sex",), (2,), (("f", "m"),))
TEXT_TASKS = {
    "transformer": TaskInfo("toy-text", "text", (12,), 3, None, ("a", "b", "c"), text=TEXT),
    "fusion": TaskInfo(
        "toy-notes", "multimodal", (14,), 3, None, ("a", "b", "c"), tabular=TABULAR, text=TEXT
    ),
}


@pytest.mark.parametrize("kind", ["transformer", "fusion"])
def test_dummy_inputs_are_valid_token_rows(kind) -> None:
    task = TEXT_TASKS[kind]
    x = dummy_inputs(task, 64, torch.Generator().manual_seed(0))
    tokens = x[:, -TEXT.max_length :]
    assert x.shape == (64, *task.input_shape)
    assert torch.equal(tokens, tokens.round())
    assert int(tokens.min()) >= 0 and int(tokens.max()) < TEXT.vocab_size
    assert bool((tokens[:, 0] >= 2).all())  # never empty, never starts with padding or <unk>
    padded = tokens == TEXT.pad_id
    assert bool((padded[:, :-1] <= padded[:, 1:]).all())  # right-padded


@pytest.mark.parametrize("kind", ["transformer", "fusion"])
def test_counts_on_text_and_multimodal_batches(kind) -> None:
    """Batch > 1 on a token model: the softmax estimate runs on valid token ids (it used to
    index past the embedding table with random floats) and the bias counts are exact."""
    task = TEXT_TASKS[kind]
    model = build_model(kind, {}, task, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = dummy_inputs(task, 6, g)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    obs = observe_batch(model, x, y, task)
    result = _attack("bias").run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert sorted(result.reconstruction.labels.tolist()) == y.tolist()
