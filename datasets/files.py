"""Walking a data folder the way a user laid it out: links followed, loops and dangling links survived.

Why its own walk: Kaggle users link read-only inputs into a working folder (``images ->
/kaggle/input/.../images``), so links must be followed; but a link loop or a dangling link
anywhere under the root must neither hang the walk nor crash it before the adapters can name the
file. Each real folder is entered once (a loop is walked once), and an entry whose target cannot
be reached is yielded with ``stat`` None for the caller to report.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator


def walk_files(root: str | Path) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Every entry under ``root`` that is not a folder, in sorted order, links followed.

    Yields:
        (path, stat of its target), stat None for a dangling link, a link in a loop or an entry
        that cannot be read. Hidden entries (names starting with ".") are included.
    """
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[tuple[Path, os.stat_result | None]]:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            names = sorted(os.listdir(folder))
        except OSError:
            return
        for name in names:
            path = folder / name
            try:
                target = path.stat()
            except OSError:
                yield path, None
                continue
            if path.is_dir():
                yield from walk(path)
            else:
                yield path, target

    yield from walk(Path(root))


def link_target(path: Path) -> str:
    """Where a link points (its text), for messages; '' when ``path`` is not a link."""
    try:
        return os.readlink(path) if path.is_symlink() else ""
    except OSError:
        return ""
