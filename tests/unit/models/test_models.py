"""Tests of the model zoo: shapes, deterministic init, classifier head and torch.func support."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradaudit.errors import ConfigError, UnknownComponentError
from gradaudit.models import MODELS, build_model, classifier_keys, init_parameters_
from gradaudit.types import TabularSchema, TaskInfo

DIGITS = TaskInfo("digits", "image", (1, 8, 8), 10, None, tuple("0123456789"))
MNIST = TaskInfo("mnist", "image", (1, 28, 28), 10, None, tuple("0123456789"))
CIFAR = TaskInfo("cifar10", "image", (3, 32, 32), 10, None, tuple("abcdefghij"))
SCHEMA = TabularSchema(
    numeric=("age", "hours"),
    categorical=("job", "country", "sex"),
    cardinalities=(5, 3, 2),
)
ADULT = TaskInfo("adult", "tabular", (5,), 2, None, ("<=50K", ">50K"), tabular=SCHEMA)

IMAGE_CASES = [
    ("mlp", {}),
    ("mlp", {"hidden": [16, 8], "activation": "sigmoid"}),
    ("mlp", {"hidden": [], "activation": "tanh"}),
    ("lenet", {}),
    ("convnet", {"width": 4}),
    ("convnet", {"width": 4, "norm": "none"}),
    ("resnet", {"depth": 8, "width": 8}),
    ("resnet", {"depth": 8, "width": 8, "norm": "group", "groups": 4}),
]


def case_id(value: object) -> str:
    return value.dataset if isinstance(value, TaskInfo) else str(value)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(task: TaskInfo, n: int = 3, seed: int = 1) -> torch.Tensor:
    if task.tabular is None:
        return torch.rand(n, *task.input_shape, generator=gen(seed))
    schema = task.tabular
    numeric = torch.randn(n, len(schema.numeric), generator=gen(seed))
    codes = [
        torch.randint(c, (n, 1), generator=gen(seed + i))
        for i, c in enumerate(schema.cardinalities)
    ]
    return torch.cat([numeric, *[c.float() for c in codes]], dim=1)


def labels(task: TaskInfo, n: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randint(task.num_classes, (n,), generator=gen(seed))


def test_registry_lists_every_model_with_a_summary() -> None:
    assert MODELS.names() == [
        "convnet",
        "fusion",
        "lenet",
        "mlp",
        "resnet",
        "tabular_mlp",
        "transformer",
    ]
    for entry in MODELS.entries():
        assert "params" in entry.summary
    assert "Deep Leakage" in MODELS.entry("lenet").summary
    assert "Inverting Gradients" in MODELS.entry("convnet").summary


SHAPE_CASES = [
    (kind, params, task)
    for task in (DIGITS, MNIST, CIFAR)
    for kind, params in IMAGE_CASES
    if not (kind == "convnet" and task is DIGITS)  # convnet needs at least 9x9
]


@pytest.mark.parametrize(("kind", "params", "task"), SHAPE_CASES, ids=case_id)
def test_image_models_give_logits(kind: str, params: dict, task: TaskInfo) -> None:
    model = build_model(kind, params, task, generator=gen(0))
    out = model(inputs(task))
    assert out.shape == (3, task.num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_flatten_sizes_follow_the_papers() -> None:
    lenet = build_model("lenet", {}, CIFAR, generator=gen(0))
    assert lenet.head.in_features == 768  # Zhu et al. 2019
    assert build_model("lenet", {}, MNIST, generator=gen(0)).head.in_features == 12 * 7 * 7
    assert build_model("lenet", {}, DIGITS, generator=gen(0)).head.in_features == 12 * 2 * 2
    convnet = build_model("convnet", {"width": 4}, CIFAR, generator=gen(0))
    assert convnet.head.in_features == 36 * 4  # Geiping et al. 2020
    assert sum(isinstance(m, nn.Conv2d) for m in convnet.modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in convnet.modules()) == 8
    resnet = build_model("resnet", {"depth": 20}, CIFAR, generator=gen(0))
    weighted = [m for m in resnet.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len([m for m in weighted if getattr(m, "kernel_size", (3, 3)) != (1, 1)]) == 20
    assert resnet.head.in_features == 64


def test_convnet_refuses_tiny_images() -> None:
    with pytest.raises(ConfigError, match="at least 9x9"):
        build_model("convnet", {}, DIGITS, generator=gen(0))


def test_tabular_mlp_forward_and_embeddings() -> None:
    model = build_model(
        "tabular_mlp", {"hidden": [16], "embedding_dim": 3}, ADULT, generator=gen(0)
    )
    x = inputs(ADULT, n=4)
    out = model(x)
    assert out.shape == (4, 2)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert [e.num_embeddings for e in embeddings] == [5, 3, 2]
    assert model.body[0].in_features == 2 + 3 * 3
    # changing a category code changes the output; numeric columns enter as they are
    x2 = x.clone()
    x2[:, 2] = (x2[:, 2] + 1) % 5
    assert not torch.allclose(model(x2), out)


def test_tabular_mlp_needs_a_tabular_dataset() -> None:
    with pytest.raises(ConfigError, match="tabular_mlp needs a tabular dataset"):
        build_model("tabular_mlp", {}, CIFAR, generator=gen(0))


def test_image_models_refuse_tabular_inputs() -> None:
    with pytest.raises(ConfigError, match="needs image inputs"):
        build_model("lenet", {}, ADULT, generator=gen(0))


ALL_CASES = [(kind, params, CIFAR) for kind, params in IMAGE_CASES] + [("tabular_mlp", {}, ADULT)]


@pytest.mark.parametrize(("kind", "params", "task"), ALL_CASES, ids=case_id)
def test_init_is_deterministic_and_leaves_global_rng_alone(
    kind: str, params: dict, task: TaskInfo
) -> None:
    state = torch.get_rng_state()
    a = build_model(kind, params, task, generator=gen(7)).state_dict()
    b = build_model(kind, params, task, generator=gen(7)).state_dict()
    c = build_model(kind, params, task, generator=gen(8)).state_dict()
    assert torch.equal(state, torch.get_rng_state())
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert all(not torch.equal(a[k], c[k]) for k in weights)


def test_init_follows_pytorch_default_distributions() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8, 400)
    )
    model.append(nn.Embedding(1000, 50, padding_idx=0))
    for p in model.parameters():
        nn.init.constant_(p, 123.0)
    init_parameters_(model, gen(0))
    conv, bn, gn, _, linear, emb = model
    for layer, fan_in in ((conv, 27), (linear, 8)):
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), ...)
        assert layer.weight.abs().max() <= bound
        assert layer.bias.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
    assert linear.weight.std().item() == pytest.approx(1 / math.sqrt(8) / math.sqrt(3), rel=0.1)
    for norm in (bn, gn):
        assert torch.equal(norm.weight, torch.ones(8))
        assert torch.equal(norm.bias, torch.zeros(8))
    assert torch.equal(bn.running_mean, torch.zeros(8))
    assert torch.equal(bn.running_var, torch.ones(8))
    assert emb.weight[1:].mean().item() == pytest.approx(0.0, abs=0.02)
    assert emb.weight[1:].std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(emb.weight[0], torch.zeros(50))


def test_init_refuses_unknown_parameters() -> None:
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="scale"):
        init_parameters_(model, gen(0))


@pytest.mark.parametrize(("kind", "params", "task"), ALL_CASES, ids=case_id)
def test_classifier_keys_point_at_the_last_linear(kind: str, params: dict, task: TaskInfo) -> None:
    model = build_model(kind, params, task, generator=gen(0))
    weight_key, bias_key = classifier_keys(model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    state = model.state_dict()
    assert state[weight_key].data_ptr() == last.weight.data_ptr()
    assert bias_key is not None
    assert state[bias_key].data_ptr() == last.bias.data_ptr()
    assert state[weight_key].shape[0] == task.num_classes


def test_classifier_keys_edge_cases() -> None:
    assert classifier_keys(nn.Linear(3, 2)) == ("weight", "bias")
    assert classifier_keys(nn.Sequential(nn.Linear(3, 2, bias=False))) == ("0.weight", None)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        classifier_keys(nn.Sequential(nn.Conv2d(1, 1, 1)))


@pytest.mark.parametrize(
    ("kind", "params", "task"),
    [("mlp", {"hidden": [16]}, MNIST), ("lenet", {}, CIFAR), ("tabular_mlp", {}, ADULT)],
    ids=["mlp", "lenet", "tabular_mlp"],
)
def test_vmap_grad_over_parameter_sets_matches_a_loop(
    kind: str, params: dict, task: TaskInfo
) -> None:
    models = [build_model(kind, params, task, generator=gen(seed)) for seed in range(3)]
    x, y = inputs(task, n=4), labels(task, n=4)
    stacked = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        for name, _ in models[0].named_parameters()
    }

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(models[0], p, (x,)), y)

    batched = vmap(grad(loss), in_dims=(0, None, None))(stacked, x, y)
    for i, model in enumerate(models):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_resnet_depth_and_groups_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"model\.params\.depth: resnet depth must be 6n\+2"):
        build_model("resnet", {"depth": 18}, CIFAR, generator=gen(0))
    with pytest.raises(ConfigError, match="6n"):
        build_model("resnet", {"depth": 2}, CIFAR, generator=gen(0))
    with pytest.raises(ConfigError, match="must divide width"):
        build_model("resnet", {"norm": "group", "groups": 5}, CIFAR, generator=gen(0))
    model = build_model("resnet", {"depth": 14}, CIFAR, generator=gen(0))
    assert len(model.stages) == 6


def test_params_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"model\.params\.hiden: unknown key"):
        build_model("mlp", {"hiden": [3]}, MNIST, generator=gen(0))
    with pytest.raises(ConfigError, match=r"model\.params\.hidden\[0\]"):
        build_model("mlp", {"hidden": [0]}, MNIST, generator=gen(0))
    with pytest.raises(ConfigError, match=r"model\.params\.activation"):
        build_model("mlp", {"activation": "gelu"}, MNIST, generator=gen(0))
    with pytest.raises(UnknownComponentError, match="unknown model 'vgg'"):
        build_model("vgg", {}, MNIST, generator=gen(0))
