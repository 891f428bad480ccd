"""Where everything of one run lives: the one owner of the run folder's paths (ground floor).

Every stage, the report, the exports and the tests ask a :class:`RunLayout` for a path instead of
spelling ``f"gen{g}"`` or ``"oof.csv"`` themselves, so the contract between the stages (which file
one writes and the next reads) is written down once, here::

    <out>/config.yaml                  the resolved config
    <out>/data/                        items.csv, boxes.csv, quarantine.csv, folds.csv, groups.csv, fold_report.json
    <out>/data/truth/                  hidden truth of the pool (demo; never read by selection or training)
    <out>/cache/                       preprocessing cache (unless run.cache_dir names a shared one)
    <out>/gen<g>/<task>/fold<k>/       one fold model: checkpoint, train_ids.txt, history.json
    <out>/gen<g>/<task>/predictions/   OOF and pool predictions of the generation
    <out>/gen<g>/metrics.json          the generation's scores (OOF, test, hidden truth), per task
    <out>/cycle<c>/pseudo/             the pseudo labels generation c trains on (made by generation c-1)
    <out>/cycle<c>/report.html         the cycle's pseudo-label quality report (+ report.json)
    <out>/final/                       gate, gated predictions, submissions
    <out>/oracle/<task>/               supervised reference on every label (runs with hidden truth)
    <out>/index.html, summary.json     the run's front page and numbers
    <out>/tensorboard/<fold path>/     TensorBoard scalars of each fold model (run.tensorboard)
    <out>/<stage>.done.json            stage markers (fingerprint of what made the stage)
    <out>/cxr_run.json                 says the folder is a run of this engine (written when it is claimed)
    <out>/run.lock                     the lock one run at a time holds (names its process)

Stage functions write into a temporary directory that is swapped in whole, so they name their
outputs with the file-name constants below, relative to the directory they are given.
Imports nothing of the project.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CLASSIFIER, DETECTOR, SEGMENTER, GRADER = "classifier", "detector", "segmenter", "grader"
"""Task kinds' folder names under a generation."""

PROB_PREFIX = "p:"
"""Probability tables have one column ``p:<class>`` per class (raw probabilities, never sharpened)."""


def prob_columns(class_names) -> list[str]:
    return [f"{PROB_PREFIX}{c}" for c in class_names]


def cumulative_columns(num_grades: int) -> list[str]:
    """The grader's probability columns ``p:>=1 .. p:>=K-1``: P(grade >= k), raw, one per step."""
    return prob_columns([f">={k}" for k in range(1, num_grades)])


# file names inside a stage directory
CONFIG = "config.yaml"
RUN_MARKER = "cxr_run.json"
"""A folder holding it is a run of this engine: the only non-empty folder a run may write into."""
RUN_LOCK = "run.lock"
TABLE_META = "table.json"
FOLDS = "folds.csv"
GROUPS = "groups.csv"
FOLD_REPORT = "fold_report.json"
TRAIN_IDS = "train_ids.txt"
"""Every fold model's distinct training images: the record the out-of-fold contract is checked on."""
CHECKPOINT = "checkpoint.pt"
DETECTOR_CHECKPOINT = "detector.pt"
HISTORY = "history.json"
OOF = "oof.csv"
POOL = "pool.csv"
POOL_FOLDS = "pool_folds.csv"
LABELED_FOLDS = "labeled_folds.csv"
"""Every fold model on every labeled image: OOF for its own fold, in-sample for the others (the
soft targets a student fold blends in come from its own teacher fold, which never saw its fold)."""
OOF_BOXES = "oof_boxes.csv"
POOL_RAW = "pool_raw.csv"
POOL_FUSED = "pool_fused.csv"
CLASS_SELECTION = "class_selection.csv"
CLASS_PSEUDO = "class_pseudo.csv"
CLASS_PSEUDO_INFO = "class_pseudo.json"
BOX_OOF_MATCHED = "box_oof_matched.csv"
BOX_PSEUDO = "box_pseudo.csv"
BOX_IMAGES = "box_images.csv"
BOX_PSEUDO_INFO = "box_pseudo.json"
OOF_MASKS = "oof_masks.npz"
"""Segmenter OOF: image ids, folds, per-view probabilities (uint8); the truth is in the mask cache."""
POOL_FOLD_MASKS = "pool_fold_masks.npz"
"""Every fold model x view on every pool image (uint8, folds x views x images x H x W)."""
POOL_MASKS = "pool_masks.npz"
"""The ensemble's mask probabilities on the pool: the mean over folds x views (uint8)."""
MASK_PSEUDO = "mask_pseudo.csv"
MASK_PSEUDO_PROBS = "mask_pseudo.npz"
MASK_PSEUDO_INFO = "mask_pseudo.json"
CASCADE = "cascade.json"
MASK_SUBMISSION = "mask_submission_{}.csv"
MASK_PNGS = "masks_{}"
"""Folders of final (or exported pseudo) masks as PNGs, at the source image's size."""
GRADE_THRESHOLDS = "thresholds.json"
"""A grader generation's OOF-fitted grade thresholds: the ensemble's and, per fold, the cross-fitted
ones its OOF grades were cut with (each fold model's own are in its checkpoint)."""
GRADE_SELECTION = "grade_selection.csv"
GRADE_PSEUDO = "grade_pseudo.csv"
GRADE_PSEUDO_INFO = "grade_pseudo.json"
GATE = "gate.json"
CLASS_PREDICTIONS = "class_predictions.csv"
BOX_PREDICTIONS = "box_predictions_{}.csv"
SUBMISSION = "submission_{}.csv"
PSEUDO_FOLD = "fold{}"
"""Inside a cycle's pseudo folder: the pseudo labels student fold k trains on (made by teacher
fold k alone, thresholds from the other folds' OOF predictions); the folder itself holds the whole
ensemble's selection, which the report and the exports show."""
METRICS = "metrics.json"
"""A generation's scores, written by the runner as soon as its predictions exist (the report reads them)."""
REPORT = "report.html"
REPORT_JSON = "report.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. ``cache_dir``: ``run.cache_dir`` (empty: ``<out>/cache``)."""

    root: Path
    cache_dir: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ run level
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_marker(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def truth(self) -> Path:
        return self.data / "truth"

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.root / "cache"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def cascade(self) -> Path:
        """The final classification -> segmentation cascade: gated masks, submissions, cascade.json."""
        return self.root / "cascade"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def index(self) -> Path:
        return self.root / "index.html"

    def marker(self, stage_dir: Path) -> Path:
        """The ``.done.json`` marker beside a stage directory."""
        return stage_dir.parent / f"{stage_dir.name}.done.json"

    # ------------------------------------------------------------------ generations
    def generation(self, gen: int) -> Path:
        return self.root / f"gen{gen}"

    def task(self, gen: int, task: str) -> Path:
        return self.generation(gen) / task

    def fold(self, gen: int, task: str, fold: int) -> Path:
        return self.task(gen, task) / f"fold{fold}"

    def predictions(self, gen: int, task: str) -> Path:
        return self.task(gen, task) / "predictions"

    def metrics(self, gen: int) -> Path:
        return self.generation(gen) / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def tensorboard_of(self, fold_dir: Path) -> Path:
        """The TensorBoard log directory of one fold model, mirroring its folder under the run
        (``gen1/classifier/fold0`` -> ``tensorboard/gen1/classifier/fold0``)."""
        return self.tensorboard / Path(fold_dir).relative_to(self.root)

    def reference(self, name: str, task: str) -> Path:
        """A reference model's task folder (``oracle``), laid out like a generation's."""
        return self.root / name / task

    # ------------------------------------------------------------------ cycles
    def cycle(self, cycle: int) -> Path:
        return self.root / f"cycle{cycle}"

    def pseudo(self, cycle: int) -> Path:
        return self.cycle(cycle) / "pseudo"

    def pseudo_fold(self, cycle: int, fold: int) -> Path:
        return pseudo_fold_dir(self.pseudo(cycle), fold)

    def report(self, cycle: int) -> Path:
        return self.cycle(cycle) / REPORT

    def report_json(self, cycle: int) -> Path:
        return self.cycle(cycle) / REPORT_JSON

    def cycles_with_pseudo_labels(self) -> list[int]:
        """Cycles whose pseudo labels exist, in order."""
        found: set[int] = set()
        for name in (CLASS_SELECTION, MASK_PSEUDO):  # a run without a classifier has pseudo masks only
            found |= {int(m.group(1)) for p in self.root.glob(f"cycle*/pseudo/{name}")
                      if (m := re.fullmatch(r"cycle(\d+)", p.parent.parent.name))}
        return sorted(found)

    def is_run(self) -> bool:
        return (self.data / TABLE_META).exists()


def pseudo_fold_dir(pseudo_dir: Path, fold: int) -> Path:
    """Fold k's pseudo labels inside a pseudo folder (the stage's temporary one or the final one)."""
    return Path(pseudo_dir) / PSEUDO_FOLD.format(fold)


def fold_of_model(name: str) -> int | None:
    """The fold of a model tag ("f1", "f1/hflip"): how provenance columns name fold models."""
    m = re.match(r"f(\d+)(/|$)", str(name))
    return int(m.group(1)) if m else None
