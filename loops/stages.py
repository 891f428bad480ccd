"""Resumable stages.

A cycle is a sequence of stages that write files. Each stage writes into a temporary directory and
swaps it in whole (``datasets.atomic``), then writes a ``.done.json`` marker holding the
fingerprint of the config and inputs that made it. A rerun skips a stage whose marker exists with
the same fingerprint, so a killed run resumes where it stopped and never reads a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ..datasets.atomic import atomic_dir, read_json, write_json

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


def file_digest(*paths: Path) -> str:
    """Content digest of stage outputs (tables, JSON, id lists; not weights), chaining a stage's
    fingerprint to the outputs of the stages it reads."""
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if f.is_file() and f.suffix in (".csv", ".json", ".txt"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def source_digest(root: Path) -> str:
    """Cheap digest of a data root (names, sizes, mtimes), so edited inputs redo the data stage."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
