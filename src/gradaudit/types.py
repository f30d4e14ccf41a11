"""Value types shared by every layer: updates, what the adversary observes, and attack results."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

TensorDict = dict[str, Tensor]
"""Tensors keyed exactly like ``model.state_dict()``."""

AttackStatus = Literal["ok", "not_applicable", "failed"]


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors as sent uncompressed.

    Example:
        >>> tensor_bytes({"w": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)})
        20
    """
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends to the server in one round.

    Attributes:
        client_id: the client's index in the federation.
        round: the round, counted from 1.
        kind: ``"gradient"`` (FedSGD: one gradient on one local batch) or ``"delta"`` (FedAvg: the
            local model minus the global model). Buffers (BatchNorm statistics) always travel as
            the change the client's local forward passes made to them.
        tensors: one tensor per ``model.state_dict()`` key.
        num_examples: how many local examples the update was computed from (sent for weighting).
        withheld: keys the client did not send (a private head, a dropped sub-model part); their
            tensors are zeros that carry no information and aggregation leaves them unchanged.
        wire_bytes: the encoded size on the wire when a defense compresses the update (sparse
            indices, quantised codes); None means dense float tensors of the sent keys.
    """

    client_id: int
    round: int
    kind: Literal["gradient", "delta"]
    tensors: TensorDict
    num_examples: int
    withheld: frozenset[str] = frozenset()
    wire_bytes: int | None = None

    @property
    def sent_keys(self) -> list[str]:
        """The keys that travelled to the server."""
        return [k for k in self.tensors if k not in self.withheld]

    @property
    def size_bytes(self) -> int:
        """Bytes on the wire: `wire_bytes`, else the sent tensors uncompressed."""
        if self.wire_bytes is not None:
            return self.wire_bytes
        return tensor_bytes({k: self.tensors[k] for k in self.sent_keys})


class Visibility(enum.Enum):
    """What the server's aggregation protocol lets the server see."""

    INDIVIDUAL = "individual"
    AGGREGATE_ONLY = "aggregate_only"
    CIPHERTEXT = "ciphertext"


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine normalisation applied to inputs: ``x_model = (x_pixel - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _shape(self, x: Tensor) -> tuple[Tensor, Tensor]:
        view = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """Pixel space [0, 1] to model space; ``x`` is (N, C, ...)."""
        mean, std = self._shape(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space back to pixel space; ``x`` is (N, C, ...)."""
        mean, std = self._shape(x)
        return x * std + mean


@dataclass(frozen=True)
class TabularSchema:
    """The columns of a tabular input row.

    A row of ``x`` holds the numeric features first (standardised floats), then one column per
    categorical feature holding its integer code (stored as a float; missing is its own code).
    `numeric_mean` and `numeric_std` are what each numeric column was standardised with,
    ``x = (raw - mean) / std`` (raw units; empty when the loader did not standardise); they
    describe the preprocessing, not the data's identity, so they take no part in equality.
    """

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    cardinalities: tuple[int, ...]
    categories: tuple[tuple[str, ...], ...] = ()
    numeric_mean: tuple[float, ...] = field(default=(), compare=False)
    numeric_std: tuple[float, ...] = field(default=(), compare=False)

    def raw_scale(self, column: str) -> tuple[float, float]:
        """``(mean, std)`` of numeric `column` in raw units: ``raw = x * std + mean``.

        Raises:
            ValueError: `column` is not numeric, or the loader kept no standardisation.

        Example:
            >>> TabularSchema(("age",), (), (), numeric_mean=(54.0,), numeric_std=(9.0,)
            ...               ).raw_scale("age")
            (54.0, 9.0)
        """
        if column not in self.numeric:
            raise ValueError(f"no numeric column {column!r}; numeric: {list(self.numeric)}")
        if len(self.numeric_mean) != len(self.numeric):
            raise ValueError(
                f"{column!r}: raw units are known only where the loader recorded its "
                "standardisation; give the values in model units (units: model)"
            )
        i = self.numeric.index(column)
        return self.numeric_mean[i], self.numeric_std[i]

    @property
    def num_features(self) -> int:
        """Columns in a row of ``x``."""
        return len(self.numeric) + len(self.categorical)

    def categorical_offsets(self) -> tuple[int, ...]:
        """Where each categorical column's codes start in one id space over all columns.

        Item ``offset[j] + code`` names "column j has this code"; a `Reconstruction.bag` of
        tabular rows uses these ids.

        Example:
            >>> TabularSchema((), ("sex", "cp"), (2, 4)).categorical_offsets()
            (0, 2)
        """
        offsets, start = [], 0
        for cardinality in self.cardinalities:
            offsets.append(start)
            start += cardinality
        return tuple(offsets)


@dataclass(frozen=True)
class TextSchema:
    """How token sequences are laid out in ``x``: one token id per position, stored as a float.

    The vocabulary is public: the federation's tokenizer is shipped with the model, so every
    participant (the server included) knows it. Sequences are padded on the right with
    `pad_id` to `max_length`; words outside the vocabulary map to `unk_id`.

    Attributes:
        vocab: the token of each id.
        max_length: positions per sequence (after truncation and padding).
        pad_id: the padding token's id.
        unk_id: the id of out-of-vocabulary words.
    """

    vocab: tuple[str, ...]
    max_length: int
    pad_id: int = 0
    unk_id: int = 1

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.vocab)

    def decode(self, ids: Tensor) -> str:
        """The text of one sequence of ids, padding left out.

        Example:
            >>> schema = TextSchema(("<pad>", "<unk>", "chest", "pain"), 4)
            >>> schema.decode(torch.tensor([2, 3, 0, 0]))
            'chest pain'
        """
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != self.pad_id)


@dataclass(frozen=True)
class TaskInfo:
    """Public facts about the learning task that every participant, the server included, knows.

    Attributes:
        dataset: the dataset's registry name.
        modality: ``"image"``, ``"tabular"``, ``"text"`` or ``"multimodal"`` (a row's tabular
            columns first, then its token ids).
        input_shape: the shape of one input, e.g. ``(3, 32, 32)``.
        num_classes: the number of labels.
        normalization: for images, how pixels in [0, 1] map to model inputs; None otherwise.
        class_names: a name per label.
        tabular: for tabular (and multimodal) data, the column schema.
        text: for text (and multimodal) data, the token layout and the public vocabulary.
    """

    dataset: str
    modality: Literal["image", "tabular", "text", "multimodal"]
    input_shape: tuple[int, ...]
    num_classes: int
    normalization: Normalization | None
    class_names: tuple[str, ...]
    tabular: TabularSchema | None = None
    text: TextSchema | None = None


@dataclass(frozen=True)
class Observation:
    """All that an attack may touch: exactly what the chosen adversary sees in one round.

    Attributes:
        round: the observed round (from 1).
        target_client: the client the adversary attacks.
        global_params: the model state the server sent at the start of the round.
        updates: the individual updates the adversary sees (empty when it sees only the aggregate).
        aggregate: the aggregated update, when the adversary sees it.
        side_info: only what the threat model grants, e.g. ``{"labels": tensor, "batch_size": 8}``.
            An inference attack also finds its question here: ``side_info["candidates"]`` holds
            the records it must decide about (see `threat.challenge`).
        task: public facts about the task (input shape, normalisation, number of classes).
        initial_params: the model the federation started from (the server chose it).
        final_params: the model after the last round (the server computed it), when the attack
            may use it; None for attacks on one round.
        history: for attacks that combine rounds, what the same adversary saw in each captured
            round, oldest first (this round included); empty otherwise.
    """

    round: int
    target_client: int
    global_params: TensorDict
    updates: tuple[ClientUpdate, ...]
    aggregate: TensorDict | None
    side_info: Mapping[str, object]
    task: TaskInfo
    initial_params: TensorDict | None = None
    final_params: TensorDict | None = None
    history: tuple[Observation, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "side_info", MappingProxyType(dict(self.side_info)))

    def update_of(self, client: int) -> ClientUpdate | None:
        """The individual update of `client`, if the adversary saw it."""
        for update in self.updates:
            if update.client_id == client:
                return update
        return None


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered; scored later against the private data.

    Attributes:
        images: reconstructed inputs in pixel space [0, 1], (N, C, H, W), or None.
        labels: recovered labels as a multiset (order carries no meaning), or None.
        rows: reconstructed tabular rows in model space, (N, F) laid out as `TabularSchema`
            says (standardised numeric values, then categorical codes), or None.
        tokens: reconstructed token sequences, (N, L) int64 ids (`TextSchema`), or None.
        bag: a multiset of item ids recovered without their order or owner: token ids for
            text; for tabular rows, ``offset(column) + code`` over the categorical columns
            (`categorical_offsets`). Repeats carry counts; None if not recovered.
        confidence: per reconstructed input, the attacker's own confidence (higher is surer).
        kept: per reconstructed input, whether the attacker keeps it after its own checks
            (e.g. rows that break a clinical rule are dropped); None means all are kept.
        scores: an inference attack's answer, float64, one row per candidate in the order of
            ``side_info["candidates"]``: shape (N,) for a yes/no question (higher means "member",
            "has the property"), (N, K) for a choice among K answers (a score per source client
            or attribute value; higher is likelier).
    """

    images: Tensor | None = None
    labels: Tensor | None = None
    rows: Tensor | None = None
    tokens: Tensor | None = None
    bag: Tensor | None = None
    confidence: Tensor | None = None
    kept: Tensor | None = None
    scores: Tensor | None = None


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on one observation.

    Attributes:
        attack: the attack's registry name.
        round: the observed round.
        client: the attacked client.
        status: ``ok``, ``not_applicable`` (the threat model does not give the attack its input:
            `reason` says which) or ``failed`` (it ran and raised: `reason` holds the error).
        reason: why the attack did not run or failed.
        reconstruction: what it recovered (status ``ok`` only).
        seconds: wall-clock seconds the attack took.
        details: attack-specific facts for the report (method used, iterations run, losses).
        trace: (iteration, seconds, loss) points of an optimisation, for convergence plots.
        snapshots: (seconds since the attack started, the best reconstruction so far in pixel
            space [0, 1], (N, C, H, W)) pairs, for PSNR-vs-seconds curves.
    """

    attack: str
    round: int
    client: int
    status: AttackStatus
    reason: str | None = None
    reconstruction: Reconstruction = field(default_factory=Reconstruction)
    seconds: float = 0.0
    details: Mapping[str, object] = field(default_factory=dict)
    trace: tuple[tuple[int, float, float], ...] = ()
    snapshots: tuple[tuple[float, Tensor], ...] = ()
