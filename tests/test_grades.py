"""Grades as data: reading and checking them (one line or a quarantine row per bad grade, never a
silent drop), the shared set's rater means rounded, and the demo's severity grade."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.datasets import demo
from cxr_noisy_student.datasets.demo_images import Lesion, severity_grade
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.grades import GRADE, GradeSource, grades_of, parse_grade, with_grades
from cxr_noisy_student.datasets.table import ItemTable, empty_boxes


@pytest.mark.parametrize("text, rounding, grade, problem", [
    ("3", "none", 3.0, None), ("3.0", "none", 3.0, None), ("", "none", np.nan, None),
    ("2.7", "nearest", 3.0, None), ("2.3", "nearest", 2.0, None), ("0.5", "nearest", 1.0, None),
    ("2.5", "none", np.nan, "is not an integer"), ("five", "none", np.nan, "is not a number"),
    ("9", "none", np.nan, "outside 0..8"), ("-0.3", "nearest", np.nan, "outside 0..8"),
    ("inf", "none", np.nan, "is not a number"),  # strict numbers (datasets.adapters.common.parse_number)
])
def test_parse_grade(text, rounding, grade, problem):
    value, why = parse_grade(text, num_grades=9, rounding=rounding)
    assert (np.isnan(value) and np.isnan(grade)) or value == grade
    assert (why is None) if problem is None else (problem in why)


def tiny_table(ids) -> ItemTable:
    items = pd.DataFrame({"image_id": ids, "patient_id": ids, "path": [f"/x/{i}.png" for i in ids], "role": "labeled",
                          "has_study_label": True, "box_labeled": False, "y:a": 1.0})
    return ItemTable(items=items, boxes=empty_boxes(), study_classes=("a",), box_classes=())


def test_bad_grades_are_quarantined_with_file_and_line_and_the_image_kept(tmp_path):
    (tmp_path / "g.csv").write_text("image_id,score\na,2\nb,2.5\nc,7\nzz,1\na,3\nd,\n")
    table = with_grades(tiny_table(["a", "b", "c", "d"]), tmp_path, GradeSource("g.csv", "score", 5), "quarantine")
    assert table.items.set_index("image_id")[GRADE].to_dict() == pytest.approx({"a": 2.0, "b": np.nan, "c": np.nan,
                                                                                "d": np.nan}, nan_ok=True)
    q = table.quarantine
    assert q["row"].tolist() == [3, 4, 5, 6] and set(q["file"]) == {str(tmp_path / "g.csv")}
    assert q["image_id"].tolist() == ["b", "c", "zz", "a"]
    assert "not an integer" in q["problem"][0] and "outside 0..4" in q["problem"][1]
    assert "not in the item table" in q["problem"][2] and "second grade" in q["problem"][3]
    assert len(table.items) == 4  # a bad grade never costs the image its other labels
    assert grades_of(table, ["a"]).tolist() == [2]
    with pytest.raises(DataError, match="image b: grade unknown"):
        grades_of(table, ["a", "b"])


def test_error_mode_stops_at_the_first_bad_grade_with_one_line(tmp_path):
    (tmp_path / "g.csv").write_text("image_id,score\na,2\nb,x\n")
    with pytest.raises(DataError, match=r"g\.csv, row 3 \(image b\): grade 'x' is not a number") as err:
        with_grades(tiny_table(["a", "b"]), tmp_path, GradeSource("g.csv", "score", 5), "error")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="did you mean"):
        with_grades(tiny_table(["a"]), tmp_path, GradeSource("g.csv", "scor", 5), "error")


def test_the_shared_sets_rater_means_round_half_up(cxr_dir):
    """geographic_mean is the mean of three integer scores (k/3: x.0, x.3, x.7), so rounding half up
    is never a tie; 61 images carry it, all COVID-19."""
    from cxr_noisy_student.datasets.adapters.generic import load_cxr_covid

    source = GradeSource("images.csv", "geographic_mean", 9, "nearest", report_absent=False)
    table = with_grades(load_cxr_covid(cxr_dir), cxr_dir, source, "error")
    graded = table.items.dropna(subset=[GRADE])
    assert len(graded) == 61 and graded["y:COVID-19"].eq(1).all()
    assert graded[GRADE].astype(int).value_counts().sort_index().to_dict() == {0: 9, 1: 9, 2: 11, 3: 5, 4: 10, 5: 4,
                                                                               6: 6, 7: 4, 8: 3}
    raw = pd.read_csv(cxr_dir / "images.csv").set_index("image_id")["geographic_mean"]
    assert np.allclose(np.floor(raw[graded["image_id"]].to_numpy() + 0.5), graded[GRADE])
    with pytest.raises(DataError, match="not an integer"):  # unrounded, a mean is bad input
        with_grades(load_cxr_covid(cxr_dir), cxr_dir, GradeSource("images.csv", "geographic_mean", 9), "error")


def test_severity_grade_by_hand():
    def lesions(*visibility):
        return [Lesion(8, (0, 0, 1, 1), v) for v in visibility]

    assert severity_grade([]) == 0
    assert severity_grade(lesions(0.3)) == 1          # one faint lesion
    assert severity_grade(lesions(0.5)) == 2          # burden 0.5 >= 0.4
    assert severity_grade(lesions(0.5, 0.5)) == 3     # two lesions: burden 1.0 >= 0.8
    assert severity_grade(lesions(0.9, 0.6)) == 4     # burden 1.5 >= 1.4
    assert severity_grade(lesions(0.1, 0.1, 0.1)) == 1


def test_the_demo_writes_grades_beside_its_unchanged_files(tmp_path):
    manifest = demo.make_demo_dataset(tmp_path / "d", seed=0, n_labeled=8, n_unlabeled=6, n_test=4, size=64)
    root = tmp_path / "d"
    grades = pd.read_csv(root / demo.GRADES_CSV)
    hidden = pd.read_csv(root / demo.UNLABELED_GRADES_CSV)
    assert list(grades.columns) == ["image_id", "grade"] and grades["grade"].between(0, 4).all()
    assert grades["image_id"].tolist() == manifest["image_ids"]["labeled"] + manifest["image_ids"]["holdout"]
    assert hidden["image_id"].tolist() == manifest["image_ids"]["unlabeled"]
    truth = pd.read_csv(root / "unlabeled_truth.csv")
    normal = set(truth.loc[truth["class_id"] == demo.NO_FINDING_ID, "image_id"])
    assert (hidden.set_index("image_id")["grade"].eq(0) == hidden["image_id"].isin(normal).to_numpy()).all()
    assert sum(manifest["grades"]["unlabeled"]) == 6
    for pair in manifest["duplicates"]:  # copies of an image carry its grade
        by_id = grades.set_index("image_id")["grade"]
        assert by_id[pair[0]] == by_id[pair[1]]
