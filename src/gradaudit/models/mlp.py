"""A fully connected network on flattened inputs."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.types import TaskInfo

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLPParams(BaseModel):
    """Parameters of ``mlp``.

    Attributes:
        hidden: the width of each hidden layer, in order; empty gives multinomial logistic
            regression.
        activation: the non-linearity after each hidden layer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128])
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"


class MLP(nn.Module):
    """A multilayer perceptron on the flattened input.

    The fully connected networks of the gradient-leakage literature, e.g. the single-hidden-layer
    networks analysed by Phong et al., "Privacy-Preserving Deep Learning via Additively
    Homomorphic Encryption", IEEE TIFS 2018, and Geiping et al., "Inverting Gradients", NeurIPS
    2020.

    Args:
        in_features: values per flattened input.
        num_classes: logits produced.
        hidden: hidden-layer widths.
        activation: ``relu``, ``sigmoid`` or ``tanh``.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: list[int], activation: str = "relu"
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for inputs (N, ...)."""
        return self.head(self.body(x.flatten(1)))


def build_mlp(params: MLPParams, task: TaskInfo) -> MLP:
    """The ``mlp`` factory: an MLP for `task`'s flattened inputs."""
    in_features = math.prod(task.input_shape)
    return MLP(in_features, task.num_classes, list(params.hidden), params.activation)
