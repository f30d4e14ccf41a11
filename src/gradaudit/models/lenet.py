"""The sigmoid LeNet of Deep Leakage from Gradients."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.models.init import flat_features, image_shape
from gradaudit.types import TaskInfo


class LeNetParams(BaseModel):
    """Parameters of ``lenet``.

    Attributes:
        width: channels of each of the three convolutions (12 in the paper).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(12, ge=1)


class LeNet(nn.Module):
    """The LeNet variant of Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019.

    Three 5x5 convolutions (strides 2, 2, 1, padding 2) each followed by a sigmoid, then one
    linear layer. Sigmoids (smooth, twice differentiable) and no pooling are what make the
    gradient-matching attack of the paper work. A 3x32x32 input flattens to 768 values; other
    input sizes are handled by computing the flatten size from the input shape.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: logits produced.
        width: channels of every convolution.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = 12
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.head = nn.Linear(flat_features(self.body, input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.body(x).flatten(1))


def build_lenet(params: LeNetParams, task: TaskInfo) -> LeNet:
    """The ``lenet`` factory."""
    return LeNet(image_shape(task, "lenet"), task.num_classes, params.width)
