#!/usr/bin/env bash
# One GPU against two (ZeRO-2, then ZeRO-3) on one recipe, each run through launch/train.sh, then a table:
# tokens/s per GPU, scaling efficiency, peak memory per GPU, communication time, loss match, shard bytes.
#
#   launch/gpu-scaling.sh OUT_DIR [section.key=value ...]
#
#   launch/gpu-scaling.sh /tmp/scaling                   Llama-3-8B shape, QLoRA (configs/scaling-llama3-8b.yaml)
#   DS_ACCELERATOR=cpu launch/gpu-scaling.sh /tmp/s model.path=random:tiny data.max_seq_len=64 \
#       model.compute_dtype=fp32 train.micro_batch_size=2 train.global_batch_size=4
#                                                         the same study on CPU processes: a rehearsal
#
# The runs: `train.sh --num-gpus 1` (ZeRO-2 over one rank), `--num-gpus 2 distributed.zero_stage=2`,
# `--num-gpus 2 distributed.zero_stage=3`; the config's global batch is the same for all three, so one GPU
# accumulates twice as many micro batches and the losses must match step for step. Overrides go to every run.
# A failed run is reported and the next one still runs. Environment: SCALING_CONFIG (the recipe),
# SCALING_RUN_TIMEOUT (seconds per run, default 600), SCALING_RUNS (which runs, default all three),
# SCALING_WORK (the run folders, with their checkpoints; default OUT_DIR/runs), LORA_DIST_PYTHON (python3).
# Writes OUT_DIR/summary.md, summary.json, metrics-<run>.jsonl and logs.txt.

set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help || $# -lt 1 ]]; then sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0; fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$1; shift
config=${SCALING_CONFIG:-$here/../configs/scaling-llama3-8b.yaml}
limit=${SCALING_RUN_TIMEOUT:-600}
python=${LORA_DIST_PYTHON:-python3}
work=${SCALING_WORK:-$out/runs}
mkdir -p "$work"

run() {  # name num_gpus zero_stage
    local name=$1 gpus=$2 stage=$3 started=$SECONDS
    echo "=== $name: launch/train.sh --num-gpus $gpus $config distributed.zero_stage=$stage $*" >&2
    timeout -k 15 "$limit" "$here/train.sh" --num-gpus "$gpus" "$config" "train.output_dir=$work/$name" \
        "distributed.zero_stage=$stage" "${@:4}"
    local rc=$?
    echo "$rc" >"$work/$name.rc"
    echo "=== $name: exit $rc after $((SECONDS - started)) s" >&2
}

only=" ${SCALING_RUNS:-gpu1-zero2 gpu2-zero2 gpu2-zero3} "  # a subset re-runs those, keeping the others' folders
[[ $only == *" gpu1-zero2 "* ]] && run gpu1-zero2 1 2 "$@"
[[ $only == *" gpu2-zero2 "* ]] && run gpu2-zero2 2 2 "$@"
[[ $only == *" gpu2-zero3 "* ]] && run gpu2-zero3 2 3 "$@"

"$python" - "$out" "$work" gpu1-zero2 gpu2-zero2 gpu2-zero3 <<'PY'
"""Collect the three runs into summary.json / summary.md (see the header of launch/gpu-scaling.sh)."""
import json
import shutil
import statistics
import sys
from pathlib import Path

WARMUP_STEPS = 3  # compile, allocator growth and NCCL setup land in the first steps
out, work, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]


def collect(name):
    folder = work / name
    rc_file = work / f"{name}.rc"
    rec = {"run": name, "exit": int(rc_file.read_text()) if rc_file.exists() else None}
    path = folder / "metrics.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    if path.exists():
        shutil.copy(path, out / f"metrics-{name}.jsonl")
    train = [m for m in lines if m.get("kind") == "train"]
    cluster = next((m for m in lines if m.get("kind") == "cluster"), {})
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "diagnostics").glob("rank-*.json"))]
    world = cluster.get("world_size") or (ranks[0]["world_size"] if ranks else 1)
    profile = next((r.get("profile") for r in ranks if r["rank"] == 0 and r.get("profile")), None)
    # the profiled steps and the one after (the profiler's teardown) run slower: not throughput samples
    skip = set(range(profile["steps"][0], profile["steps"][1] + 2)) if profile else set()
    steady = [m["tokens_per_s"] for m in train if m["step"] > WARMUP_STEPS and m["step"] not in skip]
    rec.update(
        world_size=world, hostnames=cluster.get("hostnames"), steps=len(train),
        losses=[m["loss"] for m in train],
        tokens_per_s_per_gpu=statistics.median(steady) / world if steady else None,
        step_time_s=statistics.median([m["step_time_s"] for m in train if m["step"] > WARMUP_STEPS]) if train else None,
        peak_allocated_gib=[r.get("peak_allocated_gib") for r in ranks],
        peak_reserved_gib=[r.get("peak_reserved_gib") for r in ranks],
        comm_ms_per_step=profile["comm_ms_per_step"] if profile else None,
        profile=profile, shards=[r.get("shards") for r in ranks],
    )
    return rec


runs = [collect(n) for n in names]
base = runs[0]
for r in runs:
    b, t = base["tokens_per_s_per_gpu"], r["tokens_per_s_per_gpu"]
    r["scaling_efficiency"] = t / b if (b and t) else None
    pairs = list(zip(base["losses"], r["losses"]))
    r["loss_max_abs_diff"] = max((abs(x - y) for x, y in pairs), default=None)
    r["loss_max_rel_diff"] = max((abs(x - y) / abs(x) for x, y in pairs), default=None)
(out / "summary.json").write_text(json.dumps(runs, indent=1))


def f(v, fmt):
    return "-" if v is None else format(v, fmt)


rows = ["| run | exit | GPUs | tokens/s per GPU | efficiency | peak GiB per GPU (alloc / reserved) | "
        "comm ms/step (rank 0) | step s | loss max abs diff vs 1 GPU (steps) |", "|" + "---|" * 9]
for r in runs:
    peaks = ", ".join(f"{f(a, '.1f')}/{f(b, '.1f')}" for a, b in zip(r["peak_allocated_gib"], r["peak_reserved_gib"]))
    rows.append(
        f"| {r['run']} | {r['exit']} | {r['world_size']} | {f(r['tokens_per_s_per_gpu'], ',.0f')} | "
        f"{f(r['scaling_efficiency'], '.3f')} | {peaks or '-'} | {f(r['comm_ms_per_step'], '.1f')} | "
        f"{f(r['step_time_s'], '.3f')} | {f(r['loss_max_abs_diff'], '.2e')} ({r['steps']}) |"
    )
rows += ["", "shard bytes per rank (at the second optimizer step, before its update):", "",
         "| run | rank | adapter params | adapter grads | optimizer state | fp32 masters | base | base partitioned |",
         "|" + "---|" * 8]
for r in runs:
    for rank, s in enumerate(r["shards"]):
        if s:
            rows.append(f"| {r['run']} | {rank} | {s['adapter_param_bytes']:,} | {s['adapter_grad_bytes']:,} | "
                        f"{s['optimizer_state_bytes']:,} | {s['master_param_bytes']:,} | {s['base_bytes']:,} | "
                        f"{s['base_partitioned']} |")
rows += ["", "losses:", ""] + [f"{r['run']}: " + " ".join(f"{x:.5f}" for x in r["losses"]) for r in runs]
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))

with open(out / "logs.txt", "w") as logs:  # the tail of every rank's log, for what went wrong
    for n in names:
        for log in sorted((work / n / "logs").glob("*_rank*.log")):  # DeepSpeed's --enable_each_rank_log names
            tail = log.read_text(errors="replace").splitlines()[-60:]
            logs.write(f"===== {n}/{log.name}\n" + "\n".join(tail) + "\n")
PY
