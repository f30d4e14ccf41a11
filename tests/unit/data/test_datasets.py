"""Tests of the dataset loaders: embedded and real files, validation errors, subsampling."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gradaudit.data import DATASETS, Dataset, load_dataset, subsample
from gradaudit.data.base import DATA_DIR_ENV
from gradaudit.errors import ConfigError, DataError
from gradaudit.types import TabularSchema, TaskInfo

SHARED_DATASETS = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets"
"""``<repo>/../shared/datasets``: the real data files (tests that need them skip without them)."""

ALL_DATASETS = (
    "adult",
    "breast_cancer",
    "cifar10",
    "digits",
    "heart_disease",
    "medquad",
    "mnist",
    "mtsamples",
    "mtsamples_fields",
    "pneumoniamnist",
)


def _check_model_space(ds: Dataset) -> None:
    """Dtypes, shapes and label range shared by every dataset."""
    info = ds.info
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert tuple(x.shape[1:]) == info.input_shape
        assert len(x) == len(y) > 0
        assert int(y.min()) >= 0
        assert int(y.max()) < info.num_classes
        assert torch.isfinite(x).all()
    assert len(info.class_names) == info.num_classes
    if info.modality == "image":
        assert info.normalization is not None
        for x in (ds.x_train, ds.x_test):
            pixels = info.normalization.denormalize(x)
            assert float(pixels.min()) >= -1e-5
            assert float(pixels.max()) <= 1 + 1e-5
        for value in (*info.normalization.mean, *info.normalization.std):
            assert value == round(value, 4)
    else:
        assert info.normalization is None
        assert info.tabular is not None
        assert info.input_shape == (info.tabular.num_features,)


def _check_codes(ds: Dataset) -> None:
    """Categorical columns hold integer codes below their cardinality."""
    schema = ds.info.tabular
    assert schema is not None
    start = len(schema.numeric)
    for j, cardinality in enumerate(schema.cardinalities):
        for x in (ds.x_train, ds.x_test):
            codes = x[:, start + j]
            assert torch.equal(codes, codes.round())
            assert int(codes.min()) >= 0
            assert int(codes.max()) < cardinality
    if schema.categories:
        assert tuple(len(c) for c in schema.categories) == schema.cardinalities
        assert all(c[-1] == "?" for c in schema.categories)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_dataset_with_a_useful_summary() -> None:
    assert DATASETS.names() == sorted(ALL_DATASETS)
    for entry in DATASETS.entries():
        assert entry.summary.startswith(("image (", "tabular (", "text (", "multimodal ("))
        assert "classes" in entry.summary
        assert "embedded" in entry.summary or "reads " in entry.summary


def test_unknown_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; known: adult"):
        load_dataset("nope", None)


# --------------------------------------------------------------------------- embedded


@pytest.mark.parametrize(
    ("name", "shape", "classes", "n_train", "n_test"),
    [
        ("digits", (1, 8, 8), 10, 1438, 359),
        ("breast_cancer", (30,), 2, 456, 113),
    ],
)
def test_embedded_dataset_loads_without_files(
    name: str, shape: tuple[int, ...], classes: int, n_train: int, n_test: int, tmp_path: Path
) -> None:
    ds = load_dataset(name, tmp_path / "does-not-exist")
    _check_model_space(ds)
    assert ds.info.dataset == name
    assert ds.info.input_shape == shape
    assert ds.info.num_classes == classes
    assert (len(ds.y_train), len(ds.y_test)) == (n_train, n_test)
    assert ds.groups_train is None


def test_embedded_split_is_stratified_and_deterministic() -> None:
    first, second = load_dataset("digits", None), load_dataset("digits", None)
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)
    share = torch.bincount(first.y_test, minlength=10) / torch.bincount(first.y_train, minlength=10)
    assert torch.allclose(share, torch.full((10,), 0.25), atol=0.02)


def test_breast_cancer_is_standardised_with_train_statistics() -> None:
    ds = load_dataset("breast_cancer", None)
    assert ds.info.modality == "tabular"
    assert ds.info.tabular == TabularSchema(
        numeric=ds.info.tabular.numeric, categorical=(), cardinalities=()
    )
    assert len(ds.info.tabular.numeric) == 30
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(ds.x_train.std(0, correction=0), torch.ones(30), atol=1e-4)
    assert ds.info.class_names == ("malignant", "benign")


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS.resolve()


@pytest.fixture(scope="module")
def load_real(shared_dir: Path) -> Iterator[Callable[[str], Dataset]]:
    """Loads each real dataset once for this module, and frees them all afterwards."""
    cache: dict[str, Dataset] = {}

    def load(name: str) -> Dataset:
        if name not in cache:
            cache[name] = load_dataset(name, shared_dir)
        return cache[name]

    yield load
    cache.clear()


@pytest.mark.data
@pytest.mark.parametrize(
    ("name", "shape", "n_train", "n_test", "class_names"),
    [
        ("mnist", (1, 28, 28), 60000, 10000, tuple(str(d) for d in range(10))),
        ("pneumoniamnist", (1, 28, 28), 4708, 624, ("normal", "pneumonia")),
        (
            "cifar10",
            (3, 32, 32),
            10000,
            10000,
            (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
        ),
    ],
)
def test_real_image_dataset(
    load_real: Callable[[str], Dataset],
    name: str,
    shape: tuple[int, ...],
    n_train: int,
    n_test: int,
    class_names: tuple[str, ...],
) -> None:
    ds = load_real(name)
    _check_model_space(ds)
    assert ds.info.input_shape == shape
    assert (len(ds.y_train), len(ds.y_test)) == (n_train, n_test)
    assert ds.info.class_names == class_names


@pytest.mark.data
def test_mnist_has_the_usual_normalisation(load_real: Callable[[str], Dataset]) -> None:
    ds = load_real("mnist")
    assert ds.info.normalization is not None
    assert ds.info.normalization.mean == (0.1307,)
    assert ds.info.normalization.std == (0.3081,)
    assert torch.bincount(ds.y_train).tolist()[:2] == [5923, 6742]


@pytest.mark.data
@pytest.mark.parametrize("name", ["cifar10", "pneumoniamnist"])
def test_class_sorted_files_are_shuffled(load_real: Callable[[str], Dataset], name: str) -> None:
    ds = load_real(name)
    for y in (ds.y_train, ds.y_test):
        head = y[:200]
        assert len(torch.unique(head)) == ds.info.num_classes
        assert not torch.equal(y, torch.sort(y).values)


@pytest.mark.data
def test_heart_disease_sites(load_real: Callable[[str], Dataset]) -> None:
    ds = load_real("heart_disease")
    _check_model_space(ds)
    _check_codes(ds)
    assert len(ds.y_train) + len(ds.y_test) == 920
    assert ds.group_names == ("cleveland", "hungarian", "switzerland", "va_long_beach")
    assert ds.groups_train is not None
    assert ds.groups_train.shape == (len(ds.y_train),)
    sizes = np.bincount(ds.groups_train, minlength=4)
    assert np.allclose(sizes / np.array([303, 294, 123, 200]), 0.8, atol=0.01)
    assert ds.info.input_shape == (13,)
    assert ds.info.tabular is not None
    assert ds.info.tabular.numeric == ("age", "trestbps", "chol", "thalach", "oldpeak", "ca")
    assert not torch.isnan(ds.x_train).any()


@pytest.mark.data
def test_adult(load_real: Callable[[str], Dataset]) -> None:
    ds = load_real("adult")
    _check_model_space(ds)
    _check_codes(ds)
    assert (len(ds.y_train), len(ds.y_test)) == (32561, 16281)
    assert torch.bincount(ds.y_train).tolist() == [24720, 7841]
    assert ds.info.class_names == ("<=50K", ">50K")
    assert ds.info.input_shape == (14,)


@pytest.mark.data
def test_data_dir_from_environment(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_dir))
    assert len(load_dataset("heart_disease", None).y_train) > 0


def test_no_data_dir_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="none is set"):
        load_dataset("mnist", None)


# --------------------------------------------------------------------------- corrupt files


def _mnist_arrays(n: int = 6, m: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n, dtype=np.int64) % 10,
        "x_test": rng.integers(0, 256, (m, 28, 28), dtype=np.uint8),
        "y_test": np.arange(m, dtype=np.int64) % 10,
    }


def _write_mnist(root: Path, **changes: np.ndarray | None) -> Path:
    arrays = {**_mnist_arrays(), **changes}
    path = root / "mnist" / "mnist.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_small_valid_mnist_file_loads(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path)
    _check_model_space(ds)
    assert (len(ds.y_train), len(ds.y_test)) == (6, 4)


def test_missing_file_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as err:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path / "mnist" / "mnist.npz") in str(err.value)


def test_text_file_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "mnist" / "mnist.npz"
    path.parent.mkdir()
    path.write_text("this is not an archive\n")
    with pytest.raises(DataError, match=r"cannot read it as a \.npz archive") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "mnist" / "mnist.npz"
    path.parent.mkdir()
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"mnist\.npz"):
        load_dataset("mnist", tmp_path)


def test_npy_instead_of_npz(tmp_path: Path) -> None:
    path = tmp_path / "mnist" / "mnist.npz"
    path.parent.mkdir()
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match=r"single \.npy array"):
        load_dataset("mnist", tmp_path)


def test_wrong_shape(tmp_path: Path) -> None:
    path = _write_mnist(tmp_path, x_train=np.zeros((10, 28), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    assert str(err.value) == (f"{path}: key 'x_train' has shape (10, 28) but expected (N, 28, 28)")


def test_wrong_dtype(tmp_path: Path) -> None:
    path = _write_mnist(tmp_path, x_test=np.zeros((4, 28, 28), dtype=np.float32))
    with pytest.raises(DataError, match="key 'x_test' has dtype float32 but expected uint8") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


def test_missing_key(tmp_path: Path) -> None:
    _write_mnist(tmp_path, y_test=None)
    with pytest.raises(DataError, match="key 'y_test' is missing"):
        load_dataset("mnist", tmp_path)


def test_length_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path, y_train=np.zeros(5, dtype=np.int64))
    with pytest.raises(DataError, match="key 'y_train' has 5 entries along N but key 'x_train'"):
        load_dataset("mnist", tmp_path)


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = _write_mnist(tmp_path, y_train=np.array([0, 1, 2, 3, 4, 12]))
    with pytest.raises(DataError, match=r"labels outside \[0, 10\): min 0, max 12") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)


class _TouchOnUnpickle:
    """Unpickling this object creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return pathlib.Path.touch, (self.marker,)


def test_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    evil = np.empty(6, dtype=object)
    evil[:] = [_TouchOnUnpickle(marker)] * 6
    path = _write_mnist(tmp_path, y_train=evil)
    with pytest.raises(DataError, match="key 'y_train' cannot be read") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def _write_cifar(root: Path, per_class: int = 3) -> None:
    names = np.array(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    )
    labels = np.repeat(np.arange(10, dtype=np.int64), per_class)  # sorted by class, like the files
    images = np.tile(labels.astype(np.uint8)[:, None, None, None], (1, 32, 32, 3)) * 20
    (root / "cifar10").mkdir()
    np.savez(
        root / "cifar10" / "cifar10_jpeg_train_subset.npz",
        x_train=images,
        y_train=labels,
        label_names=names,
    )
    np.savez(
        root / "cifar10" / "cifar10_jpeg_test.npz", x_test=images, y_test=labels, label_names=names
    )


def test_cifar_order_is_a_fixed_shuffle_that_keeps_pairs(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    again = load_dataset("cifar10", tmp_path)
    assert torch.equal(ds.y_train, again.y_train)
    assert not torch.equal(ds.y_train, torch.sort(ds.y_train).values)
    assert torch.equal(torch.sort(ds.y_train).values, torch.arange(10).repeat_interleave(3))
    assert ds.info.normalization is not None
    pixels = ds.info.normalization.denormalize(ds.x_train)
    assert torch.allclose(pixels[:, 0, 0, 0] * 255, ds.y_train.float() * 20, atol=1e-3)


def test_pneumonia_label_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "medmnist" / "pneumoniamnist_reconstructed.npz"
    path.parent.mkdir()
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    np.savez(
        path,
        train_images=images,
        train_labels=np.array([[0], [1], [2]], dtype=np.uint8),
        test_images=images,
        test_labels=np.array([[0], [1], [1]], dtype=np.uint8),
    )
    with pytest.raises(DataError, match=r"key 'train_labels' has labels outside \[0, 2\)") as err:
        load_dataset("pneumoniamnist", tmp_path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- CSV files

_HEART_HEADER = "site,age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"


def _heart_rows() -> list[str]:
    """20 rows over two sites, both labels in each site, some cells missing and chol == 0."""
    rows = []
    for i in range(20):
        site = "north" if i < 10 else "south"
        chol = "0" if i == 3 else str(200 + i)
        thal = "" if i % 4 == 0 else "3.0"
        rows.append(f"{site},{40 + i},1,{1 + i % 4},130,{chol},0,,150,0,1.0,2,,{thal},{i % 3}")
    return rows


def _write_heart(root: Path, rows: list[str]) -> Path:
    path = root / "tabular" / "uci_heart_disease_4sites.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([_HEART_HEADER, *rows]) + "\n")
    return path


def test_small_heart_file(tmp_path: Path) -> None:
    _write_heart(tmp_path, _heart_rows())
    ds = load_dataset("heart_disease", tmp_path)
    _check_model_space(ds)
    _check_codes(ds)
    assert ds.group_names == ("north", "south")
    assert len(ds.y_train) + len(ds.y_test) == 20
    assert ds.groups_train is not None
    assert set(ds.groups_train.tolist()) == {0, 1}
    schema = ds.info.tabular
    assert schema is not None
    restecg = 6 + schema.categorical.index("restecg")
    assert (ds.x_train[:, restecg] == 3).all()  # every restecg is missing: the "?" code
    assert not torch.isnan(ds.x_train).any()


def test_heart_row_with_a_missing_field(tmp_path: Path) -> None:
    rows = _heart_rows()
    rows[1] = rows[1].rsplit(",", 1)[0]
    path = _write_heart(tmp_path, rows)
    with pytest.raises(DataError, match="line 3 has 14 fields but the header has 15") as err:
        load_dataset("heart_disease", tmp_path)
    assert str(path) in str(err.value)


def test_heart_unparseable_number(tmp_path: Path) -> None:
    rows = _heart_rows()
    rows[4] = rows[4].replace(",130,", ",high,", 1)
    path = _write_heart(tmp_path, rows)
    with pytest.raises(
        DataError, match="line 6, column 'trestbps': cannot parse 'high' as a number"
    ) as err:
        load_dataset("heart_disease", tmp_path)
    assert str(path) in str(err.value)


def test_heart_category_outside_its_domain(tmp_path: Path) -> None:
    rows = _heart_rows()
    rows[0] = rows[0].replace("north,40,1,", "north,40,5,", 1)
    _write_heart(tmp_path, rows)
    with pytest.raises(DataError, match="column 'sex': value '5' is not one of 0, 1"):
        load_dataset("heart_disease", tmp_path)


def _adult_row(age: int, workclass: str, label: str) -> str:
    return (
        f"{age}, {workclass}, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, "
        f"White, Male, 2174, 0, 40, United-States, {label}"
    )


def _write_adult(root: Path, train: list[str], test: list[str]) -> Path:
    folder = root / "tabular" / "adult"
    folder.mkdir(parents=True)
    (folder / "adult.data").write_text("\n".join(train) + "\n\n")
    (folder / "adult.test").write_text("|1x3 Cross validator\n" + "\n".join(test) + "\n")
    return folder


def test_small_adult_files_and_unseen_categories(tmp_path: Path) -> None:
    train = [_adult_row(30, "Private", "<=50K"), _adult_row(50, "State-gov", ">50K")]
    train.append(_adult_row(40, "?", "<=50K"))
    test = [_adult_row(35, "Never-worked", ">50K."), _adult_row(45, "Private", "<=50K.")]
    _write_adult(tmp_path, train, test)
    ds = load_dataset("adult", tmp_path)
    _check_model_space(ds)
    _check_codes(ds)
    schema = ds.info.tabular
    assert schema is not None
    assert schema.categories[0] == ("Private", "State-gov", "?")
    workclass = len(schema.numeric)
    assert ds.x_train[:, workclass].tolist() == [0.0, 1.0, 2.0]
    assert ds.x_test[:, workclass].tolist() == [2.0, 0.0]  # unseen "Never-worked" -> "?"
    assert ds.y_train.tolist() == [0, 1, 0]
    assert ds.y_test.tolist() == [1, 0]


def test_adult_row_with_a_missing_field(tmp_path: Path) -> None:
    bad = _adult_row(30, "Private", "<=50K").replace("77516, ", "", 1)
    folder = _write_adult(tmp_path, [_adult_row(30, "Private", "<=50K"), bad], [])
    with pytest.raises(DataError, match="line 2 has 14 fields but expected 15") as err:
        load_dataset("adult", tmp_path)
    assert str(folder / "adult.data") in str(err.value)


def test_adult_bad_label(tmp_path: Path) -> None:
    train = [_adult_row(30, "Private", "<=50K")]
    folder = _write_adult(tmp_path, train, [_adult_row(30, "Private", "maybe")])
    with pytest.raises(DataError, match="line 2, column 'income': label 'maybe'") as err:
        load_dataset("adult", tmp_path)
    assert str(folder / "adult.test") in str(err.value)


def test_adult_unparseable_number(tmp_path: Path) -> None:
    _write_adult(tmp_path, [_adult_row(30, "Private", "<=50K").replace("30,", "thirty,", 1)], [])
    with pytest.raises(DataError, match="line 1, column 'age': cannot parse 'thirty'"):
        load_dataset("adult", tmp_path)


# --------------------------------------------------------------------------- subsample


def _numbered_dataset(n_train: int = 50, n_test: int = 20) -> Dataset:
    info = TaskInfo(
        dataset="numbered",
        modality="tabular",
        input_shape=(1,),
        num_classes=2,
        normalization=None,
        class_names=("a", "b"),
        tabular=TabularSchema(numeric=("i",), categorical=(), cardinalities=()),
    )
    return Dataset(
        info=info,
        x_train=torch.arange(n_train, dtype=torch.float32)[:, None],
        y_train=torch.arange(n_train) % 2,
        x_test=torch.arange(n_test, dtype=torch.float32)[:, None],
        y_test=torch.arange(n_test) % 2,
        groups_train=np.arange(n_train) * 10,
        group_names=tuple(str(i) for i in range(n_train)),
    )


def test_subsample_keeps_groups_aligned() -> None:
    ds = _numbered_dataset()
    sub = subsample(ds, max_train=10, max_test=5, rng=np.random.default_rng(3))
    assert (len(sub.y_train), len(sub.y_test)) == (10, 5)
    assert sub.groups_train is not None
    rows = sub.x_train[:, 0].long().numpy()
    assert np.array_equal(sub.groups_train, rows * 10)
    assert np.array_equal(sub.y_train.numpy(), rows % 2)
    assert np.all(np.diff(rows) > 0)
    assert len(np.unique(sub.x_test[:, 0].numpy())) == 5


def test_subsample_is_deterministic_and_optional() -> None:
    ds = _numbered_dataset()
    a = subsample(ds, max_train=10, max_test=None, rng=np.random.default_rng(7))
    b = subsample(ds, max_train=10, max_test=None, rng=np.random.default_rng(7))
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_test, ds.x_test)
    assert subsample(ds, max_train=None, max_test=100, rng=np.random.default_rng(0)) is ds
