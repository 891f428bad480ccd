"""WBF fusion: hand-computed values, empty input, class disagreement, validation, serial == parallel."""
import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.teacher_student.fusion import FUSED_COLUMNS, fuse_boxes

COLS = ["image_id", "class_id", "x_min", "y_min", "x_max", "y_max", "score", "model"]


def frame(rows):
    return pd.DataFrame(rows, columns=COLS)


def test_two_models_hand_computed():
    a1, sa = np.array([0.10, 0.10, 0.50, 0.50]), 0.9  # model A
    b1, sb = np.array([0.12, 0.10, 0.52, 0.50]), 0.6  # model B, same object (IoU ~0.90)
    b2, sb2 = np.array([0.60, 0.60, 0.90, 0.90]), 0.5  # model B only
    preds = frame([["img", 0, *a1, sa, "A"], ["img", 0, *b1, sb, "B"], ["img", 0, *b2, sb2, "B"]])

    fused = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0)

    assert list(fused.columns) == FUSED_COLUMNS
    assert len(fused) == 2
    top, lone = fused.iloc[0], fused.iloc[1]
    # coordinates: score-weighted mean of the members
    expected = (sa * a1 + sb * b1) / (sa + sb)  # [0.108, 0.1, 0.508, 0.5]
    np.testing.assert_allclose(top[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), expected, atol=1e-6)
    # score ("avg"): mean member score x min(members, models) / models = (0.9 + 0.6) / 2 * 2 / 2
    assert top["score"] == pytest.approx(0.75, abs=1e-6)
    assert (top["n_models"], top["models"]) == (2, "A;B")
    # a box one of two models saw keeps its coordinates and gets half its score
    np.testing.assert_allclose(lone[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), b2, atol=1e-6)
    assert lone["score"] == pytest.approx(sb2 * 1 / 2, abs=1e-6)
    assert (lone["n_models"], lone["models"]) == (1, "B")


def test_weighted_models_hand_computed():
    a1, b1 = np.array([0.10, 0.10, 0.50, 0.50]), np.array([0.12, 0.10, 0.52, 0.50])
    preds = frame([["img", 0, *a1, 0.9, "A"], ["img", 0, *b1, 0.6, "B"], ["img", 0, 0.6, 0.6, 0.9, 0.9, 0.5, "B"]])
    fused = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0, weights={"A": 2.0, "B": 1.0})
    # members weigh score x model weight; score = sum(w s) / members x min(members, models) / sum(w)
    expected = (2 * 0.9 * a1 + 1 * 0.6 * b1) / (2 * 0.9 + 1 * 0.6)
    np.testing.assert_allclose(fused.iloc[0][["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), expected, atol=1e-6)
    assert fused["score"].iloc[0] == pytest.approx((2 * 0.9 + 0.6) / 2 * 2 / 3, abs=1e-6)
    assert fused["score"].iloc[1] == pytest.approx(0.5 * 1 / 1 * 1 / 3, abs=1e-6)


def test_absent_model_lowers_score_through_models_argument():
    """A fold that predicted nothing at all still counts in the ensemble size."""
    preds = frame([["img", 0, 0.1, 0.1, 0.5, 0.5, 0.8, "f0/orig"]])
    alone = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0)
    of_four = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0, models=["f0/orig", "f0/hflip", "f1/orig", "f1/hflip"])
    assert alone["score"].iloc[0] == pytest.approx(0.8)
    assert of_four["score"].iloc[0] == pytest.approx(0.8 / 4)


def test_models_disagree_on_class():
    box = [0.2, 0.2, 0.6, 0.6]
    preds = frame([["img", 0, *box, 0.8, "A"], ["img", 1, *box, 0.6, "B"]])
    fused = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0).set_index("class_id")
    assert sorted(fused.index) == [0, 1]  # never fused across classes
    assert fused.loc[0, "score"] == pytest.approx(0.8 / 2) and fused.loc[0, "models"] == "A"
    assert fused.loc[1, "score"] == pytest.approx(0.6 / 2) and fused.loc[1, "models"] == "B"
    assert (fused["n_models"] == 1).all()


def test_empty_predictions_give_empty_table():
    fused = fuse_boxes(frame([]), iou_thr=0.55, skip_box_thr=0.0)
    assert fused.empty and list(fused.columns) == FUSED_COLUMNS
    assert fused["n_models"].dtype == np.int64


def test_skip_box_thr_drops_low_scores_only():
    preds = frame([["img", 0, 0.1, 0.1, 0.5, 0.5, 0.005, "A"], ["img", 0, 0.6, 0.6, 0.9, 0.9, 0.5, "A"]])
    fused = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.01)
    assert len(fused) == 1 and fused["x_min"].iloc[0] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "box, problem",
    [
        ([0.1, 0.1, 1.2, 0.5], "outside the image"),
        ([0.5, 0.1, 0.2, 0.5], "inverted"),
        ([0.1, 0.1, 0.1, 0.5], "zero area"),
        ([np.nan, 0.1, 0.3, 0.5], "NaN"),
    ],
)
def test_invalid_boxes_raise_naming_image_and_row(box, problem):
    preds = frame([["ok", 0, 0.1, 0.1, 0.3, 0.3, 0.9, "A"], ["bad_img", 0, *box, 0.9, "B"]])
    with pytest.raises(ValueError, match=rf"row 1 \(image bad_img, model B\).*{problem}"):
        fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.0)


def test_bad_arguments_raise():
    preds = frame([["img", 0, 0.1, 0.1, 0.5, 0.5, 0.8, "A"]])
    with pytest.raises(ValueError, match="conf_type"):
        fuse_boxes(preds, iou_thr=0.5, skip_box_thr=0.0, conf_type="mean")
    with pytest.raises(ValueError, match="weights"):
        fuse_boxes(preds, iou_thr=0.5, skip_box_thr=0.0, weights={"B": 1.0})
    with pytest.raises(ValueError, match="score"):
        fuse_boxes(preds.assign(score=1.5), iou_thr=0.5, skip_box_thr=0.0)


def random_predictions(n_images=24, n_models=4, n_boxes=30, seed=0):
    rng = np.random.default_rng(seed)
    objects = rng.uniform(0.05, 0.7, size=(n_images, 6, 2))
    rows = []
    for i in range(n_images):
        for m in range(n_models):
            for _ in range(n_boxes):
                x, y = objects[i, rng.integers(6)] + rng.normal(0, 0.02, 2)
                w, h = rng.uniform(0.1, 0.25, 2)
                x, y = float(np.clip(x, 0, 0.7)), float(np.clip(y, 0, 0.7))
                rows.append([f"im{i:03d}", int(rng.integers(3)), x, y, x + w, y + h, float(rng.uniform(0.01, 1)), f"m{m}"])
    return frame(rows)


def test_serial_equals_parallel():
    preds = random_predictions()
    serial = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.02)
    parallel = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.02, workers=2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial["image_id"].nunique() == 24
    assert serial["n_models"].between(1, 4).all()
    # every fused box is supported by the models it names
    assert (serial["models"].str.split(";").str.len() == serial["n_models"]).all()
