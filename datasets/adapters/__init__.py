"""Dataset formats -> the canonical :class:`datasets.table.ItemTable`: the entry points.

Every supported layout (Kaggle VinBigData, Kaggle SIIM-COVID19, a generic images folder + CSV, and
the built-in demo, which uses the VinBigData layout) ends in the same table, so nothing after this
module knows which format the data came from.

Every input row is checked, and a bad one goes through one :class:`~datasets.table.Quarantine`
(``on_bad_input``: set aside and reported, or the first one stops the run with a one-line
:class:`~datasets.errors.DataError`). Nothing is dropped silently: each rejected row appears in
``table.quarantine`` with its file and its CSV line number (the header is line 1, the number a
person sees in an editor or spreadsheet).

Checked everywhere: boxes outside the image, inverted, zero-area or NaN (after normalising by the
size read from the image header), unknown classes, missing or unreadable image files, duplicated
image ids, labels for images that are not there, labeled images without labels, image paths that
escape the data root, empty CSVs and wrong column names (with a "did you mean"), images smaller
than ``readers.MIN_SIDE`` and DICOMs that are not radiographs (:data:`ACCEPTED_MODALITIES`).
Problems only decoding finds (a truncated file, a missing JPEG decoder) are quarantined by the
preprocessing cache in the run's data stage (``teacher_student.cycle.data_stage.prepare``).

One module per format (:mod:`.vinbigdata`, :mod:`.siim`, :mod:`.generic`), all on the checks and the
table builder of :mod:`.common`; this package's API is what the rest of the engine calls:
:func:`load_dataset`, :func:`load_hidden_truth` and :func:`training_boxes`.
"""
from __future__ import annotations

from ..config import DataConfig
from ..demo_siim import siim_demo_paths
from ..errors import DataError
from ..table import ItemTable, Quarantine
from .common import resolved_root
from .generic import load_generic
from ..masks import DEMO_MASKS, DEMO_TRUTH_MASKS
from .masks import attach_masks, no_masks
from .siim import load_siim
from .vinbigdata import load_vinbigdata, training_boxes

__all__ = ["load_dataset", "load_hidden_truth", "training_boxes"]


def load_dataset(cfg: DataConfig) -> ItemTable:
    """The item table for a :class:`datasets.config.DataConfig`, dispatching on ``cfg.format``.

    "demo" is the VinBigData layout written by :mod:`datasets.demo`: root/train.csv + train/,
    root/test/ (unlabeled), root/holdout.csv + holdout/ (role "test", when present); with
    ``demo_layout: siim`` the SIIM layout of :mod:`datasets.demo_siim`. For "siim",
    ``labels_csv`` / ``images_csv`` name the study-level / image-level tables when not the Kaggle
    defaults. VinBigData, SIIM and the demo fix their classes; the class settings apply to "generic".
    """
    q = Quarantine(cfg.on_bad_input)
    root = resolved_root(cfg.root)
    if cfg.layout == "siim" and cfg.format == "demo":
        paths = siim_demo_paths()
        table = load_siim(root, paths["study_csv"], paths["image_csv"], paths["image_dir"], paths["unlabeled_dir"],
                          holdout=paths["holdout"], quarantine=q)
    elif cfg.format in ("demo", "vinbigdata"):
        holdout = "holdout.csv" if cfg.format == "demo" and (root / "holdout.csv").is_file() else None
        table = load_vinbigdata(root, train_csv=cfg.labels_csv or "train.csv", holdout_csv=holdout,
                                holdout_dir="holdout", fuse=cfg.fuse_radiologists, iou_thr=cfg.radiologist_iou_thr,
                                quarantine=q)
    elif cfg.format == "siim":
        table = load_siim(root, study_csv=cfg.labels_csv or "train_study_level.csv",
                          image_csv=cfg.images_csv or "train_image_level.csv", quarantine=q)
    elif cfg.format == "generic":
        if not cfg.images_csv:
            raise DataError("data.images_csv: the generic format needs an images CSV (image_id, path, ...)")
        table = load_generic(root, cfg.images_csv, cfg.labels_csv or None, study_label_column=cfg.study_label_column,
                             study_classes=cfg.study_classes, normal_class=cfg.normal_class,
                             box_classes=cfg.box_classes, quarantine=q)
        return with_masks(cfg, table, root, q, DEMO_MASKS)
    else:
        raise DataError(f"data.format: unknown format {cfg.format!r}")
    _check_fixed_classes(cfg, table)
    return with_masks(cfg, table, root, q, DEMO_MASKS)


def with_masks(cfg: DataConfig, table: ItemTable, root, q: Quarantine, demo_csv: str) -> ItemTable:
    """The table with its mask columns (``datasets.masks``): from data.masks_csv, the demo's own
    mask file, or empty ones."""
    name = cfg.masks_csv or (demo_csv if cfg.format == "demo" and (root / demo_csv).is_file() else "")
    if not name:
        return table.replace(items=no_masks(table.items))
    return attach_masks(table, root, name, q, relative_rle=cfg.mask_rle == "relative")


def _check_fixed_classes(cfg: DataConfig, table: ItemTable) -> None:
    """VinBigData and SIIM fix their classes: a config asking for others is a mistake, not a wish."""
    for key, wanted, actual in (("study_classes", tuple(cfg.study_classes), table.study_classes),
                                ("box_classes", tuple(cfg.box_classes), table.box_classes),
                                ("normal_class", cfg.normal_class, table.normal_class)):
        if wanted and wanted != actual:
            raise DataError(f"data.{key}: the {cfg.format} format fixes it to {actual!r}, config says {wanted!r}")


def load_hidden_truth(cfg: DataConfig) -> ItemTable | None:
    """True labels of the unlabeled pool (root/unlabeled_truth.csv, VinBigData format), or None.

    The demo writes them so a run can measure pseudo-label precision and train an oracle; they
    must never reach training. Images keep role "unlabeled".
    """
    root = resolved_root(cfg.root)
    if cfg.layout == "siim" and cfg.format == "demo":
        study_csv, image_csv, image_dir = siim_demo_paths()["truth"]
        if not (root / study_csv).is_file():
            return None
        table = load_siim(root, study_csv, image_csv, image_dir, unlabeled_dir=None,
                          quarantine=Quarantine(cfg.on_bad_input))
        return table.replace(items=table.items.assign(role="unlabeled"))
    if cfg.format not in ("demo", "vinbigdata") or not (root / "unlabeled_truth.csv").is_file():
        return None
    q = Quarantine(cfg.on_bad_input)
    table = load_vinbigdata(root, train_csv="unlabeled_truth.csv", image_dir="test", unlabeled_dir=None,
                            fuse=cfg.fuse_radiologists, iou_thr=cfg.radiologist_iou_thr, quarantine=q)
    table = table.replace(items=table.items.assign(role="unlabeled"))
    if cfg.format == "demo" and (root / DEMO_TRUTH_MASKS).is_file():
        return attach_masks(table, root, DEMO_TRUTH_MASKS, q)
    return table.replace(items=no_masks(table.items))
