"""data.hidden_fraction: a patient-grouped part of the labeled images loses every label for
training (study label, boxes, mask) and becomes hidden truth -- beside the demo's own -- so that a
fully labeled real set gets an oracle and pseudo-label quality. Read from a real data stage."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_noisy_student.datasets.config import DataConfig, FoldConfig, PreprocessConfig
from cxr_noisy_student.teacher_student.config import EngineConfig, RunConfig
from cxr_noisy_student.teacher_student.cycle.data_stage import prepare
from cxr_noisy_student.teacher_student.cycle.references import truth_table
from tiny_run import make_tiny_demo


def _prepare(data, out, fraction: float):
    data_cfg = DataConfig(format="demo", root=str(data), demo_counts=(16, 16, 8), demo_image_size=64,
                          hidden_fraction=fraction)
    return prepare(EngineConfig(data=data_cfg, preprocess=PreprocessConfig(size=32), folds=FoldConfig(k=2),
                                run=RunConfig(out=str(out), cycles=0, workers=0)))


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    base = tmp_path_factory.mktemp("hidden")
    data = make_tiny_demo(base / "demo")
    return _prepare(data, base / "plain", 0.0), _prepare(data, base / "hidden", 0.4)


def test_hidden_images_are_unlabeled_with_no_label_left_and_their_labels_are_truth(contexts):
    plain, hidden = contexts
    before, after = plain.table.items.set_index("image_id"), hidden.table.items.set_index("image_id")
    moved = sorted(set(before.index[before["role"] == "labeled"]) - set(after.index[after["role"] == "labeled"]))
    assert 4 <= len(moved) <= 10  # about 0.4 of the 16 labeled images, whole patients
    rows = after.loc[moved]
    assert (rows["role"] == "unlabeled").all() and not rows["has_study_label"].any()
    assert not rows["box_labeled"].any() and not rows["mask_labeled"].any() and (rows["mask_path"] == "").all()
    assert rows[hidden.table.label_columns].isna().all().all()
    assert not set(hidden.table.boxes["image_id"]) & set(moved)
    assert set(before["patient_id"].loc[moved]).isdisjoint(after.loc[after["role"] == "labeled", "patient_id"])
    truth = hidden.truth.items.set_index("image_id")
    assert set(moved) <= set(truth.index) and set(plain.truth.items["image_id"]) <= set(truth.index)
    np.testing.assert_array_equal(truth.loc[moved, hidden.table.label_columns].to_numpy(),
                                  before.loc[moved, hidden.table.label_columns].to_numpy())
    assert truth.loc[moved, "mask_labeled"].tolist() == before.loc[moved, "mask_labeled"].tolist()
    true_boxes = plain.table.boxes[plain.table.boxes["image_id"].isin(moved)]
    assert len(hidden.truth.boxes[hidden.truth.boxes["image_id"].isin(moved)]) == len(true_boxes)


def test_the_oracle_gets_the_hidden_labels_back(contexts):
    plain, hidden = contexts
    oracle = truth_table(hidden).items.set_index("image_id")
    moved = set(plain.table.with_role("labeled")["image_id"]) - set(hidden.table.with_role("labeled")["image_id"])
    labels = plain.table.label_columns
    np.testing.assert_array_equal(oracle.loc[sorted(moved), labels].to_numpy(),
                                  plain.table.items.set_index("image_id").loc[sorted(moved), labels].to_numpy())
    assert oracle.loc[sorted(moved), "mask_labeled"].tolist() == \
        plain.table.items.set_index("image_id").loc[sorted(moved), "mask_labeled"].tolist()
