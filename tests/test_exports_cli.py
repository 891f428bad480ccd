"""Tests of ``python run_cycle.py export`` (teacher_student.exports) on a synthetic run.

The run is the one tests/test_report.py builds (``make_synthetic_run``: loops.cycle's layout, real
radiographs in a real preprocessing cache). Each format is read back by the tool it is for:
pandas for CSV, pycocotools for COCO, ultralytics' own dataset check for YOLO (a full training on
the export is another test's job).
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
    c = df[df["kind"] == "classifier"]
    assert (c["source"] == "gen1/classifier").all() and (c["folds"] == "0|1|2").all() and c[["x_min", "x_max"]].isna().all().all()
    assert c.set_index("image_id")["copies"].to_dict() == cls.set_index("image_id")["copies"].to_dict()
    b = df[df["kind"] == "box"]
    assert (b["source"] == "gen1/detector").all() and (b["n_models"] >= 1).all() and b["models"].str.contains("f").all()
    assert set(b["label"]) <= {"Right Lung", "Left Lung"}
    np.testing.assert_allclose(np.sort(b["score"]), np.sort(boxes["score"]), rtol=1e-6)
    assert ((b[["x_min", "y_min", "x_max", "y_max"]] >= 0) & (b[["x_min", "y_min", "x_max", "y_max"]] <= 1)).all().all()


def test_csv_include_labeled_adds_ground_truth(run, tmp_path):
    dest = tmp_path / "all.csv"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "csv", "--dest", str(dest),
                        "--include-labeled"]) == 0
    df = pd.read_csv(dest, dtype={"image_id": str})
    gt = df[df["cycle"] == 0]
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str})
    gt_boxes = pd.read_csv(run / "data" / "boxes.csv", dtype={"image_id": str})
    labeled = items[items["role"] == "labeled"]
    assert (gt["kind"] == "classifier").sum() == len(labeled)
    assert (gt["kind"] == "box").sum() == gt_boxes["image_id"].isin(set(labeled["image_id"])).sum()
    assert (gt["score"] == 1.0).all() and (df["cycle"] == CYCLE).sum() == len(df) - len(gt)


def test_coco_loads_in_pycocotools_with_provenance(run, tmp_path):
    from pycocotools.coco import COCO

    dest = tmp_path / "pseudo.json"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "coco", "--dest", str(dest)]) == 0
    coco = COCO(str(dest))
    boxes, images = pseudo(run, "box_pseudo.csv"), pseudo(run, "box_images.csv")
    assert len(coco.getAnnIds()) == len(boxes)
    assert len(coco.getImgIds()) == images["status"].isin(["boxes", "negative"]).sum()
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["Right Lung", "Left Lung"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert all(a["cycle"] == CYCLE and a["source"] == "gen1/detector" and a["models"] and 0 <= a["score"] <= 1 for a in anns)
    _, back = read_coco(dest)  # pixels -> normalized round trip through the source image sizes
    key = ["image_id", "class_id", "score"]
    back["score"] = back["score"].astype("float64").round(4)  # read_coco gives float32 scores
    merged = back.merge(boxes.assign(score=boxes["score"].round(4)), on=key, suffixes=("", "_src"))
    assert len(merged) == len(boxes)
    np.testing.assert_allclose(merged["x_min"], merged["x_min_src"], atol=1e-3)
    np.testing.assert_allclose(merged["y_max"], merged["y_max_src"], atol=1e-3)


def test_coco_include_labeled_counts(run, tmp_path):
    from pycocotools.coco import COCO

    dest = tmp_path / "all.json"
    assert export_main(["--run", str(run), "--cycle", str(CYCLE), "--format", "coco", "--dest", str(dest),
                        "--include-labeled"]) == 0
    coco = COCO(str(dest))
    gt_boxes = pd.read_csv(run / "data" / "boxes.csv", dtype={"image_id": str})
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str})
    labeled_boxed = set(items.loc[(items["role"] == "labeled") & items["box_labeled"], "image_id"])
    n_gt = gt_boxes["image_id"].isin(labeled_boxed).sum()
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == n_gt + len(pseudo(run, "box_pseudo.csv"))
    assert sum(a["cycle"] == 0 and a["score"] == 1.0 for a in anns) == n_gt


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
    dest = tmp_path / "last.csv"  # --cycle defaults to the last cycle run
    assert run_cycle.main(["export", "--run", str(run), "--format", "csv", "--dest", str(dest)]) == 0
    assert set(pd.read_csv(dest)["cycle"]) == {CYCLE}
