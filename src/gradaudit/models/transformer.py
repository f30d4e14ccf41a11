"""A small transformer encoder that classifies token sequences (clinical notes, questions)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.errors import ConfigError
from gradaudit.types import TaskInfo, TextSchema


class TransformerParams(BaseModel):
    """Parameters of ``transformer``.

    Attributes:
        dim: width of the token and position embeddings and of every block.
        heads: attention heads per block (must divide `dim`).
        layers: encoder blocks.
        ff: hidden width of each block's feed-forward part.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(64, ge=4)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1, le=6)
    ff: int = Field(128, ge=1)


class Block(nn.Module):
    """One pre-LayerNorm encoder block: masked multi-head self-attention, then a GELU MLP.

    Written with plain tensor operations (no fused kernel), so ``torch.func.vmap`` computes
    per-example gradients through it and double backward works for gradient matching.
    """

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ff)
        self.ff2 = nn.Linear(ff, dim)

    def forward(self, h: Tensor, keep: Tensor) -> Tensor:
        """`h` (N, L, D); `keep` (N, L) bool, False at padding (never attended to)."""
        n, length, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)

        def split(t: Tensor) -> Tensor:
            return t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        logits = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        logits = logits.masked_fill(~keep[:, None, None, :], torch.finfo(h.dtype).min)
        mixed = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, dim)
        h = h + self.out(mixed)
        return h + self.ff2(nn.functional.gelu(self.ff1(self.norm2(h))))


class TransformerClassifier(nn.Module):
    """A BERT-style encoder, small: token + learned position embeddings, pre-LN blocks, masked
    mean pooling and a linear head; the architecture whose gradients TAG (Deng et al., EMNLP
    Findings 2021) and LAMP (Balunović et al., NeurIPS 2022) invert.

    ``x`` holds token ids stored as floats (`TextSchema`); padding is masked out of attention
    and pooling, so a padding position affects neither the logits nor any gradient. The token
    embedding (``token_embedding.weight``) therefore receives a non-zero gradient row exactly for
    the ids in the batch: what `text_tokens` reads.

    Attacks that optimise continuous inputs call `embed` and `forward_embeddings` directly.

    Args:
        schema: the vocabulary and sequence length.
        num_classes: logits produced.
        dim, heads, layers, ff: see `TransformerParams`.
    """

    def __init__(
        self, schema: TextSchema, num_classes: int, dim: int, heads: int, layers: int, ff: int
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transformer: heads={heads} does not divide dim={dim}")
        self.pad_id = schema.pad_id
        self.token_embedding = nn.Embedding(schema.vocab_size, dim, padding_idx=schema.pad_id)
        self.position_embedding = nn.Embedding(schema.max_length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings (N, L, D) of int ids (N, L), positions not yet added."""
        return self.token_embedding(tokens)

    def forward_embeddings(self, embeddings: Tensor, keep: Tensor) -> Tensor:
        """Logits (N, classes) from token embeddings (N, L, D) and the non-padding mask (N, L)."""
        length = embeddings.shape[1]
        h = embeddings + self.position_embedding.weight[:length]
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        weights = keep.to(h.dtype).unsqueeze(-1)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, classes) for token ids stored as floats, (N, L)."""
        tokens = x.long()
        return self.forward_embeddings(self.embed(tokens), tokens != self.pad_id)


def text_schema(task: TaskInfo, model: str) -> TextSchema:
    """The task's `TextSchema`, or a ConfigError naming `model`."""
    if task.text is None:
        raise ConfigError(
            f"{model} needs token sequences; dataset {task.dataset!r} gives {task.modality} inputs"
        )
    return task.text


def build_transformer(params: TransformerParams, task: TaskInfo) -> TransformerClassifier:
    """The ``transformer`` factory; needs a text dataset."""
    return TransformerClassifier(
        text_schema(task, "transformer"),
        task.num_classes,
        params.dim,
        params.heads,
        params.layers,
        params.ff,
    )
