"""An MLP with per-column embeddings for mixed numeric and categorical rows."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.errors import ConfigError
from gradaudit.types import TabularSchema, TaskInfo


class TabularMLPParams(BaseModel):
    """Parameters of ``tabular_mlp``.

    Attributes:
        hidden: widths of the ReLU hidden layers.
        embedding_dim: size of each categorical column's embedding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [100, 100])
    embedding_dim: int = Field(8, ge=1)


class TabularMLP(nn.Module):
    """A fully connected network for tabular rows, as attacked by Vero et al., "TabLeak: Tabular
    Data Leakage in Federated Learning", ICML 2023.

    Numeric columns enter as they are; each categorical column (its integer code stored as a
    float) goes through its own ``nn.Embedding``. Everything is concatenated and fed to ReLU
    hidden layers and a final linear layer. The embedding lookup is not differentiable in the
    input.

    Args:
        schema: the column layout: numeric columns first, then one column per categorical.
        num_classes: logits produced.
        hidden: hidden-layer widths.
        embedding_dim: embedding size per categorical column.
    """

    def __init__(
        self, schema: TabularSchema, num_classes: int, hidden: list[int], embedding_dim: int = 8
    ) -> None:
        super().__init__()
        if len(schema.cardinalities) != len(schema.categorical):
            raise ConfigError(
                f"tabular schema has {len(schema.categorical)} categorical columns but "
                f"{len(schema.cardinalities)} cardinalities"
            )
        self.num_numeric = len(schema.numeric)
        self.embeddings = nn.ModuleList(
            nn.Embedding(cardinality, embedding_dim) for cardinality in schema.cardinalities
        )
        layers: list[nn.Module] = []
        width = self.num_numeric + embedding_dim * len(schema.categorical)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for rows (N, num_numeric + num_categorical)."""
        parts = [x[:, : self.num_numeric]]
        for j, embedding in enumerate(self.embeddings):
            parts.append(embedding(x[:, self.num_numeric + j].long()))
        return self.head(self.body(torch.cat(parts, dim=1)))


def build_tabular_mlp(params: TabularMLPParams, task: TaskInfo) -> TabularMLP:
    """The ``tabular_mlp`` factory; needs a dataset with a tabular schema."""
    if task.tabular is None:
        raise ConfigError("tabular_mlp needs a tabular dataset")
    return TabularMLP(task.tabular, task.num_classes, list(params.hidden), params.embedding_dim)
