#!/usr/bin/env bash
# One node: every visible GPU, or N CPU processes (gloo) on a machine without GPUs.
#
#   launch/train.sh [--num-gpus N] [--master-port P] [--dry-run] CONFIG [section.key=value ...]
#
#   launch/train.sh configs/llama3-8b-qlora-24gb.yaml              all visible GPUs (CUDA_VISIBLE_DEVICES)
#   launch/train.sh --num-gpus 2 configs/tiny-cpu.yaml train.max_steps=10
#                                                                  2 GPUs, or 2 CPU processes without GPUs
#
# Runs `deepspeed --num_gpus N` around `python -m lora_dist train CONFIG ...` (N defaults to every visible
# GPU, or 1 CPU process; on the CPU DeepSpeed's own default would be the NUMA node count). Each rank's
# output goes to <train.output_dir>/logs/<start time>_rank<N>.log (DeepSpeed's --enable_each_rank_log),
# rank 0's is shown here too; if a rank fails, DeepSpeed's launcher stops the others and logs the exit
# status, and ours ends with each rank log's last line. Ctrl-C / SIGTERM / SIGUSR1 go to the ranks (they
# save and exit 75; a second one kills). The master port is a free one.
# --dry-run prints the command. Python: $LORA_DIST_PYTHON, else python3 on PATH (activate the venv).

set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0; fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lora_dist, installed or not
exec "${LORA_DIST_PYTHON:-python3}" -m lora_dist.launch single "$@"
