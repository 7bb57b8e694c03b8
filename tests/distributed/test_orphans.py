"""No orphans: when a launcher or a rank dies, every process of the job exits within the distributed timeout.

Each launcher runs 2 CPU ranks (gloo) for real; the test kills one process and then watches every
process that was in the job's tree at that moment (the launcher, DeepSpeed's per-node launcher, the
ranks) until all have exited. `orphan_worker.py` starts like the training job (`watch_launcher`, then
the process group) and handles SIGTERM like it (finish the collective, exit 75); `launch/train.sh`
runs the training job itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import supervise
from lora_dist.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("orphan_worker.py")
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
TIMEOUT_S = 20  # the ranks' collective timeout: the bound on every exit below
START_LIMIT_S = 180  # ranks not in their process group by then: the launch is broken
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.distributed


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "MASTER_", "RANK"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=f"{ROOT}:{env.get('PYTHONPATH', '')}",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def command(launcher: str, out: Path) -> list[str]:
    port, worker = str(free_port()), [str(WORKER), str(out), str(TIMEOUT_S)]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--master_port", port, "--num_gpus", "2", *worker]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, *worker]
    return [str(ROOT / "launch" / "train.sh"), "--num-gpus", "2", "--master-port", port, str(CONFIG),
            f"train.output_dir={out}", "train.max_steps=100000", "train.log_interval=1", "train.eval_interval=0",
            "train.save_interval=0", "data.max_seq_len=64", f"distributed.timeout_s={TIMEOUT_S}", "wandb.mode=disabled"]


def started(launcher: str, out: Path) -> bool:
    """Both ranks are in their process group (the worker's pid files; a training step logged)."""
    if launcher == "train.sh":
        metrics = out / "metrics.jsonl"
        return metrics.exists() and '"kind": "train"' in metrics.read_text()
    return all((out / f"rank-{r}.pid").exists() for r in (0, 1))


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every live process (zombies excluded)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := supervise._stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    return table


def job_processes(root: int) -> dict[int, int]:
    """{pid: start time} of `root` and all its descendants."""
    table = process_table()
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found[pid] = table[pid][1]
            todo += [child for child, (parent, _) in table.items() if parent == pid]
    return found


def rank_pid(job: dict[int, int], rank: int) -> int:
    for pid in job:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK" in b" ".join(env):
            return pid
    raise AssertionError(f"no rank {rank} among {sorted(job)}")


def alive(job: dict[int, int]) -> list[int]:
    table = process_table()
    return [pid for pid, start in job.items() if pid in table and table[pid][1] == start]


KILLS = ("SIGTERM to the launcher", "SIGKILL to the launcher", "SIGKILL to rank 1")
# launch/train.sh runs the real training job (slower to start); a rank of it killed is
# test_launch.py's killed 2-node job.
CASES = [(launcher, kill) for launcher in ("deepspeed", "torchrun") for kill in KILLS] + [
    ("train.sh", kill) for kill in KILLS[:2]]


@pytest.mark.parametrize(("launcher", "kill"), CASES)
def test_every_process_of_the_job_exits_within_the_timeout(launcher, kill, tmp_path):
    job: dict[int, int] = {}
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(command(launcher, tmp_path), env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not started(launcher, tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started(launcher, tmp_path), (tmp_path / "launcher.log").read_text()[-3000:]
        job = job_processes(proc.pid)
        target = rank_pid(job, 1) if kill.endswith("rank 1") else proc.pid
        os.kill(target, signal.SIGKILL if kill.startswith("SIGKILL") else signal.SIGTERM)
        killed_at = time.monotonic()
        while alive(job) and time.monotonic() - killed_at < TIMEOUT_S + 30:
            proc.poll()  # reap the launcher (the only one of them that is our child)
            time.sleep(0.1)
        seconds = time.monotonic() - killed_at
        print(f"{launcher}, {kill}: {len(job)} processes gone in {seconds:.1f} s")
        left = alive(job)
        assert not left, f"still running {seconds:.0f} s after {kill}: {left}\n" + (tmp_path / "launcher.log").read_text()[-3000:]
        assert seconds < TIMEOUT_S
    finally:
        for pid in alive(job):  # a failed test leaves nothing running either
            os.kill(pid, signal.SIGKILL)
        proc.wait()
