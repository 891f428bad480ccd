"""datasets.readers on every real edge-case DICOM and on broken files made in tmp_path."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from cxr_noisy_student.datasets.readers import (
    dicom_modality,
    dicom_pixels,
    image_size,
    is_dicom,
    normalize,
    pseudonymize,
    read_image,
    safe_dicom_summary,
)
from cxr_noisy_student.datasets.errors import DataError

SIIM = "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
EDGE_FILES = {
    "RG1_UNCI.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm", "vlut_04.dcm", "mlut_18.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm", "MR2_J2KI.dcm", "CT_small.dcm", "JPEG-lossy.dcm", SIIM,
    "Fake_MONOHR1.dcm",
}
DECODABLE = sorted(EDGE_FILES - {"JPEG-lossy.dcm"})
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber",
               "StudyInstanceUID", "SOPInstanceUID", "ReferringPhysicianName", "StudyDate")


@functools.lru_cache(maxsize=None)
def _read(path: str) -> np.ndarray:
    """Each edge-case file is decoded once per session (RG1_UNCI is 7 MB)."""
    return read_image(path)


@functools.lru_cache(maxsize=None)
def _raw(path: str) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array.astype(np.float64)


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window, normalised to [0, 1] (written out independently)."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _one_line_error(path: Path, match: str = "") -> DataError:
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message and match in message, message
    return info.value


# ---------------------------------------------------------------------------- every shared file


def test_edge_case_folder_holds_the_documented_files(dicom_dir):
    assert {p.name for p in dicom_dir.glob("*.dcm")} == EDGE_FILES


@pytest.mark.parametrize("name", DECODABLE)
def test_every_decodable_file_reads_to_float32_in_unit_range(dicom_dir, name):
    path = dicom_dir / name
    image = _read(str(path))
    width, height = image_size(path)
    assert image.dtype == np.float32 and image.shape == (height, width)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.05, "a real image must not come out flat"


def test_monochrome1_window_is_applied_then_inverted(dicom_dir):
    path = dicom_dir / "RG1_UNCI.dcm"
    expected = 1.0 - _window(_raw(str(path)), 15000, 30000)
    np.testing.assert_allclose(_read(str(path)), expected, atol=1e-6)


def test_jpeg2000_copy_matches_the_uncompressed_original(dicom_dir):
    unci, j2k = _read(str(dicom_dir / "RG1_UNCI.dcm")), _read(str(dicom_dir / "RG1_J2KI.dcm"))
    assert unci.shape == j2k.shape
    assert np.abs(unci - j2k).mean() < 0.01


def test_ten_bit_extremity_uses_its_window_and_is_flagged_as_not_chest(dicom_dir):
    path = dicom_dir / "RG3_J2KI.dcm"
    np.testing.assert_allclose(_read(str(path)), 1.0 - _window(_raw(str(path)), 550, 1024), atol=1e-6)
    summary = safe_dicom_summary(path)
    assert summary["BodyPartExamined"] == "EXTREMITY" and summary["BitsStored"] == 10


def test_multi_valued_window_uses_the_first_pair(dicom_dir):
    path = dicom_dir / "MR-SIEMENS-DICOM-WithOverlays.dcm"
    image, raw = _read(str(path)), _raw(str(path))
    np.testing.assert_allclose(image, _window(raw, 450, 790), atol=1e-6)
    assert np.abs(image - _window(raw, 200, 443)).max() > 0.1


def test_rescale_slope_is_applied_before_the_window(dicom_dir):
    path = dicom_dir / "MR2_J2KI.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = _raw(str(path)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = _read(str(path))
    np.testing.assert_allclose(image, _window(values, 1000, 2000), atol=1e-6)
    assert np.abs(image - _window(_raw(str(path)), 1000, 2000)).max() > 0.1


def test_voi_lut_sequence_is_applied(dicom_dir, tmp_path):
    path = dicom_dir / "vlut_04.dcm"
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    lut, first = np.asarray(item.LUTData, dtype=np.float64), int(item.LUTDescriptor[1])
    expected = lut[np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)] / lut.max()
    np.testing.assert_allclose(_read(str(path)), expected, atol=1e-6)
    # The shipped LUT is close to identity, so also prove it is used: a reversed LUT inverts.
    item.LUTData = [int(v) for v in lut[::-1]]
    ds.save_as(tmp_path / "reversed.dcm")
    np.testing.assert_allclose(read_image(tmp_path / "reversed.dcm"), 1.0 - expected, atol=1e-6)


def test_modality_lut_sequence_is_applied(dicom_dir):
    path = dicom_dir / "mlut_18.dcm"
    ds = pydicom.dcmread(path)
    item = ds.ModalityLUTSequence[0]
    lut, first = np.asarray(item.LUTData, dtype=np.float64), int(item.LUTDescriptor[1])
    expected = lut[np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)]
    px = dicom_pixels(path)
    np.testing.assert_array_equal(px.values, expected)
    assert px.value_range is None  # no window: the percentile path
    np.testing.assert_array_equal(_read(str(path)), normalize(expected, value_range=None))


def test_signed_ct_gets_hounsfield_units_and_is_not_a_radiograph(dicom_dir):
    path = dicom_dir / "CT_small.dcm"
    px = dicom_pixels(path)
    raw = pydicom.dcmread(path).pixel_array
    assert raw.dtype == np.int16
    np.testing.assert_array_equal(px.values, raw.astype(np.float64) - 1024.0)
    assert px.values.min() < -800 and px.value_range is None
    assert dicom_modality(path) == "CT" and safe_dicom_summary(path)["IsRadiograph"] is False


def test_percentile_path_is_a_robust_min_max(dicom_dir):
    path = dicom_dir / SIIM
    raw = _raw(str(path))
    lo, hi = np.percentile(raw, [0.5, 99.5])
    np.testing.assert_allclose(_read(str(path)), np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-6)
    wide = read_image(path, percentile_clip=(0.0, 100.0))
    np.testing.assert_allclose(wide, raw / raw.max(), atol=1e-6)  # raw.min() is 0
    with pytest.raises(ValueError, match="percentile_clip"):
        read_image(path, percentile_clip=(60.0, 40.0))


def test_fake_monochrome1_reads_as_exactly_one_minus_the_original(dicom_dir):
    original = _read(str(dicom_dir / SIIM))
    fake = _read(str(dicom_dir / "Fake_MONOHR1.dcm"))
    np.testing.assert_array_equal(fake, np.float32(1.0) - original)


def test_jpeg_lossy_decodes_or_says_what_to_install(dicom_dir):
    path = dicom_dir / "JPEG-lossy.dcm"
    if importlib.util.find_spec("libjpeg") is not None:
        image = read_image(path)
        assert image.dtype == np.float32 and image.std() > 0
        return
    error = _one_line_error(path, "JPEG Extended")
    assert "pip install pylibjpeg-libjpeg" in str(error) and "1.2.840.10008.1.2.4.51" in str(error)


def test_summary_keeps_no_identifying_values(dicom_dir):
    for path in sorted(dicom_dir.glob("*.dcm")):
        summary = safe_dicom_summary(path)
        text = json.dumps(summary)  # JSON-able, so it can go straight into a report
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in IDENTIFYING:
            value = str(header.get(tag, "") or "").strip()
            assert tag not in summary
            if len(value) > 3:
                assert value not in text, f"{path.name}: {tag} leaked"
    rg1 = safe_dicom_summary(dicom_dir / "RG1_J2KI.dcm")
    assert rg1["Modality"] == "CR" and rg1["PhotometricInterpretation"] == "MONOCHROME1"
    assert rg1["BitsStored"] == 15 and rg1["IsRadiograph"] is True and rg1["HasPixelData"] is True
    assert rg1["TransferSyntaxName"] == "JPEG 2000 Image Compression"
    mr = safe_dicom_summary(dicom_dir / "MR-SIEMENS-DICOM-WithOverlays.dcm")
    assert mr["WindowCenter"] == 450.0 and dicom_modality(dicom_dir / "MR2_J2KI.dcm") == "MR"


def test_pseudonymize_is_a_stable_sha256_prefix():
    token = pseudonymize("9RG1")
    assert token == hashlib.sha256(b"9RG1").hexdigest()[:12] and len(token) == 12
    assert pseudonymize(9) == pseudonymize("9") and pseudonymize("a") != pseudonymize("b")
    assert pseudonymize("9RG1", salt="s") != token


# ---------------------------------------------------------------------------- files made here


def test_multi_frame_reads_the_first_frame(dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / "CT_small.dcm")
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame[::-1] // 2]).tobytes()
    ds.save_as(tmp_path / "two_frames.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "two_frames.dcm"), _read(str(dicom_dir / "CT_small.dcm")))


def test_dicom_without_suffix_is_recognised(dicom_dir, tmp_path):
    copy = tmp_path / "1.2.3.4"
    shutil.copy(dicom_dir / "CT_small.dcm", copy)
    assert is_dicom(copy) and image_size(copy) == (128, 128)
    np.testing.assert_array_equal(read_image(copy), _read(str(dicom_dir / "CT_small.dcm")))


def test_sixteen_bit_png_is_scaled_by_the_dtype_maximum(tmp_path):
    values = (np.arange(40 * 30).reshape(30, 40) % 1001).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "dark16.png"), values)
    image = read_image(tmp_path / "dark16.png")
    np.testing.assert_allclose(image, values / 65535.0, rtol=1e-6)
    assert image.max() < 0.02  # a dark 16-bit image stays dark
    assert image_size(tmp_path / "dark16.png") == (40, 30)


def test_eight_bit_and_colour_images(cxr_dir, tmp_path):
    path = cxr_dir / "images" / "cxr_0005.png"
    grey = read_image(path)
    assert grey.shape == (446, 512) and image_size(path) == (512, 446)
    np.testing.assert_array_equal(grey, cv2.imread(str(path), cv2.IMREAD_UNCHANGED) / np.float32(255))
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 2] = 200  # pure red in BGR order
    cv2.imwrite(str(tmp_path / "red.png"), rgb)
    cv2.imwrite(str(tmp_path / "red.jpg"), rgb, [cv2.IMWRITE_JPEG_QUALITY, 100])
    np.testing.assert_allclose(read_image(tmp_path / "red.png"), 0.299 * 200 / 255, atol=1 / 255)
    np.testing.assert_allclose(read_image(tmp_path / "red.jpg"), 0.299 * 200 / 255, atol=3 / 255)


def _truncated_dicom(dicom_dir: Path, dest: Path) -> None:
    data = (dicom_dir / "CT_small.dcm").read_bytes()
    dest.write_bytes(data[: len(data) // 2])


def _truncated_jpeg2000(dicom_dir: Path, dest: Path) -> None:
    data = (dicom_dir / "RG3_J2KI.dcm").read_bytes()
    dest.write_bytes(data[:-100])  # pydicom only warns and drops the pixel data; must be an error


def _truncated_png(dicom_dir: Path, dest: Path) -> None:
    ok, buf = cv2.imencode(".png", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    dest.write_bytes(buf.tobytes()[: len(buf) // 2])


def _no_pixels(dicom_dir: Path, dest: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(dest)


BAD_FILES = {
    "truncated.dcm": (_truncated_dicom, "decode"),
    "truncated_j2k.dcm": (_truncated_jpeg2000, "truncated"),
    "truncated.png": (_truncated_png, "truncated"),
    "garbage.png": (lambda _d, p: p.write_bytes(b"this is not an image at all" * 10), "not a recognised image"),
    "garbage.dcm": (lambda _d, p: p.write_bytes(bytes(range(256)) * 4), "not a DICOM"),
    "empty.png": (lambda _d, p: p.write_bytes(b""), "empty"),
    "empty.dcm": (lambda _d, p: p.write_bytes(b""), "empty"),
    "one_pixel.png": (lambda _d, p: cv2.imwrite(str(p), np.full((1, 1), 128, np.uint8)), "too small"),
    "no_pixels.dcm": (_no_pixels, "no pixel data"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_one_line_naming_the_file(dicom_dir, tmp_path, name):
    make, match = BAD_FILES[name]
    make(dicom_dir, tmp_path / name)
    _one_line_error(tmp_path / name, match)


def test_missing_file_and_directory(tmp_path):
    _one_line_error(tmp_path / "missing.png", "not found")
    with pytest.raises(DataError, match="not found"):
        image_size(tmp_path / "missing.dcm")
    with pytest.raises(DataError, match="not a regular file"):
        read_image(tmp_path)
