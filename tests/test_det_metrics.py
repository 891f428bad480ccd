"""VOC-style mAP: a hand computation, edge cases, and agreement with pycocotools on real lung boxes."""
import contextlib
import io

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cxr_noisy_student.datasets.boxes import BOX_COLUMNS, from_pixels, to_coco
from cxr_noisy_student.loops.det_metrics import average_precision, mean_average_precision

GT_COLS = ["image_id", "class_id", *BOX_COLUMNS]
PRED_COLS = GT_COLS + ["score"]


def test_hand_computed_single_class():
    gt = pd.DataFrame(
        [["a", 0, 0.1, 0.1, 0.3, 0.3], ["a", 0, 0.6, 0.6, 0.8, 0.8], ["b", 0, 0.2, 0.2, 0.5, 0.5]], columns=GT_COLS
    )
    pred = pd.DataFrame(
        [
            ["a", 0, 0.1, 0.1, 0.3, 0.3, 0.9],  # TP (gt a0)
            ["a", 0, 0.1, 0.1, 0.3, 0.31, 0.8],  # FP: a0 already taken, a1 does not overlap
            ["b", 0, 0.2, 0.2, 0.5, 0.5, 0.7],  # TP (gt b0)
            ["c", 0, 0.2, 0.2, 0.5, 0.5, 0.6],  # FP: image c has no object
        ],
        columns=PRED_COLS,
    )
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2; envelope 1, 2/3, 2/3, 1/2
    # all-point AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    result = mean_average_precision(pred, gt, num_classes=1, iou_thr=0.5, class_names=["opacity"])
    assert result["per_class"]["opacity"] == pytest.approx(5 / 9)
    assert result["map"] == pytest.approx(5 / 9)
    assert result["n_gt"] == {"opacity": 3} and result["n_pred"] == {"opacity": 4}
    # restricted to images a and b the FP on c is not scored: precision 1, 1/2, 2/3 -> 1/3 + 1/3 * 2/3
    only_ab = mean_average_precision(pred, gt, num_classes=1, iou_thr=0.5, image_ids=["a", "b"])
    assert only_ab["map"] == pytest.approx(1 / 3 + 2 / 9)


def test_class_without_gt_is_none_and_excluded():
    gt = pd.DataFrame([["a", 0, 0.1, 0.1, 0.3, 0.3]], columns=GT_COLS)
    pred = pd.DataFrame([["a", 0, 0.1, 0.1, 0.3, 0.3, 0.9], ["a", 2, 0.5, 0.5, 0.7, 0.7, 0.9]], columns=PRED_COLS)
    result = mean_average_precision(pred, gt, num_classes=3, class_names=["x", "y", "z"])
    assert result["per_class"] == {"x": 1.0, "y": None, "z": None}
    assert result["map"] == 1.0
    empty = mean_average_precision(pred.iloc[:0], gt.iloc[:0], num_classes=3)
    assert empty["map"] is None


def test_gt_without_predictions_scores_zero_and_wrong_class_is_no_hit():
    gt = pd.DataFrame([["a", 0, 0.1, 0.1, 0.3, 0.3], ["a", 1, 0.5, 0.5, 0.9, 0.9]], columns=GT_COLS)
    pred = pd.DataFrame([["a", 1, 0.1, 0.1, 0.3, 0.3, 0.9]], columns=PRED_COLS)  # right place, wrong class
    result = mean_average_precision(pred, gt, num_classes=2)
    assert result["per_class"] == {"0": 0.0, "1": 0.0}


def test_iou_threshold_is_inclusive():
    gt = pd.DataFrame([["a", 0, 0.0, 0.0, 0.4, 1.0]], columns=GT_COLS)
    pred = pd.DataFrame([["a", 0, 0.0, 0.0, 1.0, 1.0, 0.9]], columns=PRED_COLS)  # IoU exactly 0.4
    assert mean_average_precision(pred, gt, num_classes=1, iou_thr=0.4)["map"] == pytest.approx(1.0)
    assert mean_average_precision(pred, gt, num_classes=1, iou_thr=0.41)["map"] == 0.0


def test_bad_input_raises_one_line():
    gt = pd.DataFrame([["a", 3, 0.1, 0.1, 0.3, 0.3]], columns=GT_COLS)
    with pytest.raises(ValueError, match=r"ground_truth, row 0 \(image a\): class_id 3 outside 0..1"):
        mean_average_precision(gt.assign(score=1.0, class_id=0), gt, num_classes=2)
    with pytest.raises(ValueError, match="missing columns"):
        mean_average_precision(gt, gt, num_classes=4)


def test_coco101_interpolation_of_a_known_curve():
    # one GT found at the first prediction: envelope 1 up to recall 1 -> all 101 points are 1
    assert average_precision(recall=np.array([1.0]), precision=np.array([1.0]), interpolation="coco101") == 1.0
    # recall reaches 0.5 only: 51 of 101 points (0.00..0.50) have precision 1
    assert average_precision(recall=np.array([0.5]), precision=np.array([1.0]), interpolation="coco101") == pytest.approx(51 / 101)
    assert average_precision(recall=np.array([0.5]), precision=np.array([1.0])) == 0.5


@pytest.fixture(scope="module")
def lung_fixture(cxr_dir):
    """Real lung boxes of 40 annotated radiographs as GT; jittered, dropped, duplicated, invented predictions."""
    labels = pd.read_csv(cxr_dir / "labels.csv")
    labels = labels[labels["box_annotated"] == 1].dropna(subset=["x_min"])
    ids = sorted(labels["image_id"].unique())[:40]
    labels = labels[labels["image_id"].isin(ids)]
    classes = ["Right Lung", "Left Lung"]
    gt_rows = []
    for _, r in labels.iterrows():
        box = from_pixels([[r.x_min, r.y_min, r.x_max, r.y_max]], r.width, r.height)[0]
        gt_rows.append([r.image_id, classes.index(r.box_class), *box])
    gt = pd.DataFrame(gt_rows, columns=GT_COLS)
    rng = np.random.default_rng(7)
    pred_rows = []
    for row in gt.itertuples(index=False):
        box = np.array([row.x_min, row.y_min, row.x_max, row.y_max])
        for copy in range(rng.integers(0, 3)):  # 0, 1 or 2 predictions per GT box: misses and duplicates
            jitter = np.clip(box + rng.normal(0, 0.04, 4), 0, 1)
            pred_rows.append([row.image_id, row.class_id, *jitter, rng.uniform(0.05, 1.0)])
    for image_id in rng.choice(ids, 15):  # pure false positives
        x, y = rng.uniform(0, 0.6, 2)
        pred_rows.append([image_id, int(rng.integers(2)), x, y, x + 0.3, y + 0.3, rng.uniform(0.05, 1.0)])
    return pd.DataFrame(pred_rows, columns=PRED_COLS), gt, classes


def coco_ap_per_class(pred, gt, num_classes, iou_thr, size=1000):
    """pycocotools at one IoU threshold (boxes scaled to a size x size pixel image)."""
    ids = sorted(set(gt["image_id"]) | set(pred["image_id"]))
    index = {k: i + 1 for i, k in enumerate(ids)}
    images = [{"id": index[k], "width": size, "height": size} for k in ids]
    anns = []
    for n, r in enumerate(gt.itertuples(index=False), start=1):
        x, y, w, h = to_coco([[r.x_min, r.y_min, r.x_max, r.y_max]], size, size)[0]
        anns.append({"id": n, "image_id": index[r.image_id], "category_id": r.class_id + 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    dets = []
    for r in pred.itertuples(index=False):
        x, y, w, h = to_coco([[r.x_min, r.y_min, r.x_max, r.y_max]], size, size)[0]
        dets.append({"image_id": index[r.image_id], "category_id": r.class_id + 1, "bbox": [float(x), float(y), float(w), float(h)], "score": float(r.score)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": c + 1} for c in range(num_classes)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.iouThrs = np.array([iou_thr])
        ev.params.maxDets = [1000]
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 0]  # (recall points, classes)
    return [float(precision[:, k][precision[:, k] > -1].mean()) for k in range(num_classes)]


def test_agrees_with_pycocotools_on_real_lung_boxes(lung_fixture):
    pred, gt, classes = lung_fixture
    coco = coco_ap_per_class(pred, gt, 2, iou_thr=0.4)
    ours101 = mean_average_precision(pred, gt, num_classes=2, iou_thr=0.4, class_names=classes, interpolation="coco101")
    ours = mean_average_precision(pred, gt, num_classes=2, iou_thr=0.4, class_names=classes)
    # same matching, same 101-point interpolation: equal up to float rounding of the pixel boxes
    np.testing.assert_allclose([ours101["per_class"][c] for c in classes], coco, atol=1e-6)
    # all-point (VOC) vs 101-point: the sampled curve differs by at most about one recall step
    np.testing.assert_allclose([ours["per_class"][c] for c in classes], coco, atol=0.02)
    assert 0.3 < ours["map"] < 0.95  # the fixture has misses, duplicates and false positives
    assert ours["n_gt"] == {"Right Lung": 40, "Left Lung": 40}
