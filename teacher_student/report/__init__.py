"""Per-cycle pseudo-label quality report: one self-contained HTML page and the same numbers as JSON.

Why a report per cycle: a pseudo label is a guess by the teacher, and a student trained on wrong
guesses learns them confidently. Whether a class's pseudo labels can be trusted is answered by the
out-of-fold (OOF) predictions, where the truth is known: precision at the threshold that was used,
calibration, how much the fold models agree, and how labels drift from one teacher to the next. The
page opens with a headline (:mod:`.headline`: what the fold students trained on, how precise it
was against hidden truth, red flags for starving classes and weak evidence), then a per-class
verdict (see :func:`.stats.verdict`) and the evidence below it, training curves included.

Why self-contained: a report is mailed, archived and opened on machines without network (hospital
workstations). Figures are matplotlib PNGs embedded as base64 ``data:`` URIs, the CSS is inline,
and there is no script at all. Only image ids are shown, never a patient id or a DICOM tag.

Layout read (every path from :class:`teacher_student.layout.RunLayout`): cycle ``c``'s pseudo labels
are in ``cycle<c>/pseudo/`` and were made by generation ``c - 1`` (``gen<c-1>/classifier|detector/
predictions``). Written: ``cycle<c>/report.html`` and ``cycle<c>/report.json`` (atomically), and
``index.html`` at the run root by :func:`write_index`.

The modules, bottom up: :mod:`.stats` (pure statistics), :mod:`.run_reader` (reading a run, shared
with the exports), :mod:`.class_stats` (the verdict rows), :mod:`.html` and :mod:`.figures`
(page and figure primitives), :mod:`.headline`, :mod:`.sections`, :mod:`.curves`, :mod:`.drift`,
:mod:`.grids` (the sections) and
:mod:`.build` (the two entry points below).

Measured (``CXR_REPORT_BENCH=1 pytest tests/test_report.py -k realistic``, 2 shared CPU cores): a
run with 600 labeled / 1500 unlabeled / 200 test images, 4 study classes, 14 box classes, 5 folds,
3 cycles gives a 2.8 MB report built in 10-11 s. The bytes are mostly the 246 thumbnails (2.5 MB,
32-colour PNGs, 112 px); the time is mostly matplotlib layout and rendering (about 4 s) and the
thumbnails (about 2 s).
"""
from .build import write_cycle_report, write_index

__all__ = ["write_cycle_report", "write_index"]
