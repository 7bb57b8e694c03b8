"""Eight ranks: ZeRO-2 and ZeRO-3 on a 4-bit base match one process and cut adapter state 8-fold.

The 8-GPU recipe's CPU stand-in: one 8-process job (gloo, DeepSpeed's CPU accelerator, one thread
per rank) runs `ds_eight.py` for both stages; the references are computed here without DeepSpeed.
(The shipped 70B config's DeepSpeed config on 8 ranks is checked in tests/test_configs.py, through
the function the job uses.)
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ds_eight
import ds_scenarios as sc
from lora_dist import LoRAOptimizer
from lora_dist.launch import free_port

WORKER = Path(__file__).parent / "ds_eight.py"
WORLD = ds_eight.WORLD
TIMEOUT_S = 180

# The adapter of ds_scenarios' tiny model: LoRA r=4 on q_proj and v_proj (64 -> 64) of 2 blocks,
# lora_A (4, 64) + lora_B (64, 4) = 512 elements per layer, 4 layers: 2048 fp32 elements.
ADAPTER_NUMEL = 4 * (4 * 64 + 64 * 4)
ADAPTER_BYTES = ADAPTER_NUMEL * 4  # 8192: what one process holds of params, and of grads
# No padding at 8 ranks: ZeRO-1/2 pad each flat group to a multiple of 2 * world = 16 elements
# (its nccl_start_alignment_factor) and each param to 16 bytes; ZeRO-3 pads each param to a
# multiple of world = 8 elements. 2048 and every param's 256 divide evenly: 256 elements per rank.
SHARD_BYTES = ADAPTER_BYTES // WORLD  # 1024
# AdamW keeps exp_avg and exp_avg_sq per element plus a 4-byte fp32 `step` per torch param: one
# process has 8 params (8 steps), a ZeRO rank one flat partition per param group (1 step).
ONE_PROCESS_OPTIMIZER_BYTES = 2 * ADAPTER_BYTES + 8 * 4  # 16416
SHARD_OPTIMIZER_BYTES = 2 * SHARD_BYTES + 4  # 2052


@pytest.fixture(scope="module")
def eight_ranks(tmp_path_factory) -> tuple[dict, Path]:
    """({scenario: [result of rank 0..7]}, output dir) of the one 8-rank job (ds_eight.py forks the ranks)."""
    out = tmp_path_factory.mktemp("ds_eight")
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",  # 8 ranks share CI's 2 cores: more threads per rank only contend
    )  # fmt: skip
    with open(out / "job.log", "w") as log:
        # A session of its own: on a timeout the whole job, forked ranks included, is killed.
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(out)], env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    if code != 0:
        tail = (out / "job.log").read_text()[-2000:] + (out / "rank0.log").read_text()[-4000:]
        raise RuntimeError(f"ds_eight.py exited with {code}; job and rank 0 log tails:\n{tail}")
    per_rank = [json.loads((out / f"eight-rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [ranks[name] for ranks in per_rank] for name in per_rank[0]}, out


def result(eight_ranks, stage: int) -> list[dict]:
    results, _ = eight_ranks
    per_rank = results[f"nf4-z{stage}"]
    for rank, r in enumerate(per_rank):
        assert not r.get("error"), f"nf4-z{stage} failed on rank {rank}:\n{r['error']}"
    return per_rank


@functools.cache
def reference() -> tuple[list[float], dict[str, torch.Tensor], int]:
    """(losses, final adapter, base bytes) of one process without DeepSpeed, same global batch."""
    losses, model = sc.reference_run("nf4", sc.EQUIV_STEPS)
    base_bytes = sum(t.numel() * t.element_size() for t in sc.frozen_tensors(model))
    return losses, {k: v.clone() for k, v in model.adapter_state_dict().items()}, base_bytes


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_eight_ranks_match_one_process_in_losses_and_adapter(eight_ranks, stage):
    ref_losses, ref_adapter, _ = reference()
    ranks = result(eight_ranks, stage)
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)  # all-reduced: every rank logs the same
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=sc.FP32_LOSS_RTOL)
    got = load_file(str(eight_ranks[1] / f"nf4-z{stage}.safetensors"))
    assert got.keys() == ref_adapter.keys()
    assert max((got[k] - ref_adapter[k]).abs().max().item() for k in got) <= sc.FP32_ADAPTER_ATOL


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_cuts_each_ranks_adapter_state_eightfold(eight_ranks, stage):
    """ZeRO-2 splits gradients and optimizer state, ZeRO-3 the adapter params too; exact bytes.

    One process holds ADAPTER_BYTES of params and of grads and ONE_PROCESS_OPTIMIZER_BYTES of
    AdamW state (test_one_process_holds_the_unsharded_adapter_bytes). Under ZeRO-2/3 a rank's
    torch AdamW steps an fp32 master copy of its 1/8 partition (no such copy in one process:
    AdamW updates the params in place), so that copy is 1/8 of the params too.
    """
    expected = {
        "adapter_param_bytes": SHARD_BYTES if stage == 3 else ADAPTER_BYTES,
        "adapter_grad_bytes": SHARD_BYTES,
        "optimizer_state_bytes": SHARD_OPTIMIZER_BYTES,
        "master_param_bytes": SHARD_BYTES,
    }
    for rank, r in enumerate(result(eight_ranks, stage)):
        got = {what: r["report"][what] for what in expected}
        assert got == expected, (stage, rank)


def test_one_process_holds_the_unsharded_adapter_bytes():
    """The 1-rank side of the 8-fold comparison, measured rather than assumed."""
    model = sc.build_model("nf4")
    optimizer = LoRAOptimizer(model, lr=sc.LR, weight_decay=sc.WEIGHT_DECAY).optimizer  # as reference_run
    sc.loss_fn(model(torch.randn(2, sc.WIDTH)), torch.zeros(2, sc.WIDTH)).backward()
    optimizer.step()  # creates the state
    params = model.get_trainable_parameters()
    assert sum(p.numel() * p.element_size() for p in params) == ADAPTER_BYTES
    assert sum(p.grad.numel() * p.grad.element_size() for p in params) == ADAPTER_BYTES
    state = [t for s in optimizer.state.values() for t in s.values()]
    assert sum(t.numel() * t.element_size() for t in state) == ONE_PROCESS_OPTIMIZER_BYTES


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_four_bit_base_is_whole_and_identical_on_all_eight_ranks(eight_ranks, stage):
    _, _, one_process_bytes = reference()
    for rank, r in enumerate(result(eight_ranks, stage)):
        report = r["report"]
        assert report["base_bytes"] == one_process_bytes, rank
        assert not report["base_partitioned"], rank
        assert report["base_dtypes"] == ["torch.float32", "torch.uint8"], rank
