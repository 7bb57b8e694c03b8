"""distributed.py on one process, DeepSpeed not imported: make_ds_config, init_distributed, the shm-op lock check."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from lora_dist import distributed
from lora_dist.distributed import init_distributed, make_ds_config
from lora_dist.errors import ConfigError

BASE = dict(
    zero_stage=2, micro_batch_size=4, grad_accum=8, world_size=2, grad_clip=1.0, precision="bf16",
    lr=2e-4, weight_decay=0.01, warmup_steps=10, total_steps=100, schedule="cosine",
)  # fmt: skip


def test_config_derives_batch_sizes_precision_and_optimizer_from_ours():
    config = make_ds_config(**BASE)
    assert config["train_batch_size"] == 4 * 8 * 2
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["zero_optimization"]["stage"] == 2
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 2e-4
    assert config["lora_dist"] == {"schedule": "cosine", "warmup_steps": 10, "total_steps": 100}


def test_no_clipping_is_deepspeeds_zero():
    assert make_ds_config(**dict(BASE, grad_clip=None))["gradient_clipping"] == 0.0


def test_zero_stage_outside_0_to_3_is_refused():
    with pytest.raises(ValueError, match=r"zero_stage must be one of \(0, 1, 2, 3\), got 5"):
        make_ds_config(**dict(BASE, zero_stage=5))


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        make_ds_config(**dict(BASE, zero_stage=-1, micro_batch_size=0, precision="fp8", lr=0.0))
    message = str(err.value)
    for fragment in ("zero_stage", "micro_batch_size", "precision must be one of", "lr must be positive"):
        assert fragment in message


def test_decaying_schedule_without_total_steps_is_refused():
    with pytest.raises(ValueError, match="set total_steps, or use schedule 'constant'"):
        make_ds_config(**dict(BASE, total_steps=None))


def test_offload_puts_optimizer_state_on_cpu_and_needs_a_zero_stage():
    config = make_ds_config(**dict(BASE, offload_optimizer=True))
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO stage 1, 2 or 3"):
        make_ds_config(**dict(BASE, zero_stage=0, offload_optimizer=True))


def test_conflicting_user_json_lists_every_key_with_both_values():
    user = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    with pytest.raises(ValueError) as err:
        make_ds_config(**BASE, user_config=user)
    message = str(err.value)
    assert "train_micro_batch_size_per_gpu: ours is 4, yours is 16" in message
    assert "zero_optimization.stage: ours is 2, yours is 3" in message
    assert "bf16.enabled: ours is True, yours is False" in message
    assert "optimizer.params.lr: ours is 0.0002, yours is 0.001" in message
    assert "optimizer.type" not in message  # equal values are no conflict


def test_user_scheduler_section_is_a_conflict():
    with pytest.raises(ValueError, match="scheduler: ours is"):
        make_ds_config(**BASE, user_config={"scheduler": {"type": "WarmupLR"}})


def test_user_json_adds_keys_and_overrides_soft_defaults():
    user = {
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1e6, "stage3_param_persistence_threshold": 1e4},
        "optimizer": {"params": {"betas": (0.9, 0.999), "torch_adam": False}},
        "activation_checkpointing": {"partition_activations": True},
    }
    config = make_ds_config(**BASE, user_config=user)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1e6
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 1e4
    assert config["optimizer"]["params"]["torch_adam"] is False
    assert config["activation_checkpointing"] == {"partition_activations": True}
    assert user["zero_optimization"]["stage"] == 2  # the user's dict is not modified


def test_init_distributed_without_a_launcher_is_rank_0_of_1(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed() == (0, 1)


# ---------------------------------------------------------------- DeepSpeed's CPU comm op, built once


def _op_folder(root, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    folder = root / distributed.SHM_OP
    folder.mkdir(parents=True)
    return folder


def _stale_lock(folder):
    lock = folder / "lock"
    lock.write_text("")
    old = time.time() - 600  # a build killed ten minutes ago
    os.utime(lock, (old, old))
    return lock


def test_a_lock_left_by_a_killed_build_fails_in_one_line_naming_it(tmp_path, monkeypatch):
    lock = _stale_lock(_op_folder(tmp_path, monkeypatch))
    with pytest.raises(ConfigError, match=rf"left {re.escape(str(lock))} behind .* delete that file"):
        distributed.check_cpu_comm_op()


def test_a_lock_of_a_live_build_is_left_alone(tmp_path, monkeypatch, capsys):
    folder = _op_folder(tmp_path, monkeypatch)
    _stale_lock(folder)
    (folder / f"{distributed.SHM_OP}.so").write_bytes(b"")
    builder = subprocess.Popen(["sleep", "60"], cwd=folder)  # ninja and the compiler run in that folder
    try:
        distributed.check_cpu_comm_op()  # DeepSpeed will wait for it, rightly
    finally:
        builder.kill()
        builder.wait()


def test_an_op_not_built_yet_is_announced(tmp_path, monkeypatch, capsys):
    _op_folder(tmp_path, monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.check_cpu_comm_op()
    assert "building DeepSpeed's CPU comm op once (a few minutes)" in capsys.readouterr().err


def test_cluster_info_of_a_single_process(monkeypatch):
    import socket

    for var in ("CROSS_SIZE", "SLURM_NNODES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.cluster_info() == {"world_size": 1, "num_nodes": 1, "hostnames": [socket.gethostname()]}
