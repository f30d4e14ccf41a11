"""How the training set is split among clients: iid, Dirichlet skew, label shards, natural sites."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gradaudit.errors import ConfigError
from gradaudit.registry import Registry

logger = logging.getLogger(__name__)

Partitioner = Callable[..., list[np.ndarray]]
"""``fn(labels, num_clients, params, *, rng, groups)``: one sorted int64 index array per client."""

PARTITIONERS: Registry[Partitioner] = Registry("partition")
"""Every partitioner, by name."""

NATURAL_DATASETS = ("heart_disease",)
"""The datasets whose training rows carry a natural site (``Dataset.groups_train``)."""

DIRICHLET_MAX_TRIES = 100
"""How many Dirichlet draws the ``dirichlet`` partitioner tries before giving up."""


class IidParams(BaseModel):
    """The ``iid`` partition takes no parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DirichletParams(BaseModel):
    """Parameters of the ``dirichlet`` partition.

    Attributes:
        alpha: concentration; small values (0.1) give strongly skewed label mixes, large values
            (100) approach iid.
        min_size: every client must get at least this many examples.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(1, ge=1)


class PathologicalParams(BaseModel):
    """Parameters of the ``pathological`` partition.

    Attributes:
        classes_per_client: shards (each holding one label) per client.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes_per_client: int = Field(2, ge=1)


class NaturalParams(BaseModel):
    """The ``natural`` partition takes no parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- checks


def _check_sizes(labels: np.ndarray, num_clients: int, at_least: int = 1) -> None:
    if num_clients < 1:
        raise ConfigError(f"data.num_clients must be at least 1 (got {num_clients})")
    if len(labels) < num_clients * at_least:
        raise ConfigError(
            f"cannot give each of {num_clients} clients at least {at_least} example(s): the "
            f"training set has only {len(labels)}; lower data.num_clients or raise "
            f"data.max_train_examples"
        )


def _finish(parts: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """Sorted int64 index arrays; ConfigError if a client got nothing."""
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"the {kind} partition left client(s) {', '.join(map(str, empty))} without examples; "
            f"lower data.num_clients or use more training examples"
        )
    return parts


def no_sites_message(dataset: str | None = None) -> str:
    """The error text for a natural partition of a dataset without sites."""
    name = f"dataset {dataset}" if dataset else "this dataset"
    return (
        f"{name} has no natural sites; natural partition needs one of: "
        f"{', '.join(NATURAL_DATASETS)}"
    )


# --------------------------------------------------------------------------- partitioners


@PARTITIONERS.register("iid", summary="shuffle the training set and deal it out evenly")
def iid(
    labels: np.ndarray,
    num_clients: int,
    params: IidParams,
    *,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Shuffle all examples and split them into `num_clients` near-equal parts.

    Args:
        labels: the training labels (only their number is used).
        num_clients: how many clients.
        params: none.
        rng: the partition's random stream.
        groups: ignored.

    Returns:
        One sorted int64 index array per client; together they cover every example.
    """
    _check_sizes(labels, num_clients)
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients), "iid")


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


@PARTITIONERS.register(
    "dirichlet",
    summary="label skew: each class is spread over clients by Dirichlet(alpha) proportions "
    "(Hsu et al. 2019); params alpha (default 0.5), min_size (default 1)",
    params=DirichletParams,
)
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    params: DirichletParams,
    *,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Non-iid label skew after Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification" (2019).

    For every class, proportions over the clients are drawn from ``Dirichlet(alpha * 1)`` and the
    class's (shuffled) examples are cut accordingly. The whole draw is repeated, up to
    ``DIRICHLET_MAX_TRIES`` times, until every client holds at least ``min_size`` examples.

    Args:
        labels: the training labels.
        num_clients: how many clients.
        params: ``alpha`` and ``min_size``.
        rng: the partition's random stream.
        groups: ignored.

    Returns:
        One sorted int64 index array per client; together they cover every example.

    Raises:
        ConfigError: when no draw gives every client ``min_size`` examples.
    """
    _check_sizes(labels, num_clients, params.min_size)
    smallest = 0
    for _ in range(DIRICHLET_MAX_TRIES):
        parts = _dirichlet_draw(labels, num_clients, params.alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= params.min_size:
            return _finish(parts, "dirichlet")
    raise ConfigError(
        f"the dirichlet partition (alpha={params.alpha}) could not give each of {num_clients} "
        f"clients at least min_size={params.min_size} example(s) in {DIRICHLET_MAX_TRIES} tries "
        f"(smallest client in the last try: {smallest}); raise alpha, lower min_size or lower "
        f"data.num_clients"
    )


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """Split `num_shards` among classes: one each, then always to the class whose shards are
    currently the largest, so shards are about equal in size and never empty."""
    shards = np.ones(len(counts), dtype=np.int64)
    for _ in range(num_shards - len(counts)):
        shards[np.argmax(counts / shards)] += 1
    return shards


@PARTITIONERS.register(
    "pathological",
    summary="label shards: sort by label, cut into num_clients * classes_per_client one-label "
    "shards, deal classes_per_client random shards to each client (McMahan et al. 2017)",
    params=PathologicalParams,
)
def pathological(
    labels: np.ndarray,
    num_clients: int,
    params: PathologicalParams,
    *,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The pathological non-iid split of McMahan et al., "Communication-Efficient Learning of
    Deep Networks from Decentralized Data" (AISTATS 2017).

    The examples are sorted by label (shuffled within each label) and cut into
    ``S = num_clients * classes_per_client`` shards; each client gets ``classes_per_client``
    random shards. Unlike the original fixed-size shards, no shard straddles two labels: each
    class gets at least one shard and the rest go where shards are largest, so every client sees
    at most ``classes_per_client`` labels. When ``S`` is smaller than the number of classes,
    ``S`` random classes each form one shard and the other classes are left out.

    Args:
        labels: the training labels.
        num_clients: how many clients.
        params: ``classes_per_client``.
        rng: the partition's random stream.
        groups: ignored.

    Returns:
        One sorted int64 index array per client.
    """
    num_shards = num_clients * params.classes_per_client
    _check_sizes(labels, num_clients, params.classes_per_client)
    classes = np.unique(labels)
    if num_shards < len(classes):
        kept = np.sort(rng.choice(classes, size=num_shards, replace=False))
        logger.info(
            "pathological partition: %d shards for %d classes; using only classes %s",
            num_shards,
            len(classes),
            kept.tolist(),
        )
        classes = kept
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.array([len(m) for m in members], dtype=np.float64)
    shard_counts = _shards_per_class(counts, num_shards)
    shards = [
        shard
        for class_members, n in zip(members, shard_counts, strict=True)
        for shard in np.array_split(class_members, n)
    ]
    deal = rng.permutation(num_shards).reshape(num_clients, params.classes_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in deal], "pathological")


@PARTITIONERS.register(
    "natural",
    summary="one client per natural site (hospital); needs a dataset with sites "
    f"({', '.join(NATURAL_DATASETS)}) and num_clients equal to its number of sites",
    params=NaturalParams,
)
def natural(
    labels: np.ndarray,
    num_clients: int,
    params: NaturalParams,
    *,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Client i holds the training examples of site i (the dataset's own cross-silo split).

    Args:
        labels: the training labels (only their number is used).
        num_clients: how many clients; must equal the number of sites.
        params: none.
        rng: unused; the split is fixed by the data.
        groups: the site index of each training example.

    Raises:
        ConfigError: when the dataset has no sites or `num_clients` differs from their number.
    """
    if groups is None:
        raise ConfigError(no_sites_message())
    groups = np.asarray(groups)
    if groups.shape != (len(labels),):
        raise ConfigError(
            f"natural partition: {len(groups)} site entries for {len(labels)} training examples"
        )
    sites = np.unique(groups)
    if len(sites) != num_clients:
        raise ConfigError(
            f"natural partition gives one client per site: the dataset has {len(sites)} sites "
            f"but data.num_clients is {num_clients}; set data.num_clients: {len(sites)}"
        )
    return _finish([np.flatnonzero(groups == site) for site in sites], "natural")


def partition_dataset(
    spec_kind: str,
    params: dict[str, object],
    labels: np.ndarray,
    num_clients: int,
    *,
    rng: np.random.Generator,
    groups: np.ndarray | None,
    dataset: str | None = None,
) -> list[np.ndarray]:
    """Validate `params` for partitioner `spec_kind` and split the training set.

    Args:
        spec_kind: the partitioner's registry name (``data.partition.kind``).
        params: its raw parameters (``data.partition.params``).
        labels: the training labels.
        num_clients: how many clients.
        rng: the partition's random stream.
        groups: the site index of each training example, or None.
        dataset: the dataset's name, for error messages.

    Returns:
        One sorted int64 index array per client into the training set.

    Raises:
        ConfigError: unknown partitioner, invalid params, or a split that leaves a client empty.
    """
    fn = PARTITIONERS.get(spec_kind)
    parsed = PARTITIONERS.parse_params(spec_kind, params, where="data.partition.params")
    if spec_kind == "natural" and groups is None:
        raise ConfigError(no_sites_message(dataset))
    labels = np.asarray(labels).reshape(-1)
    return fn(labels, num_clients, parsed, rng=rng, groups=groups)
