"""The built-in demo dataset: synthetic chest radiographs written as a small VinBigData look-alike.

Why synthetic: the engine must be runnable end to end without downloading a 200 GB competition set,
and its tests need data whose truth is known exactly. The images are crude but radiograph-like (body
silhouette, dark lung fields, curved ribs, heart shadow, smooth noise and film grain) and carry three
VinBigData finding kinds with known boxes. Lesion contrast varies widely, so a teacher trained on the
small labeled part is clearly imperfect and pseudo labels on the larger unlabeled pool can help.

The files exercise what real data throws at a reader: real DICOM (explicit VR little endian, 12 of
16 bits), MONOCHROME1 inversion, window and rescale tags, several images per patient, exact duplicate
images under different ids, and 1-3 radiologists per image whose boxes jitter and who now and then
miss a subtle lesion. Layout (read by the VinBigData adapter as is)::

    root/train.csv                  labeled part, VinBigData columns, radiologists R1..R17
    root/train/<image_id>.dicom
    root/test/<image_id>.dicom      unlabeled pool (no labels)
    root/holdout.csv                held-out labeled test part, one radiologist "R0" with exact boxes
    root/holdout/<image_id>.dicom
    root/unlabeled_truth.csv        true labels of the pool (pseudo-label precision, oracle only)
    root/demo_manifest.json         parameters and counts, written last: its presence means complete

Everything is a pure function of the seed: same seed, byte-identical files.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from threadpoolctl import threadpool_limits

from .errors import DataError
from .atomic import atomic_path, read_json, write_json

GENERATOR_VERSION = 1
VINBIGDATA_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding",
)
"""VinBigData class names; the index is the class_id of train.csv."""
NO_FINDING_ID = 14
OPACITY_ID, NODULE_ID, EFFUSION_ID = 7, 8, 10
DEMO_CLASS_IDS = (OPACITY_ID, NODULE_ID, EFFUSION_ID)
CSV_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
MANIFEST = "demo_manifest.json"
PARTIAL_MARKER = ".demo_partial"
SPLIT_DIRS = {"labeled": "train", "unlabeled": "test", "holdout": "holdout"}
CSV_OF = {"labeled": "train.csv", "unlabeled": "unlabeled_truth.csv", "holdout": "holdout.csv"}

NORMAL_FRACTION = 0.45
LESION_KIND_P = {NODULE_ID: 0.45, OPACITY_ID: 0.35, EFFUSION_ID: 0.20}
RADIOLOGISTS = tuple(f"R{i}" for i in range(1, 18))
RAD_WEIGHTS = np.array([8.0 if r in ("R8", "R9", "R10") else 1.0 for r in RADIOLOGISTS]) / 38.0
"""As in VinBigData, three radiologists read most images and fourteen others the rest."""
LUNG_CENTERS = ((0.3, 0.47), (0.7, 0.47))
"""Nominal lung-field centres (x, y as fractions of the image): image left = patient right."""
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
NODULE_AMP, OPACITY_AMP, EFFUSION_DEPTH = (0.09, 0.45), (0.09, 0.4), (0.035, 0.13)
"""Log-uniform ranges of lesion strength (display units; effusion: fluid height as a fraction of the
image). The low ends sit near the anatomy's own texture (ribs 0.08, markings 0.02), so a tail of
lesions is subtle, which keeps a teacher trained on few labels imperfect; the ranges were raised
until a from-scratch CPU model learns the task at all from 120 labeled images (measured: with the
first, fainter ranges every tiny model stayed at chance, test AUC 0.44-0.57)."""


@dataclass(frozen=True)
class Lesion:
    """One finding: its VinBigData class, its exact pixel box and how visible it is (0 subtle .. 1 obvious)."""

    class_id: int
    box: tuple[float, float, float, float]
    visibility: float


@dataclass
class Case:
    """One synthetic radiograph: display intensity (bright = dense), its lesions and their summed layer."""

    image: np.ndarray
    lesions: list[Lesion]
    lesion_layer: np.ndarray
    anatomy: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- small maths


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


@functools.lru_cache(maxsize=64)
def _blur_weights(n: int, knots: int) -> np.ndarray:
    """(n, knots) Gaussian interpolation weights from a knot grid to n pixels; rows sum to 1."""
    pos = (np.arange(n) + 0.5) / n
    w = np.exp(-(((pos[:, None] - (np.arange(knots) + 0.5) / knots) * knots / 0.8) ** 2))
    return np.ascontiguousarray(w / w.sum(axis=1, keepdims=True), dtype=np.float32)


def smooth_noise(rng: np.random.Generator, *, height: int, width: int, knots: int = 6) -> np.ndarray:
    """Zero-mean, unit-scale smooth noise: a random knot grid blurred up to the image by two matmuls.

    Why matmuls: a Gaussian interpolation matrix per axis is fully vectorised and needs no scipy.
    """
    grid = rng.standard_normal(size=(knots, knots), dtype=np.float32)
    field_ = (_blur_weights(height, knots) @ grid) @ np.ascontiguousarray(_blur_weights(width, knots).T)
    return field_ / max(float(field_.std()), 1e-6)


def _grid(anat: dict, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates (u, v) of every pixel after the image's shift, rotation and scale.

    float32 throughout: float64 would double the cost of every full-frame operation.
    """
    x = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5 - anat["shift"][0]
    y = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5 - anat["shift"][1]
    xx, yy = np.meshgrid(x, y)
    c, s, k = float(np.cos(anat["angle"])), float(np.sin(anat["angle"])), anat["scale"]
    return (c * xx + s * yy) / k + 0.5, (-s * xx + c * yy) / k + 0.5


def _ellipse_d(u, v, center, radii) -> np.ndarray:
    return ((u - center[0]) / radii[0]) ** 2 + ((v - center[1]) / radii[1]) ** 2


# ----------------------------------------------------------------------------- anatomy


def patient_anatomy(rng: np.random.Generator) -> dict:
    """Body habitus shared by all images of one patient (lung size, heart size, image aspect)."""
    return {
        "lung_rx": rng.uniform(0.15, 0.175), "lung_ry": rng.uniform(0.27, 0.31),
        "sep": rng.uniform(0.19, 0.21), "heart": rng.uniform(0.85, 1.15),
        "aspect": float(rng.choice([1.0, 1.0, 1.125, 1.25])),
    }


def image_anatomy(rng: np.random.Generator, patient: dict) -> dict:
    """Per-image pose and exposure on top of the patient's habitus."""
    return {
        **patient,
        "shift": (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        "angle": float(np.deg2rad(rng.uniform(-4, 4))), "scale": rng.uniform(0.93, 1.05),
        "rib_period": rng.uniform(0.075, 0.09), "rib_phase": rng.uniform(0, 1),
        "gamma": rng.uniform(0.8, 1.25), "grain": rng.uniform(0.008, 0.018),
    }


def lung_geometry(u, v, a: dict, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One lung field: its soft mask (before the heart), lateral position (-1 medial .. 1 lateral) and
    the diaphragm line. side -1 is the image-left lung (the patient's right), which is larger."""
    grow = 1.0 if side < 0 else 0.96
    cx, rx, ry = 0.5 + side * a["sep"], a["lung_rx"] * grow, a["lung_ry"] * grow
    lateral = np.clip(side * (u - cx) / rx, -1.0, 1.0)
    taper = np.clip(0.8 + 0.2 * (v - 0.47) / ry, 0.45, 1.0)  # the apex is narrower than the base
    d = ((u - cx) / (rx * taper)) ** 2 + ((v - 0.47) / ry) ** 2
    diaphragm = 0.47 + ry * (0.74 + 0.12 * lateral + 0.16 * lateral**2)  # dome; deep costophrenic angle
    mask = _sigmoid((1 - d) / 0.07) * _sigmoid((diaphragm - v) / 0.01)
    return mask, lateral, diaphragm


def _lungs(u, v, a: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft masks of the two lung fields (minus the heart shadow) and of the heart."""
    heart = _sigmoid((1 - _ellipse_d(u, v, (0.555, 0.63), (0.16 * a["heart"], 0.12 * a["heart"]))) / 0.15)
    left, right = (lung_geometry(u, v, a, side)[0] * (1 - 0.8 * heart) for side in (-1, 1))
    return left, right, heart


def _ribs_and_clavicles(u, v, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """Posterior ribs (thin bands rising from the spine, falling laterally) and the two clavicles."""
    d = np.abs(u - 0.5)
    phase = (v + 0.35 * d - 1.3 * d**2) / a["rib_period"] + a["rib_phase"]
    ribs = ((0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 8) * _sigmoid((0.8 - v) / 0.02) * _sigmoid((v - 0.12) / 0.02)
    clav = np.exp(-(((v - (0.17 - 0.15 * d + 0.2 * d**2)) / 0.016) ** 2))
    clav = clav * _sigmoid((0.36 - d) / 0.02) * _sigmoid((d - 0.03) / 0.01)
    return ribs, clav


def _anatomy_image(u, v, a: dict, lungs: tuple) -> np.ndarray:
    """Display intensity of the normal chest: body, mediastinum and spine, heart, ribs, dark lungs."""
    left, right, heart = lungs
    lung = left + right
    body = _sigmoid((1 - _ellipse_d(u, v, (0.5, 0.6), (0.46, 0.64))) / 0.06)
    d = np.abs(u - 0.5)
    medi = _sigmoid((0.075 - d) / 0.012) * _sigmoid((0.75 - v) / 0.03)
    spine = _sigmoid((0.04 - d) / 0.006) * (0.7 + 0.3 * np.cos(2 * np.pi * v / 0.045))
    ribs, clav = _ribs_and_clavicles(u, v, a)
    return (0.05 + 0.5 * body + 0.1 * medi * body + 0.06 * spine + 0.08 * heart - 0.34 * lung
            + (0.03 + 0.05 * lung) * ribs * body + 0.12 * clav * body)


# ----------------------------------------------------------------------------- lesions


def _log_visibility(value: float, low: float, high: float) -> float:
    return float(np.clip(np.log(value / low) / np.log(high / low), 0.0, 1.0))


def _lung_point(rng, a: dict, side: int) -> tuple[float, float]:
    """A random point well inside one lung field (anatomy coordinates)."""
    r, phi = 0.7 * float(np.sqrt(rng.uniform())), rng.uniform(0, 2 * np.pi)
    return 0.5 + side * a["sep"] + r * a["lung_rx"] * float(np.cos(phi)), 0.47 + r * a["lung_ry"] * float(np.sin(phi))


def _nodule(rng, u, v, a, masks) -> tuple[np.ndarray, float]:
    """A small round bright blob; contrast log-uniform, so about a third are subtle."""
    center, radius = _lung_point(rng, a, int(rng.choice([-1, 1]))), rng.uniform(0.03, 0.065)
    amp = float(np.exp(rng.uniform(np.log(NODULE_AMP[0]), np.log(NODULE_AMP[1]))))
    dist = np.sqrt((u - center[0]) ** 2 + (v - center[1]) ** 2)
    return amp * _sigmoid((radius - dist) / (0.15 * radius)), _log_visibility(amp, *NODULE_AMP)


def _opacity(rng, u, v, a, masks) -> tuple[np.ndarray, float]:
    """A larger patchy opacity confined to one lung (airspace disease)."""
    side = int(rng.choice([-1, 1]))
    center, radii = _lung_point(rng, a, side), (rng.uniform(0.05, 0.1), rng.uniform(0.06, 0.12))
    amp = float(np.exp(rng.uniform(np.log(OPACITY_AMP[0]), np.log(OPACITY_AMP[1]))))
    texture = np.clip(0.6 + 0.4 * smooth_noise(rng, height=u.shape[0], width=u.shape[1], knots=12), 0.2, 1.0)
    shape = _sigmoid((1 - _ellipse_d(u, v, center, radii)) / 0.15)
    return amp * shape * texture * masks[(side + 1) // 2], _log_visibility(amp, *OPACITY_AMP)


def _effusion(rng, u, v, a, masks) -> tuple[np.ndarray, float]:
    """Fluid above one hemidiaphragm whose level rises laterally (the meniscus); shallow ones are subtle."""
    side = int(rng.choice([-1, 1]))
    depth = float(np.exp(rng.uniform(np.log(EFFUSION_DEPTH[0]), np.log(EFFUSION_DEPTH[1]))))
    _, lateral, diaphragm = lung_geometry(u, v, a, side)
    level = diaphragm - depth * (1 + 0.6 * (lateral + 1))
    fluid = rng.uniform(0.25, 0.35) * _sigmoid((v - level) / 0.008) * masks[(side + 1) // 2]
    return fluid, _log_visibility(depth, *EFFUSION_DEPTH)


LESION_MAKERS = {NODULE_ID: _nodule, OPACITY_ID: _opacity, EFFUSION_ID: _effusion}


def layer_box(layer: np.ndarray, rel: float = 0.1) -> tuple[float, float, float, float] | None:
    """Pixel box (x_min, y_min, x_max, y_max, pixel edges) of where a lesion layer exceeds rel of its peak."""
    peak = float(layer.max())
    if peak < 1e-3:
        return None
    rows, cols = np.nonzero(layer > rel * peak)
    box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return box if box[2] - box[0] >= 2 and box[3] - box[1] >= 2 else None


def _lesions(rng, u, v, a, masks, normal: bool) -> tuple[list[Lesion], np.ndarray]:
    """1-3 lesions for an abnormal image (at most one effusion), with boxes from their own layers."""
    total = np.zeros_like(u)
    lesions: list[Lesion] = []
    count = 0 if normal else int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    kinds, p = list(LESION_KIND_P), list(LESION_KIND_P.values())
    while len(lesions) < count:
        kind = int(rng.choice(kinds, p=p))
        if kind == EFFUSION_ID and any(les.class_id == EFFUSION_ID for les in lesions):
            continue
        layer, visibility = LESION_MAKERS[kind](rng, u, v, a, masks)
        box = layer_box(layer)
        if box is not None:
            lesions.append(Lesion(kind, box, round(visibility, 4)))
            total += layer
    return lesions, total


def synthesize_case(rng: np.random.Generator, *, width: int, height: int, normal: bool,
                    patient: dict | None = None) -> Case:
    """One radiograph in display intensity [0, 1] with its lesions (none when normal)."""
    a = image_anatomy(rng, patient or patient_anatomy(rng))
    u, v = _grid(a, width, height)
    masks = _lungs(u, v, a)
    lesions, layer = _lesions(rng, u, v, a, masks, normal)
    markings = 0.02 * smooth_noise(rng, height=height, width=width, knots=28) * (masks[0] + masks[1])
    image = _anatomy_image(u, v, a, masks) + markings + layer + 0.03 * smooth_noise(rng, height=height, width=width)
    image = image + a["grain"] * rng.standard_normal(size=image.shape, dtype=np.float32)
    image = np.clip(image, 0.0, 1.0) ** a["gamma"]
    return Case(image.astype(np.float32), lesions, layer.astype(np.float32), a)


# ----------------------------------------------------------------------------- DICOM


def dicom_style(rng: np.random.Generator) -> dict:
    """How an image is stored: polarity, stored range, and which optional tags it carries."""
    rescale = rng.uniform() < 0.3
    choices = [(2.0, -1024.0), (0.5, 0.0), (1.0, -1024.0), (1.0, 100.0)]
    slope, intercept = choices[rng.integers(4)] if rescale else (1.0, 0.0)
    return {
        "monochrome1": bool(rng.uniform() < 0.3), "window": bool(rng.uniform() < 0.5), "rescale": bool(rescale),
        "slope": slope, "intercept": intercept,
        "low": int(rng.integers(50, 600)), "high": int(rng.integers(2800, 4096)),
    }


def stored_pixels(image: np.ndarray, style: dict) -> np.ndarray:
    """Display intensity -> 12-bit stored values (inverted for MONOCHROME1)."""
    values = np.rint(style["low"] + image * (style["high"] - style["low"])).astype(np.int32)
    if style["monochrome1"]:
        values = 4095 - values
    return np.clip(values, 0, 4095).astype(np.uint16)


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=["cxr-noisy-student-demo", str(seed), *parts])


def make_dicom(pixels: np.ndarray, style: dict, *, seed: int, image_id: str, patient: dict) -> Dataset:
    """A CR chest DICOM with synthetic patient tags and UIDs fixed by the seed (no timestamps)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", image_id)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, "study", image_id)
    ds.SeriesInstanceUID = _uid(seed, "series", image_id)
    ds.PatientID, ds.PatientName = patient["id"], patient["name"]
    ds.PatientSex, ds.PatientAge, ds.PatientBirthDate = patient["sex"], patient["age"], patient["birth_date"]
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20200101", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if style["monochrome1"] else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if style["rescale"]:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = style["slope"], style["intercept"], "US"
    if style["window"]:  # covers the stored range, in modality units (after rescale)
        stored = (4095 - style["high"], 4095 - style["low"]) if style["monochrome1"] else (style["low"], style["high"])
        lo, hi = (style["slope"] * x + style["intercept"] for x in stored)
        ds.WindowCenter, ds.WindowWidth = round((lo + hi) / 2, 1), round(1.05 * (hi - lo), 1)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


# ----------------------------------------------------------------------------- labels


def _rad_box(rng, box, rad: str, width: int, height: int) -> tuple[float, ...]:
    """A radiologist's box: the truth scaled by a personal bias and jittered, clipped to the image."""
    bias = ((int(rad[1:]) * 37) % 11 - 5) / 100.0
    w, h = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2 + rng.normal(0, 0.04 * w)
    cy = (box[1] + box[3]) / 2 + rng.normal(0, 0.04 * h)
    sw, sh = (1 + bias + rng.normal(0, 0.05, size=2)).clip(0.7, 1.4) * (w, h)
    x0, x1 = np.clip([cx - sw / 2, cx + sw / 2], 0, width)
    y0, y1 = np.clip([cy - sh / 2, cy + sh / 2], 0, height)
    return tuple(round(float(c), 1) for c in (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def _row(image_id: str, rad: str, class_id: int, box=None) -> dict:
    x0, y0, x1, y1 = box if box is not None else (np.nan,) * 4
    return {"image_id": image_id, "class_name": VINBIGDATA_CLASSES[class_id], "class_id": class_id,
            "rad_id": rad, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


def truth_rows(image_id: str, lesions: list[Lesion]) -> list[dict]:
    """Exact labels by one reader "R0": every lesion, or one No finding row."""
    if not lesions:
        return [_row(image_id, "R0", NO_FINDING_ID)]
    return [_row(image_id, "R0", les.class_id, tuple(round(c, 2) for c in les.box)) for les in lesions]


def radiologist_rows(rng, image_id: str, lesions: list[Lesion], width: int, height: int) -> list[dict]:
    """1-3 radiologists, VinBigData style: jittered boxes, subtle lesions now and then missed."""
    rads = rng.choice(RADIOLOGISTS, size=int(rng.choice([1, 2, 3], p=[0.2, 0.2, 0.6])), replace=False, p=RAD_WEIGHTS)
    rows = []
    for rad in sorted(rads, key=lambda r: int(r[1:])):
        seen = [les for les in lesions if rng.uniform() >= 0.02 + 0.25 * (1 - les.visibility) ** 3]
        rows += [_row(image_id, rad, les.class_id, _rad_box(rng, les.box, rad, width, height)) for les in seen]
        if not seen:
            rows.append(_row(image_id, rad, NO_FINDING_ID))
    return rows


# ----------------------------------------------------------------------------- dataset


def _image_id(seed: int, split: str, index: int) -> str:
    """A 32-hex id like VinBigData's, fixed by seed, split and index."""
    return hashlib.md5(f"demo-{seed}-{split}-{index}".encode()).hexdigest()


def _patients(rng, count: int, first: int) -> list[int]:
    """Patient number of each of count images: most patients have one image, some two to four."""
    numbers, patient = [], first
    while len(numbers) < count:
        numbers += [patient] * int(rng.choice([1, 2, 3, 4], p=[0.6, 0.25, 0.1, 0.05]))
        patient += 1
    return numbers[:count]


def _patient_record(seed: int, number: int) -> dict:
    """Synthetic identity (tags that privacy checks look for in outputs) and habitus of one patient."""
    rng = np.random.default_rng([seed, 7, number])
    age = int(rng.integers(20, 90))
    return {"number": number, "id": f"DEMOPAT{number:04d}", "name": f"DEMO^PATIENT^{number:04d}",
            "sex": str(rng.choice(["F", "M"])), "age": f"{age:03d}Y", "birth_date": f"{2020 - age}0101",
            "anatomy": patient_anatomy(rng)}


def _split_specs(seed: int, split: str, count: int, size: int, first_patient: int) -> list[dict]:
    """Render every image of one split: id, patient, pixels, style, lesions (one rng per image)."""
    code = list(SPLIT_DIRS).index(split)
    numbers = _patients(np.random.default_rng([seed, code, 10**6]), count, first_patient)
    specs = []
    for index, number in enumerate(numbers):
        rng = np.random.default_rng([seed, code, index])
        patient = _patient_record(seed, number)
        height = int(round(size * patient["anatomy"]["aspect"] / 2) * 2)
        normal = rng.uniform() < NORMAL_FRACTION
        case = synthesize_case(rng, width=size, height=height, normal=normal, patient=patient["anatomy"])
        style = dicom_style(rng)
        specs.append({"image_id": _image_id(seed, split, index), "patient": patient, "rng": rng,
                      "lesions": case.lesions, "pixels": stored_pixels(case.image, style), "style": style})
    return specs


def _add_duplicates(seed: int, specs: list[dict], first_patient: int) -> list[tuple[str, str]]:
    """Turn the last few labeled images into exact copies of earlier ones, under new ids.

    About 4% of the labeled part; half keep the source's patient, half are filed under a new patient
    (the same case filed twice), which only a pixel-hash grouping can find.
    """
    n_dup = max(1, round(0.04 * len(specs))) if len(specs) >= 4 else 0
    rng = np.random.default_rng([seed, 99])
    pairs = []
    for k in range(n_dup):
        target = len(specs) - n_dup + k
        source = specs[int(rng.integers(0, len(specs) - n_dup))]
        patient = source["patient"] if k % 2 == 0 else _patient_record(seed, first_patient + k)
        own = specs[target]
        specs[target] = {**source, "image_id": own["image_id"], "patient": patient, "rng": own["rng"]}
        pairs.append((source["image_id"], specs[target]["image_id"]))
    return pairs


def _write_split(root: Path, seed: int, split: str, specs: list[dict]) -> None:
    folder = root / SPLIT_DIRS[split]
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        ds = make_dicom(spec["pixels"], spec["style"], seed=seed, image_id=spec["image_id"], patient=spec["patient"])
        ds.save_as(folder / f"{spec['image_id']}.dicom", enforce_file_format=True)
        spec["shape"] = spec.pop("pixels").shape  # keep memory flat: the pixels are on disk now


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(tmp, index=False)


def _params(seed: int, n_labeled: int, n_unlabeled: int, n_test: int, size: int) -> dict:
    return {"seed": seed, "n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_test": n_test, "size": size,
            "generator_version": GENERATOR_VERSION}


def _is_complete(root: Path, params: dict) -> dict | None:
    """The manifest if root holds a complete demo made with these parameters, else None."""
    try:
        manifest = read_json(root / MANIFEST)
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params or (root / PARTIAL_MARKER).exists():
        return None
    for split, ids in manifest.get("image_ids", {}).items():
        if not all((root / SPLIT_DIRS[split] / f"{i}.dicom").is_file() for i in ids):
            return None
    csvs = manifest.get("files", {}).values()
    return manifest if all((root / name).is_file() for name in csvs) else None


def _clear(root: Path) -> None:
    """Remove a previous (partial or other-parameter) demo; refuse to touch a folder that is not one."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder for the demo dataset")
    ours = (root / MANIFEST).exists() or (root / PARTIAL_MARKER).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise DataError(f"{root}: folder is not empty and holds no demo dataset; choose an empty or new folder")
    for name in SPLIT_DIRS.values():
        shutil.rmtree(root / name, ignore_errors=True)
    for name in ("train.csv", "holdout.csv", "unlabeled_truth.csv", MANIFEST):
        (root / name).unlink(missing_ok=True)


def _check_args(n_labeled: int, n_unlabeled: int, n_test: int, size: int) -> None:
    if min(n_labeled, n_unlabeled, n_test) < 1:
        raise ValueError(f"demo counts must be >= 1, got labeled={n_labeled} unlabeled={n_unlabeled} test={n_test}")
    if size < 64:
        raise ValueError(f"demo image size must be >= 64 px, got {size}")


def _manifest(params: dict, specs: dict, pairs: list) -> dict:
    """What was made: parameters, per-split counts, duplicates, classes and every image id."""
    def per_split(fn) -> dict:
        return {split: int(sum(fn(s) for s in group)) for split, group in specs.items()}

    def lesions_of(split: str, class_id: int) -> int:
        return sum(les.class_id == class_id for s in specs[split] for les in s["lesions"])

    return {
        "dataset": "cxr-noisy-student synthetic demo (VinBigData layout)", "params": params,
        "counts": per_split(lambda s: 1),
        "abnormal": per_split(lambda s: bool(s["lesions"])),
        "subtle_lesions": per_split(lambda s: sum(les.visibility < 1 / 3 for les in s["lesions"])),
        "true_boxes": {split: {VINBIGDATA_CLASSES[c]: lesions_of(split, c) for c in DEMO_CLASS_IDS} for split in specs},
        "monochrome1": per_split(lambda s: s["style"]["monochrome1"]),
        "patients": len({s["patient"]["id"] for group in specs.values() for s in group}),
        "duplicates": [list(p) for p in pairs],
        "class_names": {str(c): VINBIGDATA_CLASSES[c] for c in DEMO_CLASS_IDS},
        "normal_class": VINBIGDATA_CLASSES[NO_FINDING_ID],
        "files": dict(CSV_OF),
        "dirs": dict(SPLIT_DIRS),
        "image_ids": {split: [s["image_id"] for s in group] for split, group in specs.items()},
    }


def make_demo_dataset(root: str | Path, seed: int = 0, n_labeled: int = 120, n_unlabeled: int = 360,
                      n_test: int = 120, size: int = 256) -> dict:
    """Write the synthetic demo dataset under root (see the module docstring), or reuse a complete one.

    Returns the manifest plus ``reused`` (True when nothing was written) and ``seconds``. The default
    sizes take about 5 s on one core (85 MB of DICOM); the unlabeled pool is three times the labeled
    part, as in a semi-supervised setting where labels are the scarce resource. Measured on these
    defaults (PNG 128 px, 2 CPU cores): yolov8n from scratch, 60 epochs on the labeled part alone,
    reaches holdout mAP50 0.20; on labeled plus the pool's true boxes 0.59 -- room for pseudo labels.
    """
    start, root = time.perf_counter(), Path(root)
    _check_args(n_labeled, n_unlabeled, n_test, size)
    params = _params(seed, n_labeled, n_unlabeled, n_test, size)
    manifest = _is_complete(root, params)
    if manifest is not None:
        return {**manifest, "reused": True, "seconds": round(time.perf_counter() - start, 3)}
    _clear(root)
    write_json(root / PARTIAL_MARKER, params)
    with threadpool_limits(1):  # tiny matmuls: waking BLAS threads costs more than it saves
        manifest = _generate(root, params)
    (root / PARTIAL_MARKER).unlink()
    return {**manifest, "reused": False, "seconds": round(time.perf_counter() - start, 3)}


def _generate(root: Path, params: dict) -> dict:
    """Render and write every split, then the manifest (last, atomically); returns the manifest."""
    seed, size = params["seed"], params["size"]
    counts = (("labeled", params["n_labeled"]), ("unlabeled", params["n_unlabeled"]), ("holdout", params["n_test"]))
    specs, pairs, first = {}, [], 1
    for split, count in counts:
        specs[split] = _split_specs(seed, split, count, size, first)
        first = max(s["patient"]["number"] for s in specs[split]) + 1
        if split == "labeled":
            pairs = _add_duplicates(seed, specs[split], first)
            first += len(pairs)
        _write_split(root, seed, split, specs[split])
        rows_of = _labeled_rows if split == "labeled" else _truth_rows
        _write_csv(root / CSV_OF[split], [row for spec in specs[split] for row in rows_of(spec)])
    manifest = _manifest(params, specs, pairs)
    write_json(root / MANIFEST, manifest)
    return manifest


def _labeled_rows(spec: dict) -> list[dict]:
    height, width = spec["shape"]
    return radiologist_rows(spec["rng"], spec["image_id"], spec["lesions"], width, height)


def _truth_rows(spec: dict) -> list[dict]:
    return truth_rows(spec["image_id"], spec["lesions"])

