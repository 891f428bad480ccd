"""Every report path on the runs real data makes: no unlabeled pool (a held-out test part and nothing
to pseudo-label, as the cxr_covid preset on generic data with a test role), no detector, one box
class, multilabel labels with an empty selection, no test part.

Before, the first of these failed both cycle reports with "cannot reshape array of size 0 into
shape (0,newaxis)" (an empty pool's probabilities) and the multilabel one with a KeyError (an empty
mask that selected columns instead of rows); the run went on without a report. The runs are the
synthetic ones of tests/test_report.py (in-memory images, no training), one cycle each.
"""
from __future__ import annotations

import json

import pytest

from cxr_noisy_student.teacher_student.report import write_cycle_report
from test_report import make_synthetic_run

PATHS = {
    "no unlabeled pool, a test part (nothing kept)": dict(n_unlabeled=0),
    "no detector": dict(detector=False),
    "one box class": dict(box_classes=("Lung",)),
    "multilabel, empty selection": dict(n_unlabeled=0, mode="multilabel", classes=("a", "b", "c")),
    "no test part, no pool": dict(n_unlabeled=0, n_test=0),
}


@pytest.mark.parametrize("case", sorted(PATHS))
def test_the_cycle_report_is_written_on_every_kind_of_run(tmp_path, case):
    made = make_synthetic_run(tmp_path / "run", cycles=1, **PATHS[case])
    path = write_cycle_report(made["run"], 1, load=made["load"])
    data = json.loads(path.with_name("report.json").read_text())
    assert path.stat().st_size > 5_000 and {"verdicts", "calibration", "label_issues"} <= set(data)
    if PATHS[case].get("n_unlabeled") == 0:  # nothing to pseudo-label: every class says so
        assert all(row["kept"] == 0 for row in data["verdicts"]["classes"]), data["verdicts"]["classes"]
