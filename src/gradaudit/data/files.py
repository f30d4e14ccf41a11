"""Datasets read from the data dir: MNIST, CIFAR-10, PneumoniaMNIST, UCI Heart Disease, Adult."""

from __future__ import annotations

import csv
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gradaudit.data.base import Dataset, require_file
from gradaudit.data.embedded import (
    DATASETS,
    fixed_permutation,
    image_dataset,
    impute_and_standardize,
    stratified_split,
    tabular_dataset,
    uint8_to_unit,
)
from gradaudit.errors import DataError
from gradaudit.types import TabularSchema

SHUFFLE_SEED_TRAIN = 0
"""Seed of the fixed permutation of class-sorted training files (CIFAR-10, PneumoniaMNIST)."""

SHUFFLE_SEED_TEST = 1
"""Seed of the fixed permutation of class-sorted test files (CIFAR-10, PneumoniaMNIST)."""

MISSING = "?"
"""The category name of the extra code that stands for a missing (or unseen) value."""

_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What ``np.load`` and reading an archive member may raise on a corrupt file."""


# --------------------------------------------------------------------------- .npz validation


@dataclass(frozen=True)
class ArraySpec:
    """What one key of an .npz file must hold.

    Attributes:
        shape: the dims; an int must match exactly, a str names a free length (e.g. ``"N"``) that
            must be the same for every key that names it.
        kind: ``"uint8"`` (exactly), ``"int"`` (any integer dtype) or ``"str"`` (unicode).
    """

    shape: tuple[int | str, ...]
    kind: Literal["uint8", "int", "str"]

    def describe(self) -> str:
        """The expected shape as text, e.g. ``(N, 28, 28)``."""
        dims = [str(d) for d in self.shape]
        return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def read_npz(path: Path, specs: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Load the keys of `specs` from an .npz file and check their shapes and dtypes.

    The file is opened with ``allow_pickle=False``: an object array is an error, never unpickled.

    Args:
        path: the .npz file.
        specs: what each key must hold; other keys in the file are ignored.

    Returns:
        The arrays, by key.

    Raises:
        DataError: naming `path` and what is wrong, when the file cannot be read as an .npz
            archive, a key is missing or unreadable, or an array has the wrong shape or dtype.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as exc:
        raise DataError(f"{path}: cannot read it as a .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, but a .npz archive was expected")
    with archive:
        arrays = {key: _read_member(path, archive, key) for key in specs}
    sizes: dict[str, tuple[str, int]] = {}
    for key, spec in specs.items():
        _check_array(path, key, arrays[key], spec, sizes)
    return arrays


def _read_member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    if key not in archive.files:
        present = ", ".join(repr(k) for k in archive.files) or "none"
        raise DataError(f"{path}: key {key!r} is missing (keys present: {present})")
    try:
        return archive[key]
    except _NPZ_ERRORS as exc:
        raise DataError(f"{path}: key {key!r} cannot be read: {exc}") from None


def _check_array(
    path: Path, key: str, array: np.ndarray, spec: ArraySpec, sizes: dict[str, tuple[str, int]]
) -> None:
    shape_ok = array.ndim == len(spec.shape) and all(
        isinstance(want, str) or got == want
        for got, want in zip(array.shape, spec.shape, strict=False)
    )
    if not shape_ok:
        raise DataError(
            f"{path}: key {key!r} has shape {tuple(array.shape)} but expected {spec.describe()}"
        )
    for got, want in zip(array.shape, spec.shape, strict=True):
        if not isinstance(want, str):
            continue
        if got == 0:
            raise DataError(f"{path}: key {key!r} is empty (shape {tuple(array.shape)})")
        other = sizes.setdefault(want, (key, got))
        if other[1] != got:
            raise DataError(
                f"{path}: key {key!r} has {got} entries along {want} but key {other[0]!r} has "
                f"{other[1]}"
            )
    kind_ok = {
        "uint8": array.dtype == np.uint8,
        "int": array.dtype.kind in "iu",
        "str": array.dtype.kind == "U",
    }[spec.kind]
    if not kind_ok:
        want = {"uint8": "uint8", "int": "an integer dtype", "str": "a unicode string dtype"}
        raise DataError(
            f"{path}: key {key!r} has dtype {array.dtype} but expected {want[spec.kind]}"
        )


def check_labels(path: Path, key: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`labels` as int64 after checking they lie in ``[0, num_classes)``; DataError otherwise."""
    labels = np.asarray(labels).reshape(-1)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{path}: key {key!r} has labels outside [0, {num_classes}): min {low}, max {high}"
        )
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- image datasets

_MNIST_FILE = "mnist/mnist.npz"
_CIFAR_TRAIN_FILE = "cifar10/cifar10_jpeg_train_subset.npz"
_CIFAR_TEST_FILE = "cifar10/cifar10_jpeg_test.npz"
_PNEUMONIA_FILE = "medmnist/pneumoniamnist_reconstructed.npz"


@DATASETS.register(
    "mnist",
    summary=f"image (1, 28, 28), 10 classes (digits 0-9); MNIST 60000 train / 10000 test; "
    f"reads {_MNIST_FILE}",
)
def mnist(data_dir: Path | None) -> Dataset:
    """MNIST from ``mnist/mnist.npz`` (keys x_train, y_train, x_test, y_test), in file order.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    path = require_file(data_dir, _MNIST_FILE, "mnist")
    arrays = read_npz(
        path,
        {
            "x_train": ArraySpec(("N", 28, 28), "uint8"),
            "y_train": ArraySpec(("N",), "int"),
            "x_test": ArraySpec(("M", 28, 28), "uint8"),
            "y_test": ArraySpec(("M",), "int"),
        },
    )
    return image_dataset(
        "mnist",
        uint8_to_unit(arrays["x_train"]),
        check_labels(path, "y_train", arrays["y_train"], 10),
        uint8_to_unit(arrays["x_test"]),
        check_labels(path, "y_test", arrays["y_test"], 10),
        [str(d) for d in range(10)],
    )


@DATASETS.register(
    "cifar10",
    summary=f"image (3, 32, 32), 10 classes (airplane ... truck); CIFAR-10 from JPEG copies, "
    f"10000 train (1000 per class) / 10000 test, shuffled by a fixed permutation; reads "
    f"{_CIFAR_TRAIN_FILE} and {_CIFAR_TEST_FILE}",
)
def cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10 decoded from JPEG copies (a 1000-per-class train subset and the full test set).

    The files are sorted by class, so the training set is reordered by
    ``fixed_permutation(n, SHUFFLE_SEED_TRAIN)`` and the test set by
    ``fixed_permutation(n, SHUFFLE_SEED_TEST)``; the order is the same on every run.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    train_path = require_file(data_dir, _CIFAR_TRAIN_FILE, "cifar10")
    test_path = require_file(data_dir, _CIFAR_TEST_FILE, "cifar10")
    names = ArraySpec((10,), "str")
    train = read_npz(
        train_path,
        {
            "x_train": ArraySpec(("N", 32, 32, 3), "uint8"),
            "y_train": ArraySpec(("N",), "int"),
            "label_names": names,
        },
    )
    test = read_npz(
        test_path,
        {
            "x_test": ArraySpec(("M", 32, 32, 3), "uint8"),
            "y_test": ArraySpec(("M",), "int"),
            "label_names": names,
        },
    )
    class_names = [str(n) for n in train["label_names"]]
    if [str(n) for n in test["label_names"]] != class_names:
        raise DataError(
            f"{test_path}: key 'label_names' is {list(test['label_names'])} but {train_path} "
            f"has {class_names}"
        )
    y_train = check_labels(train_path, "y_train", train["y_train"], len(class_names))
    y_test = check_labels(test_path, "y_test", test["y_test"], len(class_names))
    order_train = fixed_permutation(len(y_train), SHUFFLE_SEED_TRAIN)
    order_test = fixed_permutation(len(y_test), SHUFFLE_SEED_TEST)
    return image_dataset(
        "cifar10",
        uint8_to_unit(train["x_train"][order_train]),
        y_train[order_train],
        uint8_to_unit(test["x_test"][order_test]),
        y_test[order_test],
        class_names,
    )


@DATASETS.register(
    "pneumoniamnist",
    summary=f"image (1, 28, 28), 2 classes (normal, pneumonia); MedMNIST PneumoniaMNIST chest "
    f"X-rays, 4708 train / 624 test (val unused), shuffled by a fixed permutation; reads "
    f"{_PNEUMONIA_FILE}",
)
def pneumoniamnist(data_dir: Path | None) -> Dataset:
    """PneumoniaMNIST (rebuilt file): train and test splits; the val split is not used.

    The rebuilt training split ends with 826 'normal' images appended after the rest, so both
    splits are reordered by fixed permutations (``SHUFFLE_SEED_TRAIN`` / ``SHUFFLE_SEED_TEST``).

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    path = require_file(data_dir, _PNEUMONIA_FILE, "pneumoniamnist")
    arrays = read_npz(
        path,
        {
            "train_images": ArraySpec(("N", 28, 28), "uint8"),
            "train_labels": ArraySpec(("N", 1), "int"),
            "test_images": ArraySpec(("M", 28, 28), "uint8"),
            "test_labels": ArraySpec(("M", 1), "int"),
        },
    )
    y_train = check_labels(path, "train_labels", arrays["train_labels"], 2)
    y_test = check_labels(path, "test_labels", arrays["test_labels"], 2)
    order_train = fixed_permutation(len(y_train), SHUFFLE_SEED_TRAIN)
    order_test = fixed_permutation(len(y_test), SHUFFLE_SEED_TEST)
    return image_dataset(
        "pneumoniamnist",
        uint8_to_unit(arrays["train_images"][order_train]),
        y_train[order_train],
        uint8_to_unit(arrays["test_images"][order_test]),
        y_test[order_test],
        ["normal", "pneumonia"],
    )


# --------------------------------------------------------------------------- text parsing


def _read_lines(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None


def _parse_number(path: Path, line: int, column: str, text: str, missing: str = "") -> float:
    """`text` as a finite float; `missing` (after stripping) gives NaN; else DataError."""
    text = text.strip()
    if text == missing:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(
            f"{path}: line {line}, column {column!r}: cannot parse {text!r} as a number"
        )
    return value


# --------------------------------------------------------------------------- UCI Heart Disease

_HEART_FILE = "tabular/uci_heart_disease_4sites.csv"
_HEART_NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak", "ca")
_HEART_CATEGORIES: dict[str, tuple[tuple[int, str], ...]] = {
    # (value in the file, category name), in code order; names follow heart-disease.names.
    "sex": ((0, "female"), (1, "male")),
    "cp": (
        (1, "typical_angina"),
        (2, "atypical_angina"),
        (3, "non_anginal_pain"),
        (4, "asymptomatic"),
    ),
    "fbs": ((0, "false"), (1, "true")),
    "restecg": ((0, "normal"), (1, "st_t_abnormality"), (2, "lv_hypertrophy")),
    "exang": ((0, "no"), (1, "yes")),
    "slope": ((1, "upsloping"), (2, "flat"), (3, "downsloping")),
    "thal": ((3, "normal"), (6, "fixed_defect"), (7, "reversible_defect")),
}
_HEART_MAX_NUM = 4


@dataclass(frozen=True)
class _HeartTable:
    sites: np.ndarray  # int64 site index per row
    site_names: tuple[str, ...]
    numeric: np.ndarray  # float64 (n, 6), NaN where missing
    codes: np.ndarray  # int64 (n, 7), missing = the last code
    labels: np.ndarray  # int64 num > 0


def _heart_code(path: Path, line: int, column: str, text: str) -> int:
    domain = _HEART_CATEGORIES[column]
    value = _parse_number(path, line, column, text)
    if math.isnan(value):
        return len(domain)
    for code, (allowed, _) in enumerate(domain):
        if value == allowed:
            return code
    allowed_text = ", ".join(str(v) for v, _ in domain)
    raise DataError(
        f"{path}: line {line}, column {column!r}: value {text.strip()!r} is not one of "
        f"{allowed_text} (or empty for missing)"
    )


def _heart_label(path: Path, line: int, text: str) -> int:
    value = _parse_number(path, line, "num", text)
    if math.isnan(value) or value != int(value) or not 0 <= value <= _HEART_MAX_NUM:
        raise DataError(
            f"{path}: line {line}, column 'num': label {text.strip()!r} is not an integer in "
            f"0..{_HEART_MAX_NUM}"
        )
    return int(value > 0)


def _read_heart(path: Path) -> _HeartTable:
    rows = list(csv.reader(_read_lines(path)))
    if not rows:
        raise DataError(f"{path}: the file is empty (expected a header line)")
    header = [h.strip() for h in rows[0]]
    required = ("site", *_HEART_NUMERIC, *_HEART_CATEGORIES, "num")
    absent = [c for c in required if c not in header]
    if absent:
        raise DataError(f"{path}: the header lacks column(s) {', '.join(absent)}")
    col = {name: header.index(name) for name in required}
    site_names: dict[str, int] = {}
    sites, numeric, codes, labels = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(row)} fields but the header has {len(header)}"
            )
        site = row[col["site"]].strip()
        if not site:
            raise DataError(f"{path}: line {line}, column 'site': the site is empty")
        sites.append(site_names.setdefault(site, len(site_names)))
        values = [_parse_number(path, line, c, row[col[c]]) for c in _HEART_NUMERIC]
        if values[_HEART_NUMERIC.index("chol")] == 0:
            values[_HEART_NUMERIC.index("chol")] = math.nan  # chol == 0 means missing
        numeric.append(values)
        codes.append([_heart_code(path, line, c, row[col[c]]) for c in _HEART_CATEGORIES])
        labels.append(_heart_label(path, line, row[col["num"]]))
    if not labels:
        raise DataError(f"{path}: the file has a header but no data rows")
    return _HeartTable(
        sites=np.asarray(sites, dtype=np.int64),
        site_names=tuple(site_names),
        numeric=np.asarray(numeric, dtype=np.float64),
        codes=np.asarray(codes, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
    )


@DATASETS.register(
    "heart_disease",
    summary=f"tabular (13,), 2 classes (no_disease, disease); UCI Heart Disease from 4 hospitals "
    f"(natural sites), 920 patients, 6 numeric + 7 categorical features, stratified 20% test "
    f"split within each site; reads {_HEART_FILE}",
)
def heart_disease(data_dir: Path | None) -> Dataset:
    """UCI Heart Disease, 4 sites; label = num > 0.

    Numeric columns (age, trestbps, chol, thalach, oldpeak, ca) are imputed with the train median
    (``chol == 0`` counts as missing) and standardised with train mean/std. Categorical columns
    (sex, cp, fbs, restecg, exang, slope, thal) use the UCI value domains in code order, plus a
    last ``"?"`` code for missing. 20 % of each (site, label) stratum is held out for testing by
    :func:`stratified_split` (seed ``SPLIT_SEED``). ``groups_train`` is each training row's site
    index; ``group_names`` lists the sites in order of first appearance in the file.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    path = require_file(data_dir, _HEART_FILE, "heart_disease")
    table = _read_heart(path)
    train, test = stratified_split(table.sites * 2 + table.labels)
    num_train, num_test, mean, std = impute_and_standardize(
        table.numeric[train], table.numeric[test]
    )
    x_train = np.hstack([num_train, table.codes[train].astype(np.float32)])
    x_test = np.hstack([num_test, table.codes[test].astype(np.float32)])
    schema = TabularSchema(
        numeric=_HEART_NUMERIC,
        categorical=tuple(_HEART_CATEGORIES),
        cardinalities=tuple(len(d) + 1 for d in _HEART_CATEGORIES.values()),
        categories=tuple((*(name for _, name in d), MISSING) for d in _HEART_CATEGORIES.values()),
        numeric_mean=mean,
        numeric_std=std,
    )
    return tabular_dataset(
        "heart_disease",
        (x_train, table.labels[train], x_test, table.labels[test]),
        schema,
        ["no_disease", "disease"],
        groups_train=table.sites[train],
        group_names=table.site_names,
    )


# --------------------------------------------------------------------------- UCI Adult

_ADULT_TRAIN_FILE = "tabular/adult/adult.data"
_ADULT_TEST_FILE = "tabular/adult/adult.test"
_ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
_ADULT_NUMERIC = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)
_ADULT_CATEGORICAL = (
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "native-country",
)
_ADULT_LABELS = ("<=50K", ">50K")


def _read_adult(path: Path) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """Numeric columns (NaN for '?'), categorical strings and labels of one Adult file.

    Blank lines and lines starting with ``|`` (the test file's first line) are skipped; a
    trailing ``.`` on the label (test file) is dropped.
    """
    numeric_at = [_ADULT_COLUMNS.index(c) for c in _ADULT_NUMERIC]
    categorical_at = [_ADULT_COLUMNS.index(c) for c in _ADULT_CATEGORICAL]
    numeric: list[list[float]] = []
    categorical: list[list[str]] = []
    labels: list[int] = []
    for line, text in enumerate(_read_lines(path), start=1):
        if not text.strip() or text.startswith("|"):
            continue
        fields = [f.strip() for f in text.split(",")]
        if len(fields) != len(_ADULT_COLUMNS):
            raise DataError(
                f"{path}: line {line} has {len(fields)} fields but expected "
                f"{len(_ADULT_COLUMNS)} ({', '.join(_ADULT_COLUMNS)})"
            )
        label = fields[-1].removesuffix(".")
        if label not in _ADULT_LABELS:
            raise DataError(
                f"{path}: line {line}, column 'income': label {fields[-1]!r} is not one of "
                f"{', '.join(_ADULT_LABELS)}"
            )
        labels.append(_ADULT_LABELS.index(label))
        numeric.append(
            [_parse_number(path, line, _ADULT_COLUMNS[i], fields[i], MISSING) for i in numeric_at]
        )
        categorical.append([fields[i] or MISSING for i in categorical_at])
    if not labels:
        raise DataError(f"{path}: the file has no data rows")
    return np.asarray(numeric, dtype=np.float64), categorical, np.asarray(labels, dtype=np.int64)


def _category_codes(
    train: Sequence[Sequence[str]], test: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[str, ...], ...]]:
    """Codes from the train split's sorted categories; missing and unseen values get a last '?'."""
    categories = tuple(
        (*sorted({row[j] for row in train} - {MISSING}), MISSING) for j in range(len(train[0]))
    )
    lookups = [{name: code for code, name in enumerate(cats)} for cats in categories]

    def encode(rows: Sequence[Sequence[str]]) -> np.ndarray:
        return np.asarray(
            [
                [table.get(v, len(table) - 1) for v, table in zip(row, lookups, strict=True)]
                for row in rows
            ],
            dtype=np.float32,
        ).reshape(len(rows), len(lookups))

    return encode(train), encode(test), categories


@DATASETS.register(
    "adult",
    summary=f"tabular (14,), 2 classes (<=50K, >50K); UCI Adult census income, 32561 train / "
    f"16281 test, 6 numeric + 8 categorical features; reads {_ADULT_TRAIN_FILE} and "
    f"{_ADULT_TEST_FILE}",
)
def adult(data_dir: Path | None) -> Dataset:
    """UCI Adult with its official train/test files; label = income >50K.

    Numeric columns are standardised with train mean/std (a '?' would be imputed with the train
    median). Categorical codes follow the training file's sorted categories; missing values
    and categories never seen in training map to a last ``"?"`` code.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    train_path = require_file(data_dir, _ADULT_TRAIN_FILE, "adult")
    test_path = require_file(data_dir, _ADULT_TEST_FILE, "adult")
    num_train, cat_train, y_train = _read_adult(train_path)
    num_test, cat_test, y_test = _read_adult(test_path)
    num_train, num_test, mean, std = impute_and_standardize(num_train, num_test)
    codes_train, codes_test, categories = _category_codes(cat_train, cat_test)
    schema = TabularSchema(
        numeric=_ADULT_NUMERIC,
        categorical=_ADULT_CATEGORICAL,
        cardinalities=tuple(len(c) for c in categories),
        categories=categories,
        numeric_mean=mean,
        numeric_std=std,
    )
    return tabular_dataset(
        "adult",
        (np.hstack([num_train, codes_train]), y_train, np.hstack([num_test, codes_test]), y_test),
        schema,
        list(_ADULT_LABELS),
    )
