"""Preemption under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo): one rank gets the signal, both stop together.

Only rank 1 is signalled, mid-step: the ranks must agree (a collective flag) to finish that step, write
one complete checkpoint and both exit 75; a resume with train.resume=auto must end on the adapter of an
uninterrupted 2-rank run, bit for bit.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dist.launch import free_port
from lora_dist.preemption import EXIT_PREEMPTED
from lora_dist.tracking import read_metrics

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "preempt_worker.py"
WORLD, STEPS, ACCUM = 2, 5, 2
RUN = ["model.path=random:tiny", "data.path=random-tokens", "data.max_seq_len=64", "model.compute_dtype=fp32",
       f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"train.grad_accum={ACCUM}", "train.warmup_steps=0",
       "train.eval_interval=0", "train.save_interval=0", "train.log_interval=100", "wandb.mode=disabled",
       "lora.dropout=0.1", "distributed.timeout_s=120"]


def _launch(out: Path, *extra: str, signal_at: int = 0) -> list[int]:
    """Run `lora-dist train` on WORLD ranks; rank 1 sends itself SIGTERM at forward `signal_at` (0: never)."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text("model:\n  path: random:tiny\n")
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
        log = open(out.parent / f"{out.name}-rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "1", str(signal_at), "SIGTERM", "train", str(config), *RUN,
             f"train.output_dir={out}", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
    return [proc.wait(timeout=300) for proc in procs]


def _tail(out: Path) -> str:
    return "\n".join((out.parent / f"{out.name}-rank{r}.log").read_text()[-1500:] for r in range(WORLD))


@pytest.mark.parametrize("stage", [2, 3])
def test_signal_on_one_rank_stops_both_after_the_step_and_resume_is_bit_exact(tmp_path, stage):
    zero = f"distributed.zero_stage={stage}"
    whole = tmp_path / "whole"
    assert _launch(whole, zero) == [0, 0], _tail(whole)

    forward = random.Random(stage).randrange(1, STEPS * ACCUM)  # a seeded random point: reproducible
    cut = tmp_path / "cut"
    assert _launch(cut, zero, signal_at=forward) == [EXIT_PREEMPTED] * WORLD, _tail(cut)
    in_progress = -(-forward // ACCUM)
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"step-{in_progress:08d}"
    assert [r["step"] for r in read_metrics(cut) if r["kind"] == "train"] == list(range(1, in_progress + 1))

    assert _launch(cut, zero, "train.resume=auto") == [0, 0], _tail(cut)
    assert [r["step"] for r in read_metrics(cut) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
