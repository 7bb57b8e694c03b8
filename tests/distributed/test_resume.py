"""Checkpoints under DeepSpeed on the CPU (gloo): resume at the same or another world size, and the
format-2 fixture (DeepSpeed pickles, 2-process ZeRO-2) resumed by today's code.

The job (resume_worker.py) writes checkpoints of every supported setting on 1 and on 2 ranks after
RESUME_AT steps, then resumes each on 1 and on 2 ranks. The global batch is the same at both world
sizes, so the continued losses are compared with the single-process reference run (no DeepSpeed).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ds_scenarios as sc
from conftest import launch
from lora_dist.launch import free_port

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "resume_worker.py"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "v2"
REPO = Path(__file__).parents[2]
SETTINGS = ("fp32-z0", "fp32-z1", "fp32-z2", "fp32-z3", "bf16-z0", "bf16-z2", "bf16-z3")
PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (world size written at, world size resumed at)


@pytest.fixture(scope="module")
def resume_job(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("resume_job")
    results = {}
    for phase, world in (("write", 2), ("write", 1), ("resume", 2), ("resume", 1)):
        found = launch(phase, out, world=world, worker=WORKER, log_name=f"{phase}-w{world}")
        results.update({f"{phase}@{world}:{name}": ranks for name, ranks in found.items()})
    return results, out


def outcome(resume_job, key: str) -> list[dict]:
    results, _ = resume_job
    for rank, r in enumerate(results[key]):
        assert not r.get("error"), f"{key} failed on rank {rank}:\n{r['error']}"
    return results[key]


@functools.cache
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    losses, model = sc.reference_run("nf4", sc.RESUME_STEPS)
    return losses, {k: v.clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("written", "resumed"), PAIRS)
def test_resumed_optimizer_state_equals_the_saved_one_bitwise(resume_job, setting, written, resumed):
    # Masters, Adam moments and the adapter weights the forward uses, re-gathered after the load.
    ranks = outcome(resume_job, f"resume@{resumed}:w{written}-{setting}")
    assert all(r["state_equal"] and r["weights_equal"] for r in ranks)
    assert all(r["counters"] == [sc.RESUME_AT, sc.RESUME_AT] for r in ranks)  # engine steps, LR schedule


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.startswith("fp32")])
@pytest.mark.parametrize(("written", "resumed"), PAIRS)
def test_fp32_resume_at_any_world_size_continues_the_reference_run(resume_job, setting, written, resumed):
    ref_losses, ref_adapter = reference()
    first = outcome(resume_job, f"write@{written}:{setting}")[0]["losses"]
    second = outcome(resume_job, f"resume@{resumed}:w{written}-{setting}")[0]["losses"]
    # Tolerances of ds_scenarios (fp32 sums in another order per world size; a lost step or moment
    # moves the losses by ~1e-2 and the adapter by ~LR).
    assert first + second == pytest.approx(ref_losses, rel=sc.FP32_LOSS_RTOL)
    _, out = resume_job
    got = load_file(str(out / f"resumed-w{resumed}-from-w{written}-{setting}.safetensors"))
    assert max((got[k] - ref_adapter[k]).abs().max().item() for k in ref_adapter) <= sc.FP32_ADAPTER_ATOL


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.startswith("bf16")])
def test_bf16_resume_on_the_same_ranks_continues_exactly(resume_job, setting):
    # Resumed at its own world size, a bf16 run continues as the uninterrupted run would have: the
    # losses after the resume equal those of a resume at the other world size to bf16 noise, and
    # the fp32 masters came back bit for bit (test above), which only a lossless save allows.
    a = outcome(resume_job, f"resume@2:w2-{setting}")[0]["losses"]
    b = outcome(resume_job, f"resume@1:w1-{setting}")[0]["losses"]
    assert a == pytest.approx(b, rel=5e-3)  # bf16: 8 significant bits in the forward (see test_zero)


def _train_cli(output_dir: Path, overrides: list[str], processes: int) -> list[subprocess.CompletedProcess]:
    args = [sys.executable, "-m", "lora_dist", "train", str(REPO / "configs/tiny-cpu.yaml"), *overrides,
            f"train.output_dir={output_dir}", "train.resume=auto"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(processes)]
    return [subprocess.CompletedProcess(args, p.wait(timeout=600), p.stdout.read()) for p in procs]


def test_a_format_2_zero2_checkpoint_from_two_processes_resumes_and_continues(tmp_path):
    # The first release's 2-process ZeRO-2 checkpoint (DeepSpeed's files, read with weights_only=True)
    # resumes at step 2 and trains steps 3-4. Its continuation is not the old code's bit for bit: the
    # old loader cut each epoch per rank, the new one into global batches that do not depend on the
    # world size (issue 16 item 6), so the rows after the resume point are grouped differently.
    # The restored state itself is checked exactly in test_checkpoint (single process, same loader).
    record = json.loads((FIXTURES / "zero2-2proc.json").read_text())
    shutil.copytree(FIXTURES / "zero2-2proc", tmp_path / "run")
    for done in _train_cli(tmp_path / "run", record["overrides"], record["processes"]):
        assert done.returncode == 0, done.stdout[-3000:]
    got = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    expected = load_file(str(FIXTURES / "zero2-2proc-expected-adapter.safetensors"))
    start = load_file(str(FIXTURES / "zero2-2proc/checkpoints/step-00000002/adapter_model.safetensors"))
    assert got.keys() == expected.keys() == start.keys()
    assert not all(torch.equal(got[k], start[k]) for k in start)  # it trained on from the checkpoint
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"}
    assert sorted(losses) == sorted(record["expected_losses"]) == ["3", "4"]  # resumed at step 2, nothing repeated
    # same model state and the same rows at this point of training: losses of the same size as the old run's
    assert all(abs(losses[k] - record["expected_losses"][k]) < 0.5 * record["expected_losses"][k] for k in losses)
