"""The model zoo: a registry of architectures and a deterministic builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradaudit.models.convnet import ConvNet, ConvNetParams, build_convnet
from gradaudit.models.fusion import FusionClassifier, FusionParams, build_fusion
from gradaudit.models.init import init_parameters_
from gradaudit.models.lenet import LeNet, LeNetParams, build_lenet
from gradaudit.models.mlp import MLP, MLPParams, build_mlp
from gradaudit.models.resnet import ResNet, ResNetParams, build_resnet
from gradaudit.models.tabular import TabularMLP, TabularMLPParams, build_tabular_mlp
from gradaudit.models.transformer import (
    TransformerClassifier,
    TransformerParams,
    build_transformer,
)
from gradaudit.registry import Registry
from gradaudit.types import TaskInfo

ModelFactory = Callable[[Any, TaskInfo], nn.Module]
"""``factory(params, task) -> nn.Module``: `params` is the entry's validated pydantic model."""

MODELS: Registry[ModelFactory] = Registry("model")

MODELS.register(
    "mlp",
    summary="fully connected network on the flattened input; params: hidden=[128], "
    "activation=relu|sigmoid|tanh",
    params=MLPParams,
)(build_mlp)
MODELS.register(
    "lenet",
    summary="sigmoid LeNet of Zhu et al., Deep Leakage from Gradients (NeurIPS 2019); "
    "params: width=12",
    params=LeNetParams,
)(build_lenet)
MODELS.register(
    "convnet",
    summary="8-layer ConvNet of Geiping et al., Inverting Gradients (NeurIPS 2020); "
    "params: width=64, norm=batch|none; images >= 9x9",
    params=ConvNetParams,
)(build_convnet)
MODELS.register(
    "resnet",
    summary="CIFAR ResNet of He et al. (CVPR 2016); params: depth=20 (6n+2), width=16, "
    "norm=batch|group, groups=8",
    params=ResNetParams,
)(build_resnet)
MODELS.register(
    "tabular_mlp",
    summary="MLP with per-column categorical embeddings, as in Vero et al., TabLeak (ICML 2023); "
    "params: hidden=[100, 100], embedding_dim=8, encoding=embedding|onehot",
    params=TabularMLPParams,
)(build_tabular_mlp)
MODELS.register(
    "transformer",
    summary="small pre-LN transformer encoder for token sequences, masked mean pooling (the "
    "architecture TAG and LAMP invert); params: dim=64, heads=4, layers=2, ff=128",
    params=TransformerParams,
)(build_transformer)
MODELS.register(
    "fusion",
    summary="late fusion of a tabular record and a token sequence (a note with its fields): "
    "tabular_mlp and transformer branches, concatenated features, an MLP head; params: "
    "tabular_hidden=[32], embedding_dim=4, encoding=embedding|onehot, tabular_features=16, "
    "dim=32, heads=2, layers=1, ff=64, text_features=16, hidden=[32]",
    params=FusionParams,
)(build_fusion)


def build_model(
    kind: str, params: dict[str, Any], task: TaskInfo, *, generator: torch.Generator
) -> nn.Module:
    """Validate `params`, build model `kind` for `task` and initialise it from `generator`.

    The module is constructed on the meta device (so PyTorch's own initialisation never touches
    the global RNG), materialised on the CPU, then every parameter and buffer is set by
    `init_parameters_`: the same generator state gives a bit-identical ``state_dict``.

    Args:
        kind: the registry name (``gradaudit list models``).
        params: the scenario's ``model.params`` mapping.
        task: public facts about the task (input shape, classes, tabular schema).
        generator: a CPU generator; the only randomness used.

    Returns:
        A float32 CPU module in training mode mapping (N, *task.input_shape) to logits
        (N, task.num_classes).

    Raises:
        ConfigError: unknown `kind`, invalid `params`, or an architecture that does not fit
            `task`.

    Example:
        >>> from gradaudit.types import TaskInfo
        >>> task = TaskInfo("toy", "image", (1, 8, 8), 10, None, tuple("0123456789"))
        >>> model = build_model("mlp", {"hidden": [32]}, task, generator=torch.Generator())
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    spec = MODELS.parse_params(kind, params, where="model.params")
    factory = MODELS.get(kind)
    with torch.device("meta"):
        model = factory(spec, task)
    model = model.to_empty(device="cpu")
    init_parameters_(model, generator)
    custom = getattr(model, "custom_init_", None)
    if callable(custom):  # a model whose paper prescribes its own initialisation
        custom(generator)
    return model.train()


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head, the last ``nn.Linear`` in ``modules()``, and its module name.

    Raises:
        ValueError: `model` contains no ``nn.Linear``.
    """
    head: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = (name, module)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return head


def classifier_keys(model: nn.Module) -> tuple[str, str | None]:
    """The ``state_dict`` keys of the classifier head: the last ``nn.Linear`` in ``modules()``.

    Args:
        model: any module containing at least one ``nn.Linear``.

    Returns:
        ``(weight_key, bias_key)``; `bias_key` is None when the head has no bias.

    Raises:
        ValueError: `model` contains no ``nn.Linear``.

    Example:
        >>> classifier_keys(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ('2.weight', '2.bias')
    """
    name, linear = classifier_head(model)
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if linear.bias is not None else None)


__all__ = [
    "MLP",
    "MODELS",
    "ConvNet",
    "ConvNetParams",
    "FusionClassifier",
    "FusionParams",
    "LeNet",
    "LeNetParams",
    "MLPParams",
    "ModelFactory",
    "ResNet",
    "ResNetParams",
    "TabularMLP",
    "TabularMLPParams",
    "TransformerClassifier",
    "TransformerParams",
    "build_model",
    "classifier_head",
    "classifier_keys",
    "init_parameters_",
]
