#!/usr/bin/env bash
# One node of a multi-node job, for clusters without passwordless ssh: run it once on every node.
#
#   launch/node.sh --nnodes N --node-rank R --master-addr A --master-port P [--nproc-per-node K] [--dry-run] \
#       CONFIG [section.key=value ...]
#
#   on node 0 (10.0.0.1):  launch/node.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 CONFIG
#   on node 1:             launch/node.sh --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 CONFIG
#
# Runs `deepspeed --no_ssh --node_rank R --master_addr A --master_port P` with a hostfile of N nodes of K
# processes (K: --nproc-per-node, the same on every node; default every visible GPU, or 1 CPU process);
# node R holds global ranks R*K .. R*K+K-1, rank 0 (W&B, the adapter) lives on node 0. Every node must
# see the same CONFIG and train.output_dir (a shared filesystem) and reach A:P. Each rank's output goes to
# <train.output_dir>/logs/<start time>_rank<N>.log (DeepSpeed's --enable_each_rank_log; node 0 shows
# rank 0's); if a rank dies the others stop within distributed.timeout_s, DeepSpeed's launcher logs the
# dead rank's exit status, and ours ends with each rank log's last line. Ctrl-C / SIGTERM / SIGUSR1 go to
# the ranks (they save and exit 75). Python: $LORA_DIST_PYTHON, else python3 on PATH.

set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0; fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lora_dist, installed or not
exec "${LORA_DIST_PYTHON:-python3}" -m lora_dist.launch node "$@"
