"""A small CIFAR-style residual network."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from gradaudit.models.init import image_shape
from gradaudit.types import TaskInfo


class ResNetParams(BaseModel):
    """Parameters of ``resnet``.

    Attributes:
        depth: layers with weights, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...): n BasicBlocks
            per stage.
        width: channels of the first stage; the others use 2x and 4x this.
        norm: ``batch`` (BatchNorm) or ``group`` (GroupNorm, which keeps no running statistics).
        groups: GroupNorm groups; must divide `width` (and so every stage's width).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: int = 20
    width: int = Field(16, ge=1)
    norm: Literal["batch", "group"] = "batch"
    groups: int = Field(8, ge=1)

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, depth: int) -> int:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError("resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, ...)")
        return depth

    @model_validator(mode="after")
    def _groups_divide_width(self) -> ResNetParams:
        if self.norm == "group" and self.width % self.groups != 0:
            raise ValueError(
                f"groups ({self.groups}) must divide width ({self.width}) for GroupNorm"
            )
        return self


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., CVPR 2016).

    The shortcut is the identity, or a strided 1x1 convolution plus normalisation when the shape
    changes (option B of the paper).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution and of the shortcut.
        norm: ``batch`` or ``group``.
        groups: GroupNorm groups.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm: str, groups: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels, groups)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(norm, out_channels, groups),
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, (N, out_channels, H / stride, W / stride)."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    A 3x3 stem convolution, three stages of n BasicBlocks with widths w, 2w, 4w (strides 1, 2,
    2), global average pooling and one linear layer: ``depth = 6n + 2`` (ResNet-20 is n = 3,
    w = 16).

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: logits produced.
        depth: ``6n + 2``.
        width: w.
        norm: ``batch`` or ``group``.
        groups: GroupNorm groups.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        depth: int = 20,
        width: int = 16,
        norm: str = "batch",
        groups: int = 8,
    ) -> None:
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
            _norm(norm, width, groups),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        channels = width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(channels, out, stride if b == 0 else 1, norm, groups))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, C, H, W)."""
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def build_resnet(params: ResNetParams, task: TaskInfo) -> ResNet:
    """The ``resnet`` factory."""
    return ResNet(
        image_shape(task, "resnet"),
        task.num_classes,
        params.depth,
        params.width,
        params.norm,
        params.groups,
    )
