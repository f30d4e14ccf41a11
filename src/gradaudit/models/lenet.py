"""The sigmoid LeNet of Deep Leakage from Gradients."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.models.init import flat_features, image_shape
from gradaudit.types import TaskInfo


class LeNetParams(BaseModel):
    """Parameters of ``lenet``.

    Attributes:
        width: channels of each of the three convolutions (12 in the paper).
        init: ``uniform`` draws every weight and bias from U(-0.5, 0.5), as the paper's code
            does; ``pytorch`` keeps PyTorch's default (much smaller) initialisation.
        pixel_input: undo the dataset's normalisation first, so the convolutions see pixels in
            [0, 1] as in the paper (normalised inputs saturate the sigmoids under ``uniform``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(12, ge=1)
    init: Literal["uniform", "pytorch"] = "uniform"
    pixel_input: bool = True


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
        init: ``uniform`` (U(-0.5, 0.5), Zhu et al.'s code) or ``pytorch`` (the default).
        pixel_scale: per-channel ``(std, mean)`` mapping model inputs back to pixels, or None.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 12,
        init: str = "uniform",
        pixel_scale: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.init = init
        self.pixel_scale = pixel_scale
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
        if self.pixel_scale is not None:
            std, mean = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in self.pixel_scale)
            x = x * std + mean
        return self.head(self.body(x).flatten(1))

    @torch.no_grad()
    def custom_init_(self, generator: torch.Generator) -> None:
        """Re-draw every parameter from U(-0.5, 0.5) when ``init="uniform"``."""
        if self.init == "uniform":
            for param in self.parameters():
                param.uniform_(-0.5, 0.5, generator=generator)


def build_lenet(params: LeNetParams, task: TaskInfo) -> LeNet:
    """The ``lenet`` factory."""
    scale = None
    if params.pixel_input and task.normalization is not None:
        scale = (task.normalization.std, task.normalization.mean)
    return LeNet(image_shape(task, "lenet"), task.num_classes, params.width, params.init, scale)
