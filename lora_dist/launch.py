"""Launching `lora-dist train` on one node, over ssh (pdsh), per node by hand, and under SLURM.

The shell scripts in launch/ run this module (`python -m lora_dist.launch ...`, with the checkout
first on PYTHONPATH); it checks the arguments, builds one `deepspeed` runner command and runs it:

    check-hostfile FILE [--num-gpus N]     validate a DeepSpeed hostfile (format, duplicates, slots)
    nodelist 'node[01-03,07]'              expand a SLURM node list, one host per line
    single    [opts] CONFIG [overrides]    one node                          (launch/train.sh)
    multinode --hostfile FILE [opts] ...   every host of a hostfile, by pdsh (launch/multinode.sh)
    node      --nnodes N --node-rank R --master-addr A --master-port P ...   (launch/node.sh)
    slurm     [opts] CONFIG [overrides]    this node of a SLURM job           (launch/slurm.sbatch)

What DeepSpeed's launcher does, it does: one log per rank (`--enable_each_rank_log
<train.output_dir>/logs`, files `<start time>_rank<N>.log`), stopping the other ranks of a node when
one fails, and saying which exit status ended the launch. What it lacks is added here: rank 0's log
is echoed to this console while it runs, a failed launch ends with every rank log's last line, a
stop signal (SIGINT, SIGTERM, SIGHUP, SIGUSR1) goes to the ranks (which save and exit) rather than
killing DeepSpeed's launchers under them, and secrets never reach a command line. DeepSpeed's pdsh
runner turns every forwarded variable into `export K=V;` on the pdsh command line (visible in `ps`
on every node, and logged), so WANDB_API_KEY and HF_TOKEN travel as 0600 files on the shared run
directory instead (`NETRC`, `HF_TOKEN_PATH` point at them; deleted when the launcher ends, by
success, failure or signal), and other secret-looking variables are not forwarded. Ranks stop when
a launcher above them dies: see `lora_dist.supervise`.

It imports only the standard library, PyYAML and lora_dist's torch-free modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dist.errors import EXIT_USAGE, OneLineParser, UserError, read_text
from lora_dist.files import atomic_write_text
from lora_dist.supervise import descendants, is_launcher, terminate_with_parent

DEFAULT_OUTPUT_DIR = "runs/lora"  # TrainConfig.output_dir's default (a test keeps the two equal)
DEFAULT_MASTER_PORT = 29500
LOG_SUBDIR = "logs"
STOP_GRACE_S = 120  # after a stop signal, the ranks' time to save and exit before SIGKILL (a 2nd signal: at once)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

# Variables a rank on another node needs, by exact name or by prefix (pdsh path; srun and node.sh
# ranks inherit their own environment). DeepSpeed itself forwards PYTHON*, MLFLOW*, UCX*, MV2*.
FORWARD_NAMES = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "DS_ACCELERATOR",
                 "TOKENIZERS_PARALLELISM", "NETRC", "HF_TOKEN_PATH", "TP_SOCKET_IFNAME")
FORWARD_PREFIXES = ("WANDB_", "NCCL_", "HF_", "TRANSFORMERS_", "TORCH_", "GLOO_", "LORA_DIST_")
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES",)  # DeepSpeed sets it per node
# A secret-looking name has one of these words between underscores (TOKENIZERS_PARALLELISM does not).
SECRET_NAME = re.compile(r"(^|_)(KEY|APIKEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?)(_|$)", re.IGNORECASE)
# What survives DeepSpeed's `export K=V;` (it wraps other values in double quotes, which would
# expand $ and ` and break on " or \).
SAFE_VALUE = re.compile(r'^[^"$`\\\n]*$')


class LaunchError(UserError):
    """A problem the user fixes before launching; the message says what and how, on one line."""


def _fail(message: str) -> None:
    print(f"lora_dist.launch: error: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    print(f"lora_dist.launch: {message}", file=sys.stderr, flush=True)


# ============================================================================================ hostfile


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """The hosts of a DeepSpeed (MPI-style) hostfile, in order, with their slot counts.

    One `host slots=N` per line; blank lines and `#` comments are allowed. Stricter than DeepSpeed's
    own reader, which accepts trailing garbage after `slots=N`.

    Raises:
        LaunchError: every problem (bad line, duplicate host, slots < 1, no hosts), one per `;`.
    """
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.:\-\[\]]+)\s+slots\s*=\s*(\d+)", line)
        if match is None:
            problems.append(f"line {number} {raw.strip()!r} must read 'HOST slots=N'")
            continue
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            where = first_line[host]
            problems.append(f"line {number}: host {host} already listed on line {where}; list each host once")
            continue
        if slots < 1:
            problems.append(f"line {number}: {host} has slots={slots}; give its GPU count (>= 1) or remove the line")
        hosts[host] = slots
        first_line[host] = number
    if not hosts and not problems:
        problems.append("no hosts; write one 'HOST slots=N' line per node")
    if problems:
        raise LaunchError(f"{source}: " + "; ".join(problems))
    return hosts


def check_hostfile(path: str | Path, num_gpus: int | None = None) -> dict[str, int]:
    """`parse_hostfile` on a file, and (with `num_gpus`) check every host has that many slots.

    Raises:
        LaunchError: the file is unreadable or invalid.
    """
    hosts = parse_hostfile(read_text(path, "hostfile", LaunchError), str(path))
    if num_gpus is not None:
        short = [f"{h} (slots={n})" for h, n in hosts.items() if n < num_gpus]
        if short:
            raise LaunchError(f"--num-gpus {num_gpus} exceeds the slots of {', '.join(short)}; lower --num-gpus")
    return hosts


# ============================================================================================ SLURM


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: `node[01-03,07],gpu-a[1-2]` -> node01 node02 node03 node07 gpu-a1 gpu-a2.

    Zero padding is kept (`[08-10]` -> 08 09 10); several bracket groups in one name expand as a product.

    Raises:
        LaunchError: unbalanced brackets or a bad range.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item, nodelist))
    if not hosts:
        raise LaunchError(f"node list {nodelist!r} names no hosts")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_item(item: str, whole: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        if "]" in item:
            raise LaunchError(f"node list {whole!r}: unbalanced ']' in {item!r}")
        return [item]
    close_at = item.find("]", open_at)
    if close_at < 0:
        raise LaunchError(f"node list {whole!r}: unbalanced '[' in {item!r}")
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    values = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"node list {whole!r}: bad range {part!r} (want N or N-M)")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"node list {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return [prefix + v + tail for v in values for tail in _expand_item(rest, whole)]


def slurm_hosts(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list: `scontrol show hostnames` where it exists, else `expand_nodelist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


@dataclass
class NodePlan:
    """Where this node sits in a multi-node job."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    hosts: list[str] | None = None  # real host names, where known (SLURM)


def slurm_node_plan(env: Mapping[str, str]) -> NodePlan:
    """This node's place in a SLURM job, from SLURM's variables (one launcher task per node).

    node rank: SLURM_NODEID (else SLURM_PROCID); node count: SLURM_STEP_NUM_NODES, SLURM_NNODES or
    SLURM_JOB_NUM_NODES; master address: MASTER_ADDR if set, else the first host of SLURM_JOB_NODELIST;
    master port: MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 20000 (the same on every node, and
    two jobs sharing a node rarely collide).

    Raises:
        LaunchError: a variable is missing or they disagree (e.g. several tasks per node).
    """
    def number(*names: str) -> int | None:
        for name in names:
            if env.get(name, "").strip().isdigit():
                return int(env[name])
        return None

    nnodes = number("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node_rank = number("SLURM_NODEID", "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    problems = []
    if nnodes is None:
        problems.append("SLURM_NNODES is not set: run inside a SLURM allocation (sbatch/salloc) or set it")
    if node_rank is None:
        problems.append("SLURM_NODEID / SLURM_PROCID are not set: start this once per node with srun")
    if not nodelist and not env.get("MASTER_ADDR"):
        problems.append("SLURM_JOB_NODELIST is not set and neither is MASTER_ADDR")
    if problems:
        raise LaunchError("; ".join(problems))
    tasks, procid = number("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), number("SLURM_PROCID")
    if tasks is not None and tasks != nnodes:
        raise LaunchError(
            f"{tasks} SLURM tasks on {nnodes} nodes: start one launcher per node "
            f"(srun --ntasks-per-node=1 --ntasks={nnodes}); each launcher starts that node's ranks"
        )
    if procid is not None and procid != node_rank:
        raise LaunchError(f"SLURM_PROCID {procid} differs from SLURM_NODEID {node_rank}: run one task per node")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} is outside 0..{nnodes - 1}")
    hosts = slurm_hosts(nodelist) if nodelist else None
    if hosts is not None and len(hosts) != nnodes:
        raise LaunchError(f"the node list {nodelist!r} has {len(hosts)} hosts but the job has {nnodes} nodes")
    master_addr = env.get("MASTER_ADDR") or hosts[0]
    port = env.get("MASTER_PORT")
    if port:
        if not port.isdigit():
            raise LaunchError(f"MASTER_PORT={port!r} is not a port number")
        master_port = int(port)
    else:
        master_port = 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
    return NodePlan(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, hosts=hosts)


# ============================================================================================ config + env


def override_value(text: str) -> Any:
    """The value of one `section.key=value` override, read as `lora_dist.config` reads it.

    YAML, except that an empty value is "" and YAML 1.1's other booleans (off, no, yes, on, in any
    case) stay the word typed. config.py cannot be imported here (it imports torch), so this mirrors
    its `_apply_override`; a test feeds both the same values.

    Raises:
        yaml.YAMLError: the value is not YAML.
    """
    import yaml

    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def output_dir_of(config: str | Path, overrides: Sequence[str] = ()) -> Path:
    """`train.output_dir` of a run (the YAML file, then the last `train.output_dir=` override), absolute.

    Read with PyYAML alone, so the launcher need not import torch; the ranks validate the whole config.

    Raises:
        LaunchError: the file cannot be read or is not YAML, or the value is not a non-empty string
            (what lora_dist.config refuses too).
    """
    import yaml

    text = read_text(config, "config", LaunchError)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"config {config} is not valid YAML ({getattr(err, 'problem', err)})") from None
    train = raw.get("train") if isinstance(raw, dict) else None
    out = train.get("output_dir", DEFAULT_OUTPUT_DIR) if isinstance(train, dict) else DEFAULT_OUTPUT_DIR
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip() == "train.output_dir":
            try:
                out = override_value(text)
            except yaml.YAMLError:
                raise LaunchError(f"override {item!r}: value is not valid YAML (quote it)") from None
    if not isinstance(out, str) or not out:
        raise LaunchError(
            f"train.output_dir must be a folder name, got {out!r}; write one, in quotes where YAML reads it otherwise"
        )
    return Path(out).absolute()


def visible_gpu_count(env: Mapping[str, str]) -> int:
    """CUDA GPUs this node may use: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`, else 0."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip()]
        return 0 if not ids or ids[0].strip().startswith("-") or "NoDevFiles" in visible else len(ids)
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def rank_environment(env: Mapping[str, str], procs_per_node: int, gpus: int) -> dict[str, str]:
    """The launcher's environment plus what every rank needs: unbuffered output, and on a CPU node
    DeepSpeed's CPU accelerator and one share of the cores per process (torch would take them all)."""
    out = dict(env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    if gpus == 0:
        out.setdefault("DS_ACCELERATOR", "cpu")
        out.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs_per_node)))
    return out


def forwarded_environment(
    env: Mapping[str, str], secrets_dir: Path, extra: Sequence[str] = ()
) -> tuple[dict[str, str], dict[Path, str], list[str]]:
    """What to export on every node of a pdsh launch, without putting a secret on a command line.

    Args:
        env: this node's environment.
        secrets_dir: where the secret files go (a shared directory: the run's log dir).
        extra: more variable names to forward (`--env NAME`).

    Returns:
        (exports {name: value}, secret files {path: content}, names skipped with the reason).
        WANDB_API_KEY becomes a netrc file (`NETRC`), HF_TOKEN / HUGGING_FACE_HUB_TOKEN a token file
        (`HF_TOKEN_PATH`); no value of a skipped or secret variable appears in the result's text.
    """
    exports: dict[str, str] = {}
    files: dict[Path, str] = {}
    skipped: list[str] = []
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if venv_bin not in path.split(":"):
        path = f"{venv_bin}:{path}" if path else venv_bin
    env = {**env, "PATH": path}
    if sys.prefix != sys.base_prefix:
        env.setdefault("VIRTUAL_ENV", sys.prefix)
    for name in sorted(env):
        wanted = name in FORWARD_NAMES or name in extra or name.startswith(FORWARD_PREFIXES)
        if not wanted or name in NOT_FORWARDED:
            continue
        value = env[name]
        if name == "WANDB_API_KEY":
            host = re.sub(r"^\w+://", "", env.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
            netrc = secrets_dir / ".wandb-netrc"
            files[netrc] = f"machine {host}\n  login user\n  password {value}\n"
            exports["NETRC"] = str(netrc)
        elif name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            token = secrets_dir / ".hf-token"
            files[token] = value
            exports["HF_TOKEN_PATH"] = str(token)
        elif SECRET_NAME.search(name) and name not in ("NETRC", "HF_TOKEN_PATH"):
            skipped.append(f"{name} (looks like a secret; put it in a file on a shared filesystem)")
        elif not SAFE_VALUE.match(value):
            skipped.append(f'{name} (its value holds one of " $ ` \\ or a newline, which pdsh would mangle)')
        else:
            exports.setdefault(name, value)
    return exports, files, skipped


def write_deepspeed_env(path: Path, exports: Mapping[str, str], files: Mapping[Path, str]) -> None:
    """Write a `.deepspeed_env` (one NAME=VALUE a line, DeepSpeed's format: no blank or comment lines)
    and the secret files, all mode 0600 (`atomic_write_text` creates them so), each atomically."""
    for target, content in {**files, path: "".join(f"{k}={v}\n" for k, v in exports.items())}.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, content)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ============================================================================================ commands


def training_args(config: str | Path, overrides: Sequence[str]) -> list[str]:
    """The runner's program part: `--module lora_dist train CONFIG overrides`, the config made absolute.

    DeepSpeed starts every rank as `python -u -m lora_dist --local_rank=N train ...` (the CLI drops
    `--local_rank`), with the runner's interpreter on every node.
    """
    return ["--module", "lora_dist", "train", str(Path(config).absolute()), *overrides]


def deepspeed_command(
    program: Sequence[str],
    *,
    log_dir: Path,
    master_port: int,
    master_addr: str | None = None,
    hostfile: Path | None = None,
    num_gpus: int | None = None,
    node_rank: int | None = None,
) -> list[str]:
    """The `deepspeed` runner command for one launch; its ranks log to `log_dir/<time>_rank<N>.log`.

    `node_rank` selects the per-node mode (`--no_ssh --node_rank`, which needs `master_addr`; without
    it DeepSpeed would ssh to the first host).
    """
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(master_port),
           "--enable_each_rank_log", str(log_dir)]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    if node_rank is not None:
        if not master_addr:
            raise LaunchError("per-node launch needs --master-addr (DeepSpeed's --no_ssh would still ssh without it)")
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    return [*cmd, *program]


def node_hostfile(nnodes: int, procs_per_node: int, hosts: Sequence[str] | None = None) -> str:
    """A hostfile for per-node launches: DeepSpeed derives global ranks from it (node r holds ranks
    r*K .. r*K+K-1); the names are labels only, since nothing connects to them."""
    names = list(hosts) if hosts else [f"node{r}" for r in range(nnodes)]
    return "".join(f"{name} slots={procs_per_node}\n" for name in names)


# ============================================================================================ running


def rank_logs(log_dir: Path, since: float) -> list[Path]:
    """DeepSpeed's per-rank logs written by launches started at or after `since` (epoch seconds),
    by rank; rank 0's file of a later launch on the same node replaces an earlier one's."""
    newest: dict[int, Path] = {}
    for path in sorted(log_dir.glob("*_rank*.log")):  # the start-time prefix sorts by time
        rank = path.stem.rpartition("_rank")[2]
        if rank.isdigit() and path.stat().st_mtime >= since:
            newest[int(rank)] = path
    return [newest[r] for r in sorted(newest)]


class _RankZeroEcho:
    """Copies what rank 0 writes to its log onto this console, as it comes (where the log is
    visible here: rank 0 runs on this node, or the run folder is shared)."""

    def __init__(self, log_dir: Path, since: float):
        self.log_dir, self.since = log_dir, since
        self.path: Path | None = None
        self.offset = 0

    def pump(self) -> None:
        if self.path is None:
            logs = rank_logs(self.log_dir, self.since) if self.log_dir.is_dir() else []
            if not logs or not logs[0].stem.endswith("_rank0"):
                return
            self.path = logs[0]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        if chunk:
            self.offset += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(empty)"


def _stop_ranks(runner: subprocess.Popen, signum: int, over_ssh: bool) -> None:
    """Pass a stop signal on: to the ranks on this node (not to DeepSpeed's launchers above them,
    which would die of it and orphan the ranks), or, over pdsh, to DeepSpeed's runner, whose own
    handler stops every node (`pkill` over pdsh: SIGTERM to the ranks)."""
    if over_ssh:
        with contextlib.suppress(ProcessLookupError):
            runner.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        return
    rank_signal = signal.SIGTERM if signum == signal.SIGHUP else signum
    for pid in descendants(runner.pid):
        if not is_launcher(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, rank_signal)


def run_launcher(cmd: Sequence[str], env: Mapping[str, str], log_dir: Path, over_ssh: bool = False,
                 echo: bool = True) -> int:
    """Run a deepspeed runner command to the end, echoing rank 0's log. Returns its exit status.

    A stop signal (SIGINT, SIGTERM, SIGHUP, SIGUSR1) goes to the ranks (see `_stop_ranks`); whatever
    is left STOP_GRACE_S later, or at a second signal, is killed. The runner has its own session so
    a terminal's Ctrl-C reaches the ranks once, through here. The caller's handlers are restored at
    the end.
    """
    started = time.time() - 1.0  # file times and ours come from the same clock; allow rounding
    proc: subprocess.Popen | None = None
    kill_at: list[float] = []

    def stop(signum: int, _frame: Any) -> None:
        if kill_at:  # asked twice: do not wait for the ranks
            kill_at[0] = 0.0
            return
        kill_at.append(time.monotonic() + STOP_GRACE_S)
        _note(f"{signal.Signals(signum).name}: stopping the ranks (they save and exit; "
              f"killed in {STOP_GRACE_S} s, or at once on a second signal)")
        if proc is not None:
            _stop_ranks(proc, signum, over_ssh)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    rank0 = _RankZeroEcho(log_dir, started)
    try:
        # DeepSpeed's runner starts with SIGUSR1 ignored (an ignored signal stays so across fork and exec,
        # down to the ranks): SLURM signals every process of a job step, and SIGUSR1's default action
        # would kill DeepSpeed's launchers above the ranks, losing the ranks' exit status (75: saved,
        # requeue me). The training job installs its own SIGUSR1 handler over the inherited SIG_IGN.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True,
                                preexec_fn=terminate_with_parent())  # noqa: PLW1509 (a bare C call)
        signal.signal(signal.SIGUSR1, stop)
        if kill_at:  # a signal came while it was starting
            _stop_ranks(proc, signal.SIGTERM, over_ssh)
        while proc.poll() is None:
            time.sleep(0.2)
            if echo:
                rank0.pump()
            if kill_at and time.monotonic() > kill_at[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if echo:
            rank0.pump()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = proc.returncode
    if code != 0:
        logs = rank_logs(log_dir, started) if log_dir.is_dir() else []
        lines = [f"the launch ended with exit status {code}"
                 + (" after a stop signal" if kill_at else "")
                 + ("; the last line of each rank's log on this machine:" if logs else
                    "; no rank log on this machine (see the messages above)")]
        lines += [f"  {path}: {_last_line(path)}" for path in logs]
        _note("\n".join(lines))
    return 128 - code if code < 0 else code


def _print_command(cmd: Sequence[str], env_changes: Mapping[str, str], exports: Mapping[str, str] | None) -> None:
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_changes.items())
    print(f"{shown} {shlex.join(cmd)}".strip())
    if exports is not None:
        print("# forwarded to every node through .deepspeed_env:")
        for name in exports:
            print(f"#   {name}")


def _launch(args: argparse.Namespace, cmd: list[str], env: dict[str, str], log_dir: Path,
            exports: dict[str, str] | None = None, files: dict[Path, str] | None = None, echo: bool = True) -> int:
    """Print the command (--dry-run) or run it (`run_launcher`), with the forwarded environment and
    secret files (pdsh only) written for the launch and the secret files deleted after it."""
    shown = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "DS_ENV_FILE")  # what we add to the user's environment
    changes = {k: env[k] for k in shown if k in env and os.environ.get(k) != env[k]}
    if args.dry_run:
        _print_command(cmd, changes, exports)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    _note(f"per-rank logs: {log_dir}/<start time>_rank<N>.log" + (" (rank 0's shown here)" if echo else ""))
    # The secret files live only as long as the launch: deleted however it ends (a signal too: until
    # run_launcher takes them over, SIGTERM and SIGHUP end this process through the `finally`).
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if exports is not None:
            write_deepspeed_env(Path(env["DS_ENV_FILE"]), exports, files or {})
        return run_launcher(cmd, env, log_dir, over_ssh=exports is not None, echo=echo)
    finally:
        for secret in files or {}:
            with contextlib.suppress(FileNotFoundError):
                secret.unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _cmd_single(args: argparse.Namespace) -> int:
    gpus = visible_gpu_count(os.environ)
    procs = args.num_gpus or gpus or 1
    if gpus and procs > gpus:
        raise LaunchError(f"--num-gpus {procs} but this node has {gpus} GPU(s)")
    log_dir = output_dir_of(args.config, args.overrides) / LOG_SUBDIR
    cmd = deepspeed_command(
        training_args(args.config, args.overrides), log_dir=log_dir,
        master_port=args.master_port or free_port(), num_gpus=procs,
    )
    return _launch(args, cmd, rank_environment(os.environ, procs, gpus), log_dir)


def _cmd_multinode(args: argparse.Namespace) -> int:
    hostfile = Path(args.hostfile).absolute()
    hosts = check_hostfile(hostfile, args.num_gpus)
    missing = [tool for tool in ("pdsh", "ssh") if not shutil.which(tool)]
    if len(hosts) > 1 and missing and not args.dry_run:
        raise LaunchError(f"{' and '.join(missing)} not found (DeepSpeed reaches the other hosts with pdsh over ssh): "
                          "install them (apt-get install pdsh openssh-client), or start each node with launch/node.sh")
    log_dir = output_dir_of(args.config, args.overrides) / LOG_SUBDIR
    procs = args.num_gpus or min(hosts.values())
    env = rank_environment(os.environ, procs, visible_gpu_count(os.environ))
    exports, files, skipped = forwarded_environment(env, log_dir, args.env)
    for item in skipped:
        _note(f"not forwarded to other nodes: {item}")
    env["DS_ENV_FILE"] = str(log_dir / ".deepspeed_env")  # DeepSpeed reads it from an absolute name too
    cmd = deepspeed_command(
        training_args(args.config, args.overrides), log_dir=log_dir,
        master_port=args.master_port or DEFAULT_MASTER_PORT, master_addr=args.master_addr,
        hostfile=hostfile, num_gpus=args.num_gpus,
    )
    return _launch(args, cmd, env, log_dir, exports, files)


def _node_launch(args: argparse.Namespace, plan: NodePlan) -> int:
    gpus = visible_gpu_count(os.environ)
    procs = args.nproc_per_node or gpus or 1
    if gpus and procs > gpus:
        raise LaunchError(f"--nproc-per-node {procs} but this node has {gpus} GPU(s)")
    log_dir = output_dir_of(args.config, args.overrides) / LOG_SUBDIR
    hostfile = log_dir / f"node-{plan.node_rank}.hostfile"
    cmd = deepspeed_command(
        training_args(args.config, args.overrides), log_dir=log_dir,
        master_port=plan.master_port, master_addr=plan.master_addr, hostfile=hostfile, node_rank=plan.node_rank,
    )
    if not args.dry_run:
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(hostfile, node_hostfile(plan.nnodes, procs, plan.hosts))
    _note(f"node {plan.node_rank} of {plan.nnodes}, {procs} process(es), master {plan.master_addr}:{plan.master_port}")
    return _launch(args, cmd, rank_environment(os.environ, procs, gpus), log_dir, echo=plan.node_rank == 0)


def _cmd_node(args: argparse.Namespace) -> int:
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node-rank {args.node_rank} must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    plan = NodePlan(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    return _node_launch(args, plan)


def _cmd_slurm(args: argparse.Namespace) -> int:
    return _node_launch(args, slurm_node_plan(os.environ))


def _cmd_check_hostfile(args: argparse.Namespace) -> int:
    hosts = check_hostfile(args.hostfile, args.num_gpus)
    listing = ", ".join(f"{h}:{n}" for h, n in hosts.items())
    print(f"{args.hostfile}: {len(hosts)} host(s), {sum(hosts.values())} slot(s) ({listing})")
    return 0


def _cmd_nodelist(args: argparse.Namespace) -> int:
    print("\n".join(expand_nodelist(args.nodelist)))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lora_dist.launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
        p.add_argument("config", help="YAML config")
        p.add_argument("overrides", nargs="*", default=(), help="section.key=value ...")

    p = sub.add_parser("check-hostfile", help="validate a hostfile")
    p.add_argument("hostfile")
    p.add_argument("--num-gpus", type=_positive)
    p.set_defaults(func=_cmd_check_hostfile)

    p = sub.add_parser("nodelist", help="expand a SLURM node list")
    p.add_argument("nodelist")
    p.set_defaults(func=_cmd_nodelist)

    p = sub.add_parser("single", help="one node: all visible GPUs, or N CPU processes")
    p.add_argument("--num-gpus", type=_positive, help="processes (GPUs) to use; default all GPUs, or 1 on a CPU node")
    p.add_argument("--master-port", type=_port, help="default: a free port")
    run_args(p)
    p.set_defaults(func=_cmd_single)

    p = sub.add_parser("multinode", help="all hosts of a hostfile over pdsh/ssh")
    p.add_argument("--hostfile", required=True)
    p.add_argument("--num-gpus", type=_positive, help="GPUs per host (default: each host's slots)")
    p.add_argument("--master-addr", help="address of the first host (default: DeepSpeed asks it by ssh)")
    p.add_argument("--master-port", type=_port, help=f"default {DEFAULT_MASTER_PORT}")
    p.add_argument("--env", action="append", default=[], metavar="NAME", help="forward one more variable")
    run_args(p)
    p.set_defaults(func=_cmd_multinode)

    p = sub.add_parser("node", help="this node of N, started by hand or by an orchestrator")
    p.add_argument("--nnodes", type=_positive, required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=_port, required=True)
    p.add_argument("--nproc-per-node", type=_positive, help="default: visible GPUs, or 1 on a CPU node")
    run_args(p)
    p.set_defaults(func=_cmd_node)

    p = sub.add_parser("slurm", help="this node of a SLURM job (from SLURM's variables)")
    p.add_argument("--nproc-per-node", type=_positive, help="default: visible GPUs, or 1 on a CPU node")
    run_args(p)
    p.set_defaults(func=_cmd_slurm)

    return parser


def cluster_info() -> dict[str, Any]:
    """`world_size`, `num_nodes` and `hostnames` of the running job, for the W&B run config.

    A collective when torch.distributed is initialized (every rank must call it); otherwise this
    process alone. `num_nodes` is the launcher's node count (DeepSpeed's CROSS_SIZE, SLURM_NNODES),
    which differs from the distinct host names when "nodes" share a machine.
    """
    host = socket.gethostname()
    hosts = [host]
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            hosts = [None] * dist.get_world_size()
            dist.all_gather_object(hosts, host)
    except ImportError:
        pass
    names = list(dict.fromkeys(hosts))
    nodes = os.environ.get("CROSS_SIZE") or os.environ.get("SLURM_NNODES")
    return {"world_size": len(hosts), "num_nodes": int(nodes) if nodes else len(names), "hostnames": names}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (2 for a problem the user must fix)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        _fail(str(err))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
