"""End to end: wall time and peak memory of the demo (`run_cycle.py --cycles 3`) on this machine.

    python bench/bench_demo.py [--cycles 3] [--out runs/bench_demo] [extra run_cycle.py args]

Runs the command line in a subprocess into a fresh run directory, then prints the wall time, the
child's peak resident memory and CPU time (getrusage), the ratio to the 10-minute target, and the
slowest stages from summary.json, so a regression points at its stage. The grading demo:
``python bench/bench_demo.py --set run.tasks=classifier,grader``.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_demo"))
    args, extra = parser.parse_known_args()
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "run_cycle.py"), "--cycles", str(args.cycles), "--out", args.out,
                             "-q", *extra], cwd=ROOT)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    if result.returncode:
        print(f"run failed with exit code {result.returncode}")
        return result.returncode
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    print(f"\ndemo --cycles {args.cycles}: wall {wall:.0f} s ({wall / TARGET_SECONDS:.2f} of the 10-minute target), "
          f"peak RSS {peak_mib:.0f} MiB")
    print(f"CPU time {cpu:.0f} s (user + sys): on a machine shared with other work the wall time grows, the CPU "
          f"time much less; {cpu / 2:.0f} s is the wall time two unshared cores would need at best")
    stages = sorted(summary["stages"], key=lambda s: -s["seconds"])
    total = sum(s["seconds"] for s in stages) or 1
    for s in stages[:8]:
        print(f"  {s['path']:<36} {s['seconds']:7.1f} s  {s['seconds'] / total:5.1%} of stage time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
