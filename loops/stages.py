"""Atomic file writes and resumable stages.

A cycle is a sequence of stages that write files. Each stage writes into a temporary name and
renames (rename is atomic on POSIX), then writes a ``.done.json`` marker holding the fingerprint of
the config and inputs that made it. A rerun skips a stage whose marker exists with the same
fingerprint, so a killed run resumes where it stopped and never reads a half-written file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


ID_COLUMNS = {"image_id": str, "patient_id": str, "source": str, "models": str}


def read_table(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """Read a table written by write_table; id columns stay strings ("0001" must not become 1)."""
    return pd.read_csv(path, dtype={**ID_COLUMNS, **kwargs.pop("dtype", {})}, keep_default_na=True, **kwargs)


FAULT_ENV = "CXR_FAULT"
"""Fault injection for the kill/resume tests: ``CXR_FAULT=<stage path>@<point>`` SIGKILLs the process
at that point of that stage (path relative to the run, e.g. ``gen0/classifier/fold1@outputs``).
Points: ``start`` (nothing written), ``outputs`` (outputs complete in the temporary directory, not
yet swapped in), ``swapped`` (outputs in place, marker not yet written). Unset, it costs one lookup."""


def _fault_point(stage_dir: Path, point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or "@" not in spec:
        return
    where, when = spec.rsplit("@", 1)
    if when == point and stage_dir.as_posix().endswith("/" + where.strip("/")):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(stage_dir: Path) -> None:
    """Delete temporary directories/files a killed run left beside a stage (never read, only removed)."""
    for leftover in stage_dir.parent.glob(f".{stage_dir.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


class Stage:
    """One resumable step: ``Stage(dir, name, fingerprint).run(fn)`` calls ``fn(out_dir)`` once.

    ``fn`` writes its outputs into the directory it is given (a temporary one, swapped in whole on
    success) and may return a JSON-able record that is stored in the marker and returned on reruns.
    A stage is done only when its directory and a marker with the same fingerprint both exist, so
    a kill at any moment leaves either the old state or the new one, never half of it.
    """

    def __init__(self, root: str | Path, name: str, fingerprint: str):
        self.dir = Path(root) / name
        self.name = name
        self.fingerprint = fingerprint
        self.marker = Path(root) / f"{name}.done.json"

    def is_done(self) -> bool:
        if not (self.marker.exists() and self.dir.exists()):
            return False
        try:
            return read_json(self.marker).get("fingerprint") == self.fingerprint
        except (OSError, json.JSONDecodeError):
            return False

    def run(self, fn: Callable[[Path], Any]) -> dict:
        if self.is_done():
            record = read_json(self.marker)
            record["skipped"] = True
            return record
        if self.marker.exists():
            self.marker.unlink()
        remove_leftovers(self.dir)
        start = time.perf_counter()
        with atomic_dir(self.dir) as tmp:
            _fault_point(self.dir, "start")
            result = fn(tmp)
            _fault_point(self.dir, "outputs")
        _fault_point(self.dir, "swapped")
        record = {"stage": self.name, "fingerprint": self.fingerprint, "seconds": round(time.perf_counter() - start, 3), "result": result}
        write_json(self.marker, record)
        record["skipped"] = False
        return record
