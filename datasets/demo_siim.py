"""The built-in demo in the Kaggle SIIM-COVID19 layout: the same synthetic radiographs, filed as studies.

Why a second layout: SIIM-COVID19 differs from VinBigData in everything an adapter must get right --
a study/series/image DICOM tree, a study-level table (one of four classes, one-hot) next to an
image-level one (``opacity`` boxes as Python-literal strings, "none 1 0 0 1 1" for none), several
images in one study, and a submission with one row per study and one per image. Only a layout that
runs the whole cycle proves those paths. Layout (read by the SIIM adapter as is)::

    root/train_study_level.csv         id=<study>_study, four one-hot study classes
    root/train_image_level.csv         id=<image>_image, boxes, label, StudyInstanceUID
    root/train/<study>/<series>/<image>.dcm
    root/test/<study>/<series>/<image>.dcm              unlabeled pool
    root/holdout_{study,image}_level.csv + holdout/...  held-out labeled test part
    root/unlabeled_truth_{study,image}_level.csv        true labels of the pool (measuring only)
    root/demo_manifest.json            parameters and counts, written last: its presence means complete

Study class of a case (a pure function of its lesions, so a model can learn it): no lesion ->
Negative for Pneumonia; two or more opacities -> Typical; one opacity -> Indeterminate; other lesions
only (nodule, effusion) -> Atypical. Boxes: the opacities (the one box class, "opacity"). About one
study in eight holds a second image, a pixel copy of the first (as SIIM studies often do), and the
first held-out image is a copy of a training image filed under another patient: the cross-role
duplicate a test metric must not count.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

from .atomic import atomic_path, read_json, write_json
from .demo import MANIFEST, PARTIAL_MARKER, _check_args, _clear, _patient_record, _split_specs, make_dicom
from .demo_images import OPACITY_ID

GENERATOR_VERSION = 1
SIIM_CLASSES = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
SPLITS = {"labeled": ("train", "train"), "unlabeled": ("test", "unlabeled_truth"), "holdout": ("holdout", "holdout")}
"""split -> (image folder, prefix of its two CSVs)."""
STUDY_CSV, IMAGE_CSV = "{}_study_level.csv", "{}_image_level.csv"
SECOND_IMAGE_EVERY = 8


def study_class(lesions) -> int:
    """Index into SIIM_CLASSES of a case with these lesions (see the module docstring)."""
    opacities = sum(les.class_id == OPACITY_ID for les in lesions)
    if not lesions:
        return 0
    return 1 if opacities >= 2 else 2 if opacities == 1 else 3


def _hex_id(seed: int, *parts) -> str:
    """A 12-hex id like Kaggle's SIIM ids, fixed by seed and parts."""
    return hashlib.md5("-".join(["siim", str(seed), *map(str, parts)]).encode()).hexdigest()[:12]


def _studies(seed: int, split: str, specs: list[dict]) -> list[dict]:
    """One study per case, every eighth with a second image (a pixel copy) in its own series."""
    studies = []
    for index, spec in enumerate(specs):
        images = [{"image_id": _hex_id(seed, split, index, "image"), "series": _hex_id(seed, split, index, "series")}]
        if index % SECOND_IMAGE_EVERY == SECOND_IMAGE_EVERY - 1:
            images.append({"image_id": _hex_id(seed, split, index, "image2"),
                           "series": _hex_id(seed, split, index, "series2")})
        studies.append({"study": _hex_id(seed, split, index, "study"), "spec": spec, "images": images,
                        "class": study_class(spec["lesions"])})
    return studies


def _write_images(root: Path, seed: int, folder: str, studies: list[dict]) -> None:
    for st in studies:
        spec = st["spec"]
        for image in st["images"]:
            path = root / folder / st["study"] / image["series"] / f"{image['image_id']}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds = make_dicom(spec["pixels"], spec["style"], seed=seed, image_id=image["image_id"],
                            patient=spec["patient"])
            ds.save_as(path, enforce_file_format=True)
        spec["shape"] = spec.pop("pixels").shape  # keep memory flat: the pixels are on disk now


def _box_cells(lesions) -> tuple[str, str]:
    """(boxes, label) cells of one image: the opacities as Kaggle wrote them, or none."""
    boxes = [les.box for les in lesions if les.class_id == OPACITY_ID]
    if not boxes:
        return "", "none 1 0 0 1 1"
    dicts = [{"x": round(x0, 2), "y": round(y0, 2), "width": round(x1 - x0, 2), "height": round(y1 - y0, 2)}
             for x0, y0, x1, y1 in boxes]
    label = " ".join(f"opacity 1 {d['x']} {d['y']} {round(d['x'] + d['width'], 2)} {round(d['y'] + d['height'], 2)}"
                     for d in dicts)
    return str(dicts), label


def _write_csvs(root: Path, prefix: str, studies: list[dict]) -> None:
    study_rows = [{"id": f"{st['study']}_study", **{c: int(i == st["class"]) for i, c in enumerate(SIIM_CLASSES)}}
                  for st in studies]
    image_rows = [{"id": f"{image['image_id']}_image", "boxes": cells[0], "label": cells[1],
                   "StudyInstanceUID": st["study"]}
                  for st in studies for cells in [_box_cells(st["spec"]["lesions"])] for image in st["images"]]
    for name, rows in ((STUDY_CSV.format(prefix), study_rows), (IMAGE_CSV.format(prefix), image_rows)):
        with atomic_path(root / name) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


def _cross_role_copy(seed: int, specs: dict, first_patient: int) -> list[str] | None:
    """The first held-out case becomes a pixel copy of the first training case, under a new patient."""
    if not specs["holdout"] or not specs["labeled"]:
        return None
    source, target = specs["labeled"][0], specs["holdout"][0]
    specs["holdout"][0] = {**source, "image_id": target["image_id"], "patient": _patient_record(seed, first_patient),
                           "rng": target["rng"]}
    return [source["image_id"], target["image_id"]]


def make_siim_demo(root: str | Path, seed: int = 0, n_labeled: int = 120, n_unlabeled: int = 360, n_test: int = 120,
                   size: int = 256) -> dict:
    """Write the SIIM-layout demo under root (see the module docstring), or reuse a complete one.

    Counts are cases (studies); about one study in eight holds two images. Returns the manifest
    plus ``reused`` and ``seconds``. Same seed, byte-identical files.
    """
    start, root = time.perf_counter(), Path(root)
    _check_args(n_labeled, n_unlabeled, n_test, size)
    params = {"layout": "siim", "seed": seed, "n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_test": n_test,
              "size": size, "generator_version": GENERATOR_VERSION}
    try:
        manifest = read_json(root / MANIFEST)
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("params") == params and not (root / PARTIAL_MARKER).exists() \
            and all((root / f).is_file() for f in manifest["files"]):
        return {**manifest, "reused": True, "seconds": round(time.perf_counter() - start, 3)}
    _clear(root)
    write_json(root / PARTIAL_MARKER, params)
    with threadpool_limits(1):
        manifest = _generate(root, params)
    (root / PARTIAL_MARKER).unlink()
    return {**manifest, "reused": False, "seconds": round(time.perf_counter() - start, 3)}


def _generate(root: Path, params: dict) -> dict:
    seed, size = params["seed"], params["size"]
    counts = {"labeled": params["n_labeled"], "unlabeled": params["n_unlabeled"], "holdout": params["n_test"]}
    specs, first = {}, 1
    for split, count in counts.items():
        specs[split] = _split_specs(seed, split, count, size, first)
        first = max(s["patient"]["number"] for s in specs[split]) + 1
    copy = _cross_role_copy(seed, specs, first)
    files, studies_of = [], {}
    for split, (folder, prefix) in SPLITS.items():
        studies = studies_of[split] = _studies(seed, split, specs[split])
        _write_images(root, seed, folder, studies)
        _write_csvs(root, prefix, studies)
        files += [STUDY_CSV.format(prefix), IMAGE_CSV.format(prefix)]
        files += [f"{folder}/{st['study']}/{im['series']}/{im['image_id']}.dcm" for st in studies for im in st["images"]]
    manifest = {
        "dataset": "cxr-noisy-student synthetic demo (SIIM-COVID19 layout)", "params": params,
        "studies": {split: len(s) for split, s in studies_of.items()},
        "images": {split: sum(len(st["images"]) for st in s) for split, s in studies_of.items()},
        "study_classes": {split: {c: int(sum(st["class"] == i for st in s)) for i, c in enumerate(SIIM_CLASSES)}
                          for split, s in studies_of.items()},
        "opacity_boxes": {split: int(sum(len(st["images"]) * sum(les.class_id == OPACITY_ID for les in
                                                                    st["spec"]["lesions"]) for st in s))
                          for split, s in studies_of.items()},
        "cross_role_duplicate": None if copy is None else
        [studies_of["labeled"][0]["images"][0]["image_id"], studies_of["holdout"][0]["images"][0]["image_id"]],
        "files": files,
    }
    write_json(root / MANIFEST, manifest)
    return manifest


def siim_demo_paths() -> dict:
    """What ``datasets.adapters.load_siim`` is given to read this layout (and its hidden truth)."""
    return {"study_csv": STUDY_CSV.format("train"), "image_csv": IMAGE_CSV.format("train"), "image_dir": "train",
            "unlabeled_dir": "test", "holdout": (STUDY_CSV.format("holdout"), IMAGE_CSV.format("holdout"), "holdout"),
            "truth": (STUDY_CSV.format("unlabeled_truth"), IMAGE_CSV.format("unlabeled_truth"), "test")}

