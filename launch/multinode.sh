#!/usr/bin/env bash
# Every host of a hostfile, reached over ssh by pdsh (`deepspeed --hostfile`), started from one machine.
#
#   launch/multinode.sh --hostfile FILE [--num-gpus N] [--master-addr A] [--master-port P] [--env NAME]... \
#       [--dry-run] CONFIG [section.key=value ...]
#
#   launch/multinode.sh --hostfile launch/hostfile.example configs/llama3-70b-qlora-zero3-8gpu.yaml
#
# FILE is DeepSpeed's hostfile, one `HOST slots=GPUS` per line (see launch/hostfile.example); it is
# checked first (format, duplicate hosts, slots >= 1, --num-gpus <= slots) and every problem is listed.
# Needs pdsh and passwordless ssh to every host, and the repository, venv and train.output_dir at the same
# paths on all of them. The environment ranks need on other hosts (WANDB_*, NCCL_*, HF_*, PYTHONPATH, the
# venv's PATH, --env NAME) goes through <output_dir>/logs/.deepspeed_env; WANDB_API_KEY and HF_TOKEN go as
# 0600 files beside it (NETRC, HF_TOKEN_PATH), never on a command line, deleted when the launch ends.
# --master-addr defaults to what the first host reports (`ssh HOST hostname -I`), --master-port to 29500.
# Per-rank logs, failure report: as in train.sh. Ctrl-C / SIGTERM go to DeepSpeed's runner, which stops
# the ranks of every host (pkill over pdsh); so does the launcher's death, however it dies (the runner
# gets SIGTERM then). Rehearse on one machine: README, "Multi-node"; tests/distributed/test_multinode.py
# does it in CI with an sshd of its own. Python: $LORA_DIST_PYTHON, else python3 on PATH.

set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0; fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lora_dist, installed or not
exec "${LORA_DIST_PYTHON:-python3}" -m lora_dist.launch multinode "$@"
