"""A real multi-node launch: `launch/multinode.sh --hostfile` over pdsh and ssh, two "nodes" on this machine.

The test starts its own sshd on 127.0.0.1 (a free port, a host key and a user key generated in a
temporary folder, its own sshd_config; the system's ssh configuration is never read or changed) and
puts an `ssh` first on PATH that adds `-F <its client config>` (port, key, known_hosts) to the real
/usr/bin/ssh, for DeepSpeed's runner and pdsh alike. The hostfile names two hosts that resolve to this
machine, `127.0.0.1` and `localhost`, one CPU process each: DeepSpeed reaches both with
`pdsh -w 127.0.0.1,localhost` and runs ZeRO-2 over them (gloo). The losses must equal one plain
process; W&B variables reach every rank, and the W&B key and HF token never show on any command line
(`ps`) during the run.

.ci/run installs pdsh and openssh; elsewhere the test is skipped when they are missing, with the reason.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
SSHD = Path("/usr/sbin/sshd")
RUN_LIMIT_S = 300
SECRETS = {"WANDB_API_KEY": "wandb-s3cr3t-0123456789abcdef", "HF_TOKEN": "hf_s3cr3t-token-value"}
# 8 steps of 4 sequences: 2 per rank on 2 ranks, 2 micro batches of 2 on one process.
RUN = ["train.max_steps=8", "train.micro_batch_size=2", "train.grad_accum=null", "train.global_batch_size=4",
       "train.warmup_steps=2", "train.eval_interval=0", "train.save_interval=0", "train.log_interval=1",
       "data.max_seq_len=64", "distributed.timeout_s=60"]

missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(tool)] + (
    [] if SSHD.exists() else [str(SSHD)])
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (apt-get install pdsh openssh-server "
                                                f"openssh-client; .ci/run does)"),
]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "MASTER_", "HF_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), LORA_DIST_PYTHON=sys.executable)
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory):
    """An sshd of our own on 127.0.0.1:PORT and a folder with an `ssh` that reaches it with our key."""
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port, user = free_port(), getpass.getuser()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n"
        "StrictModes no\nUsePAM no\nLogLevel VERBOSE\n"
    )
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text("".join(f"[{h}]:{port} {host_key[0]} {host_key[1]}\n" for h in ("127.0.0.1", "localhost")))
    (d / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  User {user}\n  IdentityFile {d / 'user_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        "  AddressFamily inet\n  LogLevel ERROR\n"
    )
    (d / "bin").mkdir()
    wrapper = d / "bin" / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
    wrapper.chmod(0o755)
    # sshd started as root needs its privilege separation folder (normally made by its service unit).
    privsep = Path("/run/sshd")
    made_privsep = os.geteuid() == 0 and not privsep.exists()
    if made_privsep:
        privsep.mkdir(mode=0o755, parents=True)
    log = open(d / "sshd.log", "w")  # noqa: SIM115  (open for the server's whole life)
    server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run([str(wrapper), "127.0.0.1", "true"], check=False, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert server.poll() is None and time.monotonic() < deadline, (
                f"sshd did not come up: {probe.stderr}\n{(d / 'sshd.log').read_text()}")
            time.sleep(0.3)
        yield d
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        if made_privsep:
            privsep.rmdir()


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def rank_processes(out: Path) -> dict[int, dict[str, str]]:
    """{rank: environment} of the training processes of run `out` running on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if f"train.output_dir={out}".encode() not in argv or b"lora_dist" not in argv:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = env
    return found


def every_command_line() -> str:
    """What `ps` shows of every process on this machine (full argument lists)."""
    return subprocess.run(["ps", "-eww", "-o", "pid=,args="], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def multinode_run(ssh_server, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multinode")
    hostfile = out / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    env = environment({"PATH": f"{ssh_server / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                       "WANDB_PROJECT": "lora-dist-multinode", "WANDB_MODE": "offline", **SECRETS})
    cmd = [str(ROOT / "launch" / "multinode.sh"), "--hostfile", str(hostfile), "--master-port", str(free_port()),
           str(CONFIG), *RUN, f"train.output_dir={out / 'run'}", "wandb.mode=offline"]
    seen = {"ps_samples": 0, "secret_on_a_command_line": [], "ranks": {}, "netrc": None}
    with open(out / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)
        deadline = time.monotonic() + RUN_LIMIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            lines = every_command_line()
            seen["ps_samples"] += 1
            seen["secret_on_a_command_line"] += [line for line in lines.splitlines()
                                                 if any(v in line for v in SECRETS.values())]
            for rank, rank_env in rank_processes(out / "run").items():
                seen["ranks"].setdefault(rank, rank_env)
                netrc = rank_env.get("NETRC")
                if netrc and seen["netrc"] is None and Path(netrc).exists():
                    seen["netrc"] = Path(netrc).read_text()
            time.sleep(0.5)
        if proc.poll() is None:
            proc.terminate()
        seen["code"] = proc.wait(timeout=60)
    seen.update(out=out, log=(out / "launcher.log").read_text(), sshd=(ssh_server / "sshd.log").read_text())
    return seen


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    done = subprocess.run([sys.executable, "-m", "lora_dist", "train", str(CONFIG), *RUN, f"train.output_dir={out}",
                           "wandb.mode=disabled"], env=environment(), check=False, capture_output=True, text=True,
                          timeout=RUN_LIMIT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_multinode_sh_starts_one_node_per_host_over_ssh(multinode_run):
    log = multinode_run["log"]
    assert multinode_run["code"] == 0, log[-4000:]
    # pdsh prefixes each remote line with its host; DeepSpeed's launcher on each says which node it is
    assert "127.0.0.1: " in log and "localhost: " in log, log[-4000:]
    assert any(line.startswith("127.0.0.1: ") and "node_rank=0" in line for line in log.splitlines())
    assert any(line.startswith("localhost: ") and "node_rank=1" in line for line in log.splitlines())
    # both sessions came through our sshd with the test's key
    assert multinode_run["sshd"].count("Accepted publickey for ") >= 2, multinode_run["sshd"][-3000:]
    ranks = multinode_run["ranks"]
    assert sorted(ranks) == [0, 1]
    assert [(ranks[r]["CROSS_RANK"], ranks[r]["WORLD_SIZE"]) for r in (0, 1)] == [("0", "2"), ("1", "2")]
    assert all("SSH_CONNECTION" in env for env in ranks.values())  # started by sshd, not by a local fork


def test_two_ssh_nodes_match_one_process_losses(multinode_run, one_process):
    # ZeRO-2 over 2 ranks vs one process accumulating 2 micro batches: the same fp32 math summed in
    # another order, a few ulps per step (test_launch.py's 2-node runs: 1.5e-7 relative over 30 steps).
    two = train_losses(multinode_run["out"] / "run")
    assert len(two) == 8
    assert two == pytest.approx(train_losses(one_process), rel=1e-5)


def test_wandb_variables_and_secrets_reach_every_rank_off_the_command_lines(multinode_run):
    ranks = multinode_run["ranks"]
    for env in ranks.values():
        assert env["WANDB_PROJECT"] == "lora-dist-multinode" and env["WANDB_MODE"] == "offline"
        assert "WANDB_API_KEY" not in env and "HF_TOKEN" not in env  # they travel as files
        assert Path(env["NETRC"]).parent == multinode_run["out"] / "run" / "logs"
        assert Path(env["HF_TOKEN_PATH"]).name == ".hf-token"
    assert f"password {SECRETS['WANDB_API_KEY']}" in multinode_run["netrc"]
    assert multinode_run["ps_samples"] >= 5
    assert multinode_run["secret_on_a_command_line"] == []
    assert not any(v in multinode_run["log"] for v in SECRETS.values())
    logs = multinode_run["out"] / "run" / "logs"
    assert not (logs / ".wandb-netrc").exists() and not (logs / ".hf-token").exists()  # deleted at the end
    assert list((multinode_run["out"] / "run" / "wandb").glob("offline-run-*"))  # rank 0 reported


def job_processes(out: Path) -> list[str]:
    """Every process on this machine whose command line names run folder `out`: DeepSpeed's runner,
    pdsh and its ssh clients, the remote shells, DeepSpeed's per-node launchers and the ranks."""
    return [line for line in every_command_line().splitlines() if str(out) in line and "ps -eww" not in line]


def test_killing_the_launcher_stops_every_process_on_every_node(ssh_server, tmp_path):
    # kill -9 leaves the launcher no chance to clean up: DeepSpeed's runner gets SIGTERM from the kernel
    # (PR_SET_PDEATHSIG) and stops the ranks of every host over pdsh.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = tmp_path / "run"
    env = environment({"PATH": f"{ssh_server / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"})
    cmd = [str(ROOT / "launch" / "multinode.sh"), "--hostfile", str(hostfile), "--master-port", str(free_port()),
           str(CONFIG), *RUN, "train.max_steps=100000", f"train.output_dir={out}", "wandb.mode=disabled"]
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + RUN_LIMIT_S
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        assert sorted(rank_processes(out)) == [0, 1]
        proc.kill()
        killed_at = time.monotonic()
        while job_processes(out) and time.monotonic() - killed_at < 90:
            time.sleep(0.2)
        seconds = time.monotonic() - killed_at
        print(f"multinode.sh, SIGKILL to the launcher: {len(job_processes(out))} processes left after {seconds:.1f} s")
        assert not job_processes(out), job_processes(out)
        assert seconds < 60  # distributed.timeout_s of RUN
    finally:
        proc.wait()
        for line in job_processes(out):  # a failed test leaves nothing running either
            os.kill(int(line.split()[0]), signal.SIGKILL)
