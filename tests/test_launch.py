"""launch/: hostfile and SLURM parsing, the commands built, and real 2-"node" runs on one machine.

The end-to-end tests start the shell scripts as a user would (launch/node.sh, launch/slurm.sbatch),
two at once with one CPU process each (gloo, DeepSpeed's CPU accelerator), on the tiny config cut to
a few seconds of training. References come another way: one plain process without DeepSpeed for
the losses, an uninterrupted 2-node run for the resumed adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import launch, supervise

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LAUNCH_MODULE = [sys.executable, "-m", "lora_dist.launch"]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
TIMEOUT_S = 30  # distributed.timeout_s of every run here: the bound on a survivor's exit
RUN_LIMIT_S = 240  # a launch that takes longer than this is hung: fail instead of waiting forever

# The tiny config cut down: 30 steps of 4 sequences (2 per rank on 2 ranks, 2 micro batches of 2 on
# one process), a checkpoint every 5 steps so a kill lands between two of them.
STEPS = 30
RUN = [
    f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.grad_accum=null", "train.global_batch_size=4",
    "train.warmup_steps=2", "train.eval_interval=0", "train.eval_batches=1", "train.save_interval=5",
    "train.log_interval=10", "data.max_seq_len=64", f"distributed.timeout_s={TIMEOUT_S}", "wandb.mode=disabled",
]


def script_env(**extra: str) -> dict[str, str]:
    """The environment a user has after activating the venv, with the cores split between 2 ranks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "MASTER_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", LORA_DIST_PYTHON=sys.executable,
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def finish(procs: list[subprocess.Popen], timeout: float = RUN_LIMIT_S) -> list[int]:
    """Exit statuses of launchers; one still running after `timeout` is stopped (SIGTERM: the launcher
    stops its ranks) and reads as -999."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
            codes.append(-999)
    return codes


def node_cmds(out: Path, extra: list[str] = ()) -> list[list[str]]:
    port = str(launch.free_port())
    return [
        [str(LAUNCH / "node.sh"), "--nnodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1",
         "--master-port", port, str(CONFIG), *RUN, f"train.output_dir={out}", *extra]
        for r in (0, 1)
    ]


def run_two_nodes(out: Path, extra: list[str] = ()) -> list[int]:
    procs = [start(cmd, script_env(), out / f"node{r}.out") for r, cmd in enumerate(node_cmds(out, extra))]
    return finish(procs)


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def show(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


# ============================================================================================ hostfile


def test_hostfile_reads_hosts_in_order_with_comments_and_blank_lines():
    text = "# cluster A\n\ngpu-2 slots=8   # the fast one\ngpu-1 slots=4\n"
    assert list(launch.parse_hostfile(text).items()) == [("gpu-2", 8), ("gpu-1", 4)]


def test_hostfile_lists_every_problem_with_its_line():
    text = "a slots=2\nb slots=0\na slots=4\nc\nd slots=2 max_slots=4\n"
    with pytest.raises(launch.LaunchError) as err:
        launch.parse_hostfile(text, "hf")
    message = str(err.value)
    assert message.startswith("hf: ")
    assert "line 2: b has slots=0; give its GPU count" in message
    assert "line 3: host a already listed on line 1" in message
    assert "line 4 'c' must read 'HOST slots=N'" in message
    assert "line 5" in message  # DeepSpeed would silently ignore max_slots; we refuse it
    assert "\n" not in message


def test_hostfile_without_hosts_is_refused():
    with pytest.raises(launch.LaunchError, match="no hosts"):
        launch.parse_hostfile("# nothing here\n\n")


def test_hostfile_refuses_more_gpus_than_slots(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("a slots=8\nb slots=4\n")
    with pytest.raises(launch.LaunchError, match=r"--num-gpus 8 exceeds the slots of b \(slots=4\)"):
        launch.check_hostfile(hostfile, num_gpus=8)


def test_check_hostfile_command_exits_2_with_one_line(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("a slots=2\na slots=2\n")
    done = subprocess.run([*LAUNCH_MODULE, "check-hostfile", str(hostfile)], env=script_env(),
                          check=False, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "host a already listed on line 1" in done.stderr


def _write(path: Path, content: bytes | None) -> Path:
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


# (what is wrong, the arguments after `lora_dist.launch`, what the one line must say); HF and CFG stand
# for a file written by the test, MISSING for one that does not exist.
BAD_LAUNCHES = [
    ("hostfile is a folder", ["check-hostfile", "HF:dir"], "hostfile HF is a directory, not a file"),
    ("hostfile not UTF-8", ["check-hostfile", "HF:\xff\xfe slots=2\n"], "hostfile HF is not UTF-8 text"),
    ("hostfile missing", ["check-hostfile", "MISSING"], "hostfile MISSING does not exist: check the path"),
    ("hostfile bad line", ["multinode", "--hostfile", "HF:a slots=two\n", str(CONFIG)],
     "HF: line 1 'a slots=two' must read 'HOST slots=N'"),
    ("hostfile slots 0", ["multinode", "--hostfile", "HF:a slots=0\n", str(CONFIG)],
     "HF: line 1: a has slots=0; give its GPU count (>= 1) or remove the line"),
    ("more GPUs than slots", ["multinode", "--hostfile", "HF:a slots=2\n", "--num-gpus", "4", str(CONFIG)],
     "--num-gpus 4 exceeds the slots of a (slots=2); lower --num-gpus"),
    ("config missing", ["single", "MISSING"], "config MISSING does not exist: check the path"),
    ("config not YAML", ["single", "CFG:train: [\n"], "config CFG is not valid YAML"),
    ("port out of range", ["single", "--master-port", "70000", str(CONFIG)], "70000 is not a TCP port (1-65535)"),
    ("zero processes", ["single", "--num-gpus", "0", str(CONFIG)], "--num-gpus: must be >= 1, got 0"),
    ("unknown option", ["single", "--num-gpu", "2", str(CONFIG)], "unrecognized arguments: --num-gpu"),
    ("node rank outside", ["node", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1",
                           str(CONFIG)], "--node-rank 2 must be in 0..1 for --nnodes 2"),
    ("no config", ["single"], "the following arguments are required: config"),
]


@pytest.mark.parametrize(("problem", "args", "says"), BAD_LAUNCHES, ids=[b[0] for b in BAD_LAUNCHES])
def test_bad_launch_is_one_line_naming_the_file_and_fix_with_exit_2(problem, args, says, tmp_path, capsys):
    names = {"MISSING": str(tmp_path / "missing")}
    for i, arg in enumerate(args):
        for mark, name in (("HF:", "hostfile"), ("CFG:", "config.yaml")):
            if arg.startswith(mark):
                body = arg[len(mark):]
                raw = None if body == "dir" else body.encode("latin-1")
                names[mark[:-1]] = str(_write(tmp_path / name, raw))
                args[i] = names[mark[:-1]]
        args[i] = names.get(args[i], args[i])
    if args[0] in ("single", "multinode", "node"):
        args.insert(1, "--dry-run")  # should a case be accepted after all, it launches nothing
    for mark, name in names.items():
        says = says.replace(mark, name)
    try:
        code = launch.main(args)
    except SystemExit as stop:  # argparse's errors leave through SystemExit
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lora_dist.launch: error: "), err
    assert says in err, err
    assert not (tmp_path / "logs").exists()  # nothing written


# ============================================================================================ SLURM


def test_nodelist_expands_ranges_lists_padding_and_products():
    assert launch.expand_nodelist("node[01-03,07],gpu[8-10]-r[1-2],login") == [
        "node01", "node02", "node03", "node07",
        "gpu8-r1", "gpu8-r2", "gpu9-r1", "gpu9-r2", "gpu10-r1", "gpu10-r2", "login",
    ]


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_nodelist_refuses_malformed_lists(bad):
    with pytest.raises(launch.LaunchError, match="node list"):
        launch.expand_nodelist(bad)


def test_slurm_plan_takes_rank_from_nodeid_and_master_from_first_host():
    env = {"SLURM_NODEID": "2", "SLURM_PROCID": "2", "SLURM_NNODES": "3", "SLURM_NTASKS": "3",
           "SLURM_JOB_NODELIST": "gpu[07,09-10]", "SLURM_JOB_ID": "123456"}
    plan = launch.slurm_node_plan(env)
    assert (plan.nnodes, plan.node_rank, plan.master_addr) == (3, 2, "gpu07")
    assert plan.master_port == 20000 + 123456 % 20000
    assert plan.hosts == ["gpu07", "gpu09", "gpu10"]


def test_slurm_plan_refuses_several_tasks_per_node():
    env = {"SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[1-2]"}
    with pytest.raises(launch.LaunchError, match="--ntasks-per-node=1"):
        launch.slurm_node_plan(env)


def fake_slurm(tmp_path: Path, srun: str) -> dict[str, str]:
    """`srun` and `scontrol` stand-ins on PATH for the batch part of launch/slurm.sbatch (our script's own
    logic: what it passes srun, what it does with srun's status). The fake srun records its arguments and
    exits with `srun` ("wait": runs until SIGUSR1, then exits 75 as the ranks do after saving); the fake
    scontrol records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > {tmp_path}/srun.args\n"
        f"trap 'echo USR1 > {tmp_path}/srun.signal; exit 75' USR1\n"
        f"if [ {srun} = wait ]; then touch {tmp_path}/srun.started; while :; do sleep 0.1; done; fi\n"
        f"exit {srun}\n"
    )
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = script_env(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[1-2]")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def run_batch(tmp_path: Path, srun: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / "slurm.sbatch"), str(CONFIG), "train.lr=1e-3"],
                          env={**fake_slurm(tmp_path, srun), **extra}, check=False, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)


def test_slurm_batch_requeues_the_job_when_the_ranks_saved_and_stopped(tmp_path):
    done = run_batch(tmp_path, "75")
    assert done.returncode == 75, done.stderr
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[-2:] == [str(CONFIG), "train.lr=1e-3"]  # a first run starts as submitted
    assert "--kill-on-bad-exit=1" in args and "--ntasks-per-node=1" in args


def test_slurm_requeued_run_resumes_with_resume_auto(tmp_path):
    done = run_batch(tmp_path, "0", SLURM_RESTART_COUNT="1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "srun.args").read_text().splitlines()[-3:] == [str(CONFIG), "train.lr=1e-3",
                                                                       "train.resume=auto"]
    assert not (tmp_path / "scontrol.calls").exists()


@pytest.mark.parametrize("status", ["0", "1", "137"])
def test_slurm_batch_does_not_requeue_a_finished_or_failed_run(tmp_path, status):
    done = run_batch(tmp_path, status)
    assert done.returncode == int(status)
    assert not (tmp_path / "scontrol.calls").exists()


def test_usr1_to_the_batch_shell_reaches_srun_and_the_job_is_requeued(tmp_path):
    # `#SBATCH --signal=B:USR1@120` signals the batch shell only; it must pass the signal on.
    proc = subprocess.Popen([str(LAUNCH / "slurm.sbatch"), str(CONFIG)], env=fake_slurm(tmp_path, "wait"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert (tmp_path / "srun.signal").read_text() == "USR1\n"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out


def test_stop_signal_reaches_the_ranks_and_the_launchers_above_them_pass_on_their_status(tmp_path, capfd):
    # Stands in for DeepSpeed's runner: no SIGUSR1 handler of its own (as DeepSpeed's); one "rank" below
    # it that, like the training job, handles SIGUSR1 by saving and exiting 75. The rank gets the signal
    # twice (from SLURM and from the launcher), as under SLURM.
    rank = tmp_path / "rank.py"
    rank.write_text(  # the handler sets a flag; the loop ends the "step", saves, exits 75
        "import pathlib, signal, sys, time\n"
        "stop = []\n"
        "def on_usr1(*_):\n"
        f"    pathlib.Path({str(tmp_path / 'rank.signal')!r}).write_text('USR1')\n"
        "    stop.append(True)\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
        f"pathlib.Path({str(tmp_path / 'rank.ready')!r}).touch()\n"
        "deadline = time.monotonic() + 60\n"
        "while not stop and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0.5)  # the rest of the step, and the save\n"
        "sys.exit(75 if stop else 1)\n"
    )
    runner = tmp_path / "runner.py"
    runner.write_text(f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, {str(rank)!r}]))\n")

    def signal_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rank.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # as SLURM does: every process of the job step, the launcher under test (this one) and all below it
        for pid in supervise.descendants(os.getpid()):
            os.kill(pid, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)

    import threading

    threading.Thread(target=signal_when_ready, daemon=True).start()
    code = launch.run_launcher([sys.executable, str(runner)], script_env(), tmp_path / "logs")
    assert code == 75  # the runner survived SIGUSR1 (ignored, as launched) and passed the rank's status on
    assert (tmp_path / "rank.signal").read_text() == "USR1"
    assert "SIGUSR1: stopping the ranks" in capfd.readouterr().err


# ============================================================================================ config, env


def test_output_dir_default_is_train_configs_default(tmp_path):
    from lora_dist.config import TrainConfig

    config = tmp_path / "c.yaml"
    config.write_text("model: {path: x}\n")
    assert launch.output_dir_of(config) == Path(TrainConfig().output_dir).absolute()
    assert launch.output_dir_of(config, ["train.output_dir=/data/run 1"]) == Path("/data/run 1")


# What a user may type after train.output_dir=: YAML 1.1 booleans, null, numbers, quoted words.
OUTPUT_DIR_VALUES = ["off", "yes", "No", "ON", "true", "False", "null", "~", "'off'", '"yes"', "123", "runs/a b",
                     " spaced ", "", "[a, b]", "2024-01-01", "{a: 1}"]


def _config_reads(config: Path, overrides: list[str]) -> Path | None:
    """train.output_dir as lora_dist.config reads it (absolute), or None where it refuses the config."""
    from lora_dist.config import ConfigError, load_config

    try:
        return Path(load_config(config, overrides).train.output_dir).absolute()
    except ConfigError as err:
        assert all("output_dir" in p for p in err.problems), err.problems  # refused for this value only
        return None


def _launcher_reads(config: Path, overrides: list[str]) -> Path | None:
    try:
        return launch.output_dir_of(config, overrides)
    except launch.LaunchError:
        return None


@pytest.mark.parametrize("value", OUTPUT_DIR_VALUES)
def test_output_dir_override_reads_as_lora_dist_config_reads_it(value):
    overrides = [f"train.output_dir={value}"]
    assert _launcher_reads(CONFIG, overrides) == _config_reads(CONFIG, overrides)


@pytest.mark.parametrize("value", OUTPUT_DIR_VALUES)
def test_output_dir_in_the_yaml_file_reads_as_lora_dist_config_reads_it(value, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("output_dir: runs/tiny-cpu", f"output_dir: {value}"))
    assert f"output_dir: {value}\n" in config.read_text()
    assert _launcher_reads(config, []) == _config_reads(config, [])


def test_output_dir_override_off_is_the_folder_off_not_the_default(tmp_path):
    # PyYAML reads `off` as False; the ranks' config keeps the word, so the logs must go there too.
    assert launch.output_dir_of(CONFIG, ["train.output_dir=off"]) == Path("off").absolute()


@pytest.mark.parametrize("ending", ["success", "failure", "SIGTERM to the launcher"])
def test_launcher_deletes_the_secret_files_however_the_launch_ends(tmp_path, ending):
    log_dir = tmp_path / "logs"
    exports, files, _ = launch.forwarded_environment({"WANDB_API_KEY": "s3cr3t", "HF_TOKEN": "s3cr3t"}, log_dir)
    assert len(files) == 2
    # The launched command checks that the files exist while it runs, then ends the way under test.
    exists = " and ".join(f"os.path.isfile({str(p)!r})" for p in files)
    end = {"success": "sys.exit(0)", "failure": "sys.exit(3)",
           "SIGTERM to the launcher": "os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"}[ending]
    cmd = [sys.executable, "-c", f"import os, signal, sys, time\nif not ({exists}): sys.exit(99)\n{end}"]
    env = script_env(DS_ENV_FILE=str(log_dir / ".deepspeed_env"))
    code = launch._launch(argparse.Namespace(dry_run=False), cmd, env, log_dir, exports, files)
    assert code == {"success": 0, "failure": 3, "SIGTERM to the launcher": 128 + signal.SIGTERM}[ending]
    assert not any(p.exists() for p in files)
    assert (log_dir / ".deepspeed_env").is_file()  # names and paths only: kept as the record of the launch


def test_forwarded_environment_moves_secrets_into_0600_files(tmp_path):
    env = {"WANDB_API_KEY": "s3cr3t-wandb", "HF_TOKEN": "s3cr3t-hf", "MY_SERVICE_TOKEN": "s3cr3t-other",
           "WANDB_PROJECT": "p", "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "$(oops)",
           "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/root", "PATH": "/usr/bin", "TOKENIZERS_PARALLELISM": "false",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws", "NCCL_IB_PASSWORD": "s3cr3t-nccl"}
    exports, files, skipped = launch.forwarded_environment(env, tmp_path, extra=["MY_SERVICE_TOKEN", "AWS_SECRET_ACCESS_KEY"])
    launch.write_deepspeed_env(tmp_path / ".deepspeed_env", exports, files)

    written = (tmp_path / ".deepspeed_env").read_text()
    assert "s3cr3t" not in written and "s3cr3t" not in " ".join(skipped)
    assert exports["NETRC"] == str(tmp_path / ".wandb-netrc")
    assert "password s3cr3t-wandb" in (tmp_path / ".wandb-netrc").read_text()
    assert (tmp_path / ".hf-token").read_text() == "s3cr3t-hf"
    assert exports["WANDB_PROJECT"] == "p" and exports["NCCL_DEBUG"] == "INFO"
    assert "CUDA_VISIBLE_DEVICES" not in exports and "HOME" not in exports
    assert exports["PATH"].startswith(str(Path(sys.executable).parent) + ":")
    assert exports["TOKENIZERS_PARALLELISM"] == "false"  # a TOKEN inside a word is no secret
    assert sorted(s.split()[0] for s in skipped) == [
        "AWS_SECRET_ACCESS_KEY", "MY_SERVICE_TOKEN", "NCCL_IB_PASSWORD", "NCCL_SOCKET_IFNAME"]
    for name in (".deepspeed_env", ".wandb-netrc", ".hf-token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_deepspeed_pdsh_command_from_our_env_file_holds_no_secret(tmp_path):
    # DeepSpeed's own pdsh runner, fed our .deepspeed_env the way runner.main() reads it.
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import encode_world_info, parse_args

    exports, files, _ = launch.forwarded_environment({"WANDB_API_KEY": "s3cr3t", "WANDB_MODE": "online"}, tmp_path)
    launch.write_deepspeed_env(tmp_path / ".deepspeed_env", exports, files)
    runner = PDSHRunner(parse_args(["--hostfile", "hf", "train.py"]), encode_world_info({"a": [0], "b": [0]}))
    for line in (tmp_path / ".deepspeed_env").read_text().splitlines():
        key, val = line.split("=", maxsplit=1)
        runner.add_export(key, val)
    cmd, _, _ = runner.get_cmd({}, {"a": [0], "b": [0]})
    text = " ".join(cmd)
    assert "s3cr3t" not in text
    assert f"export NETRC={tmp_path / '.wandb-netrc'};" in text and "export WANDB_MODE=online;" in text


# ============================================================================================ commands


def test_multinode_dry_run_prints_the_deepspeed_hostfile_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    env = script_env(WANDB_API_KEY="s3cr3t-key", NCCL_DEBUG="WARN")
    done = subprocess.run(
        [str(LAUNCH / "multinode.sh"), "--dry-run", "--hostfile", str(hostfile), "--num-gpus", "2",
         str(CONFIG), "train.lr=1e-3", f"train.output_dir={out}"],
        env=env, check=False, capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr
    words = shlex.split(done.stdout.splitlines()[0])
    env_words = [w for w in words if "=" in w and w.split("=")[0].isupper()][:3]
    assert f"DS_ENV_FILE={out / 'logs' / '.deepspeed_env'}" in env_words
    cmd = words[words.index(sys.executable):]

    # how DeepSpeed itself reads the command
    from deepspeed.launcher.runner import parse_args

    ds = parse_args(cmd[cmd.index("deepspeed.launcher.runner") + 1:])
    assert (ds.hostfile, ds.num_gpus, ds.master_port) == (str(hostfile), 2, 29500)
    assert ds.module and not ds.no_python and not ds.no_ssh
    assert ds.enable_each_rank_log == str(out / "logs")  # DeepSpeed writes one log per rank there
    assert [ds.user_script, *ds.user_args] == ["lora_dist", "train", str(CONFIG), "train.lr=1e-3",
                                               f"train.output_dir={out}"]
    forwarded = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("#   ")]
    assert {"NCCL_DEBUG", "NETRC", "PATH"} <= set(forwarded) and "WANDB_API_KEY" not in forwarded
    assert not out.exists()  # a dry run writes nothing


def test_train_sh_without_gpus_asks_deepspeed_for_n_cpu_processes(tmp_path):
    env = script_env(CUDA_VISIBLE_DEVICES="")  # no GPU visible, on any machine
    env.pop("OMP_NUM_THREADS")
    done = subprocess.run([str(LAUNCH / "train.sh"), "--dry-run", "--num-gpus", "3", str(CONFIG)],
                          env=env, check=False, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    assert "DS_ACCELERATOR=cpu" in words  # gloo + DeepSpeed's CPU accelerator, not a failed CUDA probe
    assert f"OMP_NUM_THREADS={max(1, os.cpu_count() // 3)}" in words  # one share of the cores per process

    from deepspeed.launcher.runner import parse_args

    ds = parse_args(words[words.index("deepspeed.launcher.runner") + 1:])
    assert ds.num_gpus == 3 and "--hostfile" not in words  # one node: the local resources only


def test_cluster_info_of_a_single_process():
    info = launch.cluster_info()
    assert info == {"world_size": 1, "num_nodes": 1, "hostnames": [socket.gethostname()]}


def test_multinode_stops_on_a_bad_hostfile_before_launching(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode1 slots=8\n")
    done = subprocess.run([str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), str(CONFIG)],
                          env=script_env(), check=False, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lora_dist.launch: error: {hostfile}: line 2: host node1 already listed on line 1; list each host once"
    ]


def test_failure_summary_gives_each_rank_logs_last_line(tmp_path, capfd):
    old = tmp_path / "20260101000000_rank0.log"  # an earlier launch's log: left out
    old.write_text("old run\n")
    os.utime(old, (1, 1))
    # Stands in for the deepspeed runner: writes two rank logs the way --enable_each_rank_log names them.
    fake_runner = tmp_path / "ranks.py"
    fake_runner.write_text(
        "import pathlib, sys\n"
        "logs = pathlib.Path(sys.argv[1])\n"
        "(logs / '20261201120000_rank0.log').write_text('step 1\\n\\n')\n"
        "(logs / '20261201120000_rank1.log').write_text('RuntimeError: boom\\n')\n"
        "sys.exit(3)\n"
    )
    code = launch.run_launcher([sys.executable, str(fake_runner), str(tmp_path)], script_env(), tmp_path)
    out, err = capfd.readouterr()
    assert code == 3
    assert "step 1" in out  # rank 0's log, echoed
    assert err.strip().splitlines() == [
        "lora_dist.launch: the launch ended with exit status 3; the last line of each rank's log on this machine:",
        f"  {tmp_path / '20261201120000_rank0.log'}: step 1",
        f"  {tmp_path / '20261201120000_rank1.log'}: RuntimeError: boom",
    ]


# ============================================================================================ end to end


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The reference: one plain process, no launcher, no DeepSpeed."""
    out = tmp_path_factory.mktemp("single")
    log = out / "train.out"
    proc = start([sys.executable, "-m", "lora_dist", "train", str(CONFIG), *RUN, f"train.output_dir={out}"],
                 script_env(), log)
    assert finish([proc]) == [0], show(log)
    return out


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    """launch/node.sh twice (node ranks 0 and 1, one CPU process each), W&B offline."""
    out = tmp_path_factory.mktemp("two_nodes")
    codes = run_two_nodes(out, ["wandb.mode=offline"])
    assert codes == [0, 0], show(out / "node0.out") + show(out / "node1.out")
    return out


@pytest.mark.distributed
def test_two_nodes_match_single_process_losses(two_nodes, single_process):
    # ZeRO-2 over 2 ranks vs one process (2 micro batches): the same math summed in another order.
    # fp32 sums of a few hundred token losses differ by a few ulps (~1e-7 relative); Adam can grow a
    # rounding difference into a visible share of an element's step, and that feeds the later losses.
    # Observed over 30 steps: 1.5e-7 relative at most. A lost all-reduce or a wrong batch split moves the loss by
    # >1e-2 from the first step on.
    two, one = train_losses(two_nodes), train_losses(single_process)
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-5)


@pytest.mark.distributed
def test_two_nodes_report_to_one_wandb_run(two_nodes):
    from wandb_reader import read_wandb_history

    runs = list((two_nodes / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = [row["train/loss"] for row in read_wandb_history(runs[0]) if "train/loss" in row]
    assert logged == pytest.approx(train_losses(two_nodes), rel=1e-12)


@pytest.mark.distributed
def test_two_nodes_write_one_log_per_rank(two_nodes):
    logs = launch.rank_logs(two_nodes / "logs", since=0)  # DeepSpeed's --enable_each_rank_log files
    assert [path.name.rpartition("_")[2] for path in logs] == ["rank0.log", "rank1.log"]
    assert "run summary" in logs[0].read_text()  # rank 0 reports; rank 1 stays quiet
    assert "run summary" not in logs[1].read_text()
    assert "run summary" in (two_nodes / "node0.out").read_text()  # node 0's launcher echoes rank 0's log
    assert "run summary" not in (two_nodes / "node1.out").read_text()


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of global rank `rank` below the launcher process `launcher` (by its RANK variable)."""
    for pid in supervise.descendants(launcher):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} below pid {launcher}")


def slurm_tasks(out: Path, extra: list[str] = (), name: str = "task") -> list[subprocess.Popen]:
    """launch/slurm.sbatch as the two launcher tasks srun would start for a 2-node job. 127.0.0.2 and
    127.0.0.3 are this machine's loopback: the derived master (the first host) is reachable, and it
    differs from every default (DeepSpeed's is 127.0.0.1)."""
    job = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.[2-3]",
           "MASTER_PORT": str(launch.free_port()), "LORA_DIST_SLURM_NODE": "1"}
    return [
        start([str(LAUNCH / "slurm.sbatch"), str(CONFIG), *RUN, f"train.output_dir={out}", *extra],
              script_env(**job, SLURM_NODEID=str(n), SLURM_PROCID=str(n)), out / f"{name}{n}.out")
        for n in (0, 1)
    ]


@pytest.fixture(scope="module")
def killed_slurm_job(tmp_path_factory) -> dict:
    """A 2-node SLURM job whose rank 1 is SIGKILLed once the first checkpoint is complete."""
    out = tmp_path_factory.mktemp("slurm")
    procs = slurm_tasks(out)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + RUN_LIMIT_S
    while not latest.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    assert latest.exists(), show(out / "task0.out") + show(out / "task1.out")
    os.kill(rank_pid(procs[1].pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    codes = finish(procs, timeout=TIMEOUT_S + 30)
    seconds = time.monotonic() - killed_at
    return {"out": out, "codes": codes, "seconds": seconds}


@pytest.mark.distributed
def test_slurm_script_derives_ranks_and_master_from_slurm_variables(killed_slurm_job):
    out = killed_slurm_job["out"]
    for n in (0, 1):
        text = (out / f"task{n}.out").read_text()
        assert f"node {n} of 2, 1 process(es), master 127.0.0.2:" in text
        # DeepSpeed's launcher on that node says which global rank it started
        assert f"nnodes=2, num_local_procs=1, node_rank={n}" in text and "dist_world_size=2" in text
        assert "'127.0.0.2': [0], '127.0.0.3': [1]" in text


@pytest.mark.distributed
def test_killing_one_rank_stops_the_other_node_within_the_timeout(killed_slurm_job):
    codes, seconds = killed_slurm_job["codes"], killed_slurm_job["seconds"]
    assert codes[0] not in (0, -999) and codes[1] not in (0, -999)
    # gloo sees the dead peer's closed socket at once; distributed.timeout_s bounds the other cases.
    assert seconds < TIMEOUT_S, seconds
    assert not (killed_slurm_job["out"] / "adapter").exists()


@pytest.mark.distributed
def test_launchers_report_the_killed_rank_and_every_rank_log(killed_slurm_job):
    out = killed_slurm_job["out"]
    text = (out / "task1.out").read_text()
    assert "exits with return code = -9" in text, text[-3000:]  # DeepSpeed's launcher: SIGKILL
    for n in (0, 1):
        text = (out / f"task{n}.out").read_text()
        assert "the last line of each rank's log on this machine:" in text, text[-3000:]
        assert all(f"  {path}: " in text for path in launch.rank_logs(out / "logs", since=0))


@pytest.mark.distributed
def test_same_command_with_resume_auto_ends_with_the_uninterrupted_adapter(killed_slurm_job, two_nodes):
    out = killed_slurm_job["out"]
    codes = finish(slurm_tasks(out, ["train.resume=auto"], name="resume"))
    assert codes == [0, 0], show(out / "resume0.out") + show(out / "resume1.out")
    assert "resumed from" in launch.rank_logs(out / "logs", since=0)[0].read_text()
    resumed, reference = adapter(out), adapter(two_nodes)
    assert resumed.keys() == reference.keys()
    # Resume restores the adapter, AdamW moments, schedule, data position and RNG exactly, and gloo
    # sums 2 ranks in a fixed order: the same bits as the node.sh run that was never stopped (which
    # also shows that the SLURM tasks got the same ranks).
    for name in reference:
        assert (resumed[name] == reference[name]).all(), name
