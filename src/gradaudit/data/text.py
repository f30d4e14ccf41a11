"""Text datasets and the word-level tokenizer they share: MedQuAD questions, MTSamples notes.

A text input is a row of token ids stored as float32, right-padded with ``<pad>`` to the
dataset's sequence length (`TextSchema`). The vocabulary is built from the training split only,
deterministically, and is public: the federation ships it with the model.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from gradaudit.data.base import Dataset, require_file
from gradaudit.data.embedded import DATASETS, stratified_split
from gradaudit.errors import DataError
from gradaudit.types import TaskInfo, TextSchema

logger = logging.getLogger(__name__)

PAD = "<pad>"
"""The padding token; always id 0."""

UNK = "<unk>"
"""The token of every word outside the vocabulary; always id 1."""

MIN_COUNT = 2
"""A word enters the vocabulary when it occurs at least this often in the training sequences."""

MAX_VOCAB_SIZE = 8192
"""The most ids a vocabulary holds, ``<pad>`` and ``<unk>`` included."""

TOKEN_PATTERN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")
"""One token: a run of letters, a run of digits, or a single punctuation character."""


# --------------------------------------------------------------------------- the tokenizer


def tokenize(text: str) -> list[str]:
    """The tokens of `text`: lowercased words, numbers and single punctuation marks.

    Letters and digits are split apart (``23-year-old`` is ``23 - year - old``) and every
    whitespace is a separator, so the result depends on nothing but `text`.

    Example:
        >>> tokenize("A 23-year-old, BP 124/78.")
        ['a', '23', '-', 'year', '-', 'old', ',', 'bp', '124', '/', '78', '.']
    """
    return TOKEN_PATTERN.findall(text.lower())


def build_vocab(
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    min_count: int = MIN_COUNT,
    max_size: int = MAX_VOCAB_SIZE,
) -> tuple[str, ...]:
    """The vocabulary of `texts`: ``<pad>``, ``<unk>``, then the frequent tokens.

    Only the first `max_length` tokens of each text are counted (the part a model sees after
    truncation). Tokens that occur at least `min_count` times follow the two special tokens,
    most frequent first, ties in string order, so the result is the same on every run; the
    list is cut at `max_size` ids. Build it from the training split only: test text must not
    shape the vocabulary.

    Privacy: the vocabulary is public (every participant, the server included, holds it), and
    when it is built from the clients' training text it reveals by itself which words occur at
    least `min_count` times there. A federation that cares builds it from public text.

    Args:
        texts: the training texts.
        max_length: tokens counted per text; None counts them all.
        min_count: the fewest occurrences that earn a token an id.
        max_size: the most ids, the two special tokens included (at least 2).

    Example:
        >>> build_vocab(["b a b", "c a b", "d"], min_count=2)
        ('<pad>', '<unk>', 'b', 'a')
        >>> build_vocab(["b a b", "c a b", "d"], max_length=1, min_count=1)
        ('<pad>', '<unk>', 'b', 'c', 'd')
    """
    if max_size < 2:
        raise ValueError(f"a vocabulary holds <pad> and <unk> at least (max_size={max_size})")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenize(text)[:max_length])
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return (PAD, UNK, *kept[: max_size - 2])


def encode(
    texts: Iterable[str],
    vocab: Sequence[str],
    max_length: int,
    *,
    pad_id: int = 0,
    unk_id: int = 1,
) -> np.ndarray:
    """Token ids of `texts`, truncated to `max_length` and right-padded with `pad_id`.

    Tokens outside `vocab` get `unk_id`.

    Returns:
        int64 (len(texts), max_length).

    Example:
        >>> encode(["the pain, the pain", "rash"], ("<pad>", "<unk>", "the", "pain"), 4)
        array([[2, 3, 1, 2],
               [1, 0, 0, 0]])
    """
    ids = {token: i for i, token in enumerate(vocab)}
    rows = [[ids.get(t, unk_id) for t in tokenize(text)[:max_length]] for text in texts]
    out = np.full((len(rows), max_length), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def text_schema(train_texts: Sequence[str], max_length: int) -> TextSchema:
    """The `TextSchema` of a dataset: the vocabulary of its training texts (`build_vocab`
    over each text's first `max_length` tokens) and the sequence length."""
    return TextSchema(vocab=build_vocab(train_texts, max_length=max_length), max_length=max_length)


def text_dataset(
    name: str,
    parts: tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray],
    class_names: Sequence[str],
    max_length: int,
) -> Dataset:
    """A text Dataset: the training texts' vocabulary, then every text encoded with it.

    Args:
        name: the dataset's registry name.
        parts: ``(texts_train, y_train, texts_test, y_test)``.
        class_names: one name per label.
        max_length: tokens per sequence after truncation and padding.
    """
    texts_train, y_train, texts_test, y_test = parts
    schema = text_schema(texts_train, max_length)
    info = TaskInfo(
        dataset=name,
        modality="text",
        input_shape=(max_length,),
        num_classes=len(class_names),
        normalization=None,
        class_names=tuple(class_names),
        text=schema,
    )
    logger.info(
        "%s: vocabulary of %d ids from %d training texts", name, schema.vocab_size, len(y_train)
    )

    def ids(texts: Sequence[str]) -> torch.Tensor:
        codes = encode(texts, schema.vocab, max_length, pad_id=schema.pad_id, unk_id=schema.unk_id)
        return torch.from_numpy(codes.astype(np.float32))

    return Dataset(
        info=info,
        x_train=ids(texts_train),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=ids(texts_test),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
    )


def _split(
    name: str, texts: Sequence[str], labels: np.ndarray, class_names: Sequence[str], length: int
) -> Dataset:
    """`text_dataset` on a stratified 80/20 split by label (``stratified_split``)."""
    train, test = stratified_split(labels)
    return text_dataset(
        name,
        ([texts[i] for i in train], labels[train], [texts[i] for i in test], labels[test]),
        class_names,
        length,
    )


# --------------------------------------------------------------------------- MedQuAD

MEDQUAD_FILE = "text/medquad_short_qa.jsonl"
MEDQUAD_LENGTH = 16
"""Tokens per MedQuAD sequence: the question and the start of its answer."""

MIN_CLASS_PAIRS = 100
"""A MedQuAD question type is its own class when it has at least this many pairs."""

OTHER = "other"
"""The class of every rarer question type (MedQuAD) or specialty (MTSamples)."""

_MEDQUAD_FIELDS = ("qtype", "question", "answer")


def _read_medquad(path: Path) -> tuple[list[str], list[str]]:
    """The texts (question, a space, answer) and question types of a MedQuAD .jsonl file."""
    texts, qtypes = [], []
    try:
        with path.open(encoding="utf-8") as handle:
            for line, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {line} is not valid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {line} is not a JSON object")
                for field in _MEDQUAD_FIELDS:
                    if not isinstance(record.get(field), str):
                        raise DataError(
                            f"{path}: line {line}: field {field!r} is missing or not a string"
                        )
                if not tokenize(record["question"]) or not record["qtype"].strip():
                    raise DataError(f"{path}: line {line}: the question or its qtype is empty")
                texts.append(f"{record['question']} {record['answer']}")
                qtypes.append(record["qtype"].strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    if not texts:
        raise DataError(f"{path}: the file has no question/answer pairs")
    return texts, qtypes


def frequent_classes(names: Sequence[str], min_count: int) -> tuple[str, ...]:
    """The names that occur at least `min_count` times, most frequent first (ties in string
    order), followed by ``"other"`` when some name is rarer.

    Example:
        >>> frequent_classes(["b", "a", "b", "c", "a"], 2)
        ('a', 'b', 'other')
    """
    counts = Counter(names)
    kept = sorted((n for n, c in counts.items() if c >= min_count), key=lambda n: (-counts[n], n))
    return (*kept, OTHER) if len(kept) < len(counts) and OTHER not in kept else tuple(kept)


def _labels(names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index[n] if n in index else index[OTHER] for n in names], dtype=np.int64)


@DATASETS.register(
    "medquad",
    summary=f"text ({MEDQUAD_LENGTH},), 11 classes (question type: treatment, frequency, ..., "
    f"susceptibility, other); MedQuAD question + answer, first {MEDQUAD_LENGTH} tokens, 5418 "
    f"pairs, stratified 20% test split; reads {MEDQUAD_FILE}",
)
def medquad(data_dir: Path | None) -> Dataset:
    """MedQuAD short Q&A: text = question, then answer, cut to the first 16 tokens.

    Label = the question type (``qtype``); types with at least ``MIN_CLASS_PAIRS`` pairs are
    classes (most frequent first), the rarer ones are ``"other"``. 20 % of each class is held
    out by :func:`stratified_split`; the vocabulary comes from the training split.

    Ben Abacha & Demner-Fushman, "A Question-Entailment Approach to Question Answering", BMC
    Bioinformatics 20:511, 2019.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    path = require_file(data_dir, MEDQUAD_FILE, "medquad")
    texts, qtypes = _read_medquad(path)
    classes = frequent_classes(qtypes, MIN_CLASS_PAIRS)
    return _split("medquad", texts, _labels(qtypes, classes), classes, MEDQUAD_LENGTH)


# --------------------------------------------------------------------------- MTSamples

MTSAMPLES_FILE = "text/mtsamples_first401.csv"
MTSAMPLES_LENGTH = 32
"""Tokens per MTSamples sequence: the start of the transcription."""

MTSAMPLES_CLASSES = ("surgery", "urology", OTHER)
"""The specialties kept as classes (the two large ones), then every other specialty."""

_MTSAMPLES_COLUMNS = ("medical_specialty", "transcription")


def _read_mtsamples(path: Path) -> tuple[list[str], list[str], int]:
    """Transcriptions and specialties (stripped) of an MTSamples CSV with a header line, and
    the number of rows skipped for an empty transcription."""
    texts, specialties, skipped = [], [], 0
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path}: the file is empty (expected a header line)")
            absent = [c for c in _MTSAMPLES_COLUMNS if c not in header]
            if absent:
                raise DataError(f"{path}: the header lacks column(s) {', '.join(absent)}")
            at = {c: header.index(c) for c in _MTSAMPLES_COLUMNS}
            for row_number, row in enumerate(reader, start=1):
                where = f"{path}: row {row_number} (ending on line {reader.line_num})"
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{where} has {len(row)} fields but the header has {len(header)}"
                    )
                specialty = row[at["medical_specialty"]].strip()
                if not specialty:
                    raise DataError(f"{where}, column 'medical_specialty': the specialty is empty")
                if not tokenize(row[at["transcription"]]):
                    skipped += 1
                    continue
                texts.append(row[at["transcription"]])
                specialties.append(specialty)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    if not texts:
        raise DataError(f"{path}: the file has no row with a transcription")
    return texts, specialties, skipped


@DATASETS.register(
    "mtsamples",
    summary=f"text ({MTSAMPLES_LENGTH},), 3 classes (surgery, urology, other); MTSamples "
    f"clinical transcriptions, first {MTSAMPLES_LENGTH} tokens, 397 notes (4 empty ones "
    f"skipped), stratified 20% test split; reads {MTSAMPLES_FILE}",
)
def mtsamples(data_dir: Path | None) -> Dataset:
    """MTSamples transcriptions (first 401 rows): the first 32 tokens of each note.

    Label = the medical specialty (leading spaces stripped): ``surgery``, ``urology`` or
    ``other``. Rows with an empty transcription are skipped (and counted in the log). 20 % of
    each class is held out by :func:`stratified_split`; the vocabulary comes from the
    training split.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.
    """
    path = require_file(data_dir, MTSAMPLES_FILE, "mtsamples")
    texts, specialties, skipped = _read_mtsamples(path)
    if skipped:
        logger.info("mtsamples: skipped %d rows with an empty transcription in %s", skipped, path)
    names = [s.lower() if s.lower() in MTSAMPLES_CLASSES else OTHER for s in specialties]
    labels = _labels(names, MTSAMPLES_CLASSES)
    return _split("mtsamples", texts, labels, MTSAMPLES_CLASSES, MTSAMPLES_LENGTH)
