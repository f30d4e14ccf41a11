"""tabular_mlp: the one-hot encoding (TabLeak's network) and the relaxed forward of both."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradaudit.errors import ConfigError
from gradaudit.models import build_model
from gradaudit.models.tabular import TabularMLP, one_hot
from gradaudit.types import TabularSchema, TaskInfo

SCHEMA = TabularSchema(("age", "hours"), ("job", "country", "sex"), (5, 3, 2))
TASK = TaskInfo("toy", "tabular", (5,), 2, None, ("no", "yes"), tabular=SCHEMA)


def _rows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(card, (n, 1), generator=g).float() for card in SCHEMA.cardinalities]
    return torch.cat([torch.randn(n, 2, generator=g), *codes], dim=1)


def _model(encoding: str, **params: object) -> TabularMLP:
    params = {"hidden": [16, 8], "embedding_dim": 3, "encoding": encoding, **params}
    model = build_model("tabular_mlp", params, TASK, generator=torch.Generator().manual_seed(0))
    assert isinstance(model, TabularMLP)
    return model


def test_onehot_network_is_tableaks_fully_connected_layout() -> None:
    model = _model("onehot", hidden=[100, 100])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2 + 5 + 3 + 2, 100),
        (100, 100),
        (100, 2),
    ]
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    assert model.input_layer() is linears[0]
    assert [model.onehot_columns(j) for j in range(3)] == [slice(2, 7), slice(7, 10), slice(10, 12)]


def test_default_encoding_is_the_embedding_network() -> None:
    model = _model("embedding")
    default = build_model(
        "tabular_mlp",
        {"hidden": [16, 8], "embedding_dim": 3},
        TASK,
        generator=torch.Generator().manual_seed(0),
    )
    assert default.encoding == "embedding"
    assert list(default.state_dict()) == list(model.state_dict())
    assert "embeddings.0.weight" in default.state_dict()
    with pytest.raises(ValueError, match="onehot"):
        model.onehot_columns(0)


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_forward_equals_forward_relaxed_on_exact_one_hots(encoding: str) -> None:
    model = _model(encoding)
    x = _rows(6, 1)
    probs = [one_hot(x[:, 2 + j], card) for j, card in enumerate(SCHEMA.cardinalities)]
    assert torch.allclose(model(x), model.forward_relaxed(x[:, :2], probs), atol=1e-6)


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_forward_relaxed_is_differentiable_in_the_probabilities(encoding: str) -> None:
    model = _model(encoding)
    x = _rows(3, 2)
    probs = [torch.full((3, card), 1.0 / card, requires_grad=True) for card in (5, 3, 2)]
    model.forward_relaxed(x[:, :2], probs).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in probs)
    with pytest.raises(ValueError, match="3 categorical blocks"):
        model.forward_relaxed(x[:, :2], probs[:2])


def test_onehot_codes_change_the_output_and_run_under_vmap() -> None:
    model = _model("onehot")
    x = _rows(4, 3)
    changed = x.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 5
    assert not torch.allclose(model(changed), model(x))
    params = {k: v.detach() for k, v in model.named_parameters()}
    y = torch.tensor([0, 1, 1, 0])

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    per_client = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.view(2, 2, 5), y.view(2, 2))
    direct = torch.autograd.grad(
        loss(dict(model.named_parameters()), x[:2], y[:2]), [model.input_layer().weight]
    )[0]
    assert torch.allclose(per_client["body.0.weight"][0], direct, atol=1e-6)


def test_one_hot_of_float_codes() -> None:
    assert one_hot(torch.tensor([[1.0], [0.0]]), 2).tolist() == [[[0.0, 1.0]], [[1.0, 0.0]]]


def test_unknown_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="encoding"):
        build_model(
            "tabular_mlp", {"encoding": "bits"}, TASK, generator=torch.Generator().manual_seed(0)
        )
