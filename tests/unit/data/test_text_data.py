"""Tests of the word-level tokenizer and the text datasets (MedQuAD, MTSamples)."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gradaudit.data import DATASETS, Dataset, load_dataset
from gradaudit.data.text import (
    MEDQUAD_FILE,
    MTSAMPLES_FILE,
    PAD,
    UNK,
    build_vocab,
    encode,
    frequent_classes,
    text_dataset,
    tokenize,
)
from gradaudit.errors import DataError

# --------------------------------------------------------------------------- tokenizer


def test_tokenize_lowercases_and_splits_words_numbers_and_punctuation() -> None:
    assert tokenize("Pt. is a 67-year-old MALE; BP 140/90 mmHg") == [
        *("pt", ".", "is", "a", "67", "-", "year", "-", "old", "male", ";"),
        *("bp", "140", "/", "90", "mmhg"),
    ]
    assert tokenize("Sjögren's   syndrome\n(SS)") == [
        *("sjögren", "'", "s", "syndrome", "(", "ss", ")"),
    ]
    assert tokenize(" \t\n") == []


def test_vocab_is_deterministic_frequency_ordered_and_independent_of_text_order() -> None:
    texts = ["the cough, the fever", "fever and cough", "the rash", "a b c d"]
    vocab = build_vocab(texts, min_count=2)
    # 'the' occurs 3 times; 'cough' and 'fever' twice each (tie broken by string order)
    assert vocab == (PAD, UNK, "the", "cough", "fever")
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert build_vocab(shuffled, min_count=2) == vocab
    assert build_vocab(texts, min_count=1, max_size=4) == (PAD, UNK, "the", "cough")


def test_vocab_counts_only_the_first_max_length_tokens() -> None:
    texts = ["alpha beta gamma", "alpha beta delta"]
    assert build_vocab(texts, min_count=1, max_length=2) == (PAD, UNK, "alpha", "beta")
    assert "gamma" in build_vocab(texts, min_count=1)
    with pytest.raises(ValueError, match="max_size"):
        build_vocab(texts, max_size=1)


def test_encode_truncates_pads_and_maps_unknown_words_to_unk() -> None:
    vocab = (PAD, UNK, "chest", "pain", ".")
    ids = encode(["Chest pain. Chest PAIN again", "dyspnea", "pain"], vocab, 5)
    assert ids.dtype == np.int64
    assert ids.tolist() == [[2, 3, 4, 2, 3], [1, 0, 0, 0, 0], [3, 0, 0, 0, 0]]
    assert encode([], vocab, 3).shape == (0, 3)


def test_text_dataset_builds_the_vocabulary_from_the_training_split_only() -> None:
    train = ["cough and fever", "fever and rash", "cough and rash"]
    test = ["zebra cough"]  # 'zebra' occurs only in the test split
    ds = text_dataset("toy", (train, np.array([0, 1, 0]), test, np.array([1])), ("a", "b"), 4)
    schema = ds.info.text
    assert schema is not None and ds.info.modality == "text"
    assert "zebra" not in schema.vocab
    assert schema.vocab[:2] == (PAD, UNK) and schema.max_length == 4
    assert ds.x_test.tolist() == [[float(schema.unk_id), float(schema.vocab.index("cough")), 0, 0]]
    assert schema.decode(ds.x_train[1]) == "fever and rash"
    assert ds.x_train.dtype == torch.float32 and ds.info.input_shape == (4,)


def test_frequent_classes_keep_common_names_and_pool_the_rest() -> None:
    assert frequent_classes(["x", "y", "x", "z", "y", "x"], 2) == ("x", "y", "other")
    assert frequent_classes(["x", "x"], 2) == ("x",)


# --------------------------------------------------------------------------- small files


def _medquad_record(qtype: str, i: int) -> dict[str, str]:
    return {
        "qid": f"q{i}",
        "qtype": qtype,
        "question": f"What is the {qtype} of disease {i} ?",
        "answer": f"The {qtype} of disease {i} is described here in some detail.",
    }


def _write_medquad(root: Path, lines: list[str]) -> Path:
    path = root / MEDQUAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _medquad_lines(counts: dict[str, int]) -> list[str]:
    lines, i = [], 0
    for qtype, count in counts.items():
        for _ in range(count):
            lines.append(json.dumps(_medquad_record(qtype, i)))
            i += 1
    return lines


def _check_text(ds: Dataset, length: int) -> None:
    schema = ds.info.text
    assert schema is not None
    assert ds.info.modality == "text" and ds.info.normalization is None
    assert ds.info.input_shape == (length,) and schema.max_length == length
    assert len(ds.info.class_names) == ds.info.num_classes
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), length)
        assert torch.equal(x, x.round())
        assert int(x.min()) >= 0 and int(x.max()) < schema.vocab_size
        assert (x[:, 0] != schema.pad_id).all(), "an empty sequence"
        real = x != schema.pad_id
        assert (real[:, :-1] | ~real[:, 1:]).all(), "padding must be on the right only"
        assert int(y.min()) >= 0 and int(y.max()) < ds.info.num_classes


def test_small_medquad_file_classes_split_and_layout(tmp_path: Path) -> None:
    _write_medquad(tmp_path, _medquad_lines({"treatment": 120, "causes": 100, "stages": 7}))
    ds = load_dataset("medquad", tmp_path)
    _check_text(ds, 16)
    assert ds.info.class_names == ("treatment", "causes", "other")
    assert len(ds.y_train) + len(ds.y_test) == 227
    assert torch.bincount(ds.y_test).tolist() == [24, 20, 1]  # 20 % of each class
    assert ds.info.text is not None
    assert ds.info.text.decode(ds.x_train[0]).startswith("what is the treatment of disease")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"qtype": "treatment", "question": "What', "line 3 is not valid JSON"),
        ('["a list"]', "line 3 is not a JSON object"),
        ('{"qtype": "treatment", "question": "Why?"}', "line 3: field 'answer' is missing"),
        ('{"qtype": 3, "question": "Why?", "answer": "."}', "line 3: field 'qtype'"),
        ('{"qtype": "x", "question": "  ", "answer": "."}', "line 3: the question or its qtype"),
    ],
)
def test_malformed_medquad_line_names_the_file_and_line(
    tmp_path: Path, bad: str, message: str
) -> None:
    lines = _medquad_lines({"treatment": 4})
    path = _write_medquad(tmp_path, [*lines[:2], bad, *lines[2:]])
    with pytest.raises(DataError, match=message) as err:
        load_dataset("medquad", tmp_path)
    assert str(path) in str(err.value)


def test_empty_medquad_file(tmp_path: Path) -> None:
    _write_medquad(tmp_path, [""])
    with pytest.raises(DataError, match="no question/answer pairs"):
        load_dataset("medquad", tmp_path)


def _write_mtsamples(root: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    path = root / MTSAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = header or ["", "description", "medical_specialty", "sample_name", "transcription"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _mtsamples_rows() -> list[list[str]]:
    specialties = [" Surgery"] * 10 + [" Urology"] * 10 + [" Bariatrics", " Neurology"] * 3
    return [
        [str(i), "desc", s, "name", f"PREOPERATIVE DIAGNOSIS:,  case {i},\nline two {s}."]
        for i, s in enumerate(specialties)
    ]


def test_small_mtsamples_file_skips_empty_notes_and_collapses_specialties(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = _mtsamples_rows()
    rows.insert(3, ["99", "desc", " Surgery", "name", "  "])  # an empty transcription
    _write_mtsamples(tmp_path, rows)
    with caplog.at_level(logging.INFO, logger="gradaudit.data.text"):
        ds = load_dataset("mtsamples", tmp_path)
    _check_text(ds, 32)
    assert "skipped 1 rows with an empty transcription" in caplog.text
    assert ds.info.class_names == ("surgery", "urology", "other")
    assert len(ds.y_train) + len(ds.y_test) == 26
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=3)
    assert counts.tolist() == [10, 10, 6]
    assert ds.info.text is not None
    assert ds.info.text.decode(ds.x_train[0]).startswith("preoperative diagnosis : , case")


def test_mtsamples_row_with_a_missing_field_names_the_row(tmp_path: Path) -> None:
    rows = _mtsamples_rows()
    rows[4] = rows[4][:-1]
    path = _write_mtsamples(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 5 \(ending on line \d+\) has 4 fields") as err:
        load_dataset("mtsamples", tmp_path)
    assert str(path) in str(err.value)


def test_mtsamples_header_and_specialty_checks(tmp_path: Path) -> None:
    _write_mtsamples(tmp_path, _mtsamples_rows(), header=["", "description", "specialty", "a", "b"])
    with pytest.raises(DataError, match=r"header lacks column.*medical_specialty, transcription"):
        load_dataset("mtsamples", tmp_path)
    rows = _mtsamples_rows()
    rows[0][2] = "  "
    _write_mtsamples(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 1 .*'medical_specialty': the specialty is empty"):
        load_dataset("mtsamples", tmp_path)


def test_mtsamples_broken_quoting_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / MTSAMPLES_FILE
    path.parent.mkdir(parents=True)
    path.write_text(
        ",description,medical_specialty,sample_name,transcription\n"
        '0,d, Surgery,n,"open quote never closed\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match="malformed CSV") as err:
        load_dataset("mtsamples", tmp_path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- real files


def test_text_datasets_are_registered_with_summaries() -> None:
    summaries = {entry.name: entry.summary for entry in DATASETS.entries()}
    for name, length in (("medquad", 16), ("mtsamples", 32)):
        summary = summaries[name]
        assert summary.startswith(f"text ({length},)")
        assert "reads text/" in summary


@pytest.mark.data
def test_real_medquad(shared_data_dir: Path) -> None:
    ds = load_dataset("medquad", shared_data_dir)
    _check_text(ds, 16)
    assert len(ds.y_train) + len(ds.y_test) == 5418
    names = ds.info.class_names
    assert len(names) == 11 and names[0] == "treatment" and names[-1] == "other"
    assert "susceptibility" in names and "stages" not in names
    full = (ds.x_train != 0).all(dim=1).float().mean()
    assert float(full) > 0.99  # 16 real tokens almost everywhere
    assert ds.info.text is not None and 2000 < ds.info.text.vocab_size < 4000


@pytest.mark.data
def test_real_mtsamples(shared_data_dir: Path) -> None:
    ds = load_dataset("mtsamples", shared_data_dir)
    _check_text(ds, 32)
    assert len(ds.y_train) + len(ds.y_test) == 397  # 401 rows, 4 empty transcriptions
    assert ds.info.class_names == ("surgery", "urology", "other")
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test])).tolist()
    assert counts[2] == 397 - counts[0] - counts[1] > 0
    assert ds.info.text is not None and ds.info.text.vocab_size > 100
