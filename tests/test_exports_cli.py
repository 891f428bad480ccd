"""Tests of ``python run_cycle.py export`` (teacher_student.exports) on a synthetic run.

The run is the one tests/test_report.py builds (``make_synthetic_run``: loops.cycle's layout, real
radiographs in a real preprocessing cache). Each format is read back by the tool it is for:
pandas for CSV; pycocotools for COCO (load, ``loadRes`` of predictions, ``COCOeval``), also for a
cycle that kept no pseudo box; ultralytics for YOLO (its dataset check, and one epoch of training
on the folder). Every image an export names must exist at the size it states.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import run_cycle
from cxr_noisy_student.datasets.export import read_coco
from cxr_noisy_student.teacher_student.exports import CSV_COLUMNS, export_main
from test_report import make_synthetic_run  # the shared synthetic-run builder (tests/ is on sys.path)

CYCLE = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, cxr_dir):
    paths = sorted((cxr_dir / "images").glob("*.png"))[:32]
    return make_synthetic_run(tmp_path_factory.mktemp("exp") / "demo", image_paths=paths)["run"]


def pseudo(run, name: str) -> pd.DataFrame:
    return pd.read_csv(run / f"cycle{CYCLE}" / "pseudo" / name, dtype={"image_id": str})


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_csv_has_every_pseudo_label_with_provenance(run, tmp_path):
    dest = tmp_path / "pseudo.csv"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "csv", "--dest", str(dest)]) == 0
    df = pd.read_csv(dest, dtype={"image_id": str, "folds": str})
    assert list(df.columns) == CSV_COLUMNS
    cls, boxes, images = pseudo(run, "class_pseudo.csv"), pseudo(run, "box_pseudo.csv"), pseudo(run, "box_images.csv")
    counts = df["kind"].value_counts().to_dict()
    assert counts.get("classifier") == len(cls) and counts.get("box") == len(boxes)
    assert counts.get("negative", 0) == int((images["status"] == "negative").sum())
    assert (df["cycle"] == CYCLE).all()
    assert (df["origin"] == "pseudo").all()
    c = df[df["kind"] == "classifier"]
    assert (c["source"] == "gen1/classifier").all() and (c["folds"] == "0|1|2").all() and c[["x_min", "x_max"]].isna().all().all()
    assert (c["model"] == "efficientnet_b1").all()  # the teacher of cycle 2 is generation 1's rung of the ladder
    np.testing.assert_allclose(c["threshold"], cls["threshold"])  # the class threshold that kept each row
    assert (c["score"] >= c["threshold"] - 1e-9).all()
    assert c.set_index("image_id")["copies"].to_dict() == cls.set_index("image_id")["copies"].to_dict()
    b = df[df["kind"] == "box"]
    assert (b["source"] == "gen1/detector").all() and (b["n_models"] >= 1).all() and b["models"].str.contains("f").all()
    assert set(b["label"]) <= {"Right Lung", "Left Lung"} and (b["model"] == "yolov8s.yaml").all()
    info = json.loads((run / f"cycle{CYCLE}" / "pseudo" / "box_pseudo.json").read_text())
    expected = b["label"].map(info["thresholds"]).astype(float)
    np.testing.assert_allclose(b["threshold"], expected)
    assert (b["score"] >= b["threshold"] - 1e-6).all()
    assert (b["rule"] == "threshold").all()
    np.testing.assert_allclose(np.sort(b["score"]), np.sort(boxes["score"]), rtol=1e-6)
    assert ((b[["x_min", "y_min", "x_max", "y_max"]] >= 0) & (b[["x_min", "y_min", "x_max", "y_max"]] <= 1)).all().all()


def test_csv_include_labeled_adds_ground_truth(run, tmp_path):
    dest = tmp_path / "all.csv"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "csv", "--dest", str(dest),
                        "--include-labeled"]) == 0
    df = pd.read_csv(dest, dtype={"image_id": str})
    gt = df[df["origin"] == "ground truth"]
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str})
    gt_boxes = pd.read_csv(run / "data" / "boxes.csv", dtype={"image_id": str})
    labeled = items[items["role"] == "labeled"]
    assert (gt["kind"] == "classifier").sum() == len(labeled)
    assert (gt["kind"] == "box").sum() == gt_boxes["image_id"].isin(set(labeled["image_id"])).sum()
    # nothing chose a ground-truth label: no score, threshold, model or cycle, unlike every pseudo row
    assert gt[["score", "threshold", "model", "cycle"]].isna().all().all()
    pseudo_rows = df[df["origin"] == "pseudo"]
    assert pseudo_rows[["score", "model", "cycle"]].notna().all().all() and (pseudo_rows["cycle"] == CYCLE).all()
    assert len(pseudo_rows) + len(gt) == len(df)


def coco_images_exist_at_their_size(dest) -> dict:
    """Every image the COCO file names exists (file_name relative to the JSON) at its width/height."""
    data = json.loads(dest.read_text())
    for image in data["images"]:
        png = Image.open(dest.parent / image["file_name"])
        assert png.size == (image["width"], image["height"]) == (64, 64), image
    return data


def evaluate_coco(dest, results: list[dict]):
    """pycocotools as a user runs it: the export as ground truth, ``loadRes`` of results, COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(dest))
    detections = coco.loadRes(results)
    evaluation = COCOeval(coco, detections, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return coco, evaluation


def teacher_results(run, dest, cycle: int) -> list[dict]:
    """The teacher's fused pool boxes of the images the COCO file lists, as COCO results (pixels)."""
    data = json.loads(dest.read_text())
    index = {im["image_key"]: im for im in data["images"]}
    fused = pd.read_csv(run / f"gen{cycle - 1}" / "detector" / "predictions" / "pool_fused.csv", dtype={"image_id": str})
    fused = fused[fused["image_id"].isin(set(index))]
    out = []
    for row in fused.itertuples():
        im = index[row.image_id]
        w, h = im["width"], im["height"]
        out.append({"image_id": im["id"], "category_id": int(row.class_id) + 1, "score": float(row.score),
                    "bbox": [row.x_min * w, row.y_min * h, (row.x_max - row.x_min) * w, (row.y_max - row.y_min) * h]})
    return out


def test_coco_lists_every_judged_image_and_pycocotools_evaluates_it(run, tmp_path):
    dest = tmp_path / "pseudo.json"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "coco", "--dest", str(dest)]) == 0
    data = coco_images_exist_at_their_size(dest)
    boxes, images = pseudo(run, "box_pseudo.csv"), pseudo(run, "box_images.csv")
    assert sorted(im["image_key"] for im in data["images"]) == sorted(images["image_id"])  # every judged image
    assert {im["image_key"]: im["pseudo_status"] for im in data["images"]} == dict(zip(images["image_id"], images["status"]))
    assert data["info"]["image_root"] == "pseudo_images"
    results = [{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in data["annotations"]]
    coco, evaluation = evaluate_coco(dest, results)  # its own pseudo boxes as detections: a perfect score
    assert len(coco.getAnnIds()) == len(boxes) > 0
    assert evaluation.stats[1] == pytest.approx(1.0)  # AP@0.5
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["Right Lung", "Left Lung"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert all(a["cycle"] == CYCLE and a["source"] == "gen1/detector" and a["models"] and 0 <= a["score"] <= 1
               and a["score"] >= a["threshold"] - 1e-6 for a in anns)
    _, back = read_coco(dest)  # pixels -> normalized round trip through the PNGs' size
    key = ["image_id", "class_id", "score"]
    back["score"] = back["score"].astype("float64").round(4)  # read_coco gives float32 scores
    merged = back.merge(boxes.assign(score=boxes["score"].round(4)), on=key, suffixes=("", "_src"))
    assert len(merged) == len(boxes)
    np.testing.assert_allclose(merged["x_min"], merged["x_min_src"], atol=1e-3)
    np.testing.assert_allclose(merged["y_max"], merged["y_max_src"], atol=1e-3)


def test_coco_of_a_cycle_without_pseudo_boxes_still_lists_its_images(run, tmp_path):
    """The failure users met: no box kept -> a COCO file with 0 images, on which loadRes fails."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    pdir = copy / f"cycle{CYCLE}" / "pseudo"
    boxes = pd.read_csv(pdir / "box_pseudo.csv", dtype={"image_id": str})
    boxes.iloc[:0].to_csv(pdir / "box_pseudo.csv", index=False)
    images = pd.read_csv(pdir / "box_images.csv", dtype={"image_id": str})
    images.assign(status="uncertain", n_boxes=0).to_csv(pdir / "box_images.csv", index=False)
    dest = tmp_path / "empty.json"
    assert export_main(["--run", str(copy), "--cycle", str(CYCLE), "--format", "coco", "--dest", str(dest)]) == 0
    data = coco_images_exist_at_their_size(dest)
    assert len(data["images"]) == len(images) > 0 and data["annotations"] == []
    results = teacher_results(copy, dest, CYCLE)
    assert results
    coco, evaluation = evaluate_coco(dest, results)  # loadRes works: every result's image is listed
    assert len(coco.getImgIds()) == len(images) and evaluation.stats is not None


def test_coco_include_labeled_counts(run, tmp_path):
    from pycocotools.coco import COCO

    dest = tmp_path / "all.json"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "coco", "--dest", str(dest),
                        "--include-labeled"]) == 0
    coco_images_exist_at_their_size(dest)
    coco = COCO(str(dest))
    gt_boxes = pd.read_csv(run / "data" / "boxes.csv", dtype={"image_id": str})
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str})
    labeled_boxed = set(items.loc[(items["role"] == "labeled") & items["box_labeled"], "image_id"])
    n_gt = gt_boxes["image_id"].isin(labeled_boxed).sum()
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == n_gt + len(pseudo(run, "box_pseudo.csv"))
    assert sum(a["cycle"] == 0 and a["score"] == 1.0 for a in anns) == n_gt
    status = {im["image_key"]: im["pseudo_status"] for im in coco.loadImgs(coco.getImgIds())}
    assert {i for i, s in status.items() if s == "ground truth"} == labeled_boxed


def test_yolo_folder_passes_ultralytics_dataset_check(run, tmp_path):
    from ultralytics.data.utils import check_det_dataset

    dest = tmp_path / "yolo"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "yolo", "--dest", str(dest)]) == 0
    data = check_det_dataset(str(dest / "data.yaml"))
    assert data["nc"] == 2 and list(data["names"].values()) == ["Right Lung", "Left Lung"]
    folds = pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str})
    boxed = items.loc[(items["role"] == "labeled") & items["box_labeled"], "image_id"]
    val = sorted(p.stem for p in (dest / "images" / "val").iterdir())
    assert val == sorted(i for i in boxed if folds[i] == 0)
    images = pseudo(run, "box_images.csv")
    chosen = images.loc[images["status"].isin(["boxes", "negative"]), "image_id"]
    train = {p.stem for p in (dest / "images" / "train").iterdir()}
    assert set(chosen) <= train and len(train) == len(chosen) + sum(folds[i] != 0 for i in boxed)
    lines = sum(len((dest / "labels" / "train" / f"{i}.txt").read_text().splitlines()) for i in chosen)
    assert lines == len(pseudo(run, "box_pseudo.csv"))
    negative = images.loc[images["status"] == "negative", "image_id"]
    assert all((dest / "labels" / "train" / f"{i}.txt").read_text() == "" for i in negative)
    png = Image.open(next((dest / "images" / "train").iterdir()))
    assert png.size == (64, 64) and png.format == "PNG"
    assert yaml.safe_load((dest / "data.yaml").read_text())["val"] == "images/val"
    train_with_ultralytics(dest / "data.yaml", tmp_path / "train")


def train_with_ultralytics(data_yaml, project) -> None:
    """The real consumer: ultralytics trains one epoch on the export, from scratch, offline."""
    import torch
    from ultralytics import YOLO

    threads = torch.get_num_threads()
    try:
        model = YOLO("yolov8n.yaml")
        model.train(data=str(data_yaml), epochs=1, imgsz=64, batch=8, workers=0, device="cpu", plots=False,
                    project=str(project), name="t", exist_ok=True, verbose=False, amp=False, mosaic=0.0)
        assert model.trainer.best.exists() or model.trainer.last.exists()
    finally:
        torch.set_num_threads(threads)  # ultralytics sets it process-wide


def test_submission_copies_final_csvs(run, tmp_path):
    dest = tmp_path / "sub"
    assert export_main(["--run", str(run), "--format", "submission", "--dest", str(dest)]) == 0
    for name in ("submission_raw.csv", "submission_gated.csv", "gate.json"):
        assert (dest / name).read_bytes() == (run / "final" / name).read_bytes()
    assert json.loads((dest / "gate.json").read_text())["mode"] == "hard"


def test_errors_are_one_line_with_exit_code_2(run, tmp_path, capsys):
    base = ["--format", "csv", "--dest", str(tmp_path / "x.csv")]
    assert export_main(["--run", str(tmp_path / "missing"), "--cycle", "1", *base]) == 2
    assert "no such run directory" in one_error_line(capsys)
    assert export_main(["--run", str(run), "--cycle", "7", *base]) == 2
    assert "cycle 7 has not made pseudo labels yet (cycles run: 1, 2)" in one_error_line(capsys)
    assert export_main(["--run", str(run), "--cycle", "0", *base]) == 2
    assert "numbered from 1" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--run", str(run), "--format", "pdf", "--dest", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'pdf'" in one_error_line(capsys)
    (tmp_path / "run_without_final").mkdir()
    assert export_main(["--run", str(tmp_path / "run_without_final"), "--format", "submission", "--dest", "y"]) == 2
    assert "no final submissions yet" in one_error_line(capsys)
    assert not (tmp_path / "x.csv").exists()


def test_help_and_dispatch_from_run_cycle(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(word in text for word in ("csv", "yolo", "coco", "submission", "--include-labeled", "yolo train data="))
    with pytest.raises(SystemExit) as exit_info:
        run_cycle.main(["--help"])
    main_help = capsys.readouterr().out
    assert exit_info.value.code == 0 and "run_cycle.py export --run DIR" in main_help and "--version" in main_help
    with pytest.raises(SystemExit) as exit_info:
        run_cycle.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("cxr-noisy-student 0.1.0 (python ")
    dest = tmp_path / "last.csv"  # --cycle defaults to the last cycle run
    assert run_cycle.main(["export", "--run", str(run), "--format", "csv", "--dest", str(dest)]) == 0
    assert set(pd.read_csv(dest)["cycle"]) == {CYCLE}
