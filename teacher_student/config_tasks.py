"""Config sections of the task kinds beyond the classifier and the detector: masks and grades.

Split from ``config.py`` by idea (each is a task kind's own section); ``EngineConfig`` holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..loops.config import TrainConfig


def _segmenter_train() -> TrainConfig:
    return TrainConfig(epochs=30, batch_size=16, lr=3e-3, warmup_epochs=2.0)


@dataclass(frozen=True)
class CascadeConfig:
    """The final classification -> segmentation cascade (SIIM-ACR): P(positive) gates the mask."""

    mode: Literal["hard", "soft", "off"] = "hard"
    """hard: below the threshold the image gets an empty mask; soft: mask probability x P(positive); off."""
    threshold: float = 0.5
    """hard mode: P(positive) below this empties the mask (tuned on OOF unless tune_on_oof is off)."""
    tune_on_oof: bool = True
    """Choose the gate threshold and the pixel threshold on OOF predictions for the best mean dice,
    empty images included (an empty answer on an empty image scores 1)."""


@dataclass(frozen=True)
class SegmenterConfig:
    """Masks (teacher_student.tasks.segmenter): smp models over timm encoders, pseudo masks, the cascade."""

    ladder: tuple[str, ...] = ("Unet:tu-efficientnet_b0", "Unet:tu-efficientnet_b1", "Unet:tu-efficientnet_b2")
    """segmentation_models_pytorch architecture and encoder per generation, 'Arch:encoder' (Unet, FPN,
    UnetPlusPlus...; tu-<name> is any timm encoder). One input channel, encoder_weights None."""
    decoder_channels: tuple[int, ...] = ()
    """Unet / Unet++ decoder widths, one per encoder stage (empty: smp's 256, 128, 64, 32, 16); narrow
    ones make tiny CPU models (the demo's 64, 32, 16, 16, 8 costs a third of the default's time)."""
    drop_rate: tuple[float, ...] = (0.0, 0.1, 0.2)
    """Dropout before the segmentation head, per generation (student noise)."""
    drop_path_rate: tuple[float, ...] = (0.0, 0.1, 0.2)
    """Stochastic depth of the timm encoder, per generation (student noise)."""
    randaugment_n: tuple[int, ...] = (0, 2, 2)
    """Mask-safe RandAugment ops per generation (0: light teacher augmentation)."""
    randaugment_m: tuple[int, ...] = (0, 6, 9)
    """Mask-safe RandAugment magnitude (0..30) per generation."""
    cutmix: tuple[float, ...] = field(default=(0.0,), metadata={"ge": 0, "le": 1, "min_len": 1})
    """Share of each training batch's images that get a rectangle (a quarter to a half of the image)
    of another image of the batch pasted in, its mask with it (``augment.mix``), per generation.
    Student noise from semi-supervised segmentation (CutMix; French et al. 2020, ST++): a student
    under the teacher's mild noise learns the teacher's boundaries back. Applies to every image a
    generation trains on, so the ablation (the student's recipe) has it too; 0: off. Measured on
    cxr_lungs (seed 0, [0.0, 0.5]): student 0.914, ablation 0.922 test dice -- as without it."""
    hflip: bool = True
    """Flip augmentation and flip TTA (flipped back before averaging). Off for lateralised masks."""
    dice_weight: float = 1.0
    """Loss = BCE + dice_weight x soft dice, per image."""
    empty_weight: float = 1.0
    """Loss weight of images whose (ground-truth or pseudo) mask is empty. SIIM-ACR's segmenters
    trained mostly on positive images and left the empty ones to the classifier's gate: with few
    small lesions, full-weight empty images teach a from-scratch model to draw nothing at all
    (measured on the demo: 1.0 -> every mask empty; 0.1 -> dice 0.38 on the positive test images)."""
    student_steps: float = 1.0
    """As classifier.student_steps: optimizer steps of mask students and the ablation, as a multiple of the teacher's."""
    train: TrainConfig = field(default_factory=_segmenter_train)
    pixel_threshold: float = 0.0
    """Probability from which a pixel is foreground; 0: chosen on OOF for the best mean dice."""
    confidence: Literal["inside", "agreement"] = "inside"
    """Image-level confidence of a pseudo mask: inside = mean probability inside the mask (1 - the
    peak probability for an empty one); agreement = the fold models' mean pairwise dice."""
    target_dice: float = 0.85
    """Pseudo masks: the lowest confidence whose OOF images reach this mean dice (per-image) is the
    threshold; images below it are not used."""
    min_oof_support: int = 10
    """Confidence thresholds read from fewer OOF images than this are weak evidence (flagged); with
    no threshold reaching target_dice, the top fallback_k pool images are kept instead (flagged)."""
    fallback_k: int = 0
    """Pool images kept when no threshold reaches target_dice; 0: none."""
    pseudo_mode: Literal["hard", "soft"] = "hard"
    """hard: the student learns the pseudo mask thresholded at the pixel threshold; soft: the probabilities."""
    pixel_confidence: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """hard mode: pseudo-mask pixels whose probability is neither >= this nor <= 1 - this are left
    out of the student's loss (the teacher's uncertain band, mostly its boundaries); 0: every pixel counts
    (refused with pseudo_mode soft, whose targets keep every pixel).
    Measured on cxr_lungs (data.hidden_fraction 0.4, 3 seeds, 0.9): student - ablation -0.011 against
    -0.006 without -- the band holds 80% of the teacher's pixel errors, but also the boundaries dice scores."""
    pseudo_weight: float = 1.0
    """Loss weight of pseudo-masked images relative to labeled ones."""
    labeled_share: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """Share of a student's draws that are ground-truth images (drawn with replacement); 0: every
    image once per epoch. Why: at matched optimizer steps pseudo masks dilute the labeled images (a
    student with as many pseudo as labeled images sees each labeled one half as often as the
    ablation). Measured on cxr_lungs (seed 0): 0.75 left test dice where 0 had it (0.922 vs 0.921;
    ablation 0.928) -- the dilution is not what holds the student back there."""
    finetune: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    """As classifier.finetune: the last share of a mask student's (and the references') steps on
    ground-truth masks alone, from the mixed phase's weights, at finetune_lr x train.lr. Measured on
    cxr_lungs (data.hidden_fraction 0.4, 3 seeds, 0.3): student - ablation -0.004 +/- 0.001 test dice."""
    finetune_lr: float = field(default=0.3, metadata={"gt": 0, "le": 1})
    """Peak learning rate of the segmenters' fine-tuning phase as a share of train.lr."""
    cascade: CascadeConfig = field(default_factory=CascadeConfig)


@dataclass(frozen=True)
class GraderConfig:
    """The ordinal grader (``run.tasks`` includes "grader"): a grade 0..K-1 per image, cumulative
    targets with BCE, thresholds chosen on OOF for the best QWK and saved in the checkpoint."""

    num_grades: int = 5
    """K: grades are integers 0..K-1 (the model has K-1 sigmoid outputs, one per step "grade >= k")."""
    grade_column: str = "grade"
    """Column of grades_csv holding the grade (the shared set: geographic_mean)."""
    grades_csv: str = ""
    """CSV with image_id and grade_column, relative to data.root; empty: the demo's grades.csv, or
    data.images_csv for the generic format. An empty cell is an unknown grade; a bad one is quarantined."""
    grade_rounding: Literal["none", "nearest"] = "none"
    """none: a non-integer grade is bad input (quarantined); nearest: round half up, floor(x + 0.5),
    for grades that are means of several raters."""
    ladder: tuple[str, ...] = ("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
    """timm model per generation (K-1 outputs): ladder[0] is the cycle-0 teacher, ladder[c] the student of cycle c."""
    drop_rate: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4)
    """Dropout before the head, per generation (student noise)."""
    drop_path_rate: tuple[float, ...] = (0.0, 0.1, 0.2, 0.2)
    """Stochastic depth, per generation (student noise)."""
    pretrained: str = ""
    """As classifier.pretrained: empty random init, 'timm', or a local state dict."""
    student_steps: float = 1.0
    """Optimizer steps of grader students and the ablation as a multiple of the teacher's."""
    sampling: Literal["uniform", "inverse_frequency", "weights"] = "uniform"
    """How training samples are drawn: uniform shuffling; inverse_frequency (WeightedRandomSampler,
    every grade as often); weights (grade_weights per grade)."""
    grade_weights: tuple[float, ...] = ()
    """Per-grade draw weights (num_grades values) for sampling: weights."""
    selection_metric: Literal["qwk", "loss"] = "qwk"
    """The epoch kept: best validation QWK (expected grade rounded; thresholds are fitted after) or lowest loss."""
    min_margin: float = 0.25
    """A pseudo grade is kept when its expected grade lies at least this far (in grades) from the
    nearest threshold (ignored if target_accuracy > 0). Balancing, the starving-grade fallback,
    soft/hard targets, temperature, labeled_blend and weight: the pseudo.* settings, per grade."""
    target_accuracy: float = 0.0
    """If > 0, per grade the lowest margin whose OOF predictions of that grade are right this often."""
    train: TrainConfig = field(default_factory=TrainConfig)
