"""datasets.cache on real shared PNGs and DICOMs, at 64 px so the suite stays fast."""
from __future__ import annotations

import json
import os
import shutil
import time

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.datasets.cache import (
    STALE_TEMP_SECONDS,
    ImageCache,
    dhash,
    phash_distance,
    pixel_hash,
    preprocess_image,
)
from cxr_noisy_student.datasets.readers import image_size, read_image
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.config import PreprocessConfig

SIZE = 64
PNG_IDS = ["cxr_0005", "cxr_0006", "cxr_0007", "cxr_0008", "cxr_0009", "cxr_0010", "cxr_0013", "cxr_0014",
           "cxr_0018", "cxr_0019", "cxr_0020", "cxr_0023", "cxr_0024", "cxr_0025", "cxr_0073", "cxr_0074",
           "cxr_0100", "cxr_0132", "cxr_0133", "cxr_0208"]
SIIM = "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DICOMS = {"siim": SIIM, "mr2": "MR2_J2KI.dcm"}


@pytest.fixture(scope="module")
def items(cxr_dir, dicom_dir, tmp_path_factory) -> pd.DataFrame:
    """20 shared PNGs, 2 DICOMs and a byte-identical copy of cxr_0132 under another name."""
    rows = [(i, str(cxr_dir / "images" / f"{i}.png")) for i in PNG_IDS]
    rows += [(i, str(dicom_dir / name)) for i, name in DICOMS.items()]
    copy = shutil.copy(cxr_dir / "images" / "cxr_0132.png", tmp_path_factory.mktemp("src") / "copy.png")
    rows.append(("cxr_0132_copy", str(copy)))
    return pd.DataFrame(rows, columns=["image_id", "path"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, items) -> ImageCache:
    """One inline build shared by the read-only tests (the expensive part: 22 decodes)."""
    cache = ImageCache(tmp_path_factory.mktemp("cache"), PreprocessConfig(size=SIZE))
    failures = cache.build(items, workers=0)
    assert failures.empty, failures.to_string()
    assert cache.last_stats.decoded == len(items) and cache.last_stats.reused == 0
    return cache


def _copies(cxr_dir, folder, ids=("cxr_0005", "cxr_0006")) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [shutil.copy(cxr_dir / "images" / f"{i}.png", folder / f"{i}.png") for i in ids]
    return pd.DataFrame({"image_id": list(ids), "path": [str(p) for p in paths]})


# ---------------------------------------------------------------------------- build and load


def test_load_returns_the_preprocessed_image(built, items):
    for image_id, path in zip(items["image_id"], items["path"]):
        image = built.load(image_id)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE) and image.flags.writeable
    for image_id in ("cxr_0005", "siim", "mr2"):
        path = items.set_index("image_id").loc[image_id, "path"]
        np.testing.assert_array_equal(built.load(image_id), preprocess_image(read_image(path), size=SIZE))


def test_second_build_decodes_nothing(built, items):
    rerun = ImageCache(built.dir.parent, PreprocessConfig(size=SIZE))  # a new process would do this
    assert rerun.dir == built.dir
    assert rerun.build(items, workers=0).empty
    assert (rerun.last_stats.decoded, rerun.last_stats.reused) == (0, len(items))
    np.testing.assert_array_equal(rerun.load("cxr_0100"), built.load("cxr_0100"))


def test_mean_and_std_do_not_key_the_cache(built):
    assert ImageCache(built.dir.parent, PreprocessConfig(size=SIZE, mean=0.4, std=0.3)).dir == built.dir
    assert ImageCache(built.dir.parent, PreprocessConfig(size=SIZE, percentile_clip=(1.0, 99.0))).dir != built.dir


def test_hashes_find_identical_and_near_identical_images(built, items):
    table = built.hashes().set_index("image_id")
    assert list(built.hashes().columns) == ["image_id", "pixel_hash", "phash"] and len(table) == len(items)
    assert table.loc["cxr_0132", "pixel_hash"] == table.loc["cxr_0132_copy", "pixel_hash"]
    assert table["pixel_hash"].nunique() == len(items) - 1  # only the byte copy is pixel-identical
    # cxr_0208 is the same radiograph filed again for another patient, but re-encoded: up to 7 grey
    # levels differ in 60 % of its pixels. The perceptual hash still matches exactly.
    assert table.loc["cxr_0132", "pixel_hash"] != table.loc["cxr_0208", "pixel_hash"]
    assert table.loc["cxr_0132", "phash"] == table.loc["cxr_0208", "phash"]
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in table["phash"])
    # cxr_0073/0074 are a known near-duplicate pair: closer to each other than to any other image.
    near = phash_distance(table.loc["cxr_0073", "phash"], table.loc["cxr_0074", "phash"])
    pair = ("cxr_0073", "cxr_0074")
    others = [phash_distance(table.loc["cxr_0073", "phash"], h) for i, h in table["phash"].items() if i not in pair]
    assert near <= 3 < min(others)


def test_info_records_source_sizes(built, items):
    info = built.info().set_index("image_id")
    for image_id, path in zip(items["image_id"], items["path"]):
        assert (info.loc[image_id, "width"], info.loc[image_id, "height"]) == image_size(path)
    index = json.loads((built.dir / "index.json").read_text())
    assert set(index["images"]) == set(items["image_id"]) and index["params"]["size"] == SIZE


def test_path_of_writes_a_readable_png_once(built, tmp_path):
    png = built.path_of("siim")
    np.testing.assert_array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED), built.load("siim"))
    stamp = png.stat().st_mtime_ns
    assert built.path_of("siim") == png and png.stat().st_mtime_ns == stamp
    out = built.export_png("cxr_0005", tmp_path / "exports" / "cxr_0005.png")
    np.testing.assert_array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), built.load("cxr_0005"))


def test_unknown_image_and_damaged_cache_file_are_clear_errors(built, tmp_path):
    with pytest.raises(DataError, match="not in the cache"):
        built.load("nope")
    cache = ImageCache(tmp_path, PreprocessConfig(size=SIZE))
    cache.build(built.info()[["image_id", "path"]].head(1))
    file = next(cache.dir.glob("*.u8"))
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(DataError, match="expected 4096"):
        cache.load(built.info()["image_id"].iloc[0])


# ---------------------------------------------------------------------------- invalidation


def test_touching_a_source_or_changing_size_rebuilds(cxr_dir, tmp_path):
    items = _copies(cxr_dir, tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", PreprocessConfig(size=SIZE))
    cache.build(items)
    before = cache.load("cxr_0005")
    cv2.imwrite(items["path"][0], 255 - cv2.imread(items["path"][0], cv2.IMREAD_UNCHANGED))
    stat = os.stat(items["path"][0])
    os.utime(items["path"][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.build(items).empty
    assert (cache.last_stats.decoded, cache.last_stats.reused) == (1, 1)
    np.testing.assert_allclose(cache.load("cxr_0005"), 255 - before, atol=1)  # rounding ties
    assert len(list(cache.dir.glob("*.u8"))) == 2, "the stale file of the old source is removed"
    bigger = ImageCache(tmp_path / "cache", PreprocessConfig(size=2 * SIZE))
    bigger.build(items)
    assert bigger.dir != cache.dir and bigger.last_stats.decoded == 2
    assert bigger.load("cxr_0005").shape == (2 * SIZE, 2 * SIZE) and cache.load("cxr_0005").shape == (SIZE, SIZE)


def test_bad_files_are_returned_as_failures(cxr_dir, dicom_dir, tmp_path):
    items = _copies(cxr_dir, tmp_path / "src", ids=("cxr_0005",))
    (tmp_path / "src" / "garbage.png").write_bytes(b"not a png" * 50)
    good = (tmp_path / "src" / "cxr_0005.png").read_bytes()
    (tmp_path / "src" / "cut.png").write_bytes(good[: len(good) // 3])
    extra = pd.DataFrame({
        "image_id": ["garbage", "cut", "missing", "lossy"],
        "path": [str(tmp_path / "src" / "garbage.png"), str(tmp_path / "src" / "cut.png"),
                 str(tmp_path / "src" / "missing.png"), str(dicom_dir / "JPEG-lossy.dcm")],
    })
    cache = ImageCache(tmp_path / "cache", PreprocessConfig(size=SIZE))
    failures = cache.build(pd.concat([items, extra], ignore_index=True)).set_index("image_id")
    assert list(failures.columns) == ["path", "problem"]
    assert "not a recognised image" in failures.loc["garbage", "problem"]
    assert "truncated" in failures.loc["cut", "problem"]
    assert failures.loc["missing", "problem"] == "file not found"
    lossy = failures.loc["lossy", "problem"] if "lossy" in failures.index else "decoded"
    assert "pylibjpeg-libjpeg" in lossy or lossy == "decoded"
    assert all("\n" not in p and not p.startswith(str(tmp_path)) for p in failures["problem"])
    assert set(cache.hashes()["image_id"]) == {"cxr_0005"} | ({"lossy"} - set(failures.index))


def test_a_source_that_breaks_leaves_the_index(cxr_dir, tmp_path):
    items = _copies(cxr_dir, tmp_path / "src", ids=("cxr_0005",))
    cache = ImageCache(tmp_path / "cache", PreprocessConfig(size=SIZE))
    cache.build(items)
    with open(items["path"][0], "r+b") as f:
        f.truncate(200)
    failures = cache.build(items)
    assert list(failures["image_id"]) == ["cxr_0005"]
    with pytest.raises(DataError, match="not in the cache"):
        cache.load("cxr_0005")  # never the stale copy of a file that is now broken
    assert not list(cache.dir.glob("*.u8"))


def test_leftover_temp_files_are_ignored_and_cleaned(cxr_dir, tmp_path):
    items = _copies(cxr_dir, tmp_path / "src")
    cache = ImageCache(tmp_path / "cache", PreprocessConfig(size=SIZE))
    cache.build(items)
    killed = cache.dir / ".0123456789abcdef0123.u8.k1ll3d.tmp"  # what atomic_path leaves on a kill
    killed.write_bytes(b"half a file")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(killed, (old, old))
    live = cache.dir / ".fedcba9876543210fedc.u8.l1ve.tmp"  # a concurrent writer's, seconds old
    live.write_bytes(b"being written")
    assert cache.build(items).empty and cache.last_stats.decoded == 0
    assert not killed.exists() and live.exists()
    assert cache.load("cxr_0006").shape == (SIZE, SIZE)


def test_items_are_validated(tmp_path):
    cache = ImageCache(tmp_path, PreprocessConfig(size=SIZE))
    with pytest.raises(DataError, match="lacks columns"):
        cache.build(pd.DataFrame({"image_id": ["a"]}))
    with pytest.raises(DataError, match="duplicated image_id 'a'"):
        cache.build(pd.DataFrame({"image_id": ["a", "a"], "path": ["x.png", "y.png"]}))


def test_process_pool_build_matches_inline(built, items, tmp_path):
    subset = items.iloc[[0, 1, 17, 20]]
    pooled = ImageCache(tmp_path, PreprocessConfig(size=SIZE))
    assert pooled.build(subset, workers=2).empty and pooled.last_stats.decoded == 4
    for image_id in subset["image_id"]:
        np.testing.assert_array_equal(pooled.load(image_id), built.load(image_id))
    assert pooled.hashes().equals(built.hashes(subset["image_id"]))


# ---------------------------------------------------------------------------- pure helpers


def test_pixel_hash_ignores_float_noise_but_not_shape():
    # Like a decoded 8-bit PNG: multiples of 1/255, which quantise to exact uint16 levels.
    image = (np.random.default_rng(0).integers(0, 256, (32, 48)) / 255.0).astype(np.float32)
    assert pixel_hash(image) == pixel_hash(image + np.float32(1e-6)) == pixel_hash(image.astype(np.float64))
    assert pixel_hash(image) != pixel_hash(image.reshape(48, 32))
    assert pixel_hash(image) != pixel_hash(np.clip(image + 0.01, 0, 1))


def test_dhash_distance_of_an_inverted_image_is_64():
    image = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    assert phash_distance(dhash(image), dhash(image)) == 0
    assert phash_distance(dhash(image), dhash(255 - image)) == 64


def test_preprocess_image_squashes_to_a_square():
    image = np.zeros((100, 50), np.float32)
    image[:, 25:] = 1.0  # right half white: stays the right half after a non-aspect resize
    out = preprocess_image(image, size=32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert (out[:, :16] == 0).all() and (out[:, 16:] == 255).all()
