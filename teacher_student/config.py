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
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ..datasets.config import DataConfig, FoldConfig, PreprocessConfig, config_to_dict, fingerprint
from ..datasets.errors import ConfigError
from ..loops.config import TrainConfig

PRESETS = Path(__file__).resolve().parent / "presets"
"""The built-in configs: ``demo.yaml`` (the default of ``run_cycle.py``) and worked examples."""


@dataclass(frozen=True)
class ClassifierConfig:
    ladder: tuple[str, ...] = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
    """timm model per generation: ladder[0] is the cycle-0 teacher, ladder[c] the student of cycle c."""
    drop_rate: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4)
    """Dropout before the classifier head, per generation (student noise)."""
    drop_path_rate: tuple[float, ...] = (0.0, 0.1, 0.2, 0.2)
    """Stochastic depth, per generation (student noise)."""
    pretrained: str = ""
    """Empty: random init. 'timm' downloads timm's weights; a path loads a local state dict."""
    loss: Literal["auto", "softmax", "bce"] = "auto"
    """auto: softmax cross-entropy for multiclass labels, BCE for multilabel."""
    student_steps: float = 1.0
    """Optimizer steps of students (generation >= 1) and of the ablation, as a multiple of the
    teacher's (train.epochs over the teacher's images). Noisy Student trains its students longer:
    pseudo labels add images, and a student that sees each of them less often than the teacher saw
    its labels stays undertrained (measured on the demo: at 1x the pseudo labels gave nothing)."""
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class AugmentConfig:
    randaugment_n: tuple[int, ...] = (0, 2, 2, 3)
    """Number of RandAugment ops per generation (0: the light teacher transforms only)."""
    randaugment_m: tuple[int, ...] = (0, 9, 12, 15)
    """RandAugment magnitude (0..30) per generation."""
    tta_hflip: bool = True
    """Average predictions over the image and its horizontal flip."""


@dataclass(frozen=True)
class PseudoConfig:
    """How teacher predictions become student targets (pure functions in teacher_student.pseudo)."""

    mode: Literal["soft", "hard"] = "soft"
    """soft: teacher probabilities (sharpened by temperature) as targets; hard: one-hot argmax."""
    temperature: float = 1.0
    """Applied at read time to the stored raw probabilities (<1 sharpens)."""
    labeled_blend: float = 0.3
    """Student target for labeled images: (1 - w) * ground truth + w * OOF soft label."""
    confidence: float = 0.5
    """Keep unlabeled images whose top probability reaches this (ignored if target_precision > 0)."""
    target_precision: float = 0.0
    """If > 0, per class the lowest threshold whose OOF precision reaches it."""
    balance: bool = True
    """Noisy-Student balancing: duplicate up to the per-class count, keep the most confident."""
    per_class: int = 0
    """Images per class after balancing; 0: the median of the kept per-class counts."""
    weight: float = 1.0
    """Loss weight of pseudo-labeled images relative to labeled ones."""
    min_oof_support: int = 10
    """A class threshold read from fewer OOF predictions than this is weak evidence: the class is
    flagged (log, summary, report) and treated as starving."""
    fallback: Literal["top_k", "none"] = "top_k"
    """A starving class (keeps nothing, or weak evidence): top_k keeps its fallback_k most confident
    pool images instead (Noisy Student's rule), flagged as such; none: it keeps nothing (flagged)."""
    fallback_k: int = 0
    """Images a starving class keeps with fallback top_k; 0: the median kept count of the others."""


@dataclass(frozen=True)
class DetectorConfig:
    enabled: bool = True
    """Train detectors (needs box classes and box-labeled images)."""
    kind: Literal["yolo", "effdet"] = "yolo"
    """yolo (ultralytics, built from YAML) or effdet (efficientdet-pytorch)."""
    ladder: tuple[str, ...] = ("yolov8n.yaml", "yolov8s.yaml", "yolov8m.yaml", "yolov8m.yaml")
    """Per generation: an ultralytics YAML (or local .pt) or an effdet name (tf_efficientdet_d0...)."""
    img_size: int = 512
    """Detector input size (YOLO: multiple of 32; effdet: multiple of 128)."""
    epochs: int = 20
    """Detector training epochs (teachers; see student_steps)."""
    student_steps: float = 1.0
    """As classifier.student_steps: optimizer steps of detector students and the ablation as a
    multiple of the teacher's."""
    batch_size: int = 16
    """Images per detector step."""
    lr: float = 1e-3
    """Detector learning rate."""
    conf_floor: float = 0.01
    """Predictions below this score are not kept at all (low, so that WBF and thresholds decide)."""
    iou_thr: float = 0.55
    """WBF: boxes of one class overlapping more than this are fused."""
    skip_box_thr: float = 0.01
    """WBF: predictions scoring below this are ignored."""
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    """WBF score rule; avg divides by the number of models, so boxes few folds saw score low."""
    metric_iou: float = 0.4
    """mAP IoU: 0.4 VinBigData, 0.5 SIIM."""
    target_precision: float = 0.8
    """Per-class pseudo-box score threshold: the lowest that reaches this precision on OOF."""
    negative_max_p_abnormal: float = 0.2
    """An unlabeled image with no kept box and P(abnormal) below this becomes a negative."""
    uncertain_floor: float = 0.0
    """An image with a box scoring from this up but below its class threshold is left out, even with
    other boxes kept: the student would learn the lesion the teacher was unsure of as background
    (0: off). Also no image with such a box becomes a negative."""
    min_oof_support: int = 10
    """A box class whose threshold is read from fewer OOF boxes than this is weak evidence (flagged,
    treated as starving)."""
    fallback: Literal["top_k", "none"] = "top_k"
    """A starving box class: top_k keeps its fallback_k highest-scoring pool boxes (flagged); none: none."""
    fallback_k: int = 0
    """Boxes a starving class keeps with fallback top_k; 0: the median kept count of the other classes."""
    randaugment_n: tuple[int, ...] = (0, 2, 2, 3)
    """Box-safe RandAugment ops per generation (0: light teacher augmentation)."""
    randaugment_m: tuple[int, ...] = (0, 6, 9, 12)
    """Box-safe RandAugment magnitude (0..30) per generation."""
    hflip: bool = True
    """Flip augmentation and flip TTA for the detector. Turn off for lateralised classes
    ("Right Lung" / "Left Lung"): a flipped right lung is a left lung."""
    workers: int = 0
    """Processes for WBF fusion over images (0: in process)."""
    devices: str = ""
    """GPUs one YOLO fold trains on, as ultralytics names them ("0,1,2,3": its own multi-GPU DDP;
    needs the engine installed, as its workers import it); empty: run.device. Prediction uses run.device."""


@dataclass(frozen=True)
class GateConfig:
    mode: Literal["hard", "soft", "off"] = "hard"
    """hard: VinBigData three-zone gate; soft: box scores times P(abnormal); off: detector alone."""
    low: float = 0.08
    """Below this P(abnormal) an image gets only the 'No finding' prediction."""
    high: float = 0.95
    """From this P(abnormal) up, boxes stand without a 'No finding' prediction."""
    tune_on_oof: bool = True
    """Choose low/high on OOF predictions for the best mAP including 'No finding'."""


@dataclass(frozen=True)
class RunConfig:
    cycles: int = 3
    """Teacher -> student cycles after cycle 0."""
    tasks: tuple[Literal["classifier", "detector"], ...] = ("classifier", "detector")
    """Task kinds the run trains, in order; the study classifier comes first (the detector's
    negatives and the final gate read its P(abnormal)). A kind without labels in the data is skipped."""
    out: str = "runs/demo"
    """Run directory; rerunning into it resumes."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    seed: int = 0
    """Global seed; the same seed gives the same pseudo labels and summary."""
    workers: int = 2
    """Processes for building the preprocessing cache."""
    ablation: bool = True
    """Also train the ablation: the last student's exact recipe (model, noise, optimizer steps,
    folds) on the labeled images only. ``student - ablation`` is what the pseudo labels gave."""
    oracle: bool = True
    """Also train the oracle: the last student's recipe on every label (labeled + the pool's hidden
    truth), with its own step budget and early stopping, when the dataset has hidden truth (the demo
    does): the ceiling ``gap_closed`` is read against."""
    oracle_steps: float = 3.0
    """The oracle's optimizer-step budget as a multiple of the teacher's; keep it at least the
    students' (it sees several times the images: with the teacher's steps it would be a
    same-compute peer, not a ceiling)."""
    oracle_patience: int = 5
    """Early stopping of the oracle: epochs without a better validation score (its fold's labeled images)."""
    cache_dir: str = ""
    """Preprocessing cache; empty: <out>/cache. Share one between runs to decode each image once."""
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
    gate: GateConfig = field(default_factory=GateConfig)
    run: RunConfig = field(default_factory=RunConfig)


def matched_epochs(teacher_epochs: int, teacher_images: int, images: int, steps_factor: float = 1.0) -> int:
    """Epochs giving a model trained on ``images`` ``steps_factor`` times the teacher's optimizer
    steps. Why steps, not epochs: pseudo labels multiply a student's images; matching epochs would
    slow every generation by that ratio, matching steps keeps each generation's cost a choice."""
    return max(1, round(teacher_epochs * steps_factor * teacher_images / max(images, 1)))


def ladder_value(values: tuple, generation: int):
    """The ladder entry for a generation; a short ladder repeats its last rung."""
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
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{_hint(str(value), [str(a) for a in args])}")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, where) for v in items)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation.__name__}") from None
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{where}'{_hint(key, known)}")
        annotation = hints[key]
        if is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, where + ".")
        else:
            kwargs[key] = _coerce(value, annotation, where)
    return cls(**kwargs)


def config_from_dict(data: dict) -> EngineConfig:
    return check_config(_build(EngineConfig, data, ""))


def check_config(cfg: EngineConfig) -> EngineConfig:
    """Rules across keys, checked at load so a run never starts on a config that cannot finish;
    each breach is one ConfigError line naming the keys."""
    tasks = cfg.run.tasks
    if not tasks or tasks[0] != "classifier":
        raise ConfigError(f"run.tasks {list(tasks)}: must start with 'classifier' (the other kinds read its predictions)")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"run.tasks {list(tasks)}: a task kind is listed twice")
    devices = cfg.detector.devices
    if devices and (cfg.detector.kind != "yolo" or not re.fullmatch(r"\d+(,\d+)*", devices)):
        raise ConfigError(f"detector.devices {devices!r}: a list of GPU indices such as '0,1', for detector.kind yolo "
                          "(ultralytics' own multi-GPU); effdet trains on run.device")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'detector.epochs=3' -> (['detector', 'epochs'], 3) with YAML scalar parsing of the value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply key.sub=value overrides to a plain dict (validated later by config_from_dict)."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> EngineConfig:
    """Defaults <- base dict <- YAML file <- overrides, validated into frozen dataclasses."""
    data: dict = json.loads(json.dumps(base or {}))
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        data = _deep_merge(data, loaded)
    return config_from_dict(apply_overrides(data, overrides or []))


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_changes(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, named for readability at call sites."""
    return replace(cfg, **changes)


def config_reference() -> list[tuple[str, str, str]]:
    """(key, default, description) for every config key, descriptions taken from the docstrings
    under each field of the section classes (the README's config reference is generated from this)."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        docs = _field_docs(cls)
        default = cls()
        for f in fields(cls):
            value = getattr(default, f.name)
            if is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                shown = json.dumps(list(value) if isinstance(value, tuple) else value)
                rows.append((f"{prefix}{f.name}", shown, docs.get(f.name, "")))

    walk(EngineConfig, "")
    return rows


REFERENCE_START = "<!-- config reference: generated by `python run_cycle.py --config-reference` -->"
REFERENCE_END = "<!-- end of config reference -->"


def config_reference_markdown() -> str:
    """The README's config table, between its two marker lines (a test compares them)."""
    lines = [REFERENCE_START, "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in config_reference()]
    return "\n".join(lines + [REFERENCE_END])


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass, read from its source."""
    import ast
    import inspect
    import textwrap

    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(node.body, node.body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs
