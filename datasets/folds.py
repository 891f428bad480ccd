"""Duplicate-aware folds: stratified by study label, grouped by patient AND by identical image.

Why both: out-of-fold predictions are only honest when no image of the validation fold has a twin
in the training folds. Grouping by patient is the usual guard, but public chest X-ray sets file the
same case under two patients (in the shared COVID set patients 97 and 178 share four identical
images), so images with the same pixel hash -- and, optionally, a near-identical perceptual hash --
are tied together as well. Groups are the connected components of "same patient" OR "same
duplicate group", so one patient linked to another through a shared image pulls all of both
patients' images into one fold.

Folds depend on a hashes table (``image_id, pixel_hash, phash``), not on the cache object, so they
can be computed and tested from any source of hashes.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from .errors import DataError

LABEL_PREFIX = "y:"
NO_POSITIVE = -1
"""Stratum of a labeled image whose study targets are all negative (multilabel)."""
NO_STUDY_LABEL = -2
"""Stratum of a labeled-role image without a study label (box-only annotation)."""


@dataclass(frozen=True)
class FoldAssignment:
    """Folds of the labeled images, the groups that made them, and what was found on the way.

    Attributes:
        folds: image_id -> fold (0..k-1), labeled-role images only.
        groups: image_id -> group id, every image of ``items`` (so a caller can also see when an
            unlabeled or test image is tied to a labeled one).
        report: JSON-ready dict: counts, cross-patient duplicate groups, label conflicts between
            identical images, duplicates across roles (``cross_role_pairs``; the test images among
            them that duplicate a labeled, i.e. training, image: ``test_duplicates_of_training``),
            fold sizes per stratum, sklearn warnings.
    """

    folds: pd.Series
    groups: pd.Series
    report: dict


# ---------------------------------------------------------------------------- duplicate groups


def _phash_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Perceptual hashes (hex strings or ints, at most 64 bits) -> (uint64 codes, valid mask)."""
    codes = np.zeros(len(values), dtype=np.uint64)
    valid = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
            continue
        try:
            code = int(value, 16) if isinstance(value, str) else int(value)
        except ValueError:
            raise DataError(f"hashes: phash {value!r} is neither a hex string nor an integer") from None
        if not 0 <= code < 2**64:
            raise DataError(f"hashes: phash {value!r} does not fit in 64 bits")
        codes[i], valid[i] = code, True
    return codes, valid


def _near_pairs(codes: np.ndarray, max_distance: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose Hamming distance is at most ``max_distance``, in memory-bounded chunks."""
    rows, cols = [], []
    for start in range(0, len(codes), chunk):
        distance = np.bitwise_count(codes[start:start + chunk, None] ^ codes[None, :])
        i, j = np.nonzero(distance <= max_distance)
        i += start
        keep = j > i
        rows.append(i[keep])
        cols.append(j[keep])
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes, numbered by first appearance."""
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels)[0]


def duplicate_links(hashes: pd.DataFrame, phash_max_distance: int = 0) -> pd.DataFrame:
    """Direct duplicate pairs (image_a, image_b), in the order of ``hashes``' rows: identical pixel
    hashes, plus perceptual hashes at most ``phash_max_distance`` bits apart if asked.

    Why pairs and not only groups: groups are the transitive closure of these links, and a chain of
    merely similar images (a -> b -> c) can tie images that are not alike at all; what an image
    *duplicates* -- a test image that repeats a training image, two copies whose labels disagree --
    is read on the direct links.
    """
    missing = {"image_id", "pixel_hash", *(["phash"] if phash_max_distance > 0 else [])} - set(hashes.columns)
    if missing:
        raise DataError(f"hashes: missing columns {sorted(missing)}; found {list(hashes.columns)}")
    ids = hashes["image_id"].astype(str)
    if ids.duplicated().any():
        raise DataError(f"hashes: duplicated image_id {ids[ids.duplicated()].iloc[0]!r}")
    codes = pd.factorize(hashes["pixel_hash"])[0]  # missing hash -> -1
    pairs = set()
    repeated = (codes >= 0) & pd.Series(codes).duplicated(keep=False).to_numpy()
    for _, rows in pd.Series(np.flatnonzero(repeated)).groupby(codes[repeated]):
        pairs.update(itertools.combinations(rows.tolist(), 2))
    if phash_max_distance > 0:
        phash, valid = _phash_codes(hashes["phash"])
        index = np.flatnonzero(valid)
        i, j = _near_pairs(phash[index], phash_max_distance)
        pairs.update(zip(index[i].tolist(), index[j].tolist()))
    ordered = sorted(pairs)
    names = ids.to_numpy()
    return pd.DataFrame({"image_a": [names[i] for i, _ in ordered], "image_b": [names[j] for _, j in ordered]},
                        dtype=object)


def duplicate_groups(hashes: pd.DataFrame, phash_max_distance: int = 0, links: pd.DataFrame | None = None) -> pd.Series:
    """image_id -> duplicate group id: identical pixel hashes, plus near perceptual hashes if asked.

    Args:
        hashes: columns image_id, pixel_hash, phash (64-bit hex string or int; may be missing).
        phash_max_distance: link images whose perceptual hashes differ in at most this many bits;
            0 keeps only pixel-identical images together (a perceptual hash also matches images
            that are merely similar, e.g. two follow-up films of one patient).
        links: :func:`duplicate_links` of the same arguments, when the caller has them already.

    Returns:
        Series indexed by image_id, named "duplicate_group" (the connected components of the
        links); an image without hashes is alone.
    """
    links = duplicate_links(hashes, phash_max_distance) if links is None else links
    ids = hashes["image_id"].astype(str)
    position = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    rows = position.loc[links["image_a"]].to_numpy() if len(links) else np.zeros(0, np.int64)
    cols = position.loc[links["image_b"]].to_numpy() if len(links) else np.zeros(0, np.int64)
    labels = _components(len(ids), rows, cols)
    return pd.Series(labels, index=pd.Index(ids, name="image_id"), name="duplicate_group")


def chained_groups(duplicates: pd.Series, links: pd.DataFrame, *, min_images: int = 10,
                   min_share: float = 0.02) -> list[dict]:
    """Duplicate groups too large to be copies of one case: at least ``min_images`` images and
    ``min_share`` of all (``direct_links``: how many links inside tie them).

    Why it matters: a group is kept in one fold and its test images are checked against training;
    when the images of a set are alike (synthetic images, one scanner's flat fields) a perceptual
    hash chains hundreds of distinct images into one group -- the folds lose their balance and
    nothing says why. Measured on the demo: at distance 4 one group held 632 of 840 images
    (nearest unrelated pairs 2 bits apart); at 0 (pixel-identical) it holds the demo's copies only.
    """
    sizes = duplicates.value_counts()
    big = sizes[(sizes >= min_images) & (sizes >= min_share * len(duplicates))]
    out = []
    for group, size in big.items():
        members = set(duplicates.index[duplicates == group])
        inside = int(links["image_a"].isin(members).sum()) if len(links) else 0
        out.append({"group": int(group), "images": int(size), "share": round(float(size) / len(duplicates), 3),
                    "direct_links": inside})
    return out


# ---------------------------------------------------------------------------- groups + folds


def _check_items(items: pd.DataFrame) -> list[str]:
    """The study-target columns of ``items``; DataError when a needed column is missing."""
    missing = [c for c in ("image_id", "patient_id", "role") if c not in items.columns]
    label_cols = [c for c in items.columns if str(c).startswith(LABEL_PREFIX)]
    if missing or not label_cols:
        raise DataError(f"assign_folds: items lack columns {missing or ['y:<class>']}; found {list(items.columns)}")
    duplicated = items["image_id"][items["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"assign_folds: duplicated image_id {duplicated.iloc[0]!r}")
    return label_cols


def patient_duplicate_groups(items: pd.DataFrame, duplicates: pd.Series) -> pd.Series:
    """image_id -> group: connected components of (same patient) OR (same duplicate group).

    Nodes are images, patients and duplicate groups; an image is linked to its patient and to its
    duplicate group, so components join every image reachable through either relation.
    """
    ids = items["image_id"].astype(str).to_numpy()
    patients = items["patient_id"].astype(str).where(items["patient_id"].notna() & (items["patient_id"] != ""),
                                                     "image:" + items["image_id"].astype(str))
    patient_codes = pd.factorize(patients)[0]
    dup = duplicates.reindex(ids)
    dup_codes = np.where(dup.notna(), pd.factorize(dup)[0], -1)
    n, n_pat = len(ids), patient_codes.max(initial=-1) + 1
    has_dup = dup_codes >= 0
    rows = np.concatenate([np.arange(n), np.arange(n)[has_dup]])
    cols = np.concatenate([n + patient_codes, n + n_pat + dup_codes[has_dup]])
    labels = _components(n + n_pat + dup_codes.max(initial=-1) + 1, rows, cols)[:n]
    return pd.Series(pd.factorize(labels)[0], index=pd.Index(ids, name="image_id"), name="group")


def fold_strata(targets: np.ndarray) -> np.ndarray:
    """Stratum per image: the first class whose target is >= 0.5 (the argmax for one-hot labels).

    Multilabel targets with no positive class get ``NO_POSITIVE``; rows without a study label
    (NaN) get ``NO_STUDY_LABEL``, so box-only images are spread over the folds too.
    """
    targets = np.asarray(targets, dtype=np.float64)
    positive = np.nan_to_num(targets, nan=0.0) >= 0.5
    strata = np.where(positive.any(axis=1), positive.argmax(axis=1), NO_POSITIVE)
    return np.where(np.isnan(targets).all(axis=1), NO_STUDY_LABEL, strata)


def _split(strata: np.ndarray, groups: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Fold per row with StratifiedGroupKFold; sklearn's warnings are returned for the report."""
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DataError(f"folds.k={k}: the {len(groups)} labeled images form only {n_groups} patient/duplicate "
                        f"groups, fewer than k={k} folds (each fold needs one): label more patients or lower folds.k")
    folds = np.full(len(strata), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fold, (_, val) in enumerate(splitter.split(np.zeros(len(strata)), strata, groups)):
            folds[val] = fold
    return folds, [str(w.message) for w in caught]


def assign_folds(items: pd.DataFrame, hashes: pd.DataFrame, k: int, seed: int,
                 phash_max_distance: int = 0) -> FoldAssignment:
    """k folds of the labeled images, stratified by study label, never splitting a patient or duplicate.

    Args:
        items: image_id, patient_id, role and the ``y:<class>`` study targets (an ItemTable's items):
            give every role, so that duplicates and patients shared with unlabeled and test images
            are found too (only labeled images get a fold).
        hashes: image_id, pixel_hash, phash for (at least) the items' images; images without a
            hash are only grouped by patient (and listed in the report).
        k: number of folds.
        seed: shuffling seed of StratifiedGroupKFold.
        phash_max_distance: see :func:`duplicate_groups`.

    Raises:
        DataError: a needed column is missing, or there are fewer groups than folds.
    """
    label_cols = _check_items(items)
    items = items.assign(image_id=items["image_id"].astype(str))
    hashes = hashes.assign(image_id=hashes["image_id"].astype(str))
    hashes = hashes[hashes["image_id"].isin(set(items["image_id"]))]
    links = duplicate_links(hashes, phash_max_distance)
    duplicates = duplicate_groups(hashes, phash_max_distance, links=links)
    groups = patient_duplicate_groups(items, duplicates)
    labeled = items[items["role"] == "labeled"]
    strata = fold_strata(labeled[label_cols].to_numpy(dtype=np.float64))
    folds, caught = _split(strata, groups.loc[labeled["image_id"]].to_numpy(), k, seed)
    folds = pd.Series(folds, index=pd.Index(labeled["image_id"], name="image_id"), name="fold")
    report = _report(items, duplicates, links, groups, folds, strata, label_cols, k=k, seed=seed,
                     phash_max_distance=phash_max_distance)
    report["warnings"] = caught
    return FoldAssignment(folds=folds, groups=groups, report=report)


def hold_out_groups(items: pd.DataFrame, hashes: pd.DataFrame, candidates: pd.Series, *, fraction: float, seed: int,
                    phash_max_distance: int = 0) -> list[str]:
    """Image ids of a held-out test part: whole patient/duplicate groups, drawn (seeded) among the
    groups holding candidate images until about ``fraction`` of the candidates are in it.

    Why whole groups: a test image whose patient (or a copy of it) is in training scores what the
    model memorised, not what it learned. Every image of a drawn group is held out, candidate or
    not, so the split never cuts a group.

    Args:
        items: image_id and patient_id of every image that may be held out.
        candidates: boolean per row of ``items``: the images the fraction counts (e.g. box-labeled ones).
    """
    if not 0 < fraction < 1:
        raise DataError(f"data.test_fraction must be between 0 and 1, got {fraction}")
    items = items.assign(image_id=items["image_id"].astype(str)).reset_index(drop=True)
    hashes = hashes.assign(image_id=hashes["image_id"].astype(str))
    duplicates = duplicate_groups(hashes[hashes["image_id"].isin(set(items["image_id"]))], phash_max_distance)
    groups = patient_duplicate_groups(items, duplicates)
    wanted = np.asarray(candidates, dtype=bool)
    per_group = pd.Series(wanted, index=groups.index).groupby(groups.to_numpy()).sum()
    order = np.random.default_rng(seed).permutation(per_group[per_group > 0].index.to_numpy())
    target, taken, chosen = fraction * wanted.sum(), 0, []
    for group in order:
        if taken >= target:
            break
        chosen.append(group)
        taken += int(per_group[group])
    return sorted(groups.index[groups.isin(chosen)])


# ---------------------------------------------------------------------------- report


def _describe(targets: pd.Series, label_cols: list[str]) -> str:
    """Readable study label: the positive class names joined by '+', 'none' or 'unlabeled'."""
    values = targets[label_cols].to_numpy(dtype=np.float64)
    if np.isnan(values).all():
        return "unlabeled"
    names = [c[len(LABEL_PREFIX):] for c, v in zip(label_cols, values) if v >= 0.5]
    return "+".join(names) or "none"


def _duplicate_findings(items: pd.DataFrame, duplicates: pd.Series, links: pd.DataFrame, label_cols: list[str]) -> dict:
    """Duplicate groups with more than one image (across patients, across roles), and on the direct
    links (:func:`duplicate_links`): pairs across roles and label conflicts.

    A conflict is a pair of duplicates with study labels whose engine targets differ (pairs where
    one side has no study label are not conflicts: there is nothing to disagree with).
    """
    by_id = items.set_index("image_id")
    cross_patient, cross_role, n_groups = [], [], 0
    shared = duplicates[duplicates.map(duplicates.value_counts()) > 1]
    for _, members in shared.groupby(shared):
        n_groups += 1
        rows = by_id.loc[members.index]
        ids = list(members.index)
        if rows["patient_id"].nunique() > 1:
            cross_patient.append({"images": ids, "patients": sorted(rows["patient_id"].astype(str).unique())})
        if rows["role"].nunique() > 1:
            cross_role.append({"images": ids, "roles": rows["role"].tolist()})
    pairs, conflicts = [], []
    for a, b in links.itertuples(index=False):
        if by_id.at[a, "role"] != by_id.at[b, "role"]:
            pairs.append({"image_a": a, "role_a": by_id.at[a, "role"], "image_b": b, "role_b": by_id.at[b, "role"]})
        label_a, label_b = _describe(by_id.loc[a], label_cols), _describe(by_id.loc[b], label_cols)
        if "unlabeled" not in (label_a, label_b) and label_a != label_b:
            conflicts.append({"image_a": a, "image_b": b, "label_a": label_a, "label_b": label_b})
    test_dups = sorted({p[f"image_{t}"] for p in pairs for t, o in (("a", "b"), ("b", "a"))
                        if p[f"role_{t}"] == "test" and p[f"role_{o}"] == "labeled"})
    return {"duplicate_groups": n_groups, "cross_patient_duplicates": cross_patient,
            "cross_role_duplicates": cross_role, "cross_role_pairs": pairs,
            "test_duplicates_of_training": test_dups, "label_conflicts": conflicts}


def _report(items: pd.DataFrame, duplicates: pd.Series, links: pd.DataFrame, groups: pd.Series, folds: pd.Series,
            strata: np.ndarray, label_cols: list[str], **settings) -> dict:
    labeled = items[items["role"] == "labeled"]
    per_fold = pd.crosstab(folds.to_numpy(), strata)
    return {
        **settings,
        "labeled_images": int(len(labeled)),
        "labeled_patients": int(labeled["patient_id"].nunique()),
        "labeled_groups": int(groups.loc[labeled["image_id"]].nunique()),
        "images_without_hash": sorted(set(items["image_id"]) - set(duplicates.index)),
        **_duplicate_findings(items, duplicates, links, label_cols),
        "chained_groups": chained_groups(duplicates, links),
        "fold_sizes": {str(f): int(n) for f, n in folds.value_counts().sort_index().items()},
        "fold_strata": {str(f): {str(s): int(n) for s, n in row.items()} for f, row in per_fold.iterrows()},
    }


def check_no_leak(folds: pd.Series, groups: pd.Series) -> None:
    """Raise DataError if any group has images in two folds (a run-time guard of the cycle).

    Args:
        folds: image_id -> fold.
        groups: image_id -> group id (FoldAssignment.groups); every image in ``folds`` needs one.
    """
    group_of = groups.reindex(folds.index)
    if group_of.isna().any():
        raise DataError(f"fold leak check: image {group_of.index[group_of.isna()][0]!r} has no group")
    frame = pd.DataFrame({"fold": folds.to_numpy(), "group": group_of.to_numpy()}, index=folds.index)
    spread = frame.groupby("group")["fold"].nunique()
    if (spread > 1).any():
        group = spread.index[spread > 1][0]
        members = frame[frame["group"] == group]
        shown = ", ".join(f"{i} (fold {f})" for i, f in members["fold"].head(6).items())
        spanned = sorted(members["fold"].unique().tolist())
        raise DataError(f"fold leak: group {group} straddles folds {spanned}: {shown}")
