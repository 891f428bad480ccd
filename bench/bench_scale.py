"""Every stage that does not train, at VinBigData scale: does each stay linear in the number of images?

The real VinBigData label table (``../shared/data/vinbigdata-labels/train.csv.gz``: 15,000 images
x 3 radiologists, 36,096 boxes) gives the labeled part, N images of it; a 3,000-image pool (the
size of VinBigData's test set) gets simulated predictions of 5 folds x 2 TTA views. The table has
no pixels, so the images are stand-ins: DICOM headers only (Rows/Columns drawn in 2,000-3,000 px,
as the competition's films, and at least the largest box; the table does not give the real
sizes), a preprocessing cache of blank 32 px arrays, and random perceptual hashes (~0.5% near
duplicates). Each stage is the engine's own code on a real run folder:

    table               load_vinbigdata: CSV checks, header probes, the item table (no fusion)
    radiologist WBF     fuse_radiologist_boxes: the three readers' boxes fused per image
    folds               assign_folds: duplicate groups (pixel + perceptual hash) and patient groups, k = 5
    predictions         write_predictions of both tasks: OOF per fold, pool ensemble; WBF of OOF views and pool boxes
    pseudo selection    the cycle's pseudo-label stage (classifier + detector, ensemble + 5 student folds)
    final               gate tuning on OOF, gated boxes, mAP with "No finding", submissions
      gate tuning       (inside final) tune_gate's grid alone
    report              the cycle's quality report
    exports             CSV, YOLO and COCO exports of the cycle's pseudo labels

    python bench/bench_scale.py                          # N = 1000, 4000, 15000, each in a fresh process
    python bench/bench_scale.py --sizes 1000 --pool 500  # a quick look

Targets (issue 15): 15k/1k time ratio <= 20 for every stage, all of them together <= 5 minutes at
15k on 2 cores; peak memory (the process's max RSS) likewise linear.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_cycle  # noqa: E402,F401  maps the import root onto this checkout

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

LABELS = ROOT.parent / "shared" / "data" / "vinbigdata-labels" / "train.csv.gz"
STAGES = ["table", "radiologist WBF", "folds", "predictions", "pseudo selection", "final", "report", "exports"]
INSIDE = {"gate tuning": "final"}
CACHE_SIZE = 32


# ---------------------------------------------------------------------------- stand-in data


def stand_in_dataset(work: Path, n: int, pool: int, seed: int = 0) -> Path:
    """``work/vin<n>-<pool>``: train.csv with n real images' rows, DICOM headers for them and the pool."""
    root = work / f"vin{n}-{pool}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    table = pd.read_csv(LABELS, dtype={"image_id": str})
    ids = np.sort(table["image_id"].unique())
    chosen = set(rng.choice(ids, size=min(n, len(ids)), replace=False))
    rows = table[table["image_id"].isin(chosen)]
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    rows.to_csv(root / "train.csv", index=False)
    extent = rows.groupby("image_id")[["x_max", "y_max"]].max().fillna(0)
    for image_id in sorted(chosen):
        w, h = (int(v) for v in rng.integers(2000, 3001, size=2))
        if image_id in extent.index:
            w, h = max(w, int(np.ceil(extent.at[image_id, "x_max"])) + 1), max(h, int(np.ceil(extent.at[image_id, "y_max"])) + 1)
        write_header(root / "train" / f"{image_id}.dicom", image_id, w, h)
    for i in range(pool):
        w, h = (int(v) for v in rng.integers(2000, 3001, size=2))
        write_header(root / "test" / f"pool{i:05d}.dicom", f"pool{i:05d}", w, h)
    (root / "done").write_text("ok\n")
    return root


def write_header(path: Path, patient: str, width: int, height: int) -> None:
    """A DICOM with the header the adapter reads (size, modality, patient) and no pixels."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality, ds.PatientID, ds.Rows, ds.Columns = "DX", patient, height, width
    ds.save_as(path, enforce_file_format=True)


def stand_in_hashes(image_ids: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """Unique pixel hashes but for 0.5% copies; random 64-bit pHashes, 0.5% within 2 bits of another."""
    n = len(image_ids)
    pixel = np.array([f"{i:040x}" for i in range(n)], dtype=object)
    phash = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    copies = rng.choice(n, size=(max(1, n // 200), 2), replace=False)
    pixel[copies[:, 1]] = pixel[copies[:, 0]]
    near = rng.choice(n, size=(max(1, n // 200), 2), replace=False)
    phash[near[:, 1]] = phash[near[:, 0]] ^ np.uint64(0b101)
    return pd.DataFrame({"image_id": image_ids, "pixel_hash": pixel, "phash": [f"{int(v):016x}" for v in phash]})


def stand_in_cache(cache_dir: Path, items: pd.DataFrame, hashes: pd.DataFrame, preprocess) -> None:
    """A preprocessing cache of blank images (the cache's own format: index.json + raw uint8 files)."""
    from cxr_noisy_student.datasets.atomic import write_json
    from cxr_noisy_student.datasets.cache import INDEX_NAME, INDEX_VERSION, ImageCache

    cache = ImageCache(cache_dir, preprocess)
    cache.dir.mkdir(parents=True, exist_ok=True)
    blank = np.full((cache.size, cache.size), 100, np.uint8).tobytes()
    h = hashes.set_index("image_id")
    index = {}
    for r in items.itertuples():
        key = f"k{abs(hash(r.image_id)) % 10**12:012d}"
        (cache.dir / f"{key}.u8").write_bytes(blank)
        index[r.image_id] = {"key": key, "path": r.path, "width": int(r.width), "height": int(r.height),
                             "pixel_hash": h.at[r.image_id, "pixel_hash"], "phash": h.at[r.image_id, "phash"]}
    write_json(cache.dir / INDEX_NAME, {"version": INDEX_VERSION, "params": cache.params, "images": index})


# ---------------------------------------------------------------------------- simulated predictions


def class_predictions(ctx, task, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OOF (each labeled image by its own fold) and every fold model on every image, P(abnormal) noisy."""
    ids = task.every_fold_ids()
    truth = ctx.table.items.set_index("image_id").loc[ids, "y:Abnormal"].fillna(0.5).to_numpy()
    k = ctx.cfg.folds.k
    logits = np.log((truth * 0.8 + 0.1) / (0.9 - truth * 0.8))[None, :] + rng.normal(0, 1.5, (k, len(ids)))
    p = 1 / (1 + np.exp(-logits))
    every = pd.DataFrame({"image_id": np.tile(ids, k), "fold": np.repeat(np.arange(k), len(ids)),
                          "p:No finding": 1 - p.ravel(), "p:Abnormal": p.ravel()})
    labeled = every[every["image_id"].isin(set(ctx.folds.index))]
    oof = labeled[labeled["fold"].to_numpy() == ctx.folds.loc[labeled["image_id"]].to_numpy()]
    return oof.reset_index(drop=True), every


def box_predictions(ctx, task, boxes_per_view: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw boxes per fold model and TTA view: on labeled images a jittered copy of each fused
    ground-truth box (scores high) plus background boxes, on the pool background only; scores
    skewed low, as a detector's at a low confidence floor."""
    from cxr_noisy_student.datasets.adapters import training_boxes

    gt = training_boxes(ctx.table)
    labeled = task.labeled_ids()
    folds = ctx.folds.loc[labeled].to_numpy()
    k, n_cls = ctx.cfg.folds.k, len(ctx.table.box_classes)
    views = ["orig", "hflip"]
    # OOF: each labeled image by its own fold's two views
    oof_ids = np.repeat(labeled, len(views) * boxes_per_view)
    oof_fold = np.repeat(folds, len(views) * boxes_per_view)
    oof_view = np.tile(np.repeat(views, boxes_per_view), len(labeled))
    oof = random_boxes(oof_ids, n_cls, rng).assign(fold=oof_fold, model=[f"f{f}/{v}" for f, v in zip(oof_fold, oof_view)])
    g = gt[gt["image_id"].isin(set(labeled))]
    hits = []
    for view in views:
        j = g.copy()
        xy = j[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)
        size = np.tile(xy[:, 2:] - xy[:, :2], 2)
        xy = xy + rng.normal(0, 0.05, xy.shape) * size  # 5% of the box's size
        j[["x_min", "y_min", "x_max", "y_max"]] = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]),
                                                                  np.maximum(xy[:, :2], xy[:, 2:])], axis=1)
        j["score"] = rng.beta(5, 2, len(j))
        fold = ctx.folds.loc[j["image_id"]].to_numpy()
        hits.append(j[["image_id", "class_id", "x_min", "y_min", "x_max", "y_max", "score"]].assign(
            fold=fold, model=[f"f{f}/{view}" for f in fold]))
    oof = pd.concat([oof, *hits], ignore_index=True)
    # pool: every fold model x view on every pool image
    pool_ids = task.every_fold_ids()
    n = len(pool_ids) * boxes_per_view
    pool = pd.concat([random_boxes(np.repeat(pool_ids, boxes_per_view), n_cls, rng).assign(fold=f, model=f"f{f}/{v}")
                      for f in range(k) for v in views], ignore_index=True)
    assert len(pool) == n * k * len(views)
    for df in (oof, pool):
        df[["x_min", "y_min", "x_max", "y_max"]] = df[["x_min", "y_min", "x_max", "y_max"]].clip(0, 1)
    return oof, pool


def random_boxes(image_ids: np.ndarray, n_cls: int, rng: np.random.Generator) -> pd.DataFrame:
    m = len(image_ids)
    c, half = rng.uniform(0.1, 0.9, (m, 2)), rng.uniform(0.02, 0.15, (m, 2))
    return pd.DataFrame({"image_id": image_ids, "class_id": rng.integers(n_cls, size=m),
                         "x_min": c[:, 0] - half[:, 0], "y_min": c[:, 1] - half[:, 1], "x_max": c[:, 0] + half[:, 0],
                         "y_max": c[:, 1] + half[:, 1], "score": rng.beta(1.2, 6, m)})


# ---------------------------------------------------------------------------- one size


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(n: int, pool: int, boxes: int, work: Path) -> dict:
    import yaml

    from cxr_noisy_student.datasets.adapters.vinbigdata import fuse_radiologist_boxes, load_vinbigdata
    from cxr_noisy_student.datasets.atomic import write_json, write_table
    from cxr_noisy_student.datasets.config import config_to_dict
    from cxr_noisy_student.datasets.folds import assign_folds
    from cxr_noisy_student.datasets.table import save_table
    from cxr_noisy_student.teacher_student.config import load_config
    from cxr_noisy_student.teacher_student.cycle.data_stage import load_context
    from cxr_noisy_student.teacher_student.cycle.final_stage import final_stage, tune_or_fixed_gate
    from cxr_noisy_student.teacher_student.cycle.selection import select_stage
    from cxr_noisy_student.teacher_student.exports import export
    from cxr_noisy_student.teacher_student.layout import FOLD_REPORT, FOLDS, GROUPS, RunLayout
    from cxr_noisy_student.teacher_student.report import write_cycle_report
    from cxr_noisy_student.teacher_student.tasks.classifier import ClassifierTask
    from cxr_noisy_student.teacher_student.tasks.detector import DetectorTask

    root = stand_in_dataset(work, n, pool)
    out = work / f"run{n}-{pool}-{boxes}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = load_config(None, [f"data.format=vinbigdata", f"data.root={root}", f"run.out={out}", "folds.k=5",
                             f"preprocess.size={CACHE_SIZE}", "pseudo.target_precision=0.85", "run.device=cpu",
                             "run.cycles=1"])
    layout = RunLayout(out)
    times: dict[str, float] = {}
    cpu_times: dict[str, float] = {}
    memory: dict[str, float] = {}
    rng = np.random.default_rng(1)

    def timed(name, fn, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        times[name] = time.perf_counter() - start
        cpu_times[name] = time.process_time() - cpu
        memory[name] = peak_rss_mib()
        print(f"  N={n}: {name} {times[name]:.2f} s (cpu {cpu_times[name]:.2f} s)", file=sys.stderr, flush=True)
        return result

    table = timed("table", load_vinbigdata, root, fuse=False)
    fused = timed("radiologist WBF", fuse_radiologist_boxes, table.boxes, iou_thr=0.4)
    table = table.replace(boxes=pd.concat([table.boxes, fused], ignore_index=True))
    hashes = stand_in_hashes(table.items["image_id"].tolist(), rng)
    fa = timed("folds", assign_folds, table.with_role("labeled"), hashes, k=5, seed=0, phash_max_distance=4)
    # the data stage's outputs, as the engine writes them (not timed: I/O of tables the stages above made)
    layout.data.mkdir(parents=True)
    (layout.root / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    save_table(layout.data, table)
    write_table(layout.data / FOLDS, fa.folds.rename("fold").rename_axis("image_id").reset_index())
    write_table(layout.data / GROUPS, fa.groups.rename("group").rename_axis("image_id").reset_index())
    write_json(layout.data / FOLD_REPORT, fa.report)
    stand_in_cache(layout.cache, table.items, hashes, cfg.preprocess)
    ctx = load_context(cfg, layout)
    classifier, detector = ClassifierTask(ctx), DetectorTask(ctx)
    c_oof, c_every = class_predictions(ctx, classifier, rng)
    d_oof, d_pool = box_predictions(ctx, detector, boxes, rng)
    cls_dir, det_dir = layout.predictions(0, "classifier"), layout.predictions(0, "detector")
    cls_dir.mkdir(parents=True)
    det_dir.mkdir(parents=True)

    def predictions():
        classifier.write_predictions(c_oof, c_every, cls_dir)
        return detector.write_predictions(d_oof, d_pool, det_dir)

    timed("predictions", predictions)
    teachers = {"classifier": cls_dir, "detector": det_dir}
    timed("pseudo selection", select_stage, ctx, [classifier, detector], teachers, 1)
    timed("gate tuning", tune_or_fixed_gate, ctx, detector, cls_dir, det_dir)
    layout.final.mkdir()
    timed("final", final_stage, ctx, detector, cls_dir, det_dir, layout.final)
    timed("report", write_cycle_report, layout.root, 1, load=ctx.loader())

    def exports():
        for fmt, dest in (("csv", "pseudo.csv"), ("yolo", "yolo"), ("coco", "coco.json")):
            export(layout.root, 1, fmt, work / f"exports{n}" / dest)

    timed("exports", exports)
    return {"n": n, "pool": pool, "boxes_per_view": boxes, "labeled": int(len(ctx.folds)),
            "pool_raw_boxes": int(len(d_pool)), "oof_raw_boxes": int(len(d_oof)), "seconds": times,
            "cpu_seconds": cpu_times, "peak_rss_mib": memory, "total": sum(times[s] for s in STAGES),
            "cpu_total": sum(cpu_times[s] for s in STAGES)}


# ---------------------------------------------------------------------------- the table


def print_table(results: list[dict]) -> None:
    first, last = results[0], results[-1]
    ratio_head = f"{last['n'] // 1000}k/{first['n'] // 1000}k" if first["n"] >= 1000 else "last/first"
    print(f"\npool {first['pool']} images x 5 folds x 2 views, {first['boxes_per_view']} raw boxes per view "
          f"({last['pool_raw_boxes']:,} pool boxes; {last['oof_raw_boxes']:,} OOF boxes at N={last['n']:,})")
    header = f"{'stage':<22}" + "".join(f"{'N=' + format(r['n'], ','):>12}" for r in results) + f"{ratio_head:>10}"
    print(header)
    print("-" * len(header))
    for name in STAGES[:6] + ["gate tuning"] + STAGES[6:]:
        label = f"  ({name}, in final)" if name in INSIDE else name
        cells = "".join(f"{r['seconds'][name]:>11.2f}s" for r in results)
        ratio = last["seconds"][name] / max(first["seconds"][name], 1e-9)
        print(f"{label:<22}{cells}{ratio:>10.1f}")
    cells = "".join(f"{r['total']:>11.2f}s" for r in results)
    print(f"{'all stages':<22}{cells}{last['total'] / first['total']:>10.1f}")
    mem = "".join(f"{max(r['peak_rss_mib'].values()):>9.0f}MiB" for r in results)
    peak_ratio = max(last["peak_rss_mib"].values()) / max(first["peak_rss_mib"].values())
    print(f"{'peak RSS':<22}{mem}{peak_ratio:>10.1f}")
    worst = max(STAGES, key=lambda s: last["seconds"][s] / max(first["seconds"][s], 1e-9))
    print(f"\nlargest time ratio: {worst} ({last['seconds'][worst] / max(first['seconds'][worst], 1e-9):.1f}; target <= 20); "
          f"all stages at N={last['n']:,}: {last['total']:.0f} s (target <= 300 s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 15000], help="labeled images N")
    p.add_argument("--pool", type=int, default=3000, help="unlabeled pool images")
    p.add_argument("--boxes", type=int, default=30, help="raw boxes per image, fold model and view")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cxr_bench_scale")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = run_one(args.one, args.pool, args.boxes, args.work)
        (args.work / f"result{args.one}.json").write_text(json.dumps(result))
        return 0
    results = []
    for n in args.sizes:  # one fresh process per size: its peak RSS is that size's
        subprocess.run([sys.executable, __file__, "--one", str(n), "--pool", str(args.pool), "--boxes", str(args.boxes),
                        "--work", str(args.work)], check=True)
        results.append(json.loads((args.work / f"result{n}.json").read_text()))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
