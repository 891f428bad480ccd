"""Decode radiographs (DICOM, PNG, JPEG) into float32 ``H x W`` arrays in [0, 1].

Why one reader for every format: the models must see the same intensities at training and at
inference, whatever the file type, so every path through this module ends in the same
normalisation:

DICOM (pydicom, first frame of a multi-frame file)
    1. the modality LUT (Modality LUT Sequence, or Rescale Slope/Intercept: HU for CT),
    2. the VOI LUT: the VOI LUT Sequence if present, else the first Window Center/Width pair
       (``apply_voi_lut(..., index=0)``; multi-valued windows use their first value),
    3. to [0, 1]: after a window, by the window's output range (the values pydicom maps the far
       ends of the input to, so it follows pydicom's own rule for signed data, rescale and
       modality LUTs); after a VOI LUT Sequence, by the smallest and largest entry of the LUT
       (some vendors declare 16 output bits and use 12, which would leave the image nearly black);
       with neither, by a robust min-max over ``percentile_clip`` (values outside are clipped),
    4. MONOCHROME1 ("white is zero") is inverted last, as ``1 - x`` on the normalised float32
       array. Inverting last keeps the relation exact: a MONOCHROME1 copy of a MONOCHROME2 file
       reads as exactly ``1 - read_image(original)``, also on the percentile path, because the
       percentiles are taken on the identical stored values before inversion.

    Colour DICOMs (RGB, YBR, palette) become grey by the ITU-R 601 luma weights.
    A transfer syntax whose decoder is not installed raises one line naming the file, the
    syntax and the package to install (12-bit lossy JPEG needs ``pylibjpeg-libjpeg``, GPL-3,
    opt-in through the ``jpeg-lossy`` extra).

PNG / JPEG (Pillow)
    Scaled by the maximum of the stored dtype (255 or 65535), not by the image maximum: these
    files are already display-ready and a dark image must stay dark. Colour becomes grey (luma).
    EXIF orientation is not applied (radiographs rarely carry it; ``image_size`` reports the
    stored size, consistently).

Every problem with a file (missing, empty, truncated, not an image, no pixel data, smaller than
``MIN_SIDE`` pixels, no decoder) raises :class:`datasets.errors.DataError` with one line that names
the file. Non-radiograph modalities (MR, CT, NM...) still read: the reader decodes what it is given,
and the dataset adapters quarantine them (the policy is ``datasets.adapters.common.ACCEPTED_MODALITIES``).
"""
from __future__ import annotations

import sys
import hashlib
import importlib.util
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from .errors import DataError

READER_VERSION = "1"
"""Bumped whenever decoding or normalisation changes, so preprocessing caches rebuild."""

MIN_SIDE = 2
"""Images with a side shorter than this are rejected: a 1-pixel "image" is a placeholder, not data."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
"""DICOM modality codes of projection radiographs; anything else deserves a warning."""

_LUMA = np.array([0.299, 0.587, 0.114])

_LIBJPEG_HINT = "pip install pylibjpeg-libjpeg (GPL-3; or the project's extra: pip install '.[jpeg-lossy]')"
_DECODER_HINTS = {  # transfer syntax -> (python module that decodes it, what to install)
    "1.2.840.10008.1.2.4.50": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.51": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.57": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.70": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.80": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.81": ("libjpeg", _LIBJPEG_HINT),
    "1.2.840.10008.1.2.4.90": ("openjpeg", "pip install pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.91": ("openjpeg", "pip install pylibjpeg-openjpeg"),
}

# Tags that describe the image, never the patient, the institution or the study.
_SAFE_TAGS = (
    "Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "Rows", "Columns",
    "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "PixelSpacing", "ImagerPixelSpacing", "SOPClassUID",
)
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class DicomPixels:
    """The first frame of a DICOM after its modality and VOI LUTs, before normalisation."""

    values: np.ndarray
    """float64 H x W: physical values (HU for CT) if no VOI applies, else the VOI output."""
    value_range: tuple[float, float] | None
    """Output range of the window / VOI LUT that was applied; None when none was."""
    monochrome1: bool


# ---------------------------------------------------------------------------- public API


def read_image(path: str | Path, *, percentile_clip: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Decode one image into a float32 ``H x W`` array in [0, 1] (see the module docstring).

    Args:
        path: a DICOM, PNG or JPEG file.
        percentile_clip: lower and upper percentile for the robust min-max of DICOMs without a
            window or VOI LUT (``PreprocessConfig.percentile_clip``).

    Raises:
        DataError: one line naming the file and what is wrong with it.
    """
    path = _check_file(path)
    if is_dicom(path):
        px = dicom_pixels(path)
        image = normalize(px.values, value_range=px.value_range, percentile_clip=percentile_clip, invert=px.monochrome1)
    else:
        image = _read_raster(path)
    _check_shape(path, image)
    return image


def normalize(
    values: np.ndarray,
    *,
    value_range: tuple[float, float] | None,
    percentile_clip: tuple[float, float] = (0.5, 99.5),
    invert: bool = False,
) -> np.ndarray:
    """Map values to float32 [0, 1]: by ``value_range`` when given, else by robust min-max.

    A constant image (no spread even between its minimum and maximum) becomes all zeros rather
    than dividing by zero. ``invert`` (MONOCHROME1) is applied last, so it is an exact ``1 - x``.
    """
    lo_pct, hi_pct = percentile_clip
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"percentile_clip must satisfy 0 <= low < high <= 100, got {percentile_clip}")
    values = np.asarray(values, dtype=np.float64)
    if value_range is not None:
        lo, hi = value_range
    else:
        lo, hi = np.percentile(values, [lo_pct, hi_pct])
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        out = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return (np.float32(1.0) - out) if invert else out


def is_dicom(path: str | Path) -> bool:
    """A DICOM suffix, or the ``DICM`` magic at byte 128 (DICOMs often come without a suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_pixels(path: str | Path) -> DicomPixels:
    """Decode the first frame and apply the modality LUT and the VOI LUT / window (pydicom)."""
    path = _check_file(path)
    ds = _dcmread(path)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError(f"{path}: DICOM has no pixel data (truncated, or not an image: a report or presentation state)")
    frame = _decode_first_frame(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    with _as_data_error(path, "applying the DICOM LUTs"):
        if frame.ndim == 3 or photometric == "PALETTE COLOR":
            return DicomPixels(_to_grey(apply_color_lut(frame, ds) if frame.ndim == 2 else frame), None, False)
        values = apply_modality_lut(frame, ds)
        value_range = _voi_range(ds, values)
        if value_range is not None:
            values = apply_voi_lut(values, ds, index=0)
        values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: pixel data contains NaN or infinite values")
    return DicomPixels(values, value_range, photometric == "MONOCHROME1")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel decoding), for exports and checks."""
    path = _check_file(path)
    if is_dicom(path):
        ds = _dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        if "Rows" not in ds or "Columns" not in ds:
            raise DataError(f"{path}: DICOM header has no Rows/Columns")
        return int(ds.Columns), int(ds.Rows)
    with _as_data_error(path, "reading the image header"), _pil_open(path) as im:
        return int(im.size[0]), int(im.size[1])


def dicom_modality(path: str | Path) -> str:
    """The DICOM Modality code (``"CR"``, ``"DX"``, ``"MR"``...), ``""`` when absent or not a DICOM."""
    path = _check_file(path)
    if not is_dicom(path):
        return ""
    ds = _dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    return str(ds.get("Modality", "") or "").strip().upper()


def safe_dicom_summary(path: str | Path) -> dict:
    """Non-identifying header facts about a DICOM, safe to log and to put in reports.

    An allow-list, never a block-list: only tags that describe the image (modality, body part,
    photometric interpretation, bit depth, size, transfer syntax, LUT presence) are copied, so a
    vendor's private or unexpected tag cannot leak a name, id, date or institution.
    Values are plain JSON-able Python types; multi-valued windows give their first value.
    """
    path = _check_file(path)
    if not is_dicom(path):
        raise DataError(f"{path}: not a DICOM file")
    tags = [*_SAFE_TAGS, *_PIXEL_TAGS, "VOILUTSequence", "ModalityLUTSequence"]
    ds = _dcmread(path, defer_size=1024, specific_tags=tags)  # pixel data is seen, not read
    out: dict = {tag: _plain(ds.get(tag)) for tag in _SAFE_TAGS}
    ts = _transfer_syntax(ds)
    out["SOPClassName"] = UID(out["SOPClassUID"]).name if out["SOPClassUID"] else None
    out["TransferSyntaxUID"] = str(ts) if ts else None
    out["TransferSyntaxName"] = ts.name if ts else None
    out["HasPixelData"] = any(tag in ds for tag in _PIXEL_TAGS)
    out["HasVOILUTSequence"] = bool(ds.get("VOILUTSequence"))
    out["HasModalityLUTSequence"] = bool(ds.get("ModalityLUTSequence"))
    out["IsRadiograph"] = str(out["Modality"] or "").upper() in RADIOGRAPH_MODALITIES
    return out


def pseudonymize(value: object, *, salt: str = "") -> str:
    """First 12 hex characters of sha256(salt + str(value)): a stable id that hides the original.

    Used for patient ids taken from DICOM headers, so grouping by patient still works while the
    id never reaches a table or a log. Without a salt, a short id space (e.g. numeric ids) can be
    recovered by hashing every candidate; pass a project secret as ``salt`` where that matters.
    """
    return hashlib.sha256(f"{salt}{value}".encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------- DICOM internals


def _dcmread(path: Path, **kwargs) -> pydicom.Dataset:
    """dcmread with one-line errors; files without the 128-byte preamble are read with force.

    pydicom only *warns* when a file ends inside an element (a truncated download) and then drops
    that element, which would later read as "no pixel data"; that warning becomes the error here.
    """
    with _as_data_error(path, "reading the DICOM header"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True, **kwargs)
            if "Rows" not in ds and not any(tag in ds for tag in _PIXEL_TAGS):
                raise DataError(f"{path}: not a DICOM file (no DICM header and no image tags)") from None
    for warning in caught:
        if "End of file reached" in str(warning.message):
            raise DataError(f"{path}: file is truncated (it ends inside a DICOM element)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _decode_first_frame(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The first frame only: a multi-frame file (tomosynthesis, stitched series) shows frame 0."""
    ts = _transfer_syntax(ds)
    try:
        ds.pixel_array_options(index=0)
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types; all mean "cannot decode this file"
        raise DataError(_decode_problem(path, ts, exc)) from None


def _decode_problem(path: Path, ts: UID | None, exc: Exception) -> str:
    """One line: which file, which transfer syntax, and what to install if a decoder is missing."""
    syntax = f"transfer syntax '{ts.name}' ({ts})" if ts else "an unknown transfer syntax"
    module, hint = _DECODER_HINTS.get(str(ts), (None, ""))
    if module and importlib.util.find_spec(module) is None:
        return f"{path}: cannot decode pixel data with {syntax}: the decoder is not installed: {hint}"
    return f"{path}: cannot decode pixel data with {syntax}: {_one_line(exc)}"


def _voi_range(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float] | None:
    """Output range of the VOI transform apply_voi_lut will use, or None if there is none.

    For a window, ask pydicom itself where it maps the far ends of the input: that follows its
    rules for signed data, rescale slope/intercept and modality LUTs without restating them.
    """
    seq = ds.get("VOILUTSequence")
    if seq and "LUTData" in seq[0]:
        lut = np.asarray(seq[0].LUTData, dtype=np.float64)
        return float(lut.min()), float(lut.max())
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    span = 1e6 + float(np.abs(values).max())
    center = float(_first(ds.WindowCenter))
    with np.errstate(over="ignore"):  # SIGMOID windows overflow exp() at the far ends, harmlessly
        ends = apply_voi_lut(np.array([center - 1e3 * span, center + 1e3 * span]), ds, index=0)
    lo, hi = float(np.min(ends)), float(np.max(ends))
    return (lo, hi) if hi > lo else None


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64)[..., :3] @ _LUMA


def _first(value):
    return value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value


def _plain(value):
    """A DICOM element value as a JSON-able Python value (first item of a multi-value)."""
    value = value if isinstance(value, (bytes, str)) else _first(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):  # also pydicom's IS
        return int(value)
    if isinstance(value, float):  # also pydicom's DSfloat, whose repr looks like a string
        return float(value)
    return str(value).strip()


# ---------------------------------------------------------------------------- PNG / JPEG

RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
"""Pillow formats a radiograph may come in; an unknown file fails fast instead of trying plugins."""


def _pil_open(path: Path):
    """Pillow's own ``Image.open``. Importing ultralytics replaces it process-wide with a version
    that, on a file Pillow cannot identify, tries to pip-install a HEIF plugin; a reader must fail
    with one line instead, and never reach for the network."""
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open)
    return opener(path, formats=RASTER_FORMATS)


def _read_raster(path: Path) -> np.ndarray:
    """PNG/JPEG (anything Pillow opens) -> float32 [0, 1], scaled by the stored dtype's maximum."""
    with _as_data_error(path, "decoding the image"), _pil_open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.float32) / np.float32(65535.0)
        elif im.mode == "F":
            raise DataError(f"{path}: floating-point images (mode F) are not supported; save as 16-bit PNG")
        else:
            arr = np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.float32) / np.float32(255.0)
    return np.clip(arr, 0.0, 1.0)


# ---------------------------------------------------------------------------- checks


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    return path


def _check_shape(path: Path, image: np.ndarray) -> None:
    if image.ndim != 2:
        raise DataError(f"{path}: decoded to shape {image.shape}, expected a 2-D grey image")
    height, width = image.shape
    if min(height, width) < MIN_SIDE:
        raise DataError(f"{path}: image is {width}x{height} pixels, too small to be a radiograph (minimum {MIN_SIDE})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _as_data_error(path: Path, action: str) -> Iterator[None]:
    """Turn any library error into one DataError line; a bad file must not print a traceback."""
    try:
        yield
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a recognised image format (expected DICOM, PNG or JPEG)") from None
    except Exception as exc:
        raise DataError(f"{path}: {action} failed: {_one_line(exc)}") from None
