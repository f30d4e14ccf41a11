"""Tests of the fusion model: both branches shape the logits, the relaxed forward equals the
discrete one at one-hot inputs, and torch.func computes per-example gradients through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.defenses.dp import per_example_gradients
from gradaudit.errors import ConfigError
from gradaudit.models import build_model, classifier_keys
from gradaudit.models.fusion import FusionClassifier
from gradaudit.types import TabularSchema, TaskInfo, TextSchema

TABULAR = TabularSchema(("age",), ("sex", "kind"), (3, 4))
TEXT = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(20))), max_length=8)
TASK = TaskInfo(
    "toy-fusion", "multimodal", (11,), 3, None, ("a", "b", "c"), tabular=TABULAR, text=TEXT
)


def model(**params: object) -> FusionClassifier:
    net = build_model("fusion", params, TASK, generator=torch.Generator().manual_seed(0))
    assert isinstance(net, FusionClassifier)
    return net


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    numeric = torch.randn(4, 1, generator=g)
    sex = torch.randint(3, (4, 1), generator=g).float()
    kind = torch.randint(4, (4, 1), generator=g).float()
    tokens = torch.randint(2, 22, (4, 8), generator=g).float()
    tokens[1, 5:] = 0
    tokens[3, 2:] = 0
    return torch.cat([numeric, sex, kind, tokens], dim=1), torch.tensor([0, 2, 1, 1])


def test_logits_depend_on_both_modalities() -> None:
    net = model()
    x, _ = batch()
    logits = net(x)
    assert logits.shape == (4, 3)
    for column in (0, 1, 3):  # a numeric value, a category, a token
        changed = x.clone()
        changed[0, column] = (changed[0, column] + 1) % 3
        assert not torch.allclose(net(changed)[0], logits[0]), column


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_relaxed_forward_equals_forward_at_one_hot_inputs(encoding: str) -> None:
    net = model(encoding=encoding)
    x, _ = batch()
    tabular, tokens = net.split(x)
    probs = [
        nn.functional.one_hot(tabular[:, 1 + j].long(), c).float()
        for j, c in enumerate(TABULAR.cardinalities)
    ]
    relaxed = net.forward_relaxed(tabular[:, :1], probs, net.text.embed(tokens), tokens != 0)
    assert torch.allclose(relaxed, net(x), atol=1e-6)
    # row 3 holds 2 tokens: its padding is invisible, so the first two positions alone suffice
    short = net.forward_relaxed(
        tabular[3:, :1], [p[3:] for p in probs], net.text.embed(tokens[3:, :2]), tokens[3:, :2] != 0
    )
    assert torch.allclose(short, relaxed[3:], atol=1e-6)
    with pytest.raises(ValueError, match="2 categorical blocks"):
        net.forward_relaxed(tabular[:, :1], probs[:1], net.text.embed(tokens), tokens != 0)


def test_classifier_head_is_the_fusion_head() -> None:
    net = model(hidden=[])
    assert classifier_keys(net) == ("head.weight", "head.bias")
    assert net.head.in_features == 16 + 16


def test_build_is_deterministic_and_per_example_gradients_sum_to_the_batch_gradient() -> None:
    a, b = model(), model()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    x, y = batch()
    per = per_example_gradients(a, x, y)
    nn.functional.cross_entropy(a(x), y, reduction="sum").backward()
    for name, p in a.named_parameters():
        assert torch.allclose(per[name].sum(dim=0), p.grad, atol=1e-5), name
    # the token embedding's gradient rows are exactly the ids of the batch
    rows = torch.nonzero(a.text.token_embedding.weight.grad.abs().sum(dim=1)).flatten()
    assert set(rows.tolist()) == set(x[:, 3:].long().flatten().tolist()) - {0}


def test_refuses_tasks_without_both_schemas_or_with_a_wrong_width() -> None:
    tabular_only = TaskInfo("t", "tabular", (3,), 2, None, ("a", "b"), tabular=TABULAR)
    with pytest.raises(ConfigError, match="needs tabular columns and token sequences"):
        build_model("fusion", {}, tabular_only, generator=torch.Generator())
    wrong = TaskInfo("w", "multimodal", (10,), 2, None, ("a", "b"), tabular=TABULAR, text=TEXT)
    with pytest.raises(ConfigError, match=r"\(11,\)"):
        build_model("fusion", {}, wrong, generator=torch.Generator())
    with pytest.raises(ConfigError, match="does not divide"):
        model(dim=10, heads=4)
