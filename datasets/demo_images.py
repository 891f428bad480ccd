"""The demo's image synthesis: crude but radiograph-like chest images with known lesions.

Why its own module: what a synthetic radiograph looks like (body silhouette, dark lung fields, curved
ribs, heart shadow, smooth noise and film grain, three VinBigData finding kinds with exact boxes and
a visibility) is independent of how :mod:`datasets.demo` stores it (DICOM tags, CSV rows,
radiologists, the manifest). Lesion contrast varies widely, so a teacher trained on the small labeled
part is clearly imperfect and pseudo labels on the larger unlabeled pool can help.

Everything is a pure function of the random generator passed in: same generator state, same pixels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

OPACITY_ID, NODULE_ID, EFFUSION_ID = 7, 8, 10
DEMO_CLASS_IDS = (OPACITY_ID, NODULE_ID, EFFUSION_ID)
LESION_KIND_P = {NODULE_ID: 0.45, OPACITY_ID: 0.35, EFFUSION_ID: 0.20}
LUNG_CENTERS = ((0.3, 0.47), (0.7, 0.47))
"""Nominal lung-field centres (x, y as fractions of the image): image left = patient right."""
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
    layers: list[np.ndarray] = field(default_factory=list)
    """Each lesion's own layer (same order as ``lesions``): its exact geometry, for masks."""


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

SEVERITY_CUTS = (0.4, 0.8, 1.4)
"""Lesion burden (the sum of the lesions' visibilities) at which an abnormal image's severity grade
steps up from 1 to 2, 3 and 4. Chosen on 600 generated images so that every grade is common
(measured: 0 45%, 1 14%, 2 19%, 3 16%, 4 7%)."""
NUM_SEVERITY_GRADES = 5


def severity_grade(lesions: list[Lesion]) -> int:
    """The demo's ordinal severity grade 0-4: a pure function of the lesions' number and strength.

    0 for a normal image; otherwise 1 plus the number of :data:`SEVERITY_CUTS` that the burden --
    the sum of the lesions' visibilities -- reaches. More lesions, or more visible ones, grade
    higher: one faint nodule is 1, two clear opacities are 4. Visibility is what the image shows
    (lesion contrast or fluid depth), so the grade can be learned from the pixels.
    """
    if not lesions:
        return 0
    burden = sum(float(les.visibility) for les in lesions)
    return 1 + int(np.searchsorted(SEVERITY_CUTS, burden, side="right"))


def layer_box(layer: np.ndarray, rel: float = 0.1) -> tuple[float, float, float, float] | None:
    """Pixel box (x_min, y_min, x_max, y_max, pixel edges) of where a lesion layer exceeds rel of its peak."""
    peak = float(layer.max())
    if peak < 1e-3:
        return None
    rows, cols = np.nonzero(layer > rel * peak)
    box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return box if box[2] - box[0] >= 2 and box[3] - box[1] >= 2 else None


def _lesions(rng, u, v, a, masks, normal: bool) -> tuple[list[Lesion], np.ndarray, list[np.ndarray]]:
    """1-3 lesions for an abnormal image (at most one effusion), with boxes from their own layers."""
    total = np.zeros_like(u)
    lesions: list[Lesion] = []
    layers: list[np.ndarray] = []
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
            layers.append(layer)
            total += layer
    return lesions, total, layers


def synthesize_case(rng: np.random.Generator, *, width: int, height: int, normal: bool,
                    patient: dict | None = None) -> Case:
    """One radiograph in display intensity [0, 1] with its lesions (none when normal)."""
    a = image_anatomy(rng, patient or patient_anatomy(rng))
    u, v = _grid(a, width, height)
    masks = _lungs(u, v, a)
    lesions, layer, layers = _lesions(rng, u, v, a, masks, normal)
    markings = 0.02 * smooth_noise(rng, height=height, width=width, knots=28) * (masks[0] + masks[1])
    image = _anatomy_image(u, v, a, masks) + markings + layer + 0.03 * smooth_noise(rng, height=height, width=width)
    image = image + a["grain"] * rng.standard_normal(size=image.shape, dtype=np.float32)
    image = np.clip(image, 0.0, 1.0) ** a["gamma"]
    return Case(image.astype(np.float32), lesions, layer.astype(np.float32), a, layers)


MASK_CLASS_ID = OPACITY_ID
"""The lesion kind the demo draws masks of: lung opacity (airspace disease, SIIM-COVID19's target)."""


def lesion_masks(case: Case, class_id: int = MASK_CLASS_ID, rel: float = 0.1) -> list[np.ndarray]:
    """One 0/1 mask per lesion of a kind: where its own layer exceeds ``rel`` of its peak -- the
    rule :func:`layer_box` draws the box by, so a mask's bounding box is its lesion's box."""
    return [(layer > rel * float(layer.max())).astype(np.uint8)
            for lesion, layer in zip(case.lesions, case.layers) if lesion.class_id == class_id]
