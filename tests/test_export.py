"""YOLO and COCO exports: round trips, negatives as empty label files, pycocotools, a real YOLO training."""
import os
import sys
import traceback
from pathlib import Path

os.environ["YOLO_OFFLINE"] = "1"  # before ultralytics is imported anywhere

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr_noisy_student.datasets.boxes import BOX_COLUMNS
from cxr_noisy_student.datasets.export import export_coco, export_yolo, read_coco, read_yolo_labels
from cxr_noisy_student.datasets.errors import DataError

CLASSES = ("Nodule/Mass", "Pleural effusion")
SIZE = 48


@pytest.fixture()
def tiny(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """8 small PNGs with a bright square each (the last image has none: a negative)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "png"
    folder.mkdir()
    rows = []
    for i in range(8):
        pixels = rng.integers(0, 40, size=(SIZE, SIZE), dtype=np.uint8)
        if i < 7:
            x0, y0 = (int(v) for v in rng.integers(2, SIZE - 18, size=2))
            pixels[y0:y0 + 16, x0:x0 + 16] = 220
            rows.append({"image_id": f"img{i}", "class_id": i % 2, "x_min": x0 / SIZE, "y_min": y0 / SIZE,
                         "x_max": (x0 + 16) / SIZE, "y_max": (y0 + 16) / SIZE, "source": f"R{i}", "score": 0.5 + i / 20})
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    items = pd.DataFrame({"image_id": [f"img{i}" for i in range(8)], "width": SIZE, "height": SIZE})
    boxes = pd.DataFrame(rows).astype({c: "float32" for c in BOX_COLUMNS})
    return items, boxes, folder


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["image_id", "x_min"]).reset_index(drop=True)


def test_yolo_round_trip_and_negatives(tiny, tmp_path):
    items, boxes, folder = tiny
    data_yaml = export_yolo(items, boxes, CLASSES, lambda i: folder / f"{i}.png", tmp_path / "yolo")
    back = _sorted(read_yolo_labels(tmp_path / "yolo"))
    expected = _sorted(boxes)
    assert list(back["image_id"]) == list(expected["image_id"])
    assert (back["class_id"].to_numpy() == expected["class_id"].to_numpy()).all()
    np.testing.assert_allclose(back[BOX_COLUMNS].to_numpy(), expected[BOX_COLUMNS].to_numpy(), atol=1e-5)

    negative = tmp_path / "yolo" / "labels" / "train" / "img7.txt"
    assert negative.is_file() and negative.read_text() == ""
    assert (tmp_path / "yolo" / "images" / "train" / "img7.png").resolve() == (folder / "img7.png").resolve()
    data = yaml.safe_load(data_yaml.read_text())
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == (tmp_path / "yolo").resolve()
    assert data["names"] == dict(enumerate(CLASSES)) and data["nc"] == 2
    assert data["train"] == data["val"] == "images/train"  # no val given: ultralytics still needs one


def test_yolo_splits_arrays_and_atomic_failure(tiny, tmp_path):
    items, boxes, folder = tiny
    split_of = pd.Series(["val" if i >= 6 else "train" for i in range(8)], index=items["image_id"])
    arrays = {i: np.asarray(Image.open(folder / f"{i}.png")) for i in items["image_id"]}
    data_yaml = export_yolo(items, boxes, CLASSES, arrays.__getitem__, tmp_path / "yolo", split_of=split_of)
    assert yaml.safe_load(data_yaml.read_text())["val"] == "images/val"
    written = tmp_path / "yolo" / "images" / "val" / "img6.png"
    assert not written.is_symlink() and (np.asarray(Image.open(written)) == arrays["img6"]).all()
    assert sorted(p.stem for p in (tmp_path / "yolo" / "labels" / "val").glob("*.txt")) == ["img6", "img7"]

    bad = boxes.copy()
    bad.loc[2, "x_max"] = 1.3
    with pytest.raises(DataError, match=r"box row 2 \(image img2\): box .* outside the image"):
        export_yolo(items, bad, CLASSES, arrays.__getitem__, tmp_path / "yolo")
    with pytest.raises(DataError, match="split 'holdout' is not one of"):
        export_yolo(items, boxes, CLASSES, arrays.__getitem__, tmp_path / "yolo", split_of=lambda i: "holdout")
    with pytest.raises(DataError, match="missing.png .image img0.: not an existing image file"):
        export_yolo(items, boxes, CLASSES, lambda i: folder / "missing.png", tmp_path / "yolo")
    assert written.is_file(), "a failed export must leave the previous one intact"


def test_coco_round_trip_and_pycocotools(tiny, tmp_path):
    from pycocotools.coco import COCO

    items, boxes, _ = tiny
    path = export_coco(items, boxes, CLASSES, tmp_path / "coco.json", score_column="score")
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) == len(boxes)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for img in coco.loadImgs(coco.getImgIds()):
        assert len(coco.getAnnIds(imgIds=[img["id"]])) == (boxes["image_id"] == img["image_key"]).sum()
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2) and ann["area"] == pytest.approx(16 * 16, abs=1e-2)
    assert {"score", "source"} <= set(ann)

    back_items, back = read_coco(path)
    back, expected = _sorted(back), _sorted(boxes)
    assert list(back_items["image_id"]) == list(items["image_id"])
    assert (back["class_id"].to_numpy() == expected["class_id"].to_numpy()).all()
    np.testing.assert_allclose(back[BOX_COLUMNS].to_numpy() * SIZE, expected[BOX_COLUMNS].to_numpy() * SIZE, atol=1e-3)
    np.testing.assert_allclose(back["score"], expected["score"], atol=1e-6)
    assert list(back["source"]) == list(expected["source"]) and back.attrs["box_classes"] == CLASSES


def test_coco_needs_sizes(tiny, tmp_path):
    items, boxes, _ = tiny
    with pytest.raises(DataError, match=r"image img1\): no valid \(width, height\)"):
        export_coco(items[["image_id"]], boxes, CLASSES, tmp_path / "c.json", sizes={"img0": (48, 48)})
    assert not (tmp_path / "c.json").exists()


def _network_hook(events: list, armed: list):
    def hook(name, args):
        if armed and name in ("socket.connect", "socket.getaddrinfo", "urllib.Request", "subprocess.Popen"):
            events.append((name, str(args)[:120], "check_font" in "".join(traceback.format_stack())))
    return hook


def test_ultralytics_trains_on_the_export_offline(tiny, tmp_path):
    """A real yolov8n (from YAML, no weights) trains one epoch on the export without downloading anything.

    plots=False keeps the label plots (and their Arial.ttf download) away and amp=False skips the AMP
    check that fetches a .pt file. ultralytics' dataset check still probes for Arial.ttf (a HEAD request
    to github in check_font, whatever YOLO_OFFLINE says); that probe is the only network use allowed here.
    """
    items, boxes, folder = tiny
    data_yaml = export_yolo(items, boxes, CLASSES, lambda i: folder / f"{i}.png", tmp_path / "yolo")
    events, armed = [], []
    sys.addaudithook(_network_hook(events, armed))
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    armed.append(True)
    model.train(data=str(data_yaml), epochs=1, imgsz=32, batch=4, workers=0, device="cpu", plots=False, val=False,
                project=str(tmp_path / "runs"), name="t", exist_ok=True, verbose=False, amp=False)
    armed.clear()
    labels = model.trainer.train_loader.dataset.labels
    assert len(labels) == 8 and sum(len(lb["cls"]) for lb in labels) == len(boxes)
    assert (tmp_path / "runs" / "t" / "weights" / "last.pt").is_file()
    assert [e for e in events if not e[2]] == [], f"ultralytics went online: {events}"
