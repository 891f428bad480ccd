"""Config sections of the data layer, and the two helpers every layer uses on configs (ground floor).

Why frozen dataclasses: a config that cannot change after loading can be hashed and saved next to
the results it made, which is what makes stages resumable (a stage's outputs are reused only when
the config slice that made them is identical). The sections live next to the layer that reads
them; ``teacher_student.config`` composes them into ``EngineConfig`` and loads YAML. Imports
nothing of the project.

Ranges: a field's ``metadata`` declares the values it accepts, next to the field (``ge``/``gt``/
``le``/``lt`` bounds, applied to every entry of a tuple; ``len``/``min_len`` for tuples), and
``teacher_student.config`` checks them at load with the full key in the message. Every float must
also be finite. Rules across fields live in ``teacher_student.config.check_config``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels are, and in which format."""

    format: Literal["demo", "vinbigdata", "siim", "generic"] = "demo"
    """Input layout: the built-in demo, Kaggle VinBigData, Kaggle SIIM-COVID19, or an images CSV."""
    root: str = "demo_data"
    """Data root; every image path must resolve inside it."""
    labels_csv: str = ""
    """Generic/VinBigData: the label table, relative to root (adapter default when empty)."""
    images_csv: str = ""
    """Generic: one row per image (image_id, patient_id, path, study label, role...)."""
    study_label_column: str = "label_group"
    """Generic: column holding the study-level class name."""
    study_classes: tuple[str, ...] = ()
    """Class names of the study-level classifier; empty: taken from the adapter."""
    normal_class: str = ""
    """The study class meaning "nothing abnormal"; P(abnormal) = 1 - P(normal). Empty: adapter's."""
    box_classes: tuple[str, ...] = ()
    """Detector class names; empty: taken from the adapter."""
    masks_csv: str = ""
    """Segmentation masks, relative to root: image_id (or ImageId) and mask_file (a 0/255 PNG the
    size of the image) or EncodedPixels (SIIM-ACR run-length text, -1 for empty; several rows =
    instances, united). Empty: none (the demo finds its own masks.csv)."""
    mask_rle: Literal["relative", "absolute"] = "relative"
    """EncodedPixels starts: relative (SIIM-ACR train-rle.csv) or absolute 1-based (standard Kaggle RLE)."""
    fuse_radiologists: bool = True
    """VinBigData: fuse the boxes of several radiologists with WBF (as the top solutions did)."""
    radiologist_iou_thr: float = field(default=0.4, metadata={"gt": 0, "le": 1})
    """WBF IoU threshold when fusing radiologists' boxes."""
    demo_counts: tuple[int, ...] = field(default=(120, 360, 120), metadata={"ge": 1, "len": 3})
    """Demo format only: labeled, unlabeled and held-out test images generated into root."""
    demo_image_size: int = field(default=256, metadata={"ge": 64})
    """Demo format only: pixel size of the generated DICOMs."""
    demo_seed: int = field(default=0, metadata={"ge": 0})
    """Demo format only: seed of the generated dataset (bench_gain varies it with run.seed)."""
    demo_layout: Literal["vinbigdata", "siim"] = "vinbigdata"
    """Demo format only: the Kaggle layout the generated dataset is written in and read back through:
    VinBigData (train.csv of radiologists' boxes) or SIIM-COVID19 (study/series/image DICOM tree,
    study-level and image-level CSVs, one 'opacity' box class, four study classes)."""
    test_fraction: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Hold out about this fraction of the labeled images as the test role, whole patient and
    duplicate groups at a time (for data without a test part; 0: none). Test images are never
    trained on; every generation and reference model is scored on them."""
    test_from: Literal["labeled", "box_labeled", "mask_labeled"] = "labeled"
    """Which labeled images test_fraction counts: all, or those with ground-truth boxes (the
    detector's test set) or masks (the segmenter's); their groups' other images go with them."""
    hidden_fraction: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Hide the labels of about this fraction of the labeled images left after the test part
    (counted as test_from counts, whole patient and duplicate groups): they join the unlabeled
    pool and their labels become its hidden truth, as the demo's unlabeled_truth.csv is -- the
    semi-supervised benchmark protocol on a fully labeled set, so that a real dataset gets
    pseudo-label quality against truth and an oracle (a real ceiling). 0: none."""
    hidden_truth: bool = True
    """Read the pool's hidden truth when the dataset has one (the demo's unlabeled_truth.csv): it only
    measures the pseudo labels and trains the oracle; false runs the same selection and training
    without it (a test compares both)."""
    on_bad_input: Literal["quarantine", "error"] = "quarantine"
    """quarantine: bad rows are set aside and reported; error: the first bad row stops the run."""

    @property
    def layout(self) -> str:
        """The layout the data is read in: the format, or for the demo the layout it is generated in."""
        return self.demo_layout if self.format == "demo" else self.format


@dataclass(frozen=True)
class PreprocessConfig:
    """How a source image becomes the array the models read. Saved in every checkpoint."""

    size: int = field(default=512, metadata={"ge": 8})
    """Images are resized to size x size (normalized boxes are unchanged by this)."""
    percentile_clip: tuple[float, float] = field(default=(0.5, 99.5), metadata={"ge": 0, "le": 100, "len": 2})
    """Applied when a DICOM has no window/VOI LUT: robust min-max over these percentiles."""
    mean: float = 0.5
    """Normalisation of the [0, 1] image: (x - mean) / std."""
    std: float = field(default=0.25, metadata={"gt": 0})
    """See mean."""


@dataclass(frozen=True)
class FoldConfig:
    k: int = field(default=5, metadata={"ge": 2})
    """Number of folds: k teachers, each labeled image predicted out-of-fold once."""
    seed: int = field(default=42, metadata={"ge": 0})
    """Seed of the stratified grouped fold split."""
    phash_max_distance: int = field(default=4, metadata={"ge": 0, "le": 64})
    """DCT perceptual-hash Hamming distance (of 64 bits) up to which two images are one duplicate
    group (pixel-identical images always are). Measured on the shared set: re-encoded copies at 0,
    a known near-duplicate at 2, the closest unrelated films at 6; see datasets/cache.py. Images
    that are all alike (the demo's synthetic ones: unrelated pairs at 2) chain into one group at 4:
    the log warns (fold_report chained_groups); use 0 there."""
    test_duplicates: Literal["exclude", "report"] = "exclude"
    """A test image that duplicates a labeled (training) image -- the same pixels, or a perceptual
    hash within phash_max_distance; a direct link, not a chain through a group: exclude leaves it
    out of every test metric (it would score what the models memorised), report only lists it in
    data/fold_report.json (test_duplicates_of_training) and the log."""


RANGE_RULES = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
               "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
"""The bounds a field's ``metadata`` may declare; ``len``/``min_len`` count a tuple's entries."""


def range_problem(value: Any, rules: Any) -> str | None:
    """What is wrong with a field's value given the range in its metadata (each entry of a tuple
    checked; every number must be finite), or None."""
    values = value if isinstance(value, tuple) else (value,)
    if "len" in rules and len(values) != rules["len"]:
        return f"give {rules['len']} values, got {len(values)} ({list(values)})"
    if len(values) < rules.get("min_len", 0):
        return f"give at least {rules['min_len']} value(s), got none"
    for v in (v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)):
        shown, each = (list(values), "each value ") if isinstance(value, tuple) else (value, "")
        if not math.isfinite(v):
            return f"{shown!r} is not a finite number"
        broken = [f"{sign} {rules[name]}" for name, (ok, sign) in RANGE_RULES.items() if name in rules
                  and not ok(v, rules[name])]
        if broken:
            return f"{shown!r} is out of range: {each}must be {' and '.join(broken)}"
    return None


def config_to_dict(cfg: Any) -> dict:
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))  # tuples -> lists, for YAML/JSON round trips


def fingerprint(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able value), used to key stage outputs."""
    if is_dataclass(obj):
        obj = config_to_dict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
