#!/bin/bash
# One shard of a normexp sweep per SLURM array task. From the repository root:
#
#   sbatch --array=1-8 scripts/slurm_sweep.sh configs/sweeps/placement_warmup.yaml
#
# Task k of an array of N runs `normexp sweep SWEEP.yaml --shard k/N`; the shards partition the
# sweep's runs, and any arguments after the sweep file are passed on (e.g. --max-parallel 2).
# What the tasks need:
#   - the sweep's out_dir on a filesystem every node sees, with POSIX file locks (NFS has
#     them; Lustre needs the flock mount option): run directories, locks, sweep.json, the
#     shared compile cache and the table;
#   - the environment made by `make test` or `make demo` (.venv), or NORMEXP=/path/to/normexp;
#   - nothing else: no coordinator, no jax.distributed (each task trains its own runs). A rerun
#     of the same array skips finished runs and resumes interrupted ones; a task killed by the
#     scheduler leaves a lock that the next task takes over. A task exits 0 only when every run
#     of its shard is finished; one whose runs another task still trains waits for it.
# The sizes below (8 cores, 16G, 4 hours) are requests, and sbatch's own options override them:
#
#   sbatch --array=1-8 --cpus-per-task=2 --mem=4G scripts/slurm_sweep.sh SWEEP.yaml
#
# (a node smaller than the request refuses it: "Requested node configuration is not available").
# On GPU nodes add e.g. `#SBATCH --gpus-per-task=1`; with --max-parallel K the task's GPUs are
# divided among its K workers (one each when K equals their count; workers that share one GPU
# each take their part of its memory). See README, Accelerators.
#
#SBATCH --job-name=normexp-sweep
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail

sweep=${1:?usage: sbatch --array=1-N scripts/slurm_sweep.sh SWEEP.yaml [normexp sweep options]}
shift
count=${SLURM_ARRAY_TASK_COUNT:?not an array task: submit with sbatch --array=1-N}
index=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))
cd "${SLURM_SUBMIT_DIR:-.}"
exec "${NORMEXP:-.venv/bin/normexp}" sweep "$sweep" --shard "$index/$count" "$@"
