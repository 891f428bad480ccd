"""Transforms by role: light for teachers, RandAugment noise for students, box-safe for detectors.

Every transform takes and returns a ``uint8`` image of shape (H, W) (or (H, W, 1)) from the
preprocessing cache; conversion to a normalized float tensor happens later, in the dataset, once.

Why these ops: Noisy Student's RandAugment list is made for colour photographs. Radiographs are one
channel, so colour ops (hue, saturation, colour balance) are left out and so is solarize (it inverts
bright bone, something no detector ever sees); grey-level ops that mimic real acquisition
differences (exposure, gamma, CLAHE-like processing, sharpening kernels of vendors, quantum noise,
bit depth) are in. Horizontal flip is standard in the chest X-ray competitions although a chest is
not left-right symmetric; it can be switched off (``hflip=False``), which a detector with
lateralized classes ("Right Lung", "Left Lung") must do.

Magnitude M is on RandAugment's 0..30 scale. Each op's range grows linearly with M; values are
drawn uniformly in [-mag, +mag] (or [identity, mag] for one-sided ops), the "magnitude up to M"
variant that timm's ``mstd`` and TrivialAugment use, so an image is never always at the extreme.
"""
from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
import numpy as np

M_MAX = 30
N_OPS = 13
"""Length of the RandAugment op list (``_ops``)."""
BBOX_LABELS = "class_ids"
"""Name of the label field that travels with the boxes through a detection transform."""


class BankedGaussNoise(A.ImageOnlyTransform):
    """Additive Gaussian noise cut from a pre-drawn bank (albumentations' GaussNoise, ~10x cheaper).

    Why: drawing 512 x 512 normal numbers per image costs ~3 ms, more than every other op together;
    a random window of a bank twice the image size, randomly mirrored, is as good a noise field for
    augmentation and costs one scaled add. ``std_range`` is a fraction of 255, as in GaussNoise.
    Works on (H, W), (H, W, 1) and (H, W, 3) uint8 (ultralytics passes 3-channel images).
    """

    def __init__(self, std_range: tuple[float, float] = (0.0, 0.08), p: float = 0.5):
        super().__init__(p=p)
        self.std_range = (float(std_range[0]), float(std_range[1]))
        self._bank: np.ndarray | None = None

    def bank(self, h: int, w: int) -> np.ndarray:
        if self._bank is None or self._bank.shape[0] < 2 * h or self._bank.shape[1] < 2 * w:
            self._bank = np.random.default_rng(0).standard_normal((2 * h, 2 * w), dtype=np.float32)
        return self._bank

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        h, w = params["shape"][:2]
        bank = self.bank(h, w)
        return {
            "sigma": self.py_random.uniform(*self.std_range) * 255.0,
            "top": self.py_random.randint(0, bank.shape[0] - h),
            "left": self.py_random.randint(0, bank.shape[1] - w),
            "mirror": self.py_random.random() < 0.5,
        }

    def apply(self, img: np.ndarray, sigma: float, top: int, left: int, mirror: bool, **params) -> np.ndarray:
        noise = self.bank(*img.shape[:2])[top:top + img.shape[0], left:left + img.shape[1]]
        noise = (noise[:, ::-1] if mirror else noise) * sigma
        channels = img.shape[2] if img.ndim == 3 else 1
        if channels > 1:  # a gray image replicated to RGB (ultralytics) stays gray: one field for all
            noise = np.repeat(noise[..., None], channels, axis=2)
        return cv2.add(img, noise.reshape(img.shape), dtype=cv2.CV_8U).reshape(img.shape)  # rounds, saturates

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std_range",)


def _ops(m: float, boxes: bool) -> list[A.BasicTransform]:
    """The RandAugment op list at magnitude ``m``, every op applied with p=1 (SomeOf picks them).

    Box-safe lists use half the rotation and shear, and the tighter "ellipse" box after rotation,
    because an axis-aligned box around a rotated box grows and teaches the detector loose boxes.
    """
    f = float(np.clip(m, 0, M_MAX)) / M_MAX
    geo = 0.5 if boxes else 1.0
    rotate_method = "ellipse" if boxes else "largest_box"
    affine = dict(p=1.0, border_mode=cv2.BORDER_CONSTANT, fill=0, rotate_method=rotate_method)
    return [
        A.Affine(rotate=(-30 * f * geo, 30 * f * geo), **affine),
        A.Affine(shear={"x": (-15 * f * geo, 15 * f * geo), "y": (0, 0)}, **affine),
        A.Affine(translate_percent={"x": (-0.15 * f, 0.15 * f), "y": (-0.15 * f, 0.15 * f)}, **affine),
        A.Affine(scale=(1 - 0.25 * f, 1 + 0.25 * f), **affine),
        A.RandomBrightnessContrast(brightness_limit=(-0.4 * f, 0.4 * f), contrast_limit=(0, 0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=(-0.4 * f, 0.4 * f), p=1.0),
        A.RandomGamma(gamma_limit=(100 - 40 * f, 100 + 40 * f), p=1.0),
        A.CLAHE(clip_limit=(1.0, 1.0 + 3.0 * f), tile_grid_size=(8, 8), p=1.0),
        A.Sharpen(alpha=(0.0, 0.6 * f), lightness=(1.0, 1.0), p=1.0),
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 0.1 + 1.9 * f), p=1.0),
        BankedGaussNoise(std_range=(0.0, 0.08 * f), p=1.0),
        A.Equalize(p=f),  # no magnitude of its own: at full strength even at M=1 it remaps every grey level
        A.Posterize(num_bits=int(np.clip(round(8 - 4 * f), 4, 7)), p=1.0),
    ]


def _dropout(m: float, p_max: float) -> A.CoarseDropout:
    """Random erasing as extra noise: more likely, more and larger holes as M grows."""
    f = float(np.clip(m, 0, M_MAX)) / M_MAX
    return A.CoarseDropout(
        num_holes_range=(1, max(1, round(4 * f))),
        hole_height_range=(0.04, 0.04 + 0.08 * f),
        hole_width_range=(0.04, 0.04 + 0.08 * f),
        fill=0,
        p=p_max * f,
    )


def _light(hflip: bool) -> list[A.BasicTransform]:
    """Teacher-level augmentation: small shift/scale/rotate and exposure changes."""
    ops = [A.HorizontalFlip(p=0.5)] if hflip else []
    return ops + [
        A.Affine(rotate=(-7, 7), translate_percent=(-0.05, 0.05), scale=(0.93, 1.07),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


def _check(size: int, n: int, m: float) -> None:
    if size < 8:
        raise ValueError(f"image size must be >= 8, got {size}")
    if not 0 <= n <= N_OPS:
        raise ValueError(f"RandAugment n must be in 0..{N_OPS}, got {n}")
    if not 0 <= m <= M_MAX:
        raise ValueError(f"RandAugment magnitude m must be in 0..{M_MAX}, got {m}")


def _pipeline(size: int, n: int, m: float, *, hflip: bool, boxes: bool) -> list[A.BasicTransform]:
    """Resize guard, the light ops, then (n > 0) RandAugment(N, M) + random erasing on top.

    Why on top: a student's noise must add to the teacher's augmentation, not replace it (measured
    on the demo, test_resnet at 64 px, 2-fold ensembles on labeled data only: RandAugment n=1, m=5
    in place of the light ops, 0.847 test AUC; the light ops alone, 0.905). The cache already gives
    size x size images, so Resize costs nothing then; it guards against a loader of another size.
    Erasing is half as likely with boxes, since it can remove a whole box.
    """
    _check(size, n, m)
    light = [A.Resize(size, size), *_light(hflip)]
    if n == 0:
        return light
    randaugment = A.SomeOf(_ops(m, boxes=boxes), n=n, replace=False, p=1.0)
    return [*light, randaugment, _dropout(m, 0.25 if boxes else 0.5)]


def teacher_transform(size: int, *, hflip: bool = True, seed: int | None = None) -> A.Compose:
    """Light augmentation for teachers (their predictions should be accurate, not robust)."""
    return A.Compose(_pipeline(size, 0, 0, hflip=hflip, boxes=False), seed=seed)


def student_transform(
    size: int, n: int, m: float, *, hflip: bool = True, seed: int | None = None, record: bool = False,
) -> A.Compose:
    """RandAugment(N, M) plus random erasing: the input noise of a noisy student.

    ``n == 0`` gives the teacher transform (the config's "no RandAugment" rung). ``record`` makes
    every call return ``applied_transforms`` (which ops ran, with their parameters), for tests and
    for looking at what a student saw.
    """
    return A.Compose(_pipeline(size, n, m, hflip=hflip, boxes=False), seed=seed, save_applied_params=record)


def detection_transform(
    size: int, n: int, m: float, *, hflip: bool = True, min_visibility: float = 0.3,
    seed: int | None = None, record: bool = False,
) -> A.Compose:
    """Box-safe augmentation: boxes are normalized xyxy (albumentations' own "albumentations" format).

    A box pushed mostly outside the image (visible fraction below ``min_visibility``) or covered by
    an erased hole is dropped together with its class id, so boxes and labels never disagree. Call
    it through ``apply_detection`` (label field ``class_ids``). ``n == 0`` gives the light
    teacher-level ops; ``record`` as in ``student_transform``.
    """
    params = A.BboxParams(
        format="albumentations", label_fields=[BBOX_LABELS], min_visibility=min_visibility, clip=True, filter_invalid_bboxes=True,
    )
    return A.Compose(_pipeline(size, n, m, hflip=hflip, boxes=True), bbox_params=params, seed=seed, save_applied_params=record)


def apply_detection(
    transform: Callable, image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a detection transform; returns (image, boxes float32 (M, 4), class_ids int64 (M,))."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if len(boxes) != len(class_ids):
        raise ValueError(f"{len(boxes)} boxes but {len(class_ids)} class ids")
    out = transform(image=image, bboxes=boxes, **{BBOX_LABELS: class_ids})
    kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    return out["image"], kept, np.asarray(out[BBOX_LABELS], dtype=np.int64).reshape(-1)


def segmentation_transform(size: int, n: int, m: float, *, hflip: bool = True, seed: int | None = None) -> A.Compose:
    """Mask-safe augmentation: the student ops, with every geometric op moving the mask too
    (nearest neighbour, so it stays binary) and erased holes cleared from the mask as well (the
    model cannot be asked to draw what it was not shown). Call through ``apply_segmentation``.
    Half the rotation and shear, as for boxes: thin structures (a pneumothorax rim) suffer most."""
    ops = _pipeline(size, n, m, hflip=hflip, boxes=True)
    ops = [A.CoarseDropout(**{**op.get_transform_init_args(), "fill_mask": 0}) if isinstance(op, A.CoarseDropout)
           else op for op in ops]
    return A.Compose(ops, seed=seed)


def apply_segmentation(transform: Callable, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a segmentation transform on an image and its (H, W) mask of the same size."""
    out = transform(image=image, mask=mask)
    return out["image"], out["mask"]


def tta_views(hflip: bool = True) -> list[str]:
    """Test-time views; predictions are averaged over them (boxes are flipped back by the caller)."""
    return ["identity", "hflip"] if hflip else ["identity"]


def apply_view(batch, view: str):
    """One TTA view of an image batch (numpy or torch, width on the last axis)."""
    if view == "identity":
        return batch
    if view == "hflip":
        return np.ascontiguousarray(batch[..., ::-1]) if isinstance(batch, np.ndarray) else batch.flip(-1)
    raise ValueError(f"unknown TTA view {view!r} (known: identity, hflip)")
