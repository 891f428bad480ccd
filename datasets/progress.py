"""Progress you can see: a tqdm bar on a terminal, periodic log lines with an ETA everywhere else.

Why both: a person watching a terminal wants a live bar (epochs and steps while training, images
while predicting and fusing); CI, ``nohup ... > log`` and notebooks' captured output want a line
every so often instead of thousands of carriage returns. One object, :class:`Progress`, decides by
where the output goes (``sys.stderr.isatty()``), and ``CXR_PROGRESS=bar|log|off`` overrides it.
tqdm computes the rate and ETA in both modes; in log mode the lines are written here (a line once
``interval`` seconds have passed since the last, and a closing one if the count moved since), so a
short job writes nothing and a finished one is not repeated.

Log lines go to the ``cxr.progress`` logger at INFO, so ``run_cycle.py -q`` silences them; bars are
shown only where that logger would print INFO too. Imports nothing of the project (any layer may
use it).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Literal

PROGRESS_ENV = "CXR_PROGRESS"
"""``bar`` | ``log`` | ``off``: how progress is shown; unset: a bar on a terminal, log lines elsewhere."""
LOG_INTERVAL_S = 20.0
"""In log mode, at most one line per bar this often (plus one when it ends, if it wrote any)."""
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) in {elapsed}, ETA {remaining}, {rate_fmt}{postfix}"
"""A log line: what, how far, how long it ran, how long it still needs, how fast."""

log = logging.getLogger("cxr.progress")
Mode = Literal["bar", "log", "off"]


def progress_mode() -> Mode:
    """Where progress goes now: the environment's choice, else a bar on a terminal, else log lines."""
    chosen = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if chosen in ("bar", "log", "off"):
        return chosen  # type: ignore[return-value]
    if not log.isEnabledFor(logging.INFO):
        return "off"
    stream = sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "log"


class _Discard:
    """tqdm's output in log mode: nothing (tqdm only keeps the counts, the rate and the ETA)."""

    def write(self, text: str) -> None: ...

    def flush(self) -> None: ...


class Progress:
    """A progress bar over ``total`` units: ``with Progress(100, "gen0/classifier/predictions", "img") as p: p.update(10)``.

    Args:
        total: units of work (steps, images); 0 or None: unknown (no ETA).
        desc: what is running, e.g. "classifier gen 1 fold 2" (names the line in a log).
        unit: what is counted ("step", "img").
        mode: "bar", "log" or "off"; None: :func:`progress_mode`.
        interval: seconds between log lines in log mode.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, mode: Mode | None = None,
                 interval: float = LOG_INTERVAL_S):
        from tqdm.auto import tqdm

        self.mode = mode or progress_mode()
        self.desc, self.interval = desc, float(interval)
        kwargs = dict(total=total or None, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        if self.mode == "log":
            kwargs.update(file=_Discard(), mininterval=float("inf"), ascii=True,
                          bar_format=LOG_FORMAT if total else "{desc}: {n_fmt} {unit} in {elapsed}, {rate_fmt}{postfix}")
        self.bar = tqdm(disable=self.mode == "off", **kwargs)
        self.done, self._total = 0, total or None
        self._started = self._last_line = time.monotonic()
        self._logged_at: int | None = None
        """``done`` when the last log line was written (None: none yet)."""

    @property
    def n(self) -> int:
        """Units done so far (counted also when nothing is shown)."""
        return self.done

    @property
    def total(self) -> int | None:
        return self._total

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.mode == "log" and time.monotonic() - self._last_line >= self.interval:
            self._log_line()

    def _log_line(self) -> None:
        """One log line with the count, elapsed time, ETA and rate (tqdm's meter, without a bar)."""
        log.info(self.bar.format_meter(**self.bar.format_dict))
        self._last_line, self._logged_at = time.monotonic(), self.done

    def note(self, **values) -> None:
        """Short values shown after the bar (loss, epoch), refreshed with it (no extra line)."""
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}, refresh=False)

    def logging_redirected(self):
        """A context in which log records print above the bar instead of through it (bar mode only)."""
        if self.mode != "bar":
            return nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def close(self) -> None:
        """Ends the bar; in log mode a last line, if earlier lines were written and it moved since."""
        if self.mode == "log" and self._logged_at is not None and self._logged_at != self.done:
            self._log_line()
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
