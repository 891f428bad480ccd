"""Resumable stages.

A cycle is a sequence of stages that write files. Each stage writes into a temporary directory and
swaps it in whole (``datasets.atomic``), then writes a ``.done.json`` marker holding the
fingerprint of the config and inputs that made it. A rerun skips a stage whose marker exists with
the same fingerprint, so a killed run resumes where it stopped and never reads a half-written file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..datasets.atomic import atomic_dir, read_json, write_json
from ..datasets.errors import ConfigError
from ..datasets.files import walk_files

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
    """Delete temporary directories/files a killed run left beside a stage (never read, only removed).

    Only names of the form ``.<stage>.<random>.tmp`` (what ``datasets.atomic`` makes), and only
    under the run lock (:func:`hold_lock`): a leftover can then only be one of this run folder's
    own killed writers, never a live run's work in progress.
    """
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
    """Cheap digest of a data root (names, sizes, mtimes), so edited inputs redo the data stage.

    Links are followed (an image folder linked into the root counts), each real folder once; a
    dangling link or a link loop is part of the digest as such, never an error here: the adapters
    name it when they read the files.
    """
    h = hashlib.sha256()
    for path, st in sorted(walk_files(root), key=lambda entry: str(entry[0])):
        state = f"{st.st_size}:{st.st_mtime_ns}" if st is not None else "unreachable"
        h.update(f"{os.path.relpath(path, root)}:{state}".encode())
    return h.hexdigest()[:16]


class FolderBusy(ConfigError):
    """Another process holds the lock of a folder; the message names it (pid, host)."""


@contextlib.contextmanager
def hold_lock(lock_file: Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_file`` for the block, or refuse at once.

    Why: two runs writing into one folder delete each other's temporary stage folders and mix
    their outputs. The lock is the kernel's (released when the process dies, even by SIGKILL, so a
    killed run never leaves a stale lock); the file only names the holder for the refusal.

    Raises:
        FolderBusy: one line naming ``what`` is locked and the process holding it.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = " ".join(f.read().split()) or "an unknown process"
            raise FolderBusy(f"{what}: another run ({holder}) is writing into this folder; wait for it to end "
                             "or choose another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
