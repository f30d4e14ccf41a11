"""Tests of the partitioners that split a training set among clients."""

from __future__ import annotations

import numpy as np
import pytest

from gradaudit.data import PARTITIONERS, partition_dataset
from gradaudit.errors import ConfigError


def _labels(per_class: int = 100, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def _split(
    kind: str,
    labels: np.ndarray,
    num_clients: int,
    params: dict[str, object] | None = None,
    *,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    return partition_dataset(
        kind,
        params or {},
        labels,
        num_clients,
        rng=np.random.default_rng(seed),
        groups=groups,
    )


def _check_disjoint(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
        assert part.min() >= 0
        assert part.max() < n
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)


def _mean_majority_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Average over clients of the share of the client's most common label."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_registered_partitioners() -> None:
    assert PARTITIONERS.names() == ["dirichlet", "iid", "natural", "pathological"]
    assert "Hsu et al. 2019" in PARTITIONERS.entry("dirichlet").summary
    assert "McMahan et al. 2017" in PARTITIONERS.entry("pathological").summary


def test_iid_covers_everything_evenly() -> None:
    labels = _labels()
    parts = _split("iid", labels, 7)
    _check_disjoint(parts, len(labels))
    assert sum(len(p) for p in parts) == len(labels)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_covers_everything_and_small_alpha_skews_labels() -> None:
    labels = _labels()
    skewed = _split("dirichlet", labels, 10, {"alpha": 0.05})
    _check_disjoint(skewed, len(labels))
    assert sum(len(p) for p in skewed) == len(labels)
    iid = _split("iid", labels, 10)
    assert _mean_majority_share(labels, iid) < 0.3
    assert _mean_majority_share(labels, skewed) > 0.6


def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    labels = _labels()
    parts = _split("dirichlet", labels, 5, {"alpha": 1000.0})
    assert _mean_majority_share(labels, parts) < 0.3


def test_dirichlet_respects_min_size() -> None:
    labels = _labels()
    parts = _split("dirichlet", labels, 10, {"alpha": 0.5, "min_size": 20})
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_gives_up_with_a_config_error() -> None:
    labels = _labels(per_class=10, classes=2)
    with pytest.raises(ConfigError, match="could not give each of 5 clients at least min_size=4"):
        _split("dirichlet", labels, 5, {"alpha": 0.01, "min_size": 4})


@pytest.mark.parametrize(("num_clients", "per_client"), [(10, 2), (20, 1), (7, 3), (50, 2)])
def test_pathological_limits_labels_per_client(num_clients: int, per_client: int) -> None:
    labels = _labels()
    parts = _split("pathological", labels, num_clients, {"classes_per_client": per_client})
    _check_disjoint(parts, len(labels))
    assert len(parts) == num_clients
    assert all(len(np.unique(labels[p])) <= per_client for p in parts)
    assert sum(len(p) for p in parts) == len(labels)


def test_pathological_with_fewer_shards_than_classes() -> None:
    labels = _labels()
    parts = _split("pathological", labels, 2, {"classes_per_client": 2})
    _check_disjoint(parts, len(labels))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert sum(len(p) for p in parts) == 400  # four whole classes of 100


def test_natural_is_one_client_per_site() -> None:
    labels = _labels(per_class=10, classes=2)
    groups = np.arange(len(labels)) % 4
    parts = _split("natural", labels, 4, groups=groups)
    for site, part in enumerate(parts):
        assert np.array_equal(part, np.flatnonzero(groups == site))


def test_natural_without_sites() -> None:
    with pytest.raises(
        ConfigError,
        match="dataset mnist has no natural sites; natural partition needs one of: heart_disease",
    ):
        partition_dataset(
            "natural", {}, _labels(), 4, rng=np.random.default_rng(0), groups=None, dataset="mnist"
        )
    with pytest.raises(ConfigError, match="needs one of: heart_disease"):
        _split("natural", _labels(), 4)


def test_natural_with_the_wrong_number_of_clients() -> None:
    labels = _labels(per_class=10, classes=2)
    with pytest.raises(ConfigError, match=r"has 4 sites but data\.num_clients is 8"):
        _split("natural", labels, 8, groups=np.arange(len(labels)) % 4)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("pathological", {"classes_per_client": 2})],
)
def test_same_seed_same_partition(kind: str, params: dict[str, object]) -> None:
    labels = _labels()
    first = _split(kind, labels, 10, params, seed=42)
    again = _split(kind, labels, 10, params, seed=42)
    other = _split(kind, labels, 10, params, seed=43)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_more_clients_than_examples(kind: str) -> None:
    with pytest.raises(ConfigError, match="the training set has only 20"):
        _split(kind, _labels(per_class=10, classes=2), 30)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("dirichlet", {"alpha": 0}, r"data\.partition\.params\.alpha"),
        ("dirichlet", {"beta": 1}, "unknown key; allowed keys here: alpha, min_size"),
        ("pathological", {"classes_per_client": 0}, "classes_per_client"),
        ("iid", {"shuffle": True}, "unknown key"),
    ],
)
def test_invalid_params_are_config_errors(
    kind: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _split(kind, _labels(), 4, params)


def test_unknown_partitioner() -> None:
    with pytest.raises(ConfigError, match="unknown partition 'random'; known: dirichlet"):
        _split("random", _labels(), 4)


def test_zero_clients() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        _split("iid", _labels(), 0)
