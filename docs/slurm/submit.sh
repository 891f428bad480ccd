#!/usr/bin/env bash
# Submit a run to Slurm wave by wave: one array job per wave of independent stages (the folds of a
# generation, their predictions, a cycle's pseudo labels...), each wave waiting for the one before
# (afterok), then one job that finishes the run (summary.json, reports; every stage is reused).
#
#   docs/slurm/submit.sh CONFIG OUT [more run_cycle.py options, e.g. --set run.cycles=2]
#
# Run it from the checkout (or set CXR_CYCLE to the command, e.g. "run-cycle" when installed). The
# run folder OUT must be on a filesystem every node sees. Resubmitting after a failure submits only
# the stages that are not done: the plan says which. The plan, the stage lists and the jobs' logs
# go to OUT-slurm/ beside the run folder (a run claims only a new or empty folder, or its own).
set -euo pipefail
config=$1 out=${2%/}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
cycle=${CXR_CYCLE:-python run_cycle.py}
logs="$out-slurm"
mkdir -p "$logs"
$cycle plan --config "$config" --out "$out" "$@" --format tsv > "$logs/plan.tsv"
dep=""
for wave in $(awk -F'\t' 'NR > 1 && $3 != "done" {print $2}' "$logs/plan.tsv" | sort -n -u); do
  list="$logs/wave$wave.txt"
  awk -F'\t' -v w="$wave" 'NR > 1 && $2 == w && $3 != "done" {print $1}' "$logs/plan.tsv" > "$list"
  n=$(wc -l < "$list")
  dep=$(sbatch --parsable --job-name="cxr-wave$wave" --array="1-$n" ${dep:+--dependency=afterok:$dep} \
        --output="$logs/wave$wave-%a.log" "$here/stage.sbatch" "$config" "$out" "$list" "$@")
  echo "wave $wave: $n stage(s), job $dep"
done
dep=$(sbatch --parsable --job-name=cxr-finish ${dep:+--dependency=afterok:$dep} --output="$logs/finish.log" \
      "$here/stage.sbatch" "$config" "$out" ALL "$@")
echo "finish: job $dep"
