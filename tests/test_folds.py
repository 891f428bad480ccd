"""Duplicate-aware folds on the shared COVID set, where patients 97 and 178 are one case filed twice.

Hashes are computed here from the PNGs (not through the cache): sha1 of the decoded pixels and a
64-bit DCT perceptual hash (32x32 grey -> 2-D DCT -> 8x8 lowest frequencies above their median).
The duplicated images of patients 97 and 178 were re-encoded (pixels differ by up to 7 grey
levels), so only the perceptual hash can find them -- the tests show both facts.
"""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_noisy_student.datasets.adapters.generic import load_cxr_covid, load_generic
from cxr_noisy_student.datasets.cache import dct_phash
from cxr_noisy_student.datasets.readers import read_image
from cxr_noisy_student.datasets.folds import (assign_folds, chained_groups, check_no_leak, duplicate_groups,
                                              duplicate_links, fold_strata)
from cxr_noisy_student.datasets.errors import DataError

CROSS_PATIENT_PAIRS = [("cxr_0132", "cxr_0208"), ("cxr_0133", "cxr_0209"), ("cxr_0134", "cxr_0210"),
                       ("cxr_0135", "cxr_0211")]
PHASH_DISTANCE = 4
"""Measured on this set: the four copies are at distance 0, cxr_0073/cxr_0074 at 2, the next pair at 6."""


def _hashes(path) -> tuple[str, str]:
    """(sha1 of the decoded pixels, the cache's DCT perceptual hash) of one image."""
    image = read_image(path)
    return hashlib.sha1(np.asarray(Image.open(path).convert("L")).tobytes()).hexdigest(), dct_phash(image)


@pytest.fixture(scope="module")
def cxr(cxr_dir):
    items = load_cxr_covid(cxr_dir).items
    hashes = pd.DataFrame([(i, *_hashes(p)) for i, p in zip(items["image_id"], items["path"])],
                          columns=["image_id", "pixel_hash", "phash"])
    return items, hashes


def test_pixel_hashes_alone_miss_the_reencoded_copies(cxr):
    items, hashes = cxr
    assert hashes["pixel_hash"].nunique() == len(items) == 251
    report = assign_folds(items, hashes, k=5, seed=0).report
    assert report["duplicate_groups"] == 0 and report["cross_patient_duplicates"] == []


def test_folds_keep_the_twice_filed_patients_together_without_being_told(cxr):
    items, hashes = cxr
    result = assign_folds(items, hashes, k=5, seed=0, phash_max_distance=PHASH_DISTANCE)
    folds = result.folds
    assert len(folds) == 251 and sorted(folds.unique()) == [0, 1, 2, 3, 4]
    assert all(folds[a] == folds[b] for a, b in CROSS_PATIENT_PAIRS)
    by_patient = items.assign(fold=folds.loc[items["image_id"]].to_numpy()).groupby("patient_id")["fold"]
    assert (by_patient.nunique() == 1).all()  # every patient in exactly one fold
    assert by_patient.first()["97"] == by_patient.first()["178"]
    found = {frozenset(d["images"]): d["patients"] for d in result.report["cross_patient_duplicates"]}
    assert found == {frozenset(pair): ["178", "97"] for pair in CROSS_PATIENT_PAIRS}
    assert result.report["label_conflicts"] == []  # label_group agrees on all four copies
    no_finding = items.set_index("image_id").loc[folds.index, "y:No Finding"].groupby(folds.to_numpy()).sum()
    assert no_finding.min() >= 2  # 14 normal images spread over 5 folds by stratification
    check_no_leak(result.folds, result.groups)


def test_report_lists_conflicting_duplicates_on_the_targets_used(cxr, cxr_dir):
    _, hashes = cxr
    items = load_generic(cxr_dir, "images.csv", study_label_column="study_label").items
    report = assign_folds(items, hashes, k=5, seed=0, phash_max_distance=PHASH_DISTANCE).report
    conflicts = {(c["image_a"], c["image_b"]): (c["label_a"], c["label_b"]) for c in report["label_conflicts"]}
    assert conflicts == {pair: ("COVID-19, ARDS", "COVID-19") for pair in CROSS_PATIENT_PAIRS[:3]}


def test_phash_threshold_groups_a_near_duplicate_pair(cxr):
    _, hashes = cxr
    exact = duplicate_groups(hashes, phash_max_distance=0)
    assert exact["cxr_0073"] != exact["cxr_0074"] and exact.nunique() == 251
    near = duplicate_groups(hashes, phash_max_distance=PHASH_DISTANCE)
    assert near["cxr_0073"] == near["cxr_0074"]
    sizes = near.value_counts()
    assert (sizes > 1).sum() == 5 and sizes.max() == 2  # the 4 copies + 0073/0074, nothing else
    strict = duplicate_groups(hashes, phash_max_distance=1)
    assert strict["cxr_0073"] != strict["cxr_0074"]


def test_check_no_leak_raises_on_a_hand_broken_assignment(cxr):
    items, hashes = cxr
    result = assign_folds(items, hashes, k=5, seed=0, phash_max_distance=PHASH_DISTANCE)
    broken = result.folds.copy()
    broken["cxr_0208"] = (broken["cxr_0132"] + 1) % 5
    with pytest.raises(DataError, match=r"fold leak: group \d+ straddles folds .*cxr_0208"):
        check_no_leak(broken, result.groups)


def _synthetic_items(n: int) -> pd.DataFrame:
    ids = [f"i{i}" for i in range(n)]
    labels = np.eye(2)[np.arange(n) % 2]
    return pd.DataFrame({"image_id": ids, "patient_id": [f"p{i}" for i in range(n)], "role": "labeled",
                         "y:a": labels[:, 0], "y:b": labels[:, 1]})


def test_duplicate_groups_are_transitive_and_images_without_hash_stand_alone():
    hashes = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"],
                           "pixel_hash": ["h1", "h1", "h2", None, "h3"],
                           "phash": ["0000000000000000", "00000000000000ff", "0000000000000001", "0", None]})
    groups = duplicate_groups(hashes, phash_max_distance=1)
    assert groups["a"] == groups["b"] == groups["c"] == groups["d"]  # b by pixels, c and d by phash
    assert groups["e"] != groups["a"]
    alone = duplicate_groups(hashes.assign(phash=None), phash_max_distance=3)
    assert alone["a"] == alone["b"] and alone.nunique() == 4


def test_unlabeled_duplicates_are_reported_and_get_no_fold():
    items = _synthetic_items(10)
    items.loc[9, ["role", "y:a", "y:b"]] = ["unlabeled", np.nan, np.nan]
    hashes = pd.DataFrame({"image_id": items["image_id"], "pixel_hash": [f"h{i}" for i in range(9)] + ["h0"]})
    result = assign_folds(items, hashes, k=3, seed=1)
    assert "i9" not in result.folds.index and result.groups["i9"] == result.groups["i0"]
    assert result.report["cross_role_duplicates"] == [{"images": ["i0", "i9"], "roles": ["labeled", "unlabeled"]}]
    assert result.report["label_conflicts"] == []  # an unlabeled copy has nothing to disagree with
    assert json.loads(json.dumps(result.report))["fold_sizes"] == {"0": 3, "1": 3, "2": 3}
    assert assign_folds(items, hashes, k=3, seed=1).folds.equals(result.folds)  # same seed, same folds
    with pytest.raises(DataError, match="missing columns \\['phash'\\]"):
        assign_folds(items, hashes, k=3, seed=1, phash_max_distance=2)


def test_duplicates_across_roles_are_listed_as_pairs_and_test_copies_of_training_images_named():
    items = _synthetic_items(12)
    items.loc[9, ["role", "y:a", "y:b"]] = ["unlabeled", np.nan, np.nan]
    items.loc[[10, 11], "role"] = "test"
    hashes = pd.DataFrame({"image_id": items["image_id"],
                           "pixel_hash": [f"h{i}" for i in range(9)] + ["h0", "h3", "h9"]})  # i9 ~ i0, i10 ~ i3
    report = assign_folds(items, hashes, k=3, seed=1).report
    pairs = {(p["image_a"], p["role_a"], p["image_b"], p["role_b"]) for p in report["cross_role_pairs"]}
    assert pairs == {("i0", "labeled", "i9", "unlabeled"), ("i3", "labeled", "i10", "test")}
    assert report["test_duplicates_of_training"] == ["i10"]  # i11 duplicates nothing; i9 is no test image


def test_a_chain_of_similar_images_is_one_group_but_only_direct_links_are_duplicates():
    """a ~ b ~ c (2 bits apart each) but a and c are 4 bits apart: one group, yet the test image c
    duplicates no training image -- the demo once lost 199 of its 360 test images
    to such a chain -- and a group this large is reported as chained."""
    n = 12
    items = _synthetic_items(n)
    items.loc[[10, 11], "role"] = "test"
    items.loc[5, ["role", "y:a", "y:b"]] = ["unlabeled", np.nan, np.nan]
    chain = {0: 0b0000, 5: 0b0011, 11: 0b1111}  # i0 (labeled) ~ i5 (unlabeled) ~ i11 (test)
    phash = [f"{chain.get(i, (i + 1) * 0x0F0F0F0F00):016x}" for i in range(n)]
    hashes = pd.DataFrame({"image_id": items["image_id"], "pixel_hash": [f"h{i}" for i in range(n)], "phash": phash})
    result = assign_folds(items, hashes, k=3, seed=1, phash_max_distance=2)
    assert result.groups["i0"] == result.groups["i5"] == result.groups["i11"]
    assert result.report["test_duplicates_of_training"] == []
    assert {(p["image_a"], p["image_b"]) for p in result.report["cross_role_pairs"]} == {("i0", "i5"), ("i5", "i11")}
    links = duplicate_links(hashes, phash_max_distance=2)
    assert list(links.itertuples(index=False, name=None)) == [("i0", "i5"), ("i5", "i11")]
    chained = chained_groups(duplicate_groups(hashes, 2, links=links), links, min_images=3, min_share=0.2)
    assert chained == [{"group": 0, "images": 3, "share": 0.25, "direct_links": 2}]
    assert result.report["chained_groups"] == []  # 3 images: under the default 10


def test_fewer_groups_than_folds_fails_with_one_line():
    items = _synthetic_items(6).assign(patient_id=["p0", "p0", "p1", "p1", "p2", "p2"])
    hashes = pd.DataFrame({"image_id": items["image_id"], "pixel_hash": list("abcdef")})
    with pytest.raises(DataError, match="folds.k=5: the 6 labeled images form only 3 patient/duplicate groups, fewer "
                                        "than k=5 folds"):
        assign_folds(items, hashes, k=5, seed=0)


def test_fold_strata_handle_multilabel_and_missing_labels():
    targets = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 0], [np.nan, np.nan, np.nan]])
    assert fold_strata(targets).tolist() == [1, 0, -1, -2]
