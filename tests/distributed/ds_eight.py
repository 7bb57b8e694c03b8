"""The 8-rank test job: ZeRO-2 and ZeRO-3 on the 4-bit tiny model, in one process group.

Usage (test_eight_ranks.py runs it):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python ds_eight.py OUT_DIR

This process imports torch, bitsandbytes and DeepSpeed (and loads DeepSpeed's shm comm op) once,
then forks the 8 ranks, which inherit all of it: 8 separate interpreters would each pay the
imports (about 4 s of CPU apiece, over 20 s of wall on 2 cores). No torch op runs before the
fork, so no OpenMP or gloo thread is copied into a child.

Eight ranks each take 1 sample per step with no accumulation, so a step's global batch is the
GLOBAL_BATCH (8) samples that ds_scenarios.reference_run feeds one process as 4 micro batches of 2.
Writes OUT_DIR/eight-rank<r>.json ({scenario: {"losses", "report", "seconds"} or {"error"}}) and,
from rank 0, OUT_DIR/<scenario>.safetensors (the final adapter, gathered).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import ds_scenarios as sc  # noqa: E402
from lora_dist import distributed  # noqa: E402

WORLD = 8
MICRO = 1
ACCUM = 1
assert MICRO * ACCUM * WORLD == sc.GLOBAL_BATCH  # the reference's global batch, split another way
STAGES = (2, 3)


def rank_sample(data: tuple[torch.Tensor, torch.Tensor], step: int, rank: int) -> tuple[torch.Tensor, ...]:
    """Rank r's micro batch of a step: sample r of the step's GLOBAL_BATCH, as (1, 64) each."""
    start = step * sc.GLOBAL_BATCH + rank * MICRO
    x, y = data
    return x[start : start + MICRO], y[start : start + MICRO]


def run_stage(out: Path, stage: int, rank: int) -> dict:
    """Train the nf4 model EQUIV_STEPS under `stage`; returns the global mean losses and a shard report."""
    model = sc.build_model("nf4")
    config = distributed.make_ds_config(
        zero_stage=stage, micro_batch_size=MICRO, grad_accum=ACCUM, world_size=dist.get_world_size(),
        grad_clip=sc.GRAD_CLIP, precision="fp32", lr=sc.LR, weight_decay=sc.WEIGHT_DECAY,
        warmup_steps=sc.WARMUP, total_steps=sc.EQUIV_STEPS, schedule="cosine",
    )  # fmt: skip
    engine = distributed.setup_engine(model, config)
    engine.train()
    data = sc.dataset(sc.EQUIV_STEPS)
    losses, report = [], None
    for step in range(sc.EQUIV_STEPS):
        x, y = rank_sample(data, step, rank)
        loss = sc.loss_fn(engine(x), y)
        engine.backward(loss)
        if step == 1:
            # After one step the optimizer state exists; after backward, before the step, this
            # rank's gradient share is held (the step frees it).
            report = distributed.shard_report(engine)
        engine.step()
        total = loss.detach().to(torch.float64)
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    state = distributed.gathered_adapter_state_dict(engine)  # collective under ZeRO-3
    if rank == 0:
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(out / f"nf4-z{stage}.safetensors"))
    return {"losses": losses, "report": report}


def rank_main(out: Path) -> None:
    """One rank: join the group from the RANK/WORLD_SIZE/MASTER_* variables, run every stage."""
    rank, world = distributed.init_distributed(backend="gloo")
    if world != WORLD:
        raise SystemExit(f"ds_eight.py needs WORLD_SIZE={WORLD}, got {world}")
    results = {}
    for stage in STAGES:
        start = time.perf_counter()
        try:
            results[f"nf4-z{stage}"] = run_stage(out, stage, rank)
            results[f"nf4-z{stage}"]["seconds"] = time.perf_counter() - start
        except Exception:  # record it, so the test names the failing scenario
            results[f"nf4-z{stage}"] = {"error": traceback.format_exc()}
    (out / f"eight-rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Fork WORLD ranks of `rank_main`; exit non-zero if any rank failed."""
    out = Path(sys.argv[1])
    from deepspeed.accelerator import get_accelerator

    # The op DeepSpeed's CPU backend loads at init_distributed; loaded here, every rank inherits it.
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.setdefault("MASTER_PORT", "29511")
    children = []
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
                log = os.open(out / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                rank_main(out)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    failed = [rank for rank, pid in enumerate(children) if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise SystemExit(f"ranks {failed} failed; see their rank<r>.log in {out}")


if __name__ == "__main__":
    main()
