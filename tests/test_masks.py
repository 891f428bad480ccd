"""Masks at the edges: run-length encoding, COCO RLE, mask files, the mask cache, and bad mask input.

Every bad mask row is one line naming the file and the row (or a quarantine row), and its image is
then not mask-labeled -- never a traceback, never a silent drop.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.datasets.adapters.masks import attach_masks
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.mask_cache import MaskCache, resize_mask
from cxr_noisy_student.datasets.mask_export import export_coco_masks, read_coco_masks
from cxr_noisy_student.datasets.masks import (boxes_mask, read_mask_file, rle_decode, rle_encode, write_mask_png)
from cxr_noisy_student.datasets.table import ItemTable, Quarantine


def test_rle_hand_example_in_siim_acr_relative_and_standard_form():
    mask = np.zeros((3, 4), np.uint8)  # column-major numbering: pixel (row r, col c) is c * 3 + r
    mask[1:3, 0] = 1  # pixels 1, 2
    mask[0, 1] = 1  # pixel 3: the run goes on -> 1 3
    mask[2, 3] = 1  # pixel 11
    assert rle_encode(mask, relative=False) == "2 3 12 1"
    assert rle_encode(mask, relative=True) == "1 3 7 1"  # 7 pixels after the end of the first run (4)
    assert rle_encode(np.zeros((3, 4)), relative=True) == "-1"


@pytest.mark.parametrize("relative", [True, False])
def test_rle_round_trip_is_exact(relative):
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (64, 80), (1, 9)):
        mask = (rng.uniform(size=shape) > 0.6).astype(np.uint8)
        mask[0, 0] = mask[-1, -1] = 1  # runs at both ends of the image
        text = rle_encode(mask, relative=relative)
        assert np.array_equal(rle_decode(text, height=shape[0], width=shape[1], relative=relative), mask)
    assert not rle_decode("-1", height=4, width=4).any()


@pytest.mark.parametrize("text, problem", [("1 2 3", "odd number"), ("a 2", "not integers"),
                                           ("10 8", "beyond"), ("1 0", "empty run")])
def test_bad_rle_text_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        rle_decode(text, height=4, width=4)


def test_pycocotools_decodes_the_coco_masks_exactly(tmp_path):
    rng = np.random.default_rng(1)
    masks = {"a": (rng.uniform(size=(30, 20)) > 0.5).astype(np.uint8), "b": np.zeros((8, 8), np.uint8),
             "c": boxes_mask([[0.25, 0.25, 0.75, 0.5]], size=16)}
    path = export_coco_masks(masks, tmp_path / "masks.json", extra={"a": {"score": 0.9, "cycle": 2}})
    back = read_coco_masks(path)
    assert set(back) == set(masks)
    for key, mask in masks.items():
        assert np.array_equal(back[key], mask), key
    import json

    anns = json.loads(path.read_text())["annotations"]
    assert len(anns) == 2 and anns[0]["score"] == 0.9 and anns[0]["area"] == masks["a"].sum()


def test_boxes_mask_fills_the_pixels_a_box_covers():
    m = boxes_mask([[0.0, 0.5, 0.5, 1.0]], size=4)
    assert m.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_mask_cache_resizes_with_nearest_neighbour_and_keeps_alignment(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 4:8] = 1  # the top-right quarter
    small = resize_mask(mask, size=4)
    assert set(np.unique(small)) <= {0, 1} and small.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0] * 4, [0] * 4]
    write_mask_png(tmp_path / "m.png", mask)
    items = pd.DataFrame({"image_id": ["x"], "mask_labeled": [True], "mask_path": [str(tmp_path / "m.png")],
                          "mask_rle": [""], "width": [8], "height": [8]})
    cache = MaskCache(tmp_path / "cache", 4)
    assert cache.build(items).empty
    assert np.array_equal(cache.load("x"), small)
    with pytest.raises(DataError, match="no cached mask"):
        cache.load("y")


# ----------------------------------------------------------------------------- bad mask input


def tiny_table(tmp_path, n: int = 3) -> ItemTable:
    items = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": "p", "path": "x", "role": "labeled",
                          "has_study_label": False, "box_labeled": False, "width": 6, "height": 4})
    from cxr_noisy_student.datasets.table import empty_boxes

    return ItemTable(items, empty_boxes(), (), ())


def write_png(path, array) -> str:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.asarray(array, np.uint8))
    return path.name


def mask_csv(tmp_path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(tmp_path / "masks.csv", index=False)
    return "masks.csv"


def good_mask() -> np.ndarray:
    m = np.zeros((4, 6), np.uint8)
    m[1:3, 2:5] = 255
    return m


def test_good_masks_from_files_and_rle_instances_are_united(tmp_path):
    write_png(tmp_path / "m" / "i0.png", good_mask())
    table = attach_masks(tiny_table(tmp_path), tmp_path, mask_csv(tmp_path, [
        {"image_id": "i0", "mask_file": "m/i0.png", "lung_fraction": 0.25}]), Quarantine("error"))
    row = table.items.set_index("image_id").loc["i0"]
    assert row["mask_labeled"] and row["mask_path"].endswith("i0.png") and row["mask_instances"] == 1
    assert not table.items.set_index("image_id").loc["i1", "mask_labeled"]  # not listed: not annotated
    a, b = np.zeros((4, 6), np.uint8), np.zeros((4, 6), np.uint8)
    a[0, 0], b[3, 5] = 1, 1
    rle = pd.DataFrame({"ImageId": ["i1", "i1", "i2"], "EncodedPixels": [rle_encode(a), rle_encode(b), "-1"]})
    rle.to_csv(tmp_path / "rle.csv", index=False)
    table = attach_masks(tiny_table(tmp_path), tmp_path, "rle.csv", Quarantine("error"))
    items = table.items.set_index("image_id")
    assert items.loc["i1", "mask_instances"] == 2 and items.loc["i2", "mask_labeled"]
    assert np.array_equal(rle_decode(items.loc["i1", "mask_rle"], height=4, width=6, relative=False), a | b)
    assert rle_decode(items.loc["i2", "mask_rle"], height=4, width=6, relative=False).sum() == 0


@pytest.mark.parametrize("row, pixels, problem", [
    ({"mask_file": "m/i0.png"}, np.zeros((5, 6)), "mask is 6x5 pixels, the image is 6x4"),
    ({"mask_file": "m/i0.png"}, np.full((4, 6), 128), "not binary"),
    ({"mask_file": "m/i0.png", "positive": "1"}, np.zeros((4, 6)), "empty but the CSV says the image is positive"),
    ({"mask_file": "m/i0.png", "lung_fraction": "0.9"}, good_mask(), "covers 0.2500 of the image, the CSV says 0.9000"),
    ({"mask_file": "m/missing.png"}, None, "missing mask file"),
    ({"mask_file": "../outside.png"}, None, "escapes the data root"),
    ({"EncodedPixels": "3 2 1"}, None, "odd number of values"),
    ({"EncodedPixels": "0 0 0 0"}, None, "empty run"),
    ({"EncodedPixels": "20 10"}, None, "beyond the 6x4 image"),
])
def test_a_bad_mask_row_is_one_line_naming_file_and_row(tmp_path, row, pixels, problem):
    if pixels is not None:
        write_png(tmp_path / "m" / "i0.png", pixels)
    name = mask_csv(tmp_path, [{"image_id": "i0", **row}])
    with pytest.raises(DataError) as err:
        attach_masks(tiny_table(tmp_path), tmp_path, name, Quarantine("error"))
    message = str(err.value)
    assert "\n" not in message and "masks.csv, row 2 (image i0)" in message and problem in message
    q = Quarantine("quarantine")  # quarantine mode: the row is set aside, the image is not mask-labeled
    table = attach_masks(tiny_table(tmp_path), tmp_path, name, q)
    assert len(q.rows) == 1 and problem in q.rows[0]["problem"]
    assert not table.items["mask_labeled"].any()


def test_mask_rows_for_unknown_images_and_wrong_columns(tmp_path):
    q = Quarantine("quarantine")
    attach_masks(tiny_table(tmp_path), tmp_path, mask_csv(tmp_path, [{"image_id": "nope", "EncodedPixels": "-1"}]), q)
    assert "mask for an absent image" in q.rows[0]["problem"]
    with pytest.raises(DataError, match="needs an image id column"):
        attach_masks(tiny_table(tmp_path), tmp_path, mask_csv(tmp_path, [{"id": "i0", "mask": "x"}]), q)


def test_read_mask_file_accepts_0_1_and_0_255(tmp_path):
    write_png(tmp_path / "a.png", (good_mask() > 0).astype(np.uint8))
    write_png(tmp_path / "b.png", good_mask())
    assert np.array_equal(read_mask_file(tmp_path / "a.png", width=6, height=4),
                          read_mask_file(tmp_path / "b.png", width=6, height=4))


def test_the_shared_lung_masks_load_validated(cxr_dir):
    from cxr_noisy_student.datasets.adapters import load_dataset
    from cxr_noisy_student.datasets.config import DataConfig

    cfg = DataConfig(format="generic", root=str(cxr_dir), images_csv="images.csv", masks_csv="masks.csv",
                     study_label_column="label_group", on_bad_input="error")
    items = load_dataset(cfg).items
    assert int(items["mask_labeled"].sum()) == 169  # every lung_fraction in masks.csv matches its PNG
