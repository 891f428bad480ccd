"""Command line of the noisy-student pseudo-labeling engine.

    python run_cycle.py --cycles 3                      # the built-in demo, end to end
    python run_cycle.py --config my.yaml --out runs/x   # your data (see README: "Using your own data")
    python run_cycle.py plan --config my.yaml --out runs/x                  # its stages, done or not
    python run_cycle.py run --config my.yaml --out runs/x --only gen0/classifier/fold3   # one of them
    python run_cycle.py export --run runs/demo --cycle 2 --format yolo --dest exports/yolo
    python run_cycle.py --version
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from pathlib import Path

IMPORT_ROOT = "cxr_noisy_student"


def map_checkout() -> None:
    """Run from a checkout: map the import root onto the folders beside this file.

    Installed (``pip install .``), the engine is the package ``cxr_noisy_student``; a plain
    checkout has no such folder, only ``datasets/``, ``loops/``... beside this script. A
    namespace-style module whose path is this directory gives them the same names, so the script
    runs the checkout's own code whether or not (and whichever version) is installed.
    """
    here = Path(__file__).resolve().parent
    if (here / "teacher_student").is_dir() and IMPORT_ROOT not in sys.modules:
        root = types.ModuleType(IMPORT_ROOT)
        root.__path__ = [str(here)]
        sys.modules[IMPORT_ROOT] = root


map_checkout()  # at import time, so that worker processes that re-import this file see it too

from cxr_noisy_student.datasets.environment import set_offline_defaults  # noqa: E402

set_offline_defaults()

DESCRIPTION = """\
Self-training (noisy-student) for chest radiographs. Cycle 0 trains k-fold teachers (a timm
classifier and an ultralytics YOLO or effdet detector) on the labeled images. Each of the --cycles
cycles then predicts out-of-fold soft labels for the labeled images and fold-ensemble x flip-TTA
soft labels for the unlabeled ones, fuses pseudo boxes with Weighted Boxes Fusion, keeps the
confident ones (thresholds chosen on OOF against ground truth), balances classes, and trains a
larger, noised student (RandAugment, dropout, stochastic depth) that becomes the next teacher. The
final cycle gates the detector with the classifier's P(abnormal). Every cycle writes a pseudo-label
quality report; a killed run resumes when the same command is run again.

Without --config the built-in demo runs: a small synthetic VinBigData-format dataset (DICOM + CSV)
is generated into ./demo_data on first use.
"""

EPILOG = """\
config keys (override any with --set section.key=value; unknown keys fail with a hint):
  data.format        demo | vinbigdata | siim | generic        data.root   data folder
  preprocess.size    square input size (px)                    folds.k     number of folds
  classifier.ladder  timm model per generation, e.g. efficientnet_b0,efficientnet_b1,efficientnet_b2
  classifier.pretrained   '' (random init) | timm | /path/to/state_dict.pt
  augment.randaugment_n / randaugment_m   student noise per generation
  pseudo.mode soft|hard, pseudo.temperature, pseudo.confidence, pseudo.target_precision, pseudo.balance
  detector.kind yolo|effdet, detector.ladder, detector.iou_thr, detector.skip_box_thr, detector.metric_iou
  gate.mode hard|soft|off, gate.low, gate.high, gate.tune_on_oof
  run.cycles, run.out, run.device, run.seed, run.workers, run.tensorboard
The README's "Config reference" (run_cycle.py --config-reference) lists every key with its default.

commands (none: run):
  run     run the cycle (resumes); --only STAGE runs one stage (or a pattern) against the run folder
  plan    print the stage graph: stage, wave, status (done / ready / stale / waiting), inputs, outputs
  export  pseudo labels as CSV / YOLO / COCO (run_cycle.py export --help)

examples:
  python run_cycle.py --cycles 3
  python run_cycle.py plan --out runs/demo
  python run_cycle.py run --out runs/demo --only 'gen0/*/fold1'
  torchrun --nproc_per_node 4 run_cycle.py run --config my.yaml --only gen1/classifier/fold0
  python run_cycle.py --config teacher_student/presets/cxr_covid.yaml --data ../shared/data/cxr-covid-ieee8023
  python run_cycle.py --cycles 1 --set classifier.train.epochs=2 --set detector.enabled=false
  python run_cycle.py export --run runs/demo --cycle 3 --format coco --dest exports/c3.json
  python run_cycle.py --set run.tensorboard=true       # then: tensorboard --logdir runs/demo

Progress: a bar per training and prediction on a terminal, a log line with an ETA every 20 s
elsewhere (CI, a log file); CXR_PROGRESS=bar|log|off overrides. Each cycle's report is written as
soon as its pseudo labels exist (open index.html while the next cycle trains).
"""


USAGE = """run_cycle.py [run] [--config YAML] [--data DIR] [--out DIR] [--cycles N] [--set KEY=VALUE ...] [--only STAGE] [options]
       run_cycle.py plan [--config YAML] [--out DIR] [--format {table,tsv,json}]
       run_cycle.py export --run DIR [--cycle N] --format {csv,yolo,coco,masks,submission} --dest PATH [--include-labeled]
       run_cycle.py --version"""

SUBCOMMANDS = """\
subcommands:
  export             a cycle's pseudo labels as CSV, a YOLO folder or COCO JSON (with the images they name),
                     or the final submissions; see: run_cycle.py export --help
"""


def version_text() -> str:
    """The engine's version and the libraries that decide its numbers (for bug reports)."""
    from importlib import metadata

    from cxr_noisy_student.teacher_student import __version__

    libs = []
    for name in ("torch", "timm", "ultralytics", "effdet"):
        try:
            libs.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            libs.append(f"{name} not installed")
    return f"cxr-noisy-student {__version__} (python {sys.version.split()[0]}, {', '.join(libs)})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_cycle.py", usage=USAGE, description=DESCRIPTION, epilog=SUBCOMMANDS + "\n" + EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_text(),
                   help="print the engine's version (and torch/timm/ultralytics/effdet) and exit")
    p.add_argument("--cycles", type=int, help="teacher -> student cycles after cycle 0 (default: config, 3)")
    p.add_argument("--config", help="YAML config (default: the built-in demo preset)")
    p.add_argument("--data", help="data root (overrides data.root)")
    p.add_argument("--out", help="run directory (overrides run.out); rerunning into it resumes")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides run.device)")
    p.add_argument("--seed", type=int, help="global seed (overrides run.seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set pseudo.temperature=0.5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--config-reference", action="store_true",
                   help="print every config key with its default and meaning (the README's table) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run: only this stage (a path such as gen1/classifier/fold3, or a pattern such as "
                        "'gen0/*/fold*'; repeatable) against the run folder; refused when its inputs are not done")
    p.add_argument("--format", choices=["table", "tsv", "json"], default="table", help="plan: output format")
    return p


COMMANDS = ("run", "plan")


def resolve_config(args: argparse.Namespace):
    from cxr_noisy_student.teacher_student.config import PRESETS, load_config

    overrides = list(args.set)
    for flag, key in ((args.cycles, "run.cycles"), (args.data, "data.root"), (args.out, "run.out"),
                      (args.device, "run.device"), (args.seed, "run.seed")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    return load_config(args.config or PRESETS / "demo.yaml", overrides)


def print_table(summary: dict) -> None:
    """Per-generation metrics, teacher vs student, one line each."""
    from cxr_noisy_student.teacher_student.summary import format_summary

    print(format_summary(summary))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from cxr_noisy_student.teacher_student.exports import export_main

        return export_main(argv[1:])
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.WARNING if args.quiet or rank > 0 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from cxr_noisy_student.datasets.errors import ConfigError, DataError, TrainingError
    from cxr_noisy_student.datasets.config import config_to_dict

    if args.config_reference:
        from cxr_noisy_student.teacher_student.config_reference import config_reference_markdown

        print(config_reference_markdown())
        return 0
    try:
        cfg = resolve_config(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            return 0
        if command == "plan":
            from cxr_noisy_student.teacher_student.cycle.graph import format_plan, plan

            print(format_plan(plan(cfg), args.format))
            return 0
        if args.only:
            return run_only(cfg, args.only)
        from cxr_noisy_student.teacher_student.cycle.runner import run_cycles

        summary = run_cycles(cfg)
    except (ConfigError, DataError, FileNotFoundError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(summary)
    print(f"\nsummary: {Path(cfg.run.out) / 'summary.json'}   reports: {Path(cfg.run.out) / 'index.html'}")
    return 0


def run_only(cfg, patterns: list[str]) -> int:
    """``run --only``: the matching stages, one line each (path, done or reused, seconds)."""
    from cxr_noisy_student.teacher_student.cycle.graph import run_only as run_stages
    from cxr_noisy_student.teacher_student.cycle.runner import run_executor

    executor = run_executor(cfg.run)
    try:
        records = run_stages(cfg, patterns, executor)
    finally:
        executor.close()
    if int(os.environ.get("RANK", "0")) == 0:
        for r in records:
            print(f"{r['path']}: {'reused' if r['skipped'] else 'done in %.1f s' % r['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
