#!/usr/bin/env bash
# Submit a pipeline to SLURM as a chain of jobs, each starting only if the one before it
# succeeded (--dependency=afterok):
#
#   harvest (an array of $SHARDS tasks filling one artifact) → shuffle → sweep (the slurm
#   executor: its grid points are an array of their own) → interpret (one GPU)
#
#   SAECTL_STORE=/shared/saectl PIPELINE=pipelines/pythia-70m.yaml pipelines/slurm/submit.sh
#
# Each job runs `saectl run PIPELINE --only STEP` and finds its input in the ref the job
# before it recorded (refs/<pipeline>/<step>), so the chain passes no file names around; every
# step is content-addressed, so submitting the chain again redoes only what did not finish.
# Prints one line per job: "step: job id".
#
# Environment:
#   SAECTL_STORE          the artifact store, on a filesystem every node shares (required)
#   PIPELINE              the pipeline file (default: pipelines/pythia-70m.yaml)
#   SHARDS                harvest array tasks (default 8)
#   UNTIL                 last job to submit: harvest, shuffle, sweep or interpret (default)
#   LOG_DIR               job logs (default ./saectl-logs)
#   SAECTL_ACCOUNT        --account for every job, and for the sweep's array (unset: your
#                         default account)
#   SAECTL_CPU_PARTITION  --partition for harvest, shuffle and the sweep's driver job
#                         (unset: the cluster's default partition)
#   SAECTL_GPU_PARTITION  --partition for interpret and the sweep's training array, which
#                         also asks --gres=gpu:1 (unset: the default partition; the array
#                         then trains on CPUs)
#   SAECTL_ARGS           more `saectl run` options for every step, e.g. "--set ..."
#   SBATCH_ARGS           more sbatch options for every job, e.g. "--qos=long --mem=64G";
#                         they override the #SBATCH lines of the .sbatch files
#   HARVEST_STEP, SHUFFLE_STEP, SWEEP_STEP, SAE_STEP, INTERPRET_ARGS: see the .sbatch files
# The .sbatch files ask for the CPUs, memory and time pythia-70m.yaml needs; SBATCH_ARGS
# overrides them.
# saectl must be on PATH in the jobs (activate the virtual environment before submitting:
# sbatch passes the environment on).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SAECTL_STORE:?set SAECTL_STORE to a folder on a filesystem every node shares}"
export SAECTL_STORE
PIPELINE=$(realpath "${PIPELINE:-$here/../pythia-70m.yaml}")
export PIPELINE
SHARDS=${SHARDS:-8}
UNTIL=${UNTIL:-interpret}
case "$UNTIL" in harvest|shuffle|sweep|interpret) ;;
    *) echo "submit.sh: UNTIL=$UNTIL must be harvest, shuffle, sweep or interpret" >&2; exit 1;;
esac
LOG_DIR=$(realpath -m "${LOG_DIR:-saectl-logs}")
mkdir -p "$LOG_DIR"
# Validate the pipeline (and see the plan) before anything is queued.
saectl run "$PIPELINE" --dry-run >&2

# SBATCH_ARGS is a list of options: split at whitespace into an array, never globbed (a `*`
# stays a `*`); the account and partitions stay one word each whatever they hold.
read -r -a common <<< "--parsable --export=ALL ${SBATCH_ARGS:-}"
if [ -n "${SAECTL_ACCOUNT:-}" ]; then common=(--account="$SAECTL_ACCOUNT" "${common[@]}"); fi

submit() {  # PARTITION SBATCH-OPTIONS... SCRIPT → the job id (PARTITION "": the default)
    local partition=()
    if [ -n "$1" ]; then partition=(--partition="$1"); fi
    shift
    sbatch "${common[@]}" ${partition[@]+"${partition[@]}"} "$@" | cut -d';' -f1
}

job=$(submit "${SAECTL_CPU_PARTITION:-}" --array="0-$((SHARDS - 1))" \
      --output="$LOG_DIR/harvest-%A_%a.log" "$here/harvest.sbatch")
echo "harvest: $job"
[ "$UNTIL" = harvest ] && exit 0
job=$(submit "${SAECTL_CPU_PARTITION:-}" --dependency="afterok:$job" \
      --output="$LOG_DIR/shuffle-%j.log" "$here/shuffle.sbatch")
echo "shuffle: $job"
[ "$UNTIL" = shuffle ] && exit 0
job=$(submit "${SAECTL_CPU_PARTITION:-}" --dependency="afterok:$job" \
      --output="$LOG_DIR/sweep-%j.log" "$here/sweep.sbatch")
echo "sweep: $job"
[ "$UNTIL" = sweep ] && exit 0
job=$(submit "${SAECTL_GPU_PARTITION:-}" --dependency="afterok:$job" \
      --output="$LOG_DIR/interpret-%j.log" "$here/interpret.sbatch")
echo "interpret: $job"
