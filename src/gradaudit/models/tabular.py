"""An MLP for mixed numeric and categorical rows: per-column embeddings or one-hot inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.errors import ConfigError
from gradaudit.types import TabularSchema, TaskInfo

Encoding = Literal["embedding", "onehot"]


class TabularMLPParams(BaseModel):
    """Parameters of ``tabular_mlp``.

    Attributes:
        hidden: widths of the ReLU hidden layers.
        embedding_dim: size of each categorical column's embedding (``embedding`` encoding only).
        encoding: how a categorical column enters the first layer: ``embedding`` (a learnt
            vector per code) or ``onehot`` (the code's one-hot vector, TabLeak's network).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [100, 100])
    embedding_dim: int = Field(8, ge=1)
    encoding: Encoding = "embedding"


def one_hot(codes: Tensor, cardinality: int) -> Tensor:
    """Float one-hot rows of integer `codes` (any float or int tensor), shape ``(*codes, card)``.

    A comparison rather than ``nn.functional.one_hot``, so it also runs under ``torch.func.vmap``.

    Example:
        >>> one_hot(torch.tensor([2.0, 0.0]), 3).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return (codes.long().unsqueeze(-1) == torch.arange(cardinality, device=codes.device)).float()


class TabularMLP(nn.Module):
    """A fully connected network for tabular rows, as attacked by Vero et al., "TabLeak: Tabular
    Data Leakage in Federated Learning", ICML 2023.

    Numeric columns enter as they are. Each categorical column (its integer code stored as a
    float) enters either through its own ``nn.Embedding`` (``encoding="embedding"``) or as its
    one-hot vector (``encoding="onehot"``: TabLeak's FC network, whose first layer takes the
    numeric columns and the one-hot blocks; for Adult with hidden [100, 100] that is
    FC (6 + sum of cardinalities)-100-100-2). Everything is concatenated and fed to ReLU hidden
    layers and a final linear layer.

    The lookup of a code is not differentiable in the input; :meth:`forward_relaxed` is: it
    takes a probability vector per categorical column instead of a code, and equals
    :meth:`forward` on exact one-hot vectors.

    Args:
        schema: the column layout: numeric columns first, then one column per categorical.
        num_classes: logits produced.
        hidden: hidden-layer widths.
        embedding_dim: embedding size per categorical column (embedding encoding).
        encoding: ``embedding`` or ``onehot``.
    """

    def __init__(
        self,
        schema: TabularSchema,
        num_classes: int,
        hidden: list[int],
        embedding_dim: int = 8,
        encoding: Encoding = "embedding",
    ) -> None:
        super().__init__()
        if len(schema.cardinalities) != len(schema.categorical):
            raise ConfigError(
                f"tabular schema has {len(schema.categorical)} categorical columns but "
                f"{len(schema.cardinalities)} cardinalities"
            )
        self.num_numeric = len(schema.numeric)
        self.cardinalities = tuple(schema.cardinalities)
        self.encoding: Encoding = encoding
        self.embeddings = nn.ModuleList(
            nn.Embedding(cardinality, embedding_dim)
            for cardinality in (schema.cardinalities if encoding == "embedding" else ())
        )
        layers: list[nn.Module] = []
        if encoding == "embedding":
            width = self.num_numeric + embedding_dim * len(schema.categorical)
        else:
            width = self.num_numeric + sum(schema.cardinalities)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def input_layer(self) -> nn.Linear:
        """The first ``nn.Linear``: the one that reads the encoded columns."""
        return self.body[0] if len(self.body) else self.head  # type: ignore[return-value]

    def onehot_columns(self, column: int) -> slice:
        """Where categorical `column`'s one-hot block sits among the input layer's inputs
        (``onehot`` encoding).

        Example:
            >>> schema = TabularSchema(("age",), ("sex", "cp"), (2, 4))
            >>> TabularMLP(schema, 2, [3], encoding="onehot").onehot_columns(1)
            slice(3, 7, None)
        """
        if self.encoding != "onehot":
            raise ValueError("onehot_columns needs encoding='onehot'")
        start = self.num_numeric + sum(self.cardinalities[:column])
        return slice(start, start + self.cardinalities[column])

    def encode(self, numeric: Tensor, probs: Sequence[Tensor]) -> Tensor:
        """The input layer's input from numeric columns and one probability row per categorical
        column: ``probs[j] @ embedding_j.weight`` (embedding) or ``probs[j]`` itself (onehot)."""
        if len(probs) != len(self.cardinalities):
            raise ValueError(
                f"expected {len(self.cardinalities)} categorical blocks, got {len(probs)}"
            )
        parts = [numeric]
        for j, p in enumerate(probs):
            parts.append(p @ self.embeddings[j].weight if self.encoding == "embedding" else p)
        return torch.cat(parts, dim=-1)

    def forward_relaxed(self, numeric: Tensor, probs: Sequence[Tensor]) -> Tensor:
        """Logits for relaxed rows: `numeric` (N, num_numeric) and `probs[j]` (N, card_j), each
        row a distribution over column j's codes (TabLeak's softmax relaxation)."""
        return self.head(self.body(self.encode(numeric, probs)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for rows (N, num_numeric + num_categorical)."""
        numeric = x[:, : self.num_numeric]
        if self.encoding == "embedding":
            parts = [numeric]
            for j, embedding in enumerate(self.embeddings):
                parts.append(embedding(x[:, self.num_numeric + j].long()))
            return self.head(self.body(torch.cat(parts, dim=1)))
        probs = [
            one_hot(x[:, self.num_numeric + j], card) for j, card in enumerate(self.cardinalities)
        ]
        return self.forward_relaxed(numeric, probs)


def build_tabular_mlp(params: TabularMLPParams, task: TaskInfo) -> TabularMLP:
    """The ``tabular_mlp`` factory; needs a dataset with a tabular schema."""
    if task.tabular is None:
        raise ConfigError("tabular_mlp needs a tabular dataset")
    return TabularMLP(
        task.tabular,
        task.num_classes,
        list(params.hidden),
        params.embedding_dim,
        params.encoding,
    )
