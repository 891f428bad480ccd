"""Does the student gain because of the pseudo labels? The demo (or any dataset with a test role) at
several seeds, every model scored on the held-out test part.

    python bench/bench_gain.py                         # the demo, seeds 0 1 2, --cycles 3
    python bench/bench_gain.py --seeds 0 1 2 3 4 --cycles 2
    python bench/bench_gain.py --config teacher_student/presets/cxr_covid.yaml --data ../shared/data/cxr-covid-ieee8023
    OMP_NUM_THREADS=1 python bench/bench_gain.py --config teacher_student/presets/cxr_lungs.yaml \
        --data ../shared/data/cxr-covid-ieee8023          # lung masks: segmenter test dice
    OMP_NUM_THREADS=1 python bench/bench_gain.py --config teacher_student/presets/cxr_lungs.yaml \
        --data ../shared/data/cxr-covid-ieee8023 --vary-folds \
        --set data.hidden_fraction=0.4 --set run.oracle=true  # 40% of the masks hidden: an oracle on real data
    python bench/bench_gain.py --set run.tasks=classifier,grader   # the grading demo
    python bench/bench_gain.py --config teacher_student/presets/cxr_covid_grading.yaml --data ../shared/data/cxr-covid-ieee8023

For each seed (the demo's data seed and the run seed) it runs ``run_cycle.py`` in a subprocess into
its own run folder (rerunning resumes), then prints per seed and as mean +/- sd over seeds: the
cycle-0 teacher, every student, the ablation (the last student's recipe on labeled data only) and
the oracle (the same recipe on every label, trained longer) -- classifier test AUC, detector test
mAP, segmenter test dice (mean per image), grader QWK on the test part and out of fold (OOF QWK is
what data without a test part, such as the shared set's 61 graded images, can be compared on: every
student fold learns only from the teacher fold that never saw its labels, so it is honest) -- the
pseudo labels the students trained on per class with their precision against the
pool's hidden truth, and the paired differences student - ablation and student - teacher with the
number of seeds in which they are positive. Everything also goes to ``<out>/bench_gain.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("classifier", ("classifier", "test", "auc_macro"), "test AUC", "classifier_auc"),
           ("detector", ("detector", "test", "map"), "test mAP", "detector_map"),
           ("segmenter", ("segmenter", "test", "dice"), "test dice", "segmenter_dice"),
           ("grader", ("grader", "test", "qwk"), "test QWK", "grader_qwk"),
           ("grader_oof", ("grader", "oof", "qwk"), "OOF QWK", None))
"""(key, path in a generation record, what is printed, the summary's gains key)."""


def dig(d, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def run_seed(args: argparse.Namespace, seed: int, extra: list[str]) -> dict:
    out = Path(args.out) / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "run_cycle.py"), "--out", str(out), "--seed", str(seed), "-q"]
    if args.config:
        cmd += ["--config", args.config]
    if args.data:
        cmd += ["--data", args.data]
    else:  # the demo: each seed its own generated dataset
        cmd += ["--set", f"data.demo_seed={seed}", "--set", f"data.root={out / 'demo_data'}"]
    if args.cycles is not None:
        cmd += ["--cycles", str(args.cycles)]
    if args.vary_folds:  # small data: the fold split is a large part of the spread
        cmd += ["--set", f"folds.seed={seed}"]
    started = time.perf_counter()
    result = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"seed {seed}: run_cycle.py failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["bench_wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def seed_row(seed: int, summary: dict) -> dict:
    """The figures of one seed: per model and metric, pseudo labels, paired differences."""
    gens = summary["generations"]
    models = {f"gen{g['generation']}": g for g in gens}
    models.update({"ablation": summary.get("ablation") or {}, "oracle": summary.get("oracle") or {}})
    row = {"seed": seed, "wall_s": summary.get("wall_seconds"), "scores": {}, "pseudo": [], "diff": {}}
    for task, path, _, gain in METRICS:
        row["scores"][task] = {name: dig(rec, *path) for name, rec in models.items()}
        last, teacher, ablation = (dig(gens[-1], *path), dig(gens[0], *path), dig(summary.get("ablation"), *path))
        row["diff"][task] = {"student_minus_ablation": None if None in (last, ablation) else last - ablation,
                             "student_minus_teacher": None if None in (last, teacher) else last - teacher}
        row["diff"][task]["gap_closed"] = dig(summary, "gains", gain, "gap_closed") if gain else None
    for cycle in summary.get("cycles", []):
        p = cycle.get("pseudo", {})
        row["pseudo"].append({"cycle": cycle["cycle"], **{k: dig(p, k, "students")
                                                          for k in ("classifier", "detector", "segmenter", "grader")}})
    return row


def mean_sd(values: list) -> str:
    mean = column_stat(values, statistics.mean)
    return "-" if mean is None else f"{mean:.3f} +/- {column_stat(values, spread):.3f}"


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def column_stat(values: list, stat) -> float | None:
    """``stat`` of the numbers among ``values`` (None when there are none)."""
    values = [v for v in values if isinstance(v, (int, float))]
    return stat(values) if values else None


def print_report(rows: list[dict]) -> None:
    names = list(rows[0]["scores"]["classifier"])
    for task, _, metric, _ in METRICS:
        if all(v is None for r in rows for v in r["scores"][task].values()):
            continue
        print(f"\n{task.split('_')[0]} {metric}")
        print(f"  {'seed':<8}" + "".join(f"{n:>10}" for n in names) + f"{'st-abl':>10}{'st-tch':>10}")
        for r in rows:
            s, d = r["scores"][task], r["diff"][task]
            print(f"  {r['seed']:<8}" + "".join(f"{_f(s.get(n)):>10}" for n in names)
                  + f"{_f(d['student_minus_ablation'], True):>10}{_f(d['student_minus_teacher'], True):>10}")
        for label, stat in (("mean", statistics.mean), ("sd", spread)):
            print(f"  {label:<8}" + "".join(f"{_f(column_stat([r['scores'][task].get(n) for r in rows], stat)):>10}"
                                            for n in names))
        for key in ("student_minus_ablation", "student_minus_teacher"):
            vals = [r["diff"][task][key] for r in rows if r["diff"][task][key] is not None]
            positive = sum(v > 0 for v in vals)
            print(f"  {key}: {mean_sd(vals)}  (> 0 in {positive} of {len(vals)} seeds)")
        gaps = [r["diff"][task]["gap_closed"] for r in rows]
        print(f"  gap_closed per seed: {[_f(g) if isinstance(g, (int, float)) else g for g in gaps]}")
    print("\npseudo labels the students trained on (all folds; precision vs hidden truth)")
    for r in rows:
        for c in r["pseudo"]:
            cls, det, seg = c["classifier"] or {}, c["detector"] or {}, c.get("segmenter") or {}
            parts = ([f"classes {cls.get('kept_per_class')} prec {_f(cls.get('precision'))}"] if cls else []) \
                + ([f"boxes {det.get('per_class')} prec {_f(det.get('precision'))}"] if det else []) \
                + ([f"pseudo masks {seg.get('total')} dice vs truth {_f(seg.get('precision'))}"] if seg else []) \
                + ([f"starving {sorted({**cls.get('starving', {}), **det.get('starving', {})})}"]
                   if cls.get("starving") or det.get("starving") else [])
            if parts:
                print(f"  seed {r['seed']} cycle {c['cycle']}: " + "; ".join(parts))
            if c.get("grader"):
                print(f"  seed {r['seed']} cycle {c['cycle']}: grades {c['grader'].get('kept_per_grade')} exact vs "
                      f"truth {_f(c['grader'].get('precision'))}")
    print("\nwall seconds per seed (a resumed run counts only what it redid): "
          + ", ".join(f"{r['seed']}: {r['wall_s']}" for r in rows))


def _f(value, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", help="YAML config (default: the demo preset)")
    parser.add_argument("--data", help="data root (default: the demo, generated per seed)")
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--vary-folds", action="store_true", help="also set folds.seed to the seed (a new split per seed)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_gain"))
    args, extra = parser.parse_known_args()
    rows = [seed_row(seed, run_seed(args, seed, extra)) for seed in args.seeds]
    print_report(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_gain.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
