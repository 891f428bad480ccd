"""``python run_cycle.py export``: a cycle's pseudo labels in the formats other tools read.

Why an export command: pseudo labels are worth reviewing, re-using and training on outside this
engine (a radiologist's annotation tool reads COCO, ultralytics reads a YOLO folder, a spreadsheet
reads CSV). Every exported pseudo label keeps its provenance -- the cycle that made it, the model
and threshold that kept it, the fold models that voted for it, and its score -- so that nobody
mistakes it for ground truth. Every export is self-consistent: the images it names exist, at the
size it states (the preprocessing cache's, the pixels the models saw), and it lists every image it
covers, with or without boxes. Each is checked by its real consumer in tests/test_exports_cli.py
(ultralytics trains on the YOLO folder; pycocotools loads the COCO file, ``loadRes``es predictions
and evaluates them).

Formats:

``csv``
    One row per label: image_id, origin (``pseudo`` | ``ground truth``), kind (classifier | box |
    negative), label, class_id, score, threshold and rule (what kept it: the class threshold, the
    global confidence, the top-k fallback, or for negatives the P(abnormal) bound), model (the
    teacher generation's ladder model), copies, cycle, source, folds (classifier) or models /
    n_models (boxes), box coordinates (normalized x_min, y_min, x_max, y_max). ``negative`` rows are
    unlabeled images the detector student learns as "no finding". Ground-truth rows
    (``--include-labeled``) have origin ``ground truth`` and no score, threshold, model or cycle.
``yolo``
    A YOLO dataset folder (``datasets.export.export_yolo``) with the student's detector training
    set of that cycle: ground-truth boxes of the labeled images plus the kept pseudo boxes and
    negatives. Images are PNGs from the preprocessing cache. ``val`` holds fold 0's box-labeled
    images (ground truth only), so ``yolo train data=<dest>/data.yaml`` works as is.
``coco``
    A COCO detection JSON (``datasets.export.export_coco``) of every pool image the cycle judged
    for boxes, each with its ``pseudo_status`` (boxes, negative, uncertain) and the kept pseudo
    boxes as annotations (with ``score``, ``source``, ``cycle``, ``models``, ``threshold``);
    ``--include-labeled`` adds the labeled images with their ground truth (status ``ground
    truth``). The images are written as PNGs into ``<dest stem>_images/`` beside the JSON, and
    ``file_name`` is relative to the JSON's folder; width, height and boxes are in those PNGs'
    pixels. Images with status ``uncertain`` have no annotation because the teacher was unsure,
    not because they are normal: train on the YOLO export (the student's own set), or filter by
    ``pseudo_status``.
``masks``
    The kept pseudo masks as PNGs, SIIM-ACR RLE and COCO with RLE segmentation
    (``teacher_student.mask_exports``; a folder).
``submission``
    Copies of the final competition CSVs (``final/submission_raw.csv``, ``submission_gated.csv``).

Errors (no such run, cycle not run yet, bad arguments) are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..datasets.boxes import BOX_COLUMNS
from ..datasets.table import ItemTable, load_table
from ..datasets.errors import DataError
from ..datasets.atomic import atomic_dir, atomic_path, read_json, read_table, write_json, write_table
from .config import EngineConfig, ladder_value
from .layout import BOX_IMAGES, BOX_PSEUDO, BOX_PSEUDO_INFO, CLASS_PSEUDO, FOLDS, GATE, SUBMISSION, RunLayout
from .report.run_reader import check_cycle, default_loader, load_run_config
from .report.stats import label_strings

FORMATS = ("csv", "yolo", "coco", "masks", "submission")
CSV_COLUMNS = ["image_id", "origin", "kind", "label", "class_id", "score", "threshold", "rule", "model", "copies",
               "cycle", "source", "folds", "models", "n_models", *BOX_COLUMNS]
PSEUDO, GROUND_TRUTH = "pseudo", "ground truth"
SUBMISSIONS = (SUBMISSION.format("raw"), SUBMISSION.format("gated"))

EPILOG = """\
examples:
  python run_cycle.py export --run runs/demo --cycle 2 --format csv --dest exports/pseudo_c2.csv
  python run_cycle.py export --run runs/demo --cycle 2 --format yolo --dest exports/yolo_c2
      then: yolo train data=exports/yolo_c2/data.yaml model=yolov8n.yaml
  python run_cycle.py export --run runs/demo --cycle 2 --format coco --dest exports/c2.json --include-labeled
  python run_cycle.py export --run runs/demo --format submission --dest exports/submission

Cycle c's pseudo labels were made by generation c-1's models and trained generation c.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit code 2), like every other error of this command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_cycle.py export", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                      description="Export one cycle's pseudo labels (with provenance: cycle, source models,\n"
                                  "score) as CSV, a YOLO dataset folder or COCO JSON, or copy the final submissions.")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (the run.out / --out of a run)")
    p.add_argument("--cycle", type=int, metavar="N",
                   help="cycle whose pseudo labels to export (>= 1; default: the last cycle run)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="csv: pseudo-label table; yolo: dataset folder for ultralytics; coco: detection JSON; "
                        "masks: pseudo masks as PNG, RLE and COCO (a folder); submission: the final competition CSVs")
    p.add_argument("--dest", required=True, metavar="PATH",
                   help="output file (csv, coco: its PNGs go to <stem>_images/ beside it) or folder (yolo, "
                        "submission); replaced if it exists")
    p.add_argument("--include-labeled", action="store_true",
                   help="csv, coco: also write the labeled images' ground truth (origin 'ground truth', no score). "
                        "yolo always includes it, as the student's training set does")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_cycle.py export``; returns the exit code (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        dest = export(Path(args.run), args.cycle, args.format, Path(args.dest), include_labeled=args.include_labeled)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {dest}")
    return 0


def export(run_dir: Path, cycle: int | None, fmt: str, dest: Path, *, include_labeled: bool = False) -> Path:
    """Do one export; return the main file written. Raises DataError (one line) on a bad request."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    if fmt == "submission":
        return copy_submissions(run_dir, dest)
    layout = RunLayout(run_dir)
    if cycle is None:
        done = layout.cycles_with_pseudo_labels()
        if not done:
            raise DataError(f"{run_dir}: no cycle has made pseudo labels yet")
        cycle = done[-1]
    if cycle < 1:
        raise DataError(f"--cycle {cycle}: cycles are numbered from 1 (cycle 0 trains the first teachers only)")
    pseudo_dir = check_cycle(run_dir, cycle)
    if fmt == "masks":
        from .mask_exports import export_masks

        return export_masks(run_dir, pseudo_dir, cycle, dest)
    table = load_table(layout.data)
    cfg, _ = load_run_config(run_dir)
    if fmt == "csv":
        frame = pseudo_rows(table, pseudo_dir, cycle, cfg)
        if include_labeled:
            frame = pd.concat([ground_truth_rows(table, run_dir), frame], ignore_index=True)
        write_table(dest, frame[CSV_COLUMNS])
        return dest
    if not table.box_classes or not (pseudo_dir / BOX_PSEUDO).exists():
        raise DataError(f"{pseudo_dir}: this run has no pseudo boxes (detector disabled), so there is nothing to "
                        f"export as {fmt}; use --format csv")
    if fmt == "coco":
        return export_coco_file(run_dir, table, pseudo_dir, dest, include_labeled=include_labeled)
    return export_yolo_folder(run_dir, table, pseudo_dir, dest)


# ----------------------------------------------------------------------------- csv


def pseudo_rows(table: ItemTable, pseudo_dir: Path, cycle: int, cfg: EngineConfig) -> pd.DataFrame:
    """The cycle's pseudo labels as one provenance table (classifier labels, boxes, negatives), each
    row with the teacher model and the threshold that kept it."""
    cls = read_table(pseudo_dir / CLASS_PSEUDO, dtype={"folds": str})
    threshold = cls["threshold"] if "threshold" in cls.columns else np.nan
    frames = [pd.DataFrame({"image_id": cls["image_id"], "origin": PSEUDO, "kind": "classifier", "label": cls["label"],
                            "class_id": cls["class_index"], "score": cls["confidence"], "threshold": threshold,
                            "rule": cls["rule"] if "rule" in cls.columns else "threshold",
                            "model": ladder_value(cfg.classifier.ladder, cycle - 1), "copies": cls["copies"],
                            "cycle": cls["cycle"], "source": cls["source"], "folds": cls["folds"],
                            "models": cls["models"] if "models" in cls.columns else np.nan})]
    if (pseudo_dir / BOX_PSEUDO).exists():
        boxes = read_table(pseudo_dir / BOX_PSEUDO)
        names = np.array(table.box_classes, dtype=object)
        used, fallback = box_thresholds(pseudo_dir, table)
        ids = boxes["class_id"].to_numpy(int)
        frames.append(boxes.assign(origin=PSEUDO, kind="box", label=names[ids] if len(boxes) else [], copies=1,
                                   threshold=used[ids] if len(boxes) else [],
                                   rule=["top_k" if names[c] in fallback else "threshold" for c in ids],
                                   model=ladder_value(cfg.detector.ladder, cycle - 1)))
        frames.append(negative_rows(pseudo_dir, cycle, cfg))
    frames = [f.reindex(columns=CSV_COLUMNS) for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CSV_COLUMNS)


def box_thresholds(pseudo_dir: Path, table: ItemTable) -> tuple[np.ndarray, set[str]]:
    """Per box class the score its kept boxes passed (the top-k fallback's where it applied; inf:
    'never'), and the classes the fallback decided."""
    info = read_json(pseudo_dir / BOX_PSEUDO_INFO) if (pseudo_dir / BOX_PSEUDO_INFO).exists() else {}
    given = info.get("thresholds_used") or info.get("thresholds") or {}
    used = np.array([np.inf if given.get(n) is None else float(given[n]) for n in table.box_classes], dtype=np.float64)
    return used, set(info.get("fallback") or {})


def negative_rows(pseudo_dir: Path, cycle: int, cfg: EngineConfig) -> pd.DataFrame:
    """Unlabeled images taught as "no finding": no pseudo box kept and the classifier confidently
    normal. Score = 1 - P(abnormal), the classifier's confidence that the image is normal."""
    images = read_table(pseudo_dir / BOX_IMAGES)
    neg = images[images["status"] == "negative"]
    bound = cfg.detector.negative_max_p_abnormal
    return pd.DataFrame({"image_id": neg["image_id"], "origin": PSEUDO, "kind": "negative", "label": "no finding",
                         "score": 1.0 - neg["p_abnormal"].astype(float), "threshold": 1.0 - bound,
                         "rule": f"no box kept and P(abnormal) < {bound:g}",
                         "model": f"{ladder_value(cfg.detector.ladder, cycle - 1)} + {ladder_value(cfg.classifier.ladder, cycle - 1)}",
                         "copies": 1, "cycle": cycle, "source": f"gen{cycle - 1}/detector+classifier"})


def ground_truth_rows(table: ItemTable, run_dir: Path) -> pd.DataFrame:
    """Labeled images' study labels and ground-truth boxes in the same columns, marked origin
    "ground truth" and without score, threshold, model or cycle (nothing chose them)."""
    from ..datasets.adapters import training_boxes

    labeled = table.items[(table.items["role"] == "labeled") & table.items["has_study_label"]]
    names = list(table.study_classes)
    y = table.study_targets(labeled["image_id"])
    study = pd.DataFrame({"image_id": labeled["image_id"].to_numpy(), "origin": GROUND_TRUTH, "kind": "classifier",
                          "label": label_strings(y, names, mode=table.label_mode),
                          "class_id": y.argmax(axis=1) if len(y) else [], "copies": 1, "source": GROUND_TRUTH})
    boxed = set(table.items.loc[(table.items["role"] == "labeled") & table.items["box_labeled"], "image_id"])
    gt = training_boxes(table)
    gt = gt[gt["image_id"].isin(boxed)].drop(columns=["score"], errors="ignore")
    box_names = np.array(table.box_classes, dtype=object)
    boxes = gt.assign(origin=GROUND_TRUTH, kind="box", label=box_names[gt["class_id"].to_numpy(int)] if len(gt) else [],
                      copies=1, source=gt["source"].fillna(GROUND_TRUTH))
    return pd.concat([study, boxes], ignore_index=True).reindex(columns=CSV_COLUMNS)


# ----------------------------------------------------------------------------- coco / yolo


def pseudo_boxes_with_negatives(pseudo_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Kept pseudo boxes and the image ids the student detector trains on (boxes + negatives)."""
    boxes = read_table(pseudo_dir / BOX_PSEUDO)
    images = read_table(pseudo_dir / BOX_IMAGES)
    ids = images.loc[images["status"].isin(["boxes", "negative"]), "image_id"].tolist()
    return boxes[boxes["image_id"].isin(set(ids))].reset_index(drop=True), ids


def labeled_box_ids(table: ItemTable) -> list[str]:
    items = table.items
    return items.loc[(items["role"] == "labeled") & items["box_labeled"], "image_id"].tolist()


def export_coco_file(run_dir: Path, table: ItemTable, pseudo_dir: Path, dest: Path, *, include_labeled: bool) -> Path:
    """COCO JSON of every pool image the cycle judged (+ the labeled ground truth), with the PNGs it
    names written beside it at the cache's size; every annotation carries score, source, cycle,
    models and the threshold that kept it."""
    from ..datasets.adapters import training_boxes
    from ..datasets.export import export_coco

    boxes = read_table(pseudo_dir / BOX_PSEUDO)
    images = read_table(pseudo_dir / BOX_IMAGES)
    status = dict(zip(images["image_id"], images["status"]))
    used, _ = box_thresholds(pseudo_dir, table)
    boxes = boxes[boxes["image_id"].isin(set(status))].assign(
        threshold=lambda b: used[b["class_id"].to_numpy(int)] if len(b) else [])
    if include_labeled:
        gt_ids = labeled_box_ids(table)
        gt = training_boxes(table)
        gt = gt[gt["image_id"].isin(set(gt_ids))].assign(score=1.0, cycle=0, models="", threshold=np.nan)
        boxes = pd.concat([gt, boxes], ignore_index=True)
        status = dict.fromkeys(gt_ids, GROUND_TRUTH) | status
    ids = list(status)
    cfg, _ = load_run_config(run_dir)
    load = default_loader(run_dir, cfg)
    image_dir = dest.parent / f"{dest.stem}_images"
    sizes = write_pngs(ids, load, image_dir)
    items = pd.DataFrame({"image_id": ids, "file_name": [f"{image_dir.name}/{i}.png" for i in ids]})
    with atomic_path(dest) as tmp:
        export_coco(items, boxes, table.box_classes, tmp, sizes=sizes, score_column="score")
        data = read_json(tmp)
        kept = boxes[boxes["image_id"].isin(set(ids))].reset_index(drop=True)
        for ann, row in zip(data["annotations"], kept.itertuples(index=False)):
            ann["cycle"] = int(row.cycle)
            ann["models"] = "" if pd.isna(row.models) else str(row.models)
            ann["threshold"] = None if not np.isfinite(row.threshold) else float(row.threshold)
        for image in data["images"]:
            image["pseudo_status"] = status[image["image_key"]]
        data["info"].update(image_root=image_dir.name, note=(
            "file_name is relative to this file's folder; sizes and boxes are in those PNGs' pixels (the "
            "preprocessing cache). Images with pseudo_status 'uncertain' have no annotation because the teacher "
            "was unsure, not because they are normal."))
        write_json(tmp, data)
    return dest


def write_pngs(ids: list[str], load, image_dir: Path) -> dict[str, tuple[int, int]]:
    """The cache images as PNGs in ``image_dir`` (replaced whole); returns each one's (width, height)."""
    from PIL import Image

    sizes = {}
    with atomic_dir(image_dir) as tmp:
        for image_id in ids:
            array = np.asarray(load(image_id))
            Image.fromarray(array).save(tmp / f"{image_id}.png")
            sizes[image_id] = (int(array.shape[1]), int(array.shape[0]))
    return sizes


def export_yolo_folder(run_dir: Path, table: ItemTable, pseudo_dir: Path, dest: Path) -> Path:
    """The student detector's training set of this cycle as a YOLO folder; val = fold 0's ground truth."""
    from ..datasets.adapters import training_boxes
    from ..datasets.export import export_yolo

    folds = read_table(RunLayout(run_dir).data / FOLDS).set_index("image_id")["fold"]
    gt_ids = [i for i in labeled_box_ids(table) if i in folds.index]
    boxes, pseudo_ids = pseudo_boxes_with_negatives(pseudo_dir)
    gt = training_boxes(table)
    all_boxes = pd.concat([gt[gt["image_id"].isin(set(gt_ids))], boxes], ignore_index=True)
    split = {i: ("val" if folds[i] == 0 else "train") for i in gt_ids} | dict.fromkeys(pseudo_ids, "train")
    cfg, _ = load_run_config(run_dir)
    load = default_loader(run_dir, cfg)
    items = pd.DataFrame({"image_id": list(split)})
    return export_yolo(items, all_boxes, table.box_classes, load, dest, split_of=split)


# ----------------------------------------------------------------------------- submission


def copy_submissions(run_dir: Path, dest: Path) -> Path:
    """Copy the final submission CSVs (and gate.json, which says how they were gated) into ``dest``."""
    final = RunLayout(run_dir).final
    found = [final / name for name in SUBMISSIONS if (final / name).exists()]
    if not found:
        raise DataError(f"{final}: no final submissions yet (the run has not finished its last cycle)")
    dest.mkdir(parents=True, exist_ok=True)
    for src in found + ([final / GATE] if (final / GATE).exists() else []):
        with atomic_path(dest / src.name) as tmp:
            shutil.copyfile(src, tmp)
    return dest
