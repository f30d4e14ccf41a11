"""A late-fusion classifier of a tabular record and a token sequence (a clinical note with its
structured fields)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.errors import ConfigError
from gradaudit.models.tabular import Encoding, TabularMLP
from gradaudit.models.transformer import TransformerClassifier
from gradaudit.types import TabularSchema, TaskInfo, TextSchema


class FusionParams(BaseModel):
    """Parameters of ``fusion``.

    Attributes:
        tabular_hidden: widths of the tabular branch's ReLU hidden layers.
        embedding_dim: size of each categorical column's embedding (``embedding`` encoding).
        encoding: how the tabular branch reads a categorical column: ``embedding`` or
            ``onehot`` (see `TabularMLP`).
        tabular_features: width of the tabular branch's output.
        dim: width of the text branch's token and position embeddings and blocks.
        heads: attention heads per block (must divide `dim`).
        layers: encoder blocks of the text branch.
        ff: hidden width of each block's feed-forward part.
        text_features: width of the text branch's output (a linear map of the pooled encoding).
        hidden: widths of the fusion head's ReLU hidden layers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tabular_hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32])
    embedding_dim: int = Field(4, ge=1)
    encoding: Encoding = "embedding"
    tabular_features: int = Field(16, ge=1)
    dim: int = Field(32, ge=4)
    heads: int = Field(2, ge=1)
    layers: int = Field(1, ge=1, le=6)
    ff: int = Field(64, ge=1)
    text_features: int = Field(16, ge=1)
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32])


class FusionClassifier(nn.Module):
    """Late fusion of a tabular branch and a text branch, then an MLP head.

    A row of ``x`` holds the tabular columns first (standardised numeric values, then one
    categorical code per column, as `TabularSchema` says), then the token ids (`TextSchema`),
    all stored as floats. The branches are the zoo's own models, composed: the tabular branch is
    a `TabularMLP` (numeric columns plus per-column categorical embeddings, Vero et al., TabLeak,
    ICML 2023) whose output layer gives `tabular_features` features; the text branch is a
    `TransformerClassifier` (token + position embeddings, pre-LN blocks, masked mean pooling: the
    encoder TAG and LAMP invert) whose output layer maps the pooled encoding to `text_features`
    features. The two feature vectors are concatenated, passed through a ReLU and the head's
    hidden layers, and a last linear layer (the classifier head) gives the logits. This is the
    late-fusion design of multimodal clinical models (e.g. Huang et al., "Fusion of medical
    imaging and electronic health records using deep learning", npj Digital Medicine 2020).

    Gradient-inversion attacks call `forward_relaxed`, which takes every input in a continuous
    form: numeric values, a probability vector per categorical column (TabLeak's softmax
    relaxation) and token embeddings (TAG/LAMP).

    Args:
        tabular: the tabular columns' layout.
        text: the vocabulary and sequence length.
        num_classes: logits produced.
        params: the branch and head sizes.
    """

    def __init__(
        self, tabular: TabularSchema, text: TextSchema, num_classes: int, params: FusionParams
    ) -> None:
        super().__init__()
        if params.dim % params.heads:
            raise ConfigError(f"fusion: heads={params.heads} does not divide dim={params.dim}")
        self.num_numeric = len(tabular.numeric)
        self.num_tabular = tabular.num_features
        self.pad_id = text.pad_id
        self.tabular = TabularMLP(
            tabular,
            params.tabular_features,
            list(params.tabular_hidden),
            params.embedding_dim,
            params.encoding,
        )
        self.text = TransformerClassifier(
            text, params.text_features, params.dim, params.heads, params.layers, params.ff
        )
        layers: list[nn.Module] = []
        width = params.tabular_features + params.text_features
        for size in params.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The tabular columns (N, F) and the int64 token ids (N, L) of rows `x` (N, F + L)."""
        return x[:, : self.num_tabular], x[:, self.num_tabular :].long()

    def fuse(self, tabular_features: Tensor, text_features: Tensor) -> Tensor:
        """Logits from the two branches' outputs."""
        fused = torch.relu(torch.cat([tabular_features, text_features], dim=1))
        return self.head(self.body(fused))

    def forward_relaxed(
        self, numeric: Tensor, probs: Sequence[Tensor], embeddings: Tensor, keep: Tensor
    ) -> Tensor:
        """Logits from continuous inputs.

        Args:
            numeric: (N, num_numeric) standardised numeric values.
            probs: per categorical column, (N, cardinality) probabilities over its codes (a
                one-hot row gives exactly the discrete input).
            embeddings: (N, L, dim) token embeddings (positions not yet added), e.g.
                ``self.text.embed(tokens)`` or a convex combination of embedding rows.
            keep: (N, L) bool, False at padding.
        """
        text_features = self.text.forward_embeddings(embeddings, keep)
        return self.fuse(self.tabular.forward_relaxed(numeric, probs), text_features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for rows (N, F + L) of tabular columns then token ids."""
        tabular, tokens = self.split(x)
        text_features = self.text.forward_embeddings(self.text.embed(tokens), tokens != self.pad_id)
        return self.fuse(self.tabular(tabular), text_features)


def build_fusion(params: FusionParams, task: TaskInfo) -> FusionClassifier:
    """The ``fusion`` factory; needs a multimodal dataset (a tabular and a text schema)."""
    if task.tabular is None or task.text is None:
        raise ConfigError(
            f"fusion needs tabular columns and token sequences; dataset {task.dataset!r} gives "
            f"{task.modality} inputs"
        )
    width = task.tabular.num_features + task.text.max_length
    if task.input_shape != (width,):
        raise ConfigError(
            f"fusion: dataset {task.dataset!r} has inputs of shape {task.input_shape}, but its "
            f"schemas describe {task.tabular.num_features} tabular columns and "
            f"{task.text.max_length} tokens, ({width},)"
        )
    return FusionClassifier(task.tabular, task.text, task.num_classes, params)
