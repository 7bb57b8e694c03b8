"""The one multi-process DeepSpeed job the distributed tests read (started once per session).

`ds_worker.py` runs on WORLD ranks (plain processes with torch.distributed's env variables: no
launcher, which would add seconds) over gloo with DeepSpeed's CPU accelerator, three times: "train"
runs every scenario and writes checkpoints, "resume" is a new process group that resumes them,
"reshard" resumes them again on 1 rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dist.distributed import SHM_DIR, shm_buffer_name
from lora_dist.launch import free_port

WORKER = Path(__file__).parent / "ds_worker.py"
WORLD = 2
TIMEOUT_S = 240


def launch(phase: str, out: Path, world: int = WORLD, worker: Path = WORKER, log_name: str | None = None) -> dict:
    """Run `worker` (ds_worker.py) `phase` on `world` ranks; returns {scenario: [result of rank 0, rank 1, ...]}."""
    log_name = log_name or phase
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            LOCAL_SIZE=str(world),  # as the deepspeed launcher sets it: DeepSpeed's CPU comm maps /dev/shm buffers
            OMP_NUM_THREADS="1",  # 2 ranks on 2 cores: no oversubscription
        )
        log = open(out / f"{log_name}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(worker), phase, str(out)], env=env, stdout=log, stderr=log))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
    if any(code != 0 for code in codes):
        tail = (out / f"{log_name}-rank0.log").read_text()[-4000:]
        raise RuntimeError(f"{worker.name} {phase} exited with {codes}; rank 0 log tail:\n{tail}")
    # DeepSpeed's CPU comm buffers of this group, were any left in /dev/shm (distributed._unlink_shm_buffer)
    left = sorted(path.name for path in SHM_DIR.glob(shm_buffer_name("*", "127.0.0.1", port)))
    (out / f"{log_name}-shm-left.json").write_text(json.dumps(left))
    return _read(out, log_name, world)


def _read(out: Path, phase: str, world: int) -> dict:
    per_rank = [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in range(world)]
    return {name: [ranks[name] for ranks in per_rank] for name in per_rank[0]}


@pytest.fixture(scope="session")
def ds_results(tmp_path_factory) -> tuple[dict, Path]:
    """({scenario: [per-rank results]}, output dir) of the train and resume phases."""
    reuse = os.environ.get("LORA_DIST_DS_JOB_DIR")  # debugging: read a finished job's directory
    if reuse:
        out = Path(reuse)
        read = lambda phase: _read(out, phase, WORLD)  # noqa: E731
        return {**read("train"), **read("resume"), **_read(out, "reshard", 1)}, out
    out = tmp_path_factory.mktemp("ds_job")
    results = launch("train", out)
    results.update(launch("resume", out))
    results.update(launch("reshard", out, world=1))  # the same checkpoints at another world size
    return results, out
