"""Preemption on one process: a stop signal mid-run ends the step, checkpoints, exits 75; resume is exact."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lora_dist import building, train
from lora_dist.config import load_config
from lora_dist.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from lora_dist.tracking import read_metrics
from preempt_hook import signalling

STEPS, ACCUM = 6, 2
# random:tiny on random tokens: no tokenizer or dataset to build. Dropout on: the resumed run only
# matches if the RNG state comes back with the checkpoint too. No save_interval: the only checkpoint
# is the one the signal makes.
RUN = ["model.path=random:tiny", "data.path=random-tokens", "data.max_seq_len=64", "model.compute_dtype=fp32",
       f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"train.grad_accum={ACCUM}", "train.warmup_steps=0",
       "train.eval_interval=0", "train.save_interval=0", "train.log_interval=100", "wandb.mode=disabled",
       "lora.dropout=0.1"]


def _adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _train_steps(out):
    return [r["step"] for r in read_metrics(out) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    train.train(load_config(None, [*RUN, f"train.output_dir={out}"]))
    return _adapter(out)


def _signal_at_forward(monkeypatch, forward: int, sig: signal.Signals) -> None:
    """Make the process send itself `sig` during its `forward`-th model forward (1-based)."""
    monkeypatch.setattr(building, "build_model", signalling(building.build_model, forward, sig))


# Two random points of the 12 forwards (2 per step): a seed keeps a failure reproducible.
POINTS = dict(zip((signal.SIGTERM, signal.SIGINT), random.Random(13).sample(range(1, STEPS * ACCUM), 2)))


@pytest.mark.parametrize("sig", list(POINTS), ids=lambda s: s.name)
def test_signal_mid_run_checkpoints_the_step_in_progress_and_resume_is_bit_exact(
    uninterrupted, tmp_path, monkeypatch, capsys, sig
):
    forward = POINTS[sig]
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _signal_at_forward(patch, forward, sig)
        with pytest.raises(Preempted) as stopped:
            train.train(load_config(None, [*RUN, f"train.output_dir={out}"]))
    in_progress = -(-forward // ACCUM)  # the step the signal arrived in: it finishes and is checkpointed
    assert stopped.value.step == in_progress and stopped.value.signal_name == sig.name
    assert (out / "checkpoints" / f"step-{in_progress:08d}").is_dir()
    assert _train_steps(out) == list(range(1, in_progress + 1))  # no finished step lost
    assert [r for r in read_metrics(out) if r["kind"] == "summary"][-1]["preempted"] == sig.name

    train.train(load_config(None, [*RUN, f"train.output_dir={out}", "train.resume=auto"]))
    assert _train_steps(out) == list(range(1, STEPS + 1))  # each step logged once
    resumed = _adapter(out)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # same float ops in the same order


def test_second_ctrl_c_stops_at_once():
    with StopSignals() as signals, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises here


def test_stop_signals_restores_the_previous_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with StopSignals():
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigusr1_to_the_cli_exits_75_with_one_line_and_a_checkpoint_of_the_last_step(tmp_path):
    # SIGUSR1: what SLURM sends ahead of the end with `#SBATCH --signal=USR1@120`.
    out = tmp_path / "run"
    config = tmp_path / "random.yaml"
    config.write_text("model:\n  path: random:tiny\n")  # the rest comes as overrides
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "WORLD_", "RANK"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_dist", "train", str(config), *RUN, "train.max_steps=2000", "train.log_interval=1",
         f"train.output_dir={out}"],
        env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(_train_steps(out)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("lora-dist: error:")]
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert len(errors) == 1 and "preempted by SIGUSR1" in errors[0] and "train.resume=auto" in errors[0]
    last = _train_steps(out)[-1]
    assert f"after step {last};" in errors[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{last:08d}"


def test_signal_after_the_last_step_checkpoints_before_the_final_eval(tmp_path, monkeypatch, capsys):
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda run: fit(run) or os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted) as stopped:
        train.train(load_config(None, [*RUN, f"train.output_dir={tmp_path}"]))
    assert stopped.value.step == STEPS and (tmp_path / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    assert not (tmp_path / "adapter").exists()  # the resume evaluates and exports


def test_signal_during_the_final_save_lets_the_job_finish(tmp_path, monkeypatch, capsys):
    save = train.save
    monkeypatch.setattr(train, "save", lambda run: os.kill(os.getpid(), signal.SIGTERM) or save(run))
    summary = train.train(load_config(None, [*RUN, f"train.output_dir={tmp_path}"]))
    assert summary["steps"] == STEPS and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the job
