"""Atomic writes and safe reads of the files an audit leaves behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gradaudit.errors import GradauditError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically; NaN and infinities are refused."""
    text = json.dumps(payload, indent=2, allow_nan=False, sort_keys=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def read_json(path: Path, *, what: str = "file") -> Any:
    """Parse a JSON file; a missing or corrupt file is a GradauditError naming it."""
    if not path.is_file():
        raise GradauditError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradauditError(f"{path}: not a valid JSON {what} ({exc})") from None
