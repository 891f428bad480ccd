"""The final gate's scoring and the competition submission formats, against hand-written rows."""
import pandas as pd
import pytest

from cxr_noisy_student.teacher_student.gating import gated_map, siim_submission, tune_gate, vinbigdata_submission, with_no_finding

ITEMS = pd.DataFrame({"image_id": ["a", "b"], "study_id": ["s1", "s1"], "width": [100, 200], "height": [100, 100]})
PRED = pd.DataFrame({"image_id": ["a", "a"], "class_id": [3, 1], "x_min": [0.1, 0.0], "y_min": [0.1, 0.0],
                     "x_max": [0.5, 1.0], "y_max": [0.5, 1.0], "score": [0.4, 0.9]})


def test_vinbigdata_rows_are_in_original_pixels_with_no_finding_as_the_competition_wrote_it():
    sub = vinbigdata_submission(PRED.assign(class_id=[3, 14]), ITEMS, no_finding_class=14).set_index("image_id")
    assert sub.loc["a", "PredictionString"] == "14 0.9000 0 0 1 1 3 0.4000 10 10 50 50"
    assert sub.loc["b", "PredictionString"] == "14 1 0 0 1 1"  # nothing predicted: No finding


def test_siim_study_and_image_rows():
    probs = pd.DataFrame({"image_id": ["a", "b"], "p:Negative for Pneumonia": [0.2, 0.4],
                          "p:Typical Appearance": [0.8, 0.6]})
    sub = siim_submission(PRED.assign(class_id=[0, 1]), probs, ITEMS, study_classes=["Negative for Pneumonia",
                          "Typical Appearance"], normal_class="Negative for Pneumonia", no_finding_class=1)
    assert list(sub["id"]) == ["s1_study", "a_image", "b_image"]
    sub = sub.set_index("id")["PredictionString"]
    assert sub["s1_study"] == "negative 0.3000 0 0 1 1 typical 0.7000 0 0 1 1"
    # the gate's "No finding" row (class 1, score 0.9) is not used: 'none' is the classifier's P(negative)
    assert sub["a_image"] == "opacity 0.4000 10.0 10.0 50.0 50.0 none 0.2000 0 0 1 1"
    assert sub["b_image"] == "none 0.4000 0 0 1 1"


def test_siim_rows_need_a_study_for_every_image_and_vinbigdata_uses_the_datasets_no_finding_id():
    from cxr_noisy_student.datasets.errors import DataError

    probs = pd.DataFrame({"image_id": ["a", "b"], "p:Negative for Pneumonia": [0.2, 0.4]})
    with pytest.raises(DataError, match="the item table has no study_id for every image"):
        siim_submission(PRED, probs, ITEMS.drop(columns="study_id"), study_classes=["Negative for Pneumonia"],
                        normal_class="Negative for Pneumonia", no_finding_class=1)
    with pytest.raises(DataError, match=r"no class probabilities \(p:Negative for Pneumonia\) for 1 images"):
        siim_submission(PRED, probs.iloc[:1], ITEMS, study_classes=["Negative for Pneumonia"],
                        normal_class="Negative for Pneumonia", no_finding_class=1)
    two = vinbigdata_submission(PRED.assign(class_id=[0, 2]), ITEMS, no_finding_class=2).set_index("image_id")
    assert two.loc["a", "PredictionString"] == "2 0.9000 0 0 1 1 0 0.4000 10 10 50 50"
    assert two.loc["b", "PredictionString"] == "2 1 0 0 1 1"


def test_gate_scoring_rewards_no_finding_on_normal_images():
    gt = pd.DataFrame({"image_id": ["abn"], "class_id": [0], "x_min": [0.1], "y_min": [0.1], "x_max": [0.3], "y_max": [0.3]})
    boxes = pd.DataFrame({"image_id": ["abn", "nor"], "class_id": [0, 0], "x_min": [0.1, 0.5], "y_min": [0.1, 0.5],
                          "x_max": [0.3, 0.7], "y_max": [0.3, 0.7], "score": [0.9, 0.8]})
    p = pd.Series({"abn": 0.97, "nor": 0.02})
    ids = ["abn", "nor"]
    assert len(with_no_finding(gt, ids, 1)) == 2  # "nor" gets a full-image No finding box
    kw = dict(class_names=["nodule"], iou_thr=0.4)
    off = gated_map(boxes, p, gt, ids, mode="off", low=0, high=1, **kw)
    hard = gated_map(boxes, p, gt, ids, mode="hard", low=0.05, high=0.95, **kw)
    assert off["per_class"]["No finding"] == 0.0 and off["per_class"]["nodule"] == pytest.approx(1.0)
    assert hard["map"] == pytest.approx(1.0)  # the false box on the normal image is gone, No finding found
    best = tune_gate(boxes, p, gt, ids, mode="hard", **kw)
    assert best["map"] == pytest.approx(1.0) and best["low"] <= best["high"]
