"""Tests of the multimodal MTSamples dataset: fields read from each row, the layout of an input
row, and DataErrors for malformed files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradaudit.data.multimodal import (
    FIELDS_LENGTH,
    NOTE_TYPES,
    SEX_CATEGORIES,
    mtsamples_fields,
    note_type,
    stated_age,
    stated_sex,
)
from gradaudit.data.text import MTSAMPLES_FILE, encode
from gradaudit.errors import DataError

HEADER = ",description,medical_specialty,sample_name,transcription,keywords\n"


def write(root: Path, body: str, *, header: str = HEADER, raw: bytes | None = None) -> Path:
    path = root / MTSAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(header + body, encoding="utf-8")
    return root


def rows(count: int) -> str:
    """`count` well-formed rows: alternating surgery and urology, ages stated on even rows."""
    lines = []
    for i in range(count):
        specialty = " Surgery" if i % 2 else " Urology"
        age = f"A {20 + i}-year-old man" if i % 2 == 0 else "A patient"
        transcription = "PREOPERATIVE DIAGNOSIS:, Hernia." if i % 3 else "CHIEF COMPLAINT: Pain."
        lines.append(f'{i}," {age} with hernia {i}.",{specialty}, Name ,"{transcription}",k\n')
    return "".join(lines)


def test_fields_are_read_from_the_text() -> None:
    assert stated_age("A 23-year-old white female.", "He is 40 years old.") == 23.0
    assert stated_age("Consult.", "This 42 years old man.") == 42.0
    assert stated_age("A 16-month-old boy.") == pytest.approx(16 / 12)
    assert stated_age("Seen 400-year-old records. Now 7 yr old.") == 7.0
    assert math.isnan(stated_age("No age here.", ""))
    assert SEX_CATEGORIES[stated_sex("She has pain; her husband drove.")] == "female"
    assert SEX_CATEGORIES[stated_sex("The gentleman says his knee hurts.")] == "male"
    assert SEX_CATEGORIES[stated_sex("He told her.")] == "unknown"
    assert NOTE_TYPES[note_type("PREOPERATIVE DIAGNOSES:, 1. Hernia.")] == "operative"
    assert NOTE_TYPES[note_type("TITLE OF OPERATION: Repair.")] == "operative"
    assert NOTE_TYPES[note_type("HISTORY OF PRESENT ILLNESS: , He")] == "visit"
    assert NOTE_TYPES[note_type("2-D ECHOCARDIOGRAM,Multiple views.")] == "other"
    assert NOTE_TYPES[note_type("")] == "other"


def test_a_small_file_gives_the_multimodal_layout(tmp_path: Path) -> None:
    ds = mtsamples_fields(write(tmp_path, rows(20)))
    info = ds.info
    assert info.modality == "multimodal"
    assert info.tabular is not None and info.text is not None
    assert info.tabular.numeric == ("age",)
    assert info.tabular.categorical == ("sex", "age_stated", "note_type")
    assert info.input_shape == (4 + FIELDS_LENGTH,)
    assert info.class_names == ("surgery", "urology", "other")
    assert len(ds.y_train) == 16 and len(ds.y_test) == 4
    x = torch.cat([ds.x_train, ds.x_test])
    mean, std = info.tabular.raw_scale("age")
    stated = x[:, 2] == 1
    ages = x[:, 0] * std + mean
    # unstated ages are the training median of the stated ones, flagged by age_stated = no
    assert int(stated.sum()) == 10
    assert torch.all(ages[stated] >= 20) and torch.all(ages[stated] <= 38)
    assert torch.allclose(ages[~stated], ages[~stated][0].expand(10))
    assert torch.all(x[stated, 1] == SEX_CATEGORIES.index("male"))
    assert torch.all(x[~stated, 1] == SEX_CATEGORIES.index("unknown"))
    assert set(x[:, 3].long().tolist()) == {
        NOTE_TYPES.index("operative"),
        NOTE_TYPES.index("visit"),
    }
    tokens = x[:, 4:].long()
    assert int(tokens.max()) < info.text.vocab_size
    assert bool((tokens[:, -1] == info.text.pad_id).all())  # the short notes are padded


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        ("", HEADER, "no row with a description"),
        ("", "", "the file is empty"),
        (
            '0," Note.", Surgery\n',
            ",description,medical_specialty\n",
            "lacks column.*transcription",
        ),
        ('0," Note.", Surgery, N ,"T."\n', HEADER, r"row 1 \(ending on line 2\) has 5 fields"),
        (
            '0," Note.",  , N ,"T.",k\n',
            HEADER,
            "row 1.*specialty is empty",
        ),
        ('0," Note.", Surgery, N ,"T."x,k\n', HEADER, "line 2: malformed CSV"),
    ],
)
def test_malformed_files_raise_data_errors(
    tmp_path: Path, body: str, header: str, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        mtsamples_fields(write(tmp_path, body, header=header))


def test_unreadable_and_missing_files_raise_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        mtsamples_fields(tmp_path)
    with pytest.raises(DataError, match="cannot read it as UTF-8"):
        mtsamples_fields(write(tmp_path, "", raw=HEADER.encode() + b'0,"\xff",Surgery,N,T,k\n'))


@pytest.mark.data
def test_real_mtsamples_fields(shared_data_dir: Path) -> None:
    ds = mtsamples_fields(shared_data_dir)
    info = ds.info
    assert info.tabular is not None and info.text is not None
    assert (len(ds.y_train), len(ds.y_test)) == (320, 81)
    assert np.bincount(torch.cat([ds.y_train, ds.y_test]).numpy()).tolist() == [223, 158, 20]
    x = torch.cat([ds.x_train, ds.x_test])
    assert torch.isfinite(x).all()
    assert int((x[:, 2] == 1).sum()) == 202  # rows that state an age (7 in months)
    for j, cardinality in enumerate(info.tabular.cardinalities):
        assert set(x[:, 1 + j].long().tolist()) == set(range(cardinality))
    # the note of row 0 ("A 23-year-old white female presents with complaint of allergies.")
    first = encode(["A 23-year-old white female presents"], info.text.vocab, FIELDS_LENGTH)
    row = next(r for r in x if torch.equal(r[4:9].long(), torch.from_numpy(first[0, :5])))
    mean, std = info.tabular.raw_scale("age")
    assert float(row[0] * std + mean) == pytest.approx(23.0, abs=1e-4)
    assert SEX_CATEGORIES[int(row[1])] == "female"
    assert NOTE_TYPES[int(row[3])] == "visit"  # its transcription starts "SUBJECTIVE:"
    # the vocabulary is the training notes': a test-only word is <unk>
    train_ids = set(ds.x_train[:, 4:].long().flatten().tolist())
    assert set(range(info.text.vocab_size)) - {info.text.pad_id} <= train_ids | {info.text.unk_id}
