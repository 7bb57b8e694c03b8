"""Checkpoints in single-process mode (no DeepSpeed): exact resume, atomic layout, clear errors.

The DeepSpeed side (2 ranks, ZeRO 0-3) is in tests/distributed/test_zero.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lora_dist import LoRAConfig, LoRAModel, LoRAOptimizer
from lora_dist.adapters import load_adapter
from lora_dist.checkpoint import find_latest, load_checkpoint, save_checkpoint
from lora_dist.distributed import make_lr_scheduler

STEPS = 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.v_proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 64)
        return self.v_proj(torch.relu(self.q_proj(x)))


def build():
    torch.manual_seed(0)
    model = LoRAModel(Net(), LoRAConfig(rank=4, alpha=8, dropout=0.2, target_modules=["q_proj", "v_proj"]))
    optimizer = LoRAOptimizer(model, lr=1e-2, weight_decay=0.01).optimizer
    scheduler = make_lr_scheduler(optimizer, schedule="cosine", warmup_steps=1, total_steps=STEPS)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)


def train(model, optimizer, scheduler, steps) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        x, y = batch(step)
        loss = F.mse_loss(model(x), y)  # dropout draws from torch's RNG: resume must restore it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_resume_three_plus_three_steps_equals_six_bitwise(tmp_path):
    model, optimizer, scheduler = build()
    straight = train(model, optimizer, scheduler, range(STEPS))
    expected = {k: v.clone() for k, v in model.adapter_state_dict().items()}

    model, optimizer, scheduler = build()
    first = train(model, optimizer, scheduler, range(3))
    save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=scheduler, data_state={"next": 3})
    torch.manual_seed(12345)  # the checkpoint's RNG state must replace this
    model, optimizer, scheduler = build()
    state = load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    second = train(model, optimizer, scheduler, range(state["data_state"]["next"], STEPS))

    assert first + second == straight
    assert all(torch.equal(model.adapter_state_dict()[k], expected[k]) for k in expected)


def test_load_returns_step_data_state_and_extra(tmp_path):
    model, optimizer, scheduler = build()
    save_checkpoint(tmp_path, step=7, model=model, data_state={"epoch": 1, "batch": 3}, extra={"note": "x"})
    assert load_checkpoint(tmp_path, model=model) == {
        "step": 7,
        "data_state": {"epoch": 1, "batch": 3},
        "extra": {"note": "x"},
    }


def test_checkpoint_holds_adapter_optimizer_scheduler_rng_and_no_base(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(1))
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler)
    assert path == tmp_path / "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
        "rng-rank00000.pt", "scheduler.pt", "trainer_state.json",
    ]  # fmt: skip
    keys = load_file(str(path / "adapter_model.safetensors")).keys()
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert not list(tmp_path.glob(".*"))  # no partial directory or temp file left behind


def test_checkpoint_adapter_loads_as_a_peft_adapter_folder(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(2))
    path = save_checkpoint(tmp_path, step=2, model=model)
    fresh, _, _ = build()
    load_adapter(fresh, path)
    assert all(torch.equal(fresh.adapter_state_dict()[k], v) for k, v in model.adapter_state_dict().items())


def test_latest_moves_to_the_newest_checkpoint(tmp_path):
    model, _, _ = build()
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, model=model)
    assert find_latest(tmp_path) == tmp_path / "step-00000002"
    assert load_checkpoint(tmp_path, model=model)["step"] == 2
    assert load_checkpoint(tmp_path / "step-00000001", model=model)["step"] == 1


def test_resaving_a_step_replaces_it(tmp_path):
    model, _, _ = build()
    save_checkpoint(tmp_path, step=1, model=model, extra={"v": 1})
    save_checkpoint(tmp_path, step=1, model=model, extra={"v": 2})
    assert load_checkpoint(tmp_path, model=model)["extra"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


class ExplodingScheduler:
    def state_dict(self):
        raise RuntimeError("disk full")


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    model, _, _ = build()
    save_checkpoint(tmp_path, step=1, model=model)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, step=2, model=model, scheduler=ExplodingScheduler())
    assert not (tmp_path / "step-00000002").exists()
    assert find_latest(tmp_path) == tmp_path / "step-00000001"
    assert load_checkpoint(tmp_path, model=model)["step"] == 1


def test_find_latest_of_an_empty_or_missing_root_is_none(tmp_path):
    assert find_latest(tmp_path) is None
    assert find_latest(tmp_path / "nowhere") is None


def test_load_from_a_missing_path_says_it_does_not_exist(tmp_path):
    model, _, _ = build()
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere: the path does not exist"):
        load_checkpoint(tmp_path / "nowhere", model=model)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path, model=model)


def test_load_from_an_incomplete_checkpoint_names_a_complete_one(tmp_path):
    model, _, _ = build()
    save_checkpoint(tmp_path, step=1, model=model)
    broken = save_checkpoint(tmp_path, step=2, model=model)
    (broken / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"step-00000002 is incomplete .*resume from .*step-00000001 instead"):
        load_checkpoint(broken, model=model)
    with pytest.raises(ValueError, match=r"latest names step-00000002, which is missing or incomplete"):
        load_checkpoint(tmp_path, model=model)
    assert find_latest(tmp_path) == tmp_path / "step-00000001"


def test_a_checkpoint_missing_a_listed_file_is_incomplete(tmp_path):
    model, optimizer, _ = build()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer)
    (path / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="is incomplete"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_data_state_that_is_not_json_is_refused_before_writing(tmp_path):
    model, _, _ = build()
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, step=1, model=model, data_state={"sampler": object()})
    assert not tmp_path.joinpath("step-00000001").exists()


def test_manifest_holds_size_and_sha256_of_every_other_file(tmp_path):
    model, optimizer, scheduler = build()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler)
    files = json.loads((path / "trainer_state.json").read_text())["files"]
    expected = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in path.iterdir() if p.name != "trainer_state.json"
    }  # fmt: skip
    assert files == expected


def test_a_step_whose_bytes_never_reached_the_disk_is_incomplete_and_latest_falls_back(tmp_path):
    # What a power loss leaves when data was not fsynced: the names exist, the files are empty.
    model, _, _ = build()
    save_checkpoint(tmp_path, step=1, model=model)
    lost = save_checkpoint(tmp_path, step=2, model=model)
    (lost / "adapter_model.safetensors").write_bytes(b"")
    assert find_latest(tmp_path) == tmp_path / "step-00000001"
    with pytest.raises(ValueError, match=r"step-00000002 is incomplete \(adapter_model.safetensors has 0 bytes"):
        load_checkpoint(lost, model=model)


def test_every_file_and_folder_is_fsynced_before_a_rename_publishes_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst, real=real_rename):
        events.append(("rename", str(src), str(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", lambda src, dst: rename(src, dst, real_replace))
    model, optimizer, _ = build()
    root = tmp_path.resolve()
    final = save_checkpoint(root, step=1, model=model, optimizer=optimizer)
    partial = root / ".step-00000001.partial"

    def at(event):
        return events.index(event)

    publish = at(("rename", str(partial), str(final)))
    state_in = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(partial / "trainer_state.json"))
    latest_in = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(root / "latest"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng-rank00000.pt"):
        assert at(("fsync", str(partial / name))) < publish, name
    assert at(("fsync", events[state_in][1])) < state_in  # the temp file's data, then its name
    assert state_in < max(i for i, e in enumerate(events) if e == ("fsync", str(partial))) < publish
    assert publish < at(("fsync", str(root))) < latest_in  # the step folder's name before `latest` names it
    assert at(("fsync", events[latest_in][1])) < latest_in
    assert ("fsync", str(root)) in events[latest_in + 1 :]


def test_a_changed_byte_is_refused_before_anything_is_loaded(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(2))
    path = save_checkpoint(tmp_path, step=2, model=model, optimizer=optimizer, scheduler=scheduler)
    target = path / "optimizer.pt"  # read after the adapter: a late check would have loaded that
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    fresh, fresh_optimizer, fresh_scheduler = build()
    adapter_before = {k: v.clone() for k, v in fresh.adapter_state_dict().items()}
    rng_before = torch.get_rng_state()
    message = (
        f"checkpoint file {target} changed since it was written; resume only from checkpoints this tool wrote"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert all(torch.equal(fresh.adapter_state_dict()[k], v) for k, v in adapter_before.items())
    assert not fresh_optimizer.state and fresh_scheduler.last_epoch == 0
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_a_file_added_to_a_checkpoint_is_refused(tmp_path):
    # DeepSpeed's universal converter reads every *zero_pp_rank_* file it finds in deepspeed/.
    model, _, _ = build()
    path = save_checkpoint(tmp_path, step=1, model=model)
    (path / "deepspeed").mkdir()
    (path / "deepspeed" / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(ValueError, match=r"deepspeed/zero_pp_rank_9_mp_rank_00_optim_states.pt changed since"):
        load_checkpoint(path, model=model)


def test_trainer_state_records_world_size_and_mode(tmp_path):
    model, _, _ = build()
    path = save_checkpoint(tmp_path, step=1, model=model)
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["world_size"], state["deepspeed"], state["zero_stage"]) == (1, False, None)
