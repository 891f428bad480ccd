"""SIIM-COVID19 with effdet end to end: the built-in demo in the SIIM layout, one cycle, through the
command line, ending in Kaggle's SIIM submission rows; the detector is effdet (tf_efficientdet_d0 at
128 px, one epoch).

One run covers both paths the VinBigData + YOLO run (tests/test_cycle_e2e.py) does not: the SIIM
layout (study/series/image DICOM tree, study-level and image-level CSVs, "none" rows, the
``study_id`` of every image, the submission with one row per study and one per image, the image's
"none" from the classifier) and effdet through every stage of the cycle. The run also carries the
cross-role duplicate the demo plants (a held-out image that is a copy of a training image: listed in
the fold report, left out of the test metrics), and its detector checkpoints show that prediction
reads the checkpoint's preprocessing, not the run's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr_noisy_student.datasets.atomic import read_table
from tiny_run import TINY, run_cli

STUDY_ROW = re.compile(r"negative (\S+) 0 0 1 1 typical (\S+) 0 0 1 1 indeterminate (\S+) 0 0 1 1 "
                       r"atypical (\S+) 0 0 1 1")
IMAGE_ROW = re.compile(r"((opacity \S+ \S+ \S+ \S+ \S+ )*)none (\S+) 0 0 1 1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("siim")
    cfg = {**TINY, "data": {"format": "demo", "demo_layout": "siim", "root": str(base / "data"),
                            "demo_counts": [12, 8, 6], "demo_image_size": 64},
           "detector": {"kind": "effdet", "ladder": ["tf_efficientdet_d0"], "img_size": 128, "epochs": 1,
                        "batch_size": 4, "metric_iou": 0.5, "conf_floor": 0.05, "skip_box_thr": 0.05},
           "run": {**TINY["run"], "oracle": False, "ablation": False}}
    (base / "siim.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("--config", str(base / "siim.yaml"), "--out", str(base / "run"), timeout=1500, threads=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run", base / "data"


def test_the_siim_layout_runs_a_cycle_and_every_image_knows_its_study(run):
    run, data = run
    assert (data / "train_study_level.csv").is_file() and list((data / "train").glob("*/*/*.dcm"))
    items = read_table(run / "data" / "items.csv")
    assert items["study_id"].notna().all() and set(items["role"]) == {"labeled", "unlabeled", "test"}
    studies = pd.read_csv(data / "train_study_level.csv")
    labeled = items[items["role"] == "labeled"]
    assert set(labeled["study_id"]) == set(studies["id"].str.removesuffix("_study"))
    pool = items[items["role"] == "unlabeled"]  # the pool's studies come from the folder tree
    assert all(Path(p).parts[-3] == s for p, s in zip(pool["path"], pool["study_id"]))
    summary = json.loads((run / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    assert summary["generations"][1]["detector"]["test"] is not None


def test_the_submission_is_kaggles_siim_format_with_none_from_the_classifier(run):
    run, _ = run
    items = read_table(run / "data" / "items.csv")
    test = items[items["role"] == "test"]
    probs = read_table(run / "final" / "class_predictions.csv")
    p_negative = probs[probs["split"] == "pool"].set_index("image_id")["p:Negative for Pneumonia"]
    for tag in ("raw", "gated"):
        sub = pd.read_csv(run / "final" / f"submission_{tag}.csv")
        assert list(sub.columns) == ["id", "PredictionString"]
        study_rows = sub[sub["id"].str.endswith("_study")]
        image_rows = sub[sub["id"].str.endswith("_image")]
        assert sorted(study_rows["id"]) == sorted(f"{s}_study" for s in set(test["study_id"]))
        assert sorted(image_rows["id"]) == sorted(f"{i}_image" for i in test["image_id"])
        for text in study_rows["PredictionString"]:
            match = STUDY_ROW.fullmatch(text)
            assert match and sum(float(v) for v in match.groups()) == pytest.approx(1.0, abs=2e-4), text
        for image_id, text in zip(image_rows["id"].str.removesuffix("_image"), image_rows["PredictionString"]):
            match = IMAGE_ROW.fullmatch(text)
            assert match, text
            assert float(match.group(3)) == pytest.approx(p_negative[image_id], abs=1e-4)


def test_a_test_image_that_duplicates_a_training_image_is_reported_and_not_scored(run):
    run, data = run
    report = json.loads((run / "data" / "fold_report.json").read_text())
    manifest = json.loads((data / "demo_manifest.json").read_text())
    train_copy, test_copy = manifest["cross_role_duplicate"]
    pairs = {(p["image_a"], p["image_b"]) for p in report["cross_role_pairs"]} | \
            {(p["image_b"], p["image_a"]) for p in report["cross_role_pairs"]}
    assert (train_copy, test_copy) in pairs and report["test_duplicates_of_training"] == [test_copy]
    items = read_table(run / "data" / "items.csv")
    scored = int((items["role"] == "test").sum()) - 1
    summary = json.loads((run / "summary.json").read_text())
    assert all(g["classifier"]["test"]["n"] == scored for g in summary["generations"])


def test_effdet_checkpoints_carry_the_preprocessing_and_prediction_reads_it(run):
    """Change the run's preprocessing after training (another size, another mean): a fold
    detector still predicts exactly as before, from the cache of its own preprocessing and with
    its own normalisation; fed the run's new cache directly, it refuses (the input differs)."""
    import dataclasses

    from cxr_noisy_student.datasets.cache import ImageCache
    from cxr_noisy_student.datasets.config import config_to_dict
    from cxr_noisy_student.datasets.errors import DataError
    from cxr_noisy_student.teacher_student.config import detector_preprocess, load_config
    from cxr_noisy_student.teacher_student.cycle.data_stage import prepare
    from cxr_noisy_student.teacher_student.detectors import load_detector
    from cxr_noisy_student.teacher_student.tasks.detector import DetectorTask

    out, _ = run
    cfg = load_config(out / "config.yaml")
    ctx = prepare(cfg)  # the finished run's data stage, reused
    fold_dir = out / "gen1" / "detector" / "fold0"
    detector = load_detector(fold_dir / "detector.pt")
    own = detector_preprocess(cfg)  # the run's preprocessing at the detector's input size
    assert detector.kind == "effdet" and detector.preprocess == config_to_dict(own)
    ids = ctx.ids("test")[:3]
    before = DetectorTask(ctx).predict(fold_dir, 0, ids)
    changed = dataclasses.replace(cfg.preprocess, size=32, mean=0.3, std=0.4)
    moved = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, preprocess=changed))
    ImageCache(ctx.layout.cache, changed).build(ctx.table.items[["image_id", "path"]], workers=0)
    after = DetectorTask(moved).predict(fold_dir, 0, ids)
    pd.testing.assert_frame_equal(after.reset_index(drop=True), before.reset_index(drop=True))
    with pytest.raises(DataError, match="the preprocessing differs from training"):
        detector.predict(ids, moved.loader())
    detector.mean = 0.3  # the test would notice a detector that took the run's mean
    assert not detector.predict(ids, ctx.loader(own), conf_floor=0.0)[["score"]].equals(
        load_detector(fold_dir / "detector.pt").predict(ids, ctx.loader(own), conf_floor=0.0)[["score"]])
