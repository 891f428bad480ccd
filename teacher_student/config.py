"""One nested, frozen configuration for the whole engine.

Why frozen dataclasses: a config that cannot change after loading is a config that can be hashed
and saved next to the results it made, which is what makes stages resumable (a stage's outputs are
reused only when the config slice that made them is identical). Loaded from YAML, overridden from
the command line with ``key.sub=value``; an unknown key fails with a "did you mean" hint.
"""
from __future__ import annotations

import difflib
import json
import re
import typing
import warnings
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal


from ..datasets.config import DataConfig, FoldConfig, PreprocessConfig, config_to_dict, fingerprint, range_problem
from ..datasets.errors import ConfigError
from ..loops.config import TrainConfig
from ..loops.device import check_device_name
from .config_yaml import apply_overrides, deep_merge, read_yaml
from .config_tasks import CascadeConfig, GraderConfig, SegmenterConfig  # noqa: F401  (sections of EngineConfig)

PRESETS = Path(__file__).resolve().parent / "presets"
"""The built-in configs: ``demo.yaml`` (the default of ``run_cycle.py``) and worked examples."""


@dataclass(frozen=True)
class ClassifierConfig:
    ladder: tuple[str, ...] = field(default=("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"),
                                    metadata={"min_len": 1})
    """timm model per generation: ladder[0] is the cycle-0 teacher, ladder[c] the student of cycle c."""
    drop_rate: tuple[float, ...] = field(default=(0.0, 0.2, 0.3, 0.4), metadata={"ge": 0, "lt": 1, "min_len": 1})
    """Dropout before the classifier head, per generation (student noise)."""
    drop_path_rate: tuple[float, ...] = field(default=(0.0, 0.1, 0.2, 0.2), metadata={"ge": 0, "lt": 1, "min_len": 1})
    """Stochastic depth, per generation (student noise)."""
    pretrained: str = ""
    """Empty: random init. 'timm' downloads timm's weights; a path loads a local state dict."""
    loss: Literal["auto", "softmax", "bce"] = "auto"
    """auto: softmax cross-entropy for multiclass labels, BCE for multilabel."""
    student_steps: float = field(default=1.0, metadata={"gt": 0})
    """Optimizer steps of students (generation >= 1) and of the ablation, as a multiple of the
    teacher's (train.epochs over the teacher's images). Noisy Student trains its students longer:
    pseudo labels add images, and a student that sees each of them less often than the teacher saw
    its labels stays undertrained (measured on the demo: at 1x the pseudo labels gave nothing)."""
    finetune: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Share of a student's optimizer steps (the ablation's and the oracle's too: the same recipe)
    spent last on the labeled rows alone, from the mixed phase's weights with a fresh warmup and
    cosine at finetune_lr x train.lr; 0: one phase. Pre-training on pseudo labels, then fine-tuning
    on labels (the Kaggle recipe for pseudo-labeled data): noisy pseudo labels shape the features,
    the labels have the last word. Measured on the demo (0.3, 3 seeds): last student 0.751 -> 0.767
    test AUC, level with its ablation (student - ablation -0.016 -> 0.000)."""
    finetune_lr: float = field(default=0.3, metadata={"gt": 0, "le": 1})
    """Peak learning rate of the fine-tuning phase as a share of train.lr."""
    aux_mask: Literal["off", "masks", "boxes"] = "off"
    """Auxiliary mask loss (SIIM-COVID19): a light decoder head on the classifier's features trained
    beside the class loss on the images' masks, or on masks drawn from their boxes; prediction uses
    only the class head. off: none."""
    aux_mask_weight: float = 0.5
    """Weight of the auxiliary mask loss (BCE + dice) against the class loss."""
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class AugmentConfig:
    randaugment_n: tuple[int, ...] = field(default=(0, 2, 2, 3), metadata={"ge": 0, "min_len": 1})
    """Number of RandAugment ops per generation (0: the light teacher transforms only)."""
    randaugment_m: tuple[int, ...] = field(default=(0, 9, 12, 15), metadata={"ge": 0, "le": 30, "min_len": 1})
    """RandAugment magnitude (0..30) per generation."""
    tta_hflip: bool = True
    """Average predictions over the image and its horizontal flip."""


@dataclass(frozen=True)
class PseudoConfig:
    """How teacher predictions become student targets (pure functions in teacher_student.pseudo)."""

    mode: Literal["soft", "hard"] = "soft"
    """soft: teacher probabilities (sharpened by temperature) as targets; hard: one-hot argmax."""
    temperature: float = field(default=1.0, metadata={"gt": 0})
    """Applied at read time to the stored raw probabilities (<1 sharpens)."""
    labeled_blend: float = field(default=0.3, metadata={"ge": 0, "le": 1})
    """Student target for labeled images: (1 - w) * ground truth + w * OOF soft label."""
    confidence: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    """Keep unlabeled images whose top probability reaches this (ignored if target_precision > 0)."""
    target_precision: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """If > 0, per class the lowest threshold whose OOF precision reaches it."""
    balance: bool = True
    """Noisy-Student balancing: duplicate up to the per-class count, keep the most confident."""
    per_class: int = field(default=0, metadata={"ge": 0})
    """Images per class after balancing; 0: the median of the kept per-class counts."""
    weight: float = field(default=1.0, metadata={"ge": 0})
    """Loss weight of pseudo-labeled images relative to labeled ones."""
    labeled_share: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Share of a classifier student's draws that are labeled images (drawn with replacement); 0:
    every image once per epoch. Why: at matched steps a student with ten pseudo labels per labeled
    image sees each labeled one a tenth as often as the ablation. Measured on the demo (seeds
    0-2, 0.5 vs 0): last student test AUC 0.768 / 0.693 / 0.833 vs 0.768 / 0.653 / 0.833 --
    within the seed spread, so the demo preset leaves it at 0."""
    min_oof_support: int = field(default=10, metadata={"ge": 0})
    """A class threshold read from fewer OOF predictions than this is weak evidence: the class is
    flagged (log, summary, report) and treated as starving."""
    fallback: Literal["top_k", "none"] = "top_k"
    """A starving class (keeps nothing, or weak evidence): top_k keeps its fallback_k most confident
    pool images instead (Noisy Student's rule), flagged as such; none adds nothing (a class that
    keeps nothing stays empty, a weakly supported one keeps what its threshold keeps; flagged)."""
    fallback_k: int = field(default=0, metadata={"ge": 0})
    """Images a starving class keeps with fallback top_k; 0: the median kept count of the others."""


YOLO_LADDER = ("yolov8n.yaml", "yolov8s.yaml", "yolov8m.yaml", "yolov8m.yaml")
EFFDET_LADDER = ("tf_efficientdet_d0", "tf_efficientdet_d1", "tf_efficientdet_d2", "tf_efficientdet_d2")
"""The default detector ladder of each kind: ``detector.kind: effdet`` without a ladder of its own
(or with the YOLO default) gets the effdet one."""
DETECTOR_STRIDE = {"yolo": 32, "effdet": 128}
"""``detector.img_size`` must be a multiple of the kind's largest stride (effdet's pyramid goes to 2**7)."""


@dataclass(frozen=True)
class DetectorConfig:
    enabled: bool = True
    """Train detectors (needs box classes and box-labeled images)."""
    kind: Literal["yolo", "effdet"] = "yolo"
    """yolo (ultralytics, built from YAML) or effdet (efficientdet-pytorch)."""
    ladder: tuple[str, ...] = field(default=YOLO_LADDER, metadata={"min_len": 1})
    """Per generation: an ultralytics YAML (or local .pt) or an effdet name (tf_efficientdet_d0...);
    with kind effdet the default is tf_efficientdet_d0 -> d1 -> d2."""
    img_size: int = field(default=512, metadata={"ge": 32})
    """Detector input size (YOLO: multiple of 32; effdet: multiple of 128)."""
    epochs: int = field(default=20, metadata={"ge": 1})
    """Detector training epochs (teachers; see student_steps)."""
    student_steps: float = field(default=1.0, metadata={"gt": 0})
    """As classifier.student_steps: optimizer steps of detector students and the ablation as a
    multiple of the teacher's."""
    finetune: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """As classifier.finetune: the last share of a detector student's (and the references') steps on
    the labeled images alone, from the mixed phase's best weights, at finetune_lr x lr. Measured on
    the demo (0.3, 3 seeds): last student 0.529 +/- 0.063 -> 0.572 +/- 0.011 test mAP, student -
    ablation -0.059 -> +0.015; the one-phase ablation (0.588) stays above both."""
    finetune_lr: float = field(default=0.3, metadata={"gt": 0, "le": 1})
    """Peak learning rate of the detectors' fine-tuning phase as a share of lr."""
    batch_size: int = field(default=16, metadata={"ge": 1})
    """Images per detector step."""
    lr: float = field(default=1e-3, metadata={"gt": 0})
    """Detector learning rate."""
    conf_floor: float = field(default=0.01, metadata={"ge": 0, "le": 1})
    """Predictions below this score are not kept at all (low, so that WBF and thresholds decide)."""
    iou_thr: float = field(default=0.55, metadata={"gt": 0, "le": 1})
    """WBF: boxes of one class overlapping more than this are fused."""
    skip_box_thr: float = field(default=0.01, metadata={"ge": 0, "le": 1})
    """WBF: predictions scoring below this are ignored."""
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    """WBF score rule; avg divides by the number of models, so boxes few folds saw score low."""
    metric_iou: float = field(default=0.4, metadata={"gt": 0, "le": 1})
    """mAP IoU: 0.4 VinBigData, 0.5 SIIM."""
    target_precision: float = field(default=0.8, metadata={"ge": 0, "le": 1})
    """Per-class pseudo-box score threshold: the lowest that reaches this precision on OOF."""
    threshold_floor: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """A per-class box threshold is never set below this. Why: the low end of an OOF precision curve
    is read from a handful of boxes (measured on the demo: thresholds of 0.03-0.07 chosen on about 11
    OOF boxes kept pool boxes of 0.42-0.85 precision against a 0.8 target)."""
    negative_max_p_abnormal: float = field(default=0.2, metadata={"ge": 0, "le": 1})
    """An unlabeled image with no kept box and P(abnormal) below this becomes a negative."""
    uncertain_floor: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """An image with a box scoring from this up but below its class threshold is left out, even with
    other boxes kept: the student would learn the lesion the teacher was unsure of as background
    (0: off). Also no image with such a box becomes a negative."""
    min_oof_support: int = field(default=10, metadata={"ge": 0})
    """A box class whose threshold is read from fewer OOF boxes than this is weak evidence (flagged,
    treated as starving)."""
    fallback: Literal["top_k", "none", "drop"] = "top_k"
    """A starving box class (keeps no box, or its threshold rests on fewer than min_oof_support OOF
    boxes at or above it): top_k keeps its fallback_k highest-scoring pool boxes (flagged); none
    adds nothing (a weakly supported class keeps what its threshold keeps, flagged); drop keeps no
    box of it at all. With uncertain_floor > 0 the images showing a class that keeps nothing are
    left out rather than taught as background."""
    fallback_k: int = field(default=0, metadata={"ge": 0})
    """Boxes a starving class keeps with fallback top_k; 0: the median kept count of the other classes."""
    randaugment_n: tuple[int, ...] = field(default=(0, 2, 2, 3), metadata={"ge": 0, "min_len": 1})
    """Box-safe RandAugment ops per generation (0: light teacher augmentation)."""
    randaugment_m: tuple[int, ...] = field(default=(0, 6, 9, 12), metadata={"ge": 0, "le": 30, "min_len": 1})
    """Box-safe RandAugment magnitude (0..30) per generation."""
    hflip: bool = True
    """Flip augmentation and flip TTA for the detector. Turn off for lateralised classes
    ("Right Lung" / "Left Lung"): a flipped right lung is a left lung."""
    workers: int = field(default=0, metadata={"ge": 0})
    """Processes for WBF fusion over images (0: in process)."""
    devices: str = ""
    """GPUs one YOLO fold trains on, as ultralytics names them ("0,1,2,3": its own multi-GPU DDP;
    needs the engine installed, as its workers import it); empty: run.device. Prediction uses run.device."""


@dataclass(frozen=True)
class GateConfig:
    mode: Literal["hard", "soft", "off"] = "hard"
    """hard: VinBigData three-zone gate; soft: box scores times P(abnormal); off: detector alone."""
    low: float = field(default=0.08, metadata={"ge": 0, "le": 1})
    """Below this P(abnormal) an image gets only the 'No finding' prediction."""
    high: float = field(default=0.95, metadata={"ge": 0, "le": 1})
    """From this P(abnormal) up, boxes stand without a 'No finding' prediction."""
    tune_on_oof: bool = True
    """Choose low/high on OOF predictions for the best mAP including 'No finding'."""


@dataclass(frozen=True)
class RunConfig:
    cycles: int = field(default=3, metadata={"ge": 0})
    """Teacher -> student cycles after cycle 0."""
    tasks: tuple[Literal["classifier", "detector", "segmenter", "grader"], ...] = field(
        default=("classifier", "detector"), metadata={"min_len": 1})
    """Task kinds the run trains, in order; the study classifier comes first (the detector's
    negatives and the final gate read its P(abnormal)); a segmenter without a cascade may run
    alone. A kind without labels in the data is skipped. grader: the ordinal grade (see grader.*)."""
    out: str = "runs/demo"
    """Run directory; rerunning into it resumes."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    seed: int = field(default=0, metadata={"ge": 0})
    """Global seed; the same seed gives the same pseudo labels and summary."""
    workers: int = field(default=2, metadata={"ge": 0})
    """Processes for building the preprocessing cache."""
    ablation: bool = True
    """Also train the ablation: the last student's exact recipe (model, noise, optimizer steps,
    folds) on the labeled images only. ``student - ablation`` is what the pseudo labels gave."""
    oracle: bool = True
    """Also train the oracle: the last student's recipe on every label (labeled + the pool's hidden
    truth), with its own step budget and early stopping, when the dataset has hidden truth (the demo
    does): the ceiling ``gap_closed`` is read against."""
    oracle_steps: float = field(default=3.0, metadata={"gt": 0})
    """The oracle's optimizer-step budget as a multiple of the teacher's; keep it at least the
    students' (it sees several times the images: with the teacher's steps it would be a
    same-compute peer, not a ceiling)."""
    oracle_patience: int = field(default=5, metadata={"ge": 0})
    """Early stopping of the oracle: epochs without a better validation score (its fold's labeled images)."""
    cache_dir: str = ""
    """Preprocessing cache; empty: <out>/cache. Share one between runs to decode each image once."""
    tensorboard: bool = False
    """Write TensorBoard scalars of every fold model (losses, metric, learning rate per epoch, live)
    under <out>/tensorboard: ``tensorboard --logdir <out>``. Needs the tensorboard package (extra
    ``[tensorboard]``); the run stops with one line if it is missing."""
    executor: Literal["local", "processes", "ray"] = "local"
    """Where the independent fold trainings (and per-fold predictions) of a step run: local (one after
    another in this process), processes (a process pool on this machine, one torch thread per worker)
    or ray (Ray tasks on a cluster or a local Ray; pip install '.[ray]'). Results are the same files."""
    fold_workers: int = 2
    """Folds trained at once by the processes executor (and the CPUs of a local Ray)."""
    ray_address: str = ""
    """Ray cluster to run on ("auto", "ray://head:10001"); empty: a local Ray started for the run."""
    ray_num_cpus_per_fold: float = 1.0
    """CPUs each fold's Ray task asks for (and its torch threads)."""
    ray_num_gpus_per_fold: float = 0.0
    """GPUs each fold's Ray task asks for (a fraction shares one); Ray shows each task only its own."""


@dataclass(frozen=True)
class EngineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    grader: GraderConfig = field(default_factory=GraderConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    run: RunConfig = field(default_factory=RunConfig)


def matched_epochs(teacher_epochs: int, teacher_images: int, images: int, steps_factor: float = 1.0) -> int:
    """Epochs giving a model trained on ``images`` ``steps_factor`` times the teacher's optimizer
    steps. Why steps, not epochs: pseudo labels multiply a student's images; matching epochs would
    slow every generation by that ratio, matching steps keeps each generation's cost a choice."""
    return max(1, round(teacher_epochs * steps_factor * teacher_images / max(images, 1)))


def finetune_epochs(epochs: int, images: int, labeled_images: int, share: float) -> tuple[int, int]:
    """(mixed, labeled-only) epochs of a student that spends the last ``share`` of its optimizer
    steps on ground truth alone, the total steps unchanged: ``epochs`` over ``images`` become
    (1 - share) of them over the same images, then share x epochs x images / labeled_images epochs
    over the labeled ones. Why: the pseudo labels as pre-training, the labels as the last word
    (pre-train on pseudo labels, fine-tune on labels). share 0 (or no labeled image): (epochs, 0)."""
    if share <= 0 or labeled_images <= 0:
        return epochs, 0
    mixed = max(1, round(epochs * (1 - share)))
    return mixed, max(1, round(epochs * share * images / labeled_images))


def detector_preprocess(cfg: EngineConfig) -> PreprocessConfig:
    """The preprocessing detectors read: the run's, cached at the detector's own input size.

    Why its own size: a detector needs its lesions to be objects of several pixels at its input
    size (measured on the demo: at 64 px YOLO assigns no positives, at 128 px it learns), while a
    classifier may read a smaller image (faster, and on the demo better); caching at the input size
    also spares the detector a second resize."""
    return replace(cfg.preprocess, size=cfg.detector.img_size)


def ladder_value(values: tuple, generation: int):
    """The ladder entry for a generation. A one-entry ladder holds for every generation; a longer one
    is checked at load to cover generations 0..run.cycles (past it, the oracle and ablation of the
    last generation, it repeats its last rung)."""
    if not values:
        raise ConfigError("a model/noise ladder must have at least one entry")
    return values[min(generation, len(values) - 1)]


# ---------------------------------------------------------------------------- loading


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, with a clear error naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads a bare off (mode=off on the command line) as false
            value = "off"
        if not isinstance(value, (str, int, float, bool)) or value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{_hint(str(value), [str(a) for a in args])}")
        return value
    if origin is tuple:
        if isinstance(value, dict):
            raise ConfigError(f"{where}: expected a list, got a mapping")
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, where) for v in items)
    if annotation in (int, float, str, bool) and isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: expected one {annotation.__name__}, got {type(value).__name__} {value!r}")
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # True is an int to Python, never a number the user meant
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation.__name__}") from None
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(data).__name__} "
                          f"{data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{where}'{_hint(str(key), list(known))}")
        annotation = hints[key]
        if is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, where + ".")
        else:
            kwargs[key] = _coerce(value, annotation, where)
            problem = range_problem(kwargs[key], known[key].metadata)
            if problem:
                raise ConfigError(f"{where}: {problem}")
    return cls(**kwargs)


def kind_defaults(data: dict) -> dict:
    """Defaults that depend on another key: detector.kind effdet without a ladder of its own, or with
    the YOLO default, gets the effdet ladder (a YOLO YAML means nothing to effdet)."""
    det = data.get("detector")
    if isinstance(det, dict) and det.get("kind") == "effdet":
        ladder = det.get("ladder")
        if ladder is None or tuple(ladder if isinstance(ladder, (list, tuple)) else [ladder]) == YOLO_LADDER:
            data = {**data, "detector": {**det, "ladder": list(EFFDET_LADDER)}}
    return data


def config_from_dict(data: dict) -> EngineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections (data, preprocess, ...), got {type(data).__name__}")
    return check_config(_build(EngineConfig, kind_defaults(data), ""))


def check_config(cfg: EngineConfig) -> EngineConfig:
    """Rules across keys, checked at load so a run never starts on a config that cannot finish.

    Every breach found is named (keys and values) in one ConfigError line, so one fix-and-rerun
    covers them all.
    """
    problems = []
    tasks = cfg.run.tasks
    alone = tasks == ("segmenter",) and cfg.segmenter.cascade.mode == "off"
    if tasks and tasks[0] != "classifier" and not alone:
        problems.append(f"run.tasks {list(tasks)}: must start with 'classifier' (the other kinds read its "
                        "predictions; only a segmenter with segmenter.cascade.mode off runs alone)")
    if len(set(tasks)) != len(tasks):
        problems.append(f"run.tasks {list(tasks)}: a task kind is listed twice")
    if cfg.gate.low > cfg.gate.high:
        problems.append(f"gate.low {cfg.gate.low} is above gate.high {cfg.gate.high}")
    low, high = cfg.preprocess.percentile_clip
    if low >= high:
        problems.append(f"preprocess.percentile_clip {[low, high]}: the low percentile must be below the high one")
    g = cfg.grader
    if "grader" in tasks and g.num_grades < 2:
        problems.append(f"grader.num_grades {g.num_grades}: an ordinal scale needs at least 2 grades")
    if "grader" in tasks and g.sampling == "weights" and (len(g.grade_weights) != g.num_grades
                                                          or min(g.grade_weights, default=0) < 0):
        problems.append(f"grader.grade_weights {list(g.grade_weights)}: sampling 'weights' needs "
                        f"{g.num_grades} non-negative values (grader.num_grades)")
    sc = cfg.segmenter
    if "segmenter" in tasks and sc.pixel_confidence and sc.pseudo_mode != "hard":
        problems.append(f"segmenter.pixel_confidence {sc.pixel_confidence}: leaves uncertain pixels out of hard pseudo "
                        f"masks only; segmenter.pseudo_mode is {sc.pseudo_mode!r} (soft targets keep every pixel)")
    devices = cfg.detector.devices
    if devices and (cfg.detector.kind != "yolo" or not re.fullmatch(r"\d+(,\d+)*", devices)):
        problems.append(f"detector.devices {devices!r}: a list of GPU indices such as '0,1', for detector.kind yolo "
                        "(ultralytics' own multi-GPU); effdet trains on run.device")
    problems += _ladder_problems(cfg)
    problems += _model_problems(cfg)
    device = check_device_name(cfg.run.device)
    if device:
        problems.append(device)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def _ladder_problems(cfg: EngineConfig) -> list[str]:
    """Per-generation settings: one entry (every generation), or one per generation 0..run.cycles."""
    need = cfg.run.cycles + 1
    ladders = {"classifier.ladder": cfg.classifier.ladder, "classifier.drop_rate": cfg.classifier.drop_rate,
               "classifier.drop_path_rate": cfg.classifier.drop_path_rate,
               "augment.randaugment_n": cfg.augment.randaugment_n, "augment.randaugment_m": cfg.augment.randaugment_m}
    if _detector_on(cfg):
        ladders.update({"detector.ladder": cfg.detector.ladder, "detector.randaugment_n": cfg.detector.randaugment_n,
                        "detector.randaugment_m": cfg.detector.randaugment_m})
    return [f"{key} has {len(values)} entries but run.cycles {cfg.run.cycles} trains generations 0..{need - 1}: "
            f"give {need} (or one for every generation)" for key, values in ladders.items() if 1 < len(values) < need]


def _detector_on(cfg: EngineConfig) -> bool:
    return cfg.detector.enabled and "detector" in cfg.run.tasks


def _model_problems(cfg: EngineConfig) -> list[str]:
    """Model names that the libraries would refuse minutes into the run, and detector input sizes."""
    import timm

    out = [f"classifier.ladder: unknown timm model {name!r}{_close(name, timm.list_models())}"
           for name in dict.fromkeys(cfg.classifier.ladder) if not timm.is_model(name)]
    if not _detector_on(cfg):
        return out
    kind, size = cfg.detector.kind, cfg.detector.img_size
    if size % DETECTOR_STRIDE[kind]:
        out.append(f"detector.img_size {size}: {kind} needs a multiple of {DETECTOR_STRIDE[kind]} "
                   f"(e.g. {max(1, round(size / DETECTOR_STRIDE[kind])) * DETECTOR_STRIDE[kind]})")
    wrong = [name for name in cfg.detector.ladder if not _detector_model_known(kind, name)]
    if wrong:
        example = "tf_efficientdet_d0" if kind == "effdet" else "yolov8n.yaml"
        out.append(f"detector.ladder {wrong}: not {kind} models (detector.kind {kind}); e.g. {example}")
    return out


def _close(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _detector_model_known(kind: str, name: str) -> bool:
    """YOLO: an ultralytics YAML or a .pt file (the name says which model scale); effdet: a model in
    effdet's registry of configurations."""
    if kind == "yolo":
        return name.lower().endswith((".yaml", ".yml", ".pt"))
    with warnings.catch_warnings():  # effdet's import warns about torch.jit.script: not the user's concern
        warnings.simplefilter("ignore")
        from effdet.config.model_config import efficientdet_model_param_dict

    return name in efficientdet_model_param_dict


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> EngineConfig:
    """Defaults <- base dict <- YAML file <- overrides, validated into frozen dataclasses."""
    data: dict = json.loads(json.dumps(base or {}))
    if path:
        loaded = read_yaml(Path(path))
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, preprocess, ...), got "
                              f"{type(loaded).__name__}")
        data = deep_merge(data, loaded)
    return config_from_dict(apply_overrides(data, overrides or []))


def with_changes(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, named for readability at call sites."""
    return replace(cfg, **changes)
