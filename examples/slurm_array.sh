#!/bin/bash
# One ddaug job as a Slurm array: every array task is a worker that takes the job's units by
# lease from the shared output folder, so tasks may start late, be preempted and requeued, or
# be added later (sbatch again with the same variables) without losing or repeating work.
#
#   export INPUT=/data/llava.json OUT=/shared/ddaug/general-sdxl DDAUG_ARGS="--model sdxl"
#   ddaug augment "$INPUT" -o "$OUT" $DDAUG_ARGS --plan-only    # optional: write the plan first
#   sbatch --export=ALL examples/slurm_array.sh
#   ddaug inspect "$OUT"                                         # progress per unit and per worker
#
#SBATCH --job-name=ddaug
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=ddaug-%A_%a.log
set -euo pipefail

: "${INPUT:?set INPUT to the inputs (folder, dataset, tars)}"
: "${OUT:?set OUT to the output folder on a file system every node sees}"
COMMAND=${COMMAND:-augment}          # or caption
DDAUG=${DDAUG:-ddaug}                 # e.g. "python -m ddaug" in a virtual environment

# SLURM_ARRAY_TASK_ID makes each task join the others (no --join needed); it only names the
# worker. A task that dies leaves its unit to the others after --lease-timeout seconds.
# shellcheck disable=SC2086  # DDAUG and DDAUG_ARGS are word lists
exec $DDAUG "$COMMAND" "$INPUT" -o "$OUT" --rank "${SLURM_ARRAY_TASK_ID:-0}" ${DDAUG_ARGS:-}
