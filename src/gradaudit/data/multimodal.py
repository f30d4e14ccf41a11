"""Multimodal datasets: a clinical note together with structured fields of the same record.

A multimodal input row holds the tabular columns first (standardised numeric values, then one
categorical code per column, as `TabularSchema` says), then the note's token ids (`TextSchema`),
all stored as float32: input shape ``(F + L,)``.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradaudit.data.base import Dataset, require_file
from gradaudit.data.embedded import DATASETS, impute_and_standardize, stratified_split
from gradaudit.data.text import (
    MTSAMPLES_CLASSES,
    MTSAMPLES_FILE,
    OTHER,
    encode,
    text_schema,
    tokenize,
)
from gradaudit.errors import DataError
from gradaudit.types import TabularSchema, TaskInfo

logger = logging.getLogger(__name__)

FIELDS_LENGTH = 24
"""Tokens per note of ``mtsamples_fields``: its ``description`` (median 19 tokens), padded."""

AGE_PATTERN = re.compile(r"\b(\d{1,3})[- ]?(?:years?|yrs?)[- ]old\b", re.IGNORECASE)
"""An age in years as notes state it: ``23-year-old``, ``42 years old``, ``8 yr old``."""

MONTHS_PATTERN = re.compile(r"\b(\d{1,2})[- ]?months?[- ]old\b", re.IGNORECASE)
"""An infant's age in months: ``16-month-old``."""

MAX_AGE = 120
"""Ages above this are read as something else (a count, a date) and ignored."""

FEMALE_WORDS = frozenset(
    {"she", "her", "hers", "herself", "female", "woman", "lady", "girl", "mrs"}
)
"""Tokens that refer to a female patient."""

MALE_WORDS = frozenset({"he", "him", "his", "himself", "male", "man", "gentleman", "boy", "mr"})
"""Tokens that refer to a male patient."""

SEX_CATEGORIES = ("female", "male", "unknown")
AGE_STATED_CATEGORIES = ("no", "yes")
NOTE_TYPES = ("operative", "visit", "other")

OPERATIVE_HEADERS = ("OPERATI", "PROCEDURE", "PREOPERATIVE", "POSTOPERATIVE")
"""Words of a first section header that mark an operative or procedure report."""

VISIT_HEADERS = ("HISTORY", "COMPLAINT", "SUBJECTIVE", "REASON", "CONSULT", "ADMI", "EXAM", "CC")
"""Words of a first section header that mark a visit, consultation or admission note."""

_HEADER = re.compile(r"\s*([A-Z][A-Z0-9 ,/&()\-]*?)\s*:")
_COLUMNS = ("description", "medical_specialty", "transcription")


@dataclass(frozen=True)
class NoteRecord:
    """What one MTSamples row gives: the note, its fields, and the label's source."""

    note: str
    age: float
    sex: int
    note_type: int
    specialty: str


def stated_age(*texts: str) -> float:
    """The patient's age in years from the first text that states one, else NaN.

    ``NN-year-old`` (and ``NN years old``, ``NN yr old``) gives NN; ``NN-month-old`` gives
    NN / 12. A value above ``MAX_AGE`` is ignored.

    Example:
        >>> stated_age("A 23-year-old white female.", "She is 40 years old.")
        23.0
        >>> stated_age("Consult.", "A 6-month-old boy.")
        0.5
        >>> import math; math.isnan(stated_age("No age."))
        True
    """
    for text in texts:
        for match in AGE_PATTERN.finditer(text):
            if int(match.group(1)) <= MAX_AGE:
                return float(match.group(1))
        months = MONTHS_PATTERN.search(text)
        if months is not None:
            return int(months.group(1)) / 12.0
    return float("nan")


def stated_sex(text: str) -> int:
    """The code in ``SEX_CATEGORIES`` of the sex the text's words refer to most.

    Counts the tokens in ``FEMALE_WORDS`` and in ``MALE_WORDS`` (pronouns, ``female``,
    ``gentleman``, ...); the larger count wins, a tie (none included) is ``unknown``.

    Example:
        >>> [SEX_CATEGORIES[stated_sex(t)] for t in ("She said he", "His knee", "Biopsy")]
        ['unknown', 'male', 'unknown']
    """
    tokens = tokenize(text)
    female = sum(t in FEMALE_WORDS for t in tokens)
    male = sum(t in MALE_WORDS for t in tokens)
    if female == male:
        return SEX_CATEGORIES.index("unknown")
    return SEX_CATEGORIES.index("female" if female > male else "male")


def note_type(transcription: str) -> int:
    """The code in ``NOTE_TYPES`` of the transcription's first section header.

    The header is the upper-case text before the first colon at the start (``PREOPERATIVE
    DIAGNOSIS:``). It is ``operative`` when it holds a word of ``OPERATIVE_HEADERS``, else
    ``visit`` when it holds one of ``VISIT_HEADERS``, else (no header too) ``other``.

    Example:
        >>> [NOTE_TYPES[note_type(t)] for t in ("PREOPERATIVE DIAGNOSIS:, Hernia.",
        ...                                      "CHIEF COMPLAINT: Pain.", "The patient.")]
        ['operative', 'visit', 'other']
    """
    match = _HEADER.match(transcription)
    if match is None:
        return NOTE_TYPES.index("other")
    words = re.findall(r"[A-Z]+", match.group(1))
    if any(w.startswith(OPERATIVE_HEADERS) for w in words):
        return NOTE_TYPES.index("operative")
    if any(w.startswith(VISIT_HEADERS) for w in words):
        return NOTE_TYPES.index("visit")
    return NOTE_TYPES.index("other")


def _read_records(path: Path) -> tuple[list[NoteRecord], int]:
    """The records of an MTSamples CSV with a header line, and how many rows were skipped for
    an empty description."""
    records: list[NoteRecord] = []
    skipped = 0
    reader = None
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path}: the file is empty (expected a header line)")
            absent = [c for c in _COLUMNS if c not in header]
            if absent:
                raise DataError(f"{path}: the header lacks column(s) {', '.join(absent)}")
            at = {c: header.index(c) for c in _COLUMNS}
            for row_number, row in enumerate(reader, start=1):
                if not row:
                    continue
                where = f"{path}: row {row_number} (ending on line {reader.line_num})"
                if len(row) != len(header):
                    raise DataError(
                        f"{where} has {len(row)} fields but the header has {len(header)}"
                    )
                specialty = row[at["medical_specialty"]].strip()
                if not specialty:
                    raise DataError(f"{where}, column 'medical_specialty': the specialty is empty")
                description = row[at["description"]]
                transcription = row[at["transcription"]]
                if not tokenize(description):
                    skipped += 1
                    continue
                records.append(
                    NoteRecord(
                        note=description.strip(),
                        age=stated_age(description, transcription),
                        sex=stated_sex(f"{description} {transcription}"),
                        note_type=note_type(transcription),
                        specialty=specialty,
                    )
                )
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 0
        raise DataError(f"{path}: line {line}: malformed CSV: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    if not records:
        raise DataError(f"{path}: the file has no row with a description")
    return records, skipped


def _fields(records: Sequence[NoteRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Raw ages (N, 1), NaN where unstated, and codes (N, 3): sex, age stated, note type."""
    ages = np.asarray([[r.age] for r in records], dtype=np.float64).reshape(len(records), 1)
    codes = np.asarray(
        [[r.sex, int(not np.isnan(r.age)), r.note_type] for r in records], dtype=np.float32
    ).reshape(len(records), 3)
    return ages, codes


@DATASETS.register(
    "mtsamples_fields",
    summary=f"multimodal ({4 + FIELDS_LENGTH},), 3 classes (surgery, urology, other); MTSamples "
    f"notes (description, {FIELDS_LENGTH} tokens) with fields read from the same row: age "
    f"(numeric), sex, age stated, note type; 401 records, stratified 20% test split; reads "
    f"{MTSAMPLES_FILE}",
)
def mtsamples_fields(data_dir: Path | None) -> Dataset:
    """MTSamples records (first 401 rows) as a note plus structured fields.

    Each row of the CSV gives:

    - the note: its ``description`` (a one-to-three-sentence summary written with the
      transcription), tokenised by `gradaudit.data.text.tokenize`, cut to ``FIELDS_LENGTH`` = 24
      tokens and right-padded; the vocabulary is built from the training split's notes
      (`build_vocab`: tokens seen at least twice);
    - ``age`` (numeric): the first ``NN-year-old`` / ``NN years old`` (or ``NN-month-old``, as
      NN / 12) in the description, else in the transcription (`stated_age`); 202 of 401 rows
      state one. Unstated ages are imputed with the training median, then the column is
      standardised with the training mean and std (`impute_and_standardize`);
    - ``sex`` (female / male / unknown): which of ``FEMALE_WORDS`` (she, her, female, woman,
      ...) and ``MALE_WORDS`` (he, his, male, gentleman, ...) occur more often in description
      and transcription together; a tie is unknown (`stated_sex`);
    - ``age_stated`` (no / yes): whether an age was found, so the imputed value is flagged;
    - ``note_type`` (operative / visit / other): from the transcription's first section header
      (``PREOPERATIVE DIAGNOSIS:`` is operative, ``CHIEF COMPLAINT:`` a visit; `note_type`).

    Label = the medical specialty (stripped, lowercased): ``surgery``, ``urology`` or
    ``other``, as in ``mtsamples``. Rows with an empty description are skipped (none in the
    shipped file). 20 % of each class is held out by :func:`stratified_split`.

    Privacy: the fields are derived from the note's own record, so the note and its fields
    overlap (an age stated in the description is both in the text and in ``age``), as the
    structured and free-text parts of a real health record do.

    Args:
        data_dir: the data dir; None means ``$GRADAUDIT_DATA_DIR``.

    Raises:
        DataError: the file is missing, not UTF-8, malformed CSV, lacks a column, has a row
            with the wrong number of fields or an empty specialty, or has no usable row.
    """
    path = require_file(data_dir, MTSAMPLES_FILE, "mtsamples_fields")
    records, skipped = _read_records(path)
    if skipped:
        logger.info("mtsamples_fields: skipped %d rows with an empty description", skipped)
    names = [r.specialty.lower() for r in records]
    labels = np.asarray(
        [MTSAMPLES_CLASSES.index(n if n in MTSAMPLES_CLASSES else OTHER) for n in names],
        dtype=np.int64,
    )
    train, test = stratified_split(labels)
    ages, codes = _fields(records)
    age_train, age_test, mean, std = impute_and_standardize(ages[train], ages[test])
    notes = [r.note for r in records]
    text = text_schema([notes[i] for i in train], FIELDS_LENGTH)
    tabular = TabularSchema(
        numeric=("age",),
        categorical=("sex", "age_stated", "note_type"),
        cardinalities=(len(SEX_CATEGORIES), len(AGE_STATED_CATEGORIES), len(NOTE_TYPES)),
        categories=(SEX_CATEGORIES, AGE_STATED_CATEGORIES, NOTE_TYPES),
        numeric_mean=mean,
        numeric_std=std,
    )
    info = TaskInfo(
        dataset="mtsamples_fields",
        modality="multimodal",
        input_shape=(tabular.num_features + text.max_length,),
        num_classes=len(MTSAMPLES_CLASSES),
        normalization=None,
        class_names=MTSAMPLES_CLASSES,
        tabular=tabular,
        text=text,
    )
    logger.info("mtsamples_fields: vocabulary of %d ids", text.vocab_size)

    def rows(index: np.ndarray, numeric: np.ndarray) -> torch.Tensor:
        ids = encode([notes[i] for i in index], text.vocab, text.max_length)
        x = np.hstack([numeric, codes[index], ids.astype(np.float32)]).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x))

    return Dataset(
        info=info,
        x_train=rows(train, age_train),
        y_train=torch.from_numpy(labels[train]),
        x_test=rows(test, age_test),
        y_test=torch.from_numpy(labels[test]),
    )
