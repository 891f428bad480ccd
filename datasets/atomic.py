"""Atomic file writes and the table/JSON readers that go with them (ground floor).

Every output of the engine is written to a temporary name beside its target and renamed into
place (rename is atomic on POSIX), so a killed run never leaves a half-written file that a rerun
could mistake for a finished one. Imports nothing of the project.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like atomic_path for a directory: build it under a temporary name, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: str | Path, df: pd.DataFrame) -> None:
    """Write a table atomically as CSV (gzip-compressed when the name ends in .gz)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, compression="gzip" if str(path).endswith(".gz") else None)


ID_COLUMNS = {"image_id": str, "patient_id": str, "study_id": str, "source": str, "models": str}


def read_table(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """Read a table written by write_table; id columns stay strings ("0001" must not become 1).

    Only an empty cell is missing (what ``write_table`` writes for NaN/None): pandas' default would
    also read the ids "NA", "null", "nan" or "None" as missing, and a patient or image of that
    name would vanish into NaN.
    """
    return pd.read_csv(path, dtype={**ID_COLUMNS, **kwargs.pop("dtype", {})}, keep_default_na=False,
                       na_values=[""], **kwargs)
