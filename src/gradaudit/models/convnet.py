"""The eight-layer ConvNet of Inverting Gradients."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.errors import ConfigError
from gradaudit.models.init import flat_features, image_shape
from gradaudit.types import TaskInfo


class ConvNetParams(BaseModel):
    """Parameters of ``convnet``.

    Attributes:
        width: channels of the first convolution; later ones use 2x and 4x this.
        norm: ``batch`` (BatchNorm after every convolution, as in the paper) or ``none``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(64, ge=1)
    norm: Literal["batch", "none"] = "batch"


class ConvNet(nn.Module):
    """The ConvNet of Geiping et al., "Inverting Gradients", NeurIPS 2020 (inversefed/breaching).

    Eight 3x3 convolutions (padding 1) with widths w, 2w, 2w, 4w, 4w, 4w, 4w, 4w, each followed by
    BatchNorm (unless ``norm="none"``) and ReLU; 3x3 max-pooling after the sixth and the eighth;
    then one linear layer. A 32x32 input flattens to 36·w values; the flatten size is computed
    from the input shape, which must be at least 9x9.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: logits produced.
        width: base width w.
        norm: ``batch`` or ``none``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channels = [input_shape[0], width, 2 * width, 2 * width, 4 * width] + [4 * width] * 4
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(8):
            layers[f"conv{i}"] = nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, padding=1)
            if norm == "batch":
                layers[f"bn{i}"] = nn.BatchNorm2d(channels[i + 1])
            layers[f"relu{i}"] = nn.ReLU()
            if i in (5, 7):
                layers[f"pool{(i - 5) // 2}"] = nn.MaxPool2d(3)
        self.body = nn.Sequential(layers)
        self.head = nn.Linear(flat_features(self.body, input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.body(x).flatten(1))


def build_convnet(params: ConvNetParams, task: TaskInfo) -> ConvNet:
    """The ``convnet`` factory; refuses inputs smaller than 9x9 (two 3x3 poolings)."""
    shape = image_shape(task, "convnet")
    if min(shape[1:]) < 9:
        raise ConfigError(
            f"convnet needs images of at least 9x9 (it max-pools by 3 twice); dataset "
            f"{task.dataset!r} has {shape[1]}x{shape[2]}: use lenet, mlp or resnet instead"
        )
    return ConvNet(shape, task.num_classes, params.width, params.norm)
