"""The demo's folds side by side: ``run.executor: processes`` (2 workers x 1 torch thread) against
``local`` (one fold after another, torch's default threads: the 2 cores here), same process tree.

    python bench/bench_executor.py                  # the demo, --cycles 3, each executor once
    python bench/bench_executor.py --cycles 1 --repeats 2

Why it matters: the demo's 10-minute budget on 2 cores. Tiny models scale badly over threads (a
64 px convolution is over before a second thread has work), so two folds with one thread each
should use the cores better than one fold with two. Runs alternate (local, processes, local, ...)
into fresh run folders that share the demo data and its preprocessing cache (built once, before),
and the ratio is local wall time over processes wall time (> 1: processes is faster). Both write
the same files; only the thread counts differ, so their numbers agree to float rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, out: Path, cycles: int, cache: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, str(ROOT / "run_cycle.py"), "--cycles", str(cycles), "--out", str(out), "-q",
            "--set", f"run.executor={kind}", "--set", "run.fold_workers=2", "--set", f"run.cache_dir={cache}", *extra]
    start = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, "YOLO_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stages = json.loads((out / "summary.json").read_text())["stages"]
    folds = sum(s["seconds"] for s in stages if "/fold" in s["path"])
    return {"kind": kind, "wall": wall, "fold_stage_seconds": folds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_executor")
    args, extra = p.parse_known_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    # data + cache once, so neither executor pays for them
    subprocess.run([sys.executable, str(ROOT / "run_cycle.py"), "run", "--only", "data", "--out", str(args.work / "prep"),
                    "--set", f"run.cache_dir={cache}", *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = []
    for i in range(args.repeats):
        for kind in ("local", "processes"):
            results.append(run(kind, args.work / f"{kind}{i}", args.cycles, cache, extra))
            r = results[-1]
            print(f"{kind:<10} wall {r['wall']:7.1f} s   fold stages {r['fold_stage_seconds']:7.1f} s", flush=True)
    local = [r["wall"] for r in results if r["kind"] == "local"]
    procs = [r["wall"] for r in results if r["kind"] == "processes"]
    ratios = [a / b for a, b in zip(local, procs)]
    print(f"\ndemo --cycles {args.cycles}: local / processes wall time = "
          + ", ".join(f"{x:.2f}" for x in ratios) + f"  (processes {min(procs):.0f} s best; local {min(local):.0f} s best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
