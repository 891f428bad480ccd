"""Transforms on real radiographs: shapes kept, RandAugment picks exactly N ops, boxes stay consistent."""
import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cxr_noisy_student.augment.transforms import (  # _ops: the op list itself, to check every op
    N_OPS, _ops, apply_detection, apply_view, detection_transform, student_transform, teacher_transform, tta_views,
)
from cxr_noisy_student.datasets.boxes import box_problem, from_pixels, hflip, iou_matrix

SIZE = 64
RANDAUGMENT_OPS = {"Affine", "RandomBrightnessContrast", "RandomGamma", "CLAHE", "Sharpen", "GaussianBlur", "BankedGaussNoise", "Equalize", "Posterize"}


@pytest.fixture(scope="module")
def radiograph(cxr_dir):
    """cxr_0005 (a real AP chest film) as the cache would give it, and its two lung boxes."""
    img = cv2.imread(str(cxr_dir / "images" / "cxr_0005.png"), cv2.IMREAD_GRAYSCALE)
    labels = pd.read_csv(cxr_dir / "labels.csv")
    rows = labels[labels["image_id"] == "cxr_0005"]
    boxes = np.concatenate([from_pixels(r[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), r["width"], r["height"]) for _, r in rows.iterrows()])
    return cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA), np.clip(boxes, 0, 1), rows["box_class"].tolist()


@pytest.mark.parametrize("make", [lambda: teacher_transform(SIZE, seed=0), lambda: student_transform(SIZE, 2, 9, seed=0),
                                  lambda: student_transform(SIZE, 3, 30, seed=0)])
def test_transforms_keep_shape_and_dtype(radiograph, make):
    img = radiograph[0]
    t = make()
    for image in (img, img[..., None]):
        out = t(image=image)["image"]
        assert out.dtype == np.uint8 and out.shape == image.shape
    # an image of another size comes out at the transform's size
    assert t(image=cv2.resize(img, (80, 80)))["image"].shape[:2] == (SIZE, SIZE)


def test_every_op_keeps_shape_and_dtype(radiograph):
    img = radiograph[0]
    for op in _ops(15, boxes=False) + _ops(30, boxes=True):
        t = A.Compose([op], seed=0)
        for image in (img, img[..., None], np.repeat(img[..., None], 3, axis=2)):  # ultralytics passes 3 channels
            out = t(image=image)["image"]
            assert out.dtype == np.uint8 and out.shape == image.shape, op


@pytest.mark.parametrize("n", [1, 2, 3])
def test_randaugment_applies_exactly_n_ops_on_top_of_the_teachers_light_ops(radiograph, n):
    t = student_transform(SIZE, n, 15, seed=1, record=True)
    teacher = [type(x).__name__ for x in teacher_transform(SIZE).transforms]
    names = [type(x).__name__ for x in t.transforms]
    assert names == [*teacher, "SomeOf", "CoarseDropout"]  # the student's noise adds to the teacher's augmentation
    some_of = t.transforms[len(teacher)]
    assert some_of.n == n and {type(x).__name__ for x in some_of.transforms} == RANDAUGMENT_OPS
    chosen, counts = set(), []
    for _ in range(30):
        applied = [name for name, _ in t(image=radiograph[0])["applied_transforms"]]
        ops = [a for a in applied if a in RANDAUGMENT_OPS]
        # n drawn (Equalize applies with probability M/30 once drawn), + at most the light Affine and brightness
        assert len(ops) <= n + 2, applied
        counts.append(len(ops))
        chosen.update(ops)
    assert np.mean(counts) >= n - 0.1
    assert len(chosen) >= 6  # the ops are drawn from the whole list, not a fixed few


def test_seed_makes_augmentation_reproducible_and_magnitude_matters(radiograph):
    img = radiograph[0]
    a = [student_transform(SIZE, 2, 20, seed=5)(image=img)["image"] for _ in range(2)]
    assert np.array_equal(*a)
    t = student_transform(SIZE, 2, 20, seed=5)
    assert not np.array_equal(t(image=img)["image"], t(image=img)["image"])  # a stream, not one fixed draw
    diff = {m: np.mean([np.abs(student_transform(SIZE, 1, m, seed=s, hflip=False)(image=img)["image"].astype(int) - img).mean()
                        for s in range(12)]) for m in (3, 30)}
    assert diff[30] > diff[3]


def test_bad_randaugment_settings_fail_clearly():
    with pytest.raises(ValueError, match=f"n must be in 0..{N_OPS}"):
        student_transform(SIZE, N_OPS + 1, 9)
    with pytest.raises(ValueError, match="magnitude m must be in 0..30"):
        student_transform(SIZE, 2, 31)


def test_detection_flip_matches_boxes_hflip(radiograph):
    img, boxes, names = radiograph
    ids = np.arange(len(boxes))
    t = detection_transform(SIZE, 0, 0, seed=3, record=True)
    flipped_only = 0
    for _ in range(40):
        out = t(image=img, bboxes=boxes, class_ids=ids)
        applied = [name for name, _ in out["applied_transforms"]]
        if "HorizontalFlip" in applied and "Affine" not in applied:
            flipped_only += 1
            assert np.allclose(out["bboxes"], hflip(boxes), atol=1e-5)
            assert np.array_equal(out["image"], img[:, ::-1]) or "RandomBrightnessContrast" in applied
    assert flipped_only >= 3
    # the lateralized classes of this data set: a flipped "Right Lung" sits where the left one was
    assert names == ["Right Lung", "Left Lung"] and iou_matrix(hflip(boxes[:1]), boxes[1:])[0, 0] > 0.6


def test_detection_boxes_follow_the_pixels_and_keep_their_labels():
    img = np.zeros((SIZE, SIZE), np.uint8)
    img[16:40, 8:32] = 255  # a bright object exactly inside the box below
    box = np.array([[8 / SIZE, 16 / SIZE, 32 / SIZE, 40 / SIZE]], np.float32)
    light = detection_transform(SIZE, 0, 0, seed=0)
    for _ in range(20):
        out, boxes, ids = apply_detection(light, img, box, [4])
        ys, xs = np.nonzero(out > 128)
        seen = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]) / SIZE
        assert ids.tolist() == [4] and iou_matrix(boxes, seen)[0, 0] > 0.75
    strong = detection_transform(SIZE, 3, 30, seed=0)
    two = np.array([[0.0, 0.0, 0.06, 0.06], [0.5, 0.5, 0.9, 0.9]], np.float32)
    kept_counts = set()
    for _ in range(60):
        _, boxes, ids = apply_detection(strong, img, two, [7, 9])
        assert len(boxes) == len(ids) and set(ids.tolist()) <= {7, 9} and ids.dtype == np.int64
        assert all(box_problem(*b) is None for b in boxes)
        if len(ids) == 2:  # labels stay with their boxes: 9 stays below 7 (a flip does not change y)
            y_centre = dict(zip(ids.tolist(), (boxes[:, 1] + boxes[:, 3]) / 2))
            assert y_centre[9] > y_centre[7]
        kept_counts.add(len(ids))
    assert 2 in kept_counts and min(kept_counts) < 2  # a box pushed out is dropped, with its label
    empty = apply_detection(strong, img, np.zeros((0, 4)), [])
    assert empty[1].shape == (0, 4) and empty[2].shape == (0,)


def test_tta_views_flip_the_width_axis():
    assert tta_views() == ["identity", "hflip"] and tta_views(False) == ["identity"]
    x = np.arange(12).reshape(1, 3, 4)
    assert np.array_equal(apply_view(x, "hflip"), x[..., ::-1])
    assert torch.equal(apply_view(torch.from_numpy(x), "hflip"), torch.from_numpy(x[..., ::-1].copy()))
    assert apply_view(x, "identity") is x
    with pytest.raises(ValueError, match="unknown TTA view"):
        apply_view(x, "vflip")
