"""Checkpoints in single-process mode (no DeepSpeed): exact resume, data only, every kind of damage.

The DeepSpeed side (ZeRO 0-3, 1 and 2 ranks, re-sharding) is in tests/distributed/test_resume.py.
Each damage or attack case checks what the user gets: one line naming the problem (CheckpointError),
or a fallback to the previous intact checkpoint with one logged line, and nothing loaded from the bad one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lora_dist import LoRAConfig, LoRAModel, LoRAOptimizer
from lora_dist.adapters import load_adapter
from lora_dist.checkpoint import (
    MANIFEST,
    STATE_FILE,
    find_latest,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from lora_dist.distributed import make_lr_scheduler
from lora_dist.errors import CheckpointError

STEPS = 6
REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "v2"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.v_proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 64)
        return self.v_proj(torch.relu(self.q_proj(x)))


def build(rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    torch.manual_seed(0)
    model = LoRAModel(Net(), LoRAConfig(rank=rank, alpha=8, dropout=0.2, target_modules=list(targets)))
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


def adapter_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def two_checkpoints(root: Path) -> tuple[Path, Path]:
    """Steps 1 and 2 of a real run (optimizer and schedule included); returns their folders."""
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(1))
    first = save_checkpoint(root, step=1, model=model, optimizer=optimizer, scheduler=scheduler,
                            data_state={"epoch": 0, "batch": 1})
    train(model, optimizer, scheduler, range(1, 2))
    second = save_checkpoint(root, step=2, model=model, optimizer=optimizer, scheduler=scheduler,
                             data_state={"epoch": 0, "batch": 2})
    return first, second


def rewrite_manifest(folder: Path) -> None:
    """What someone who can write the folder can do: recompute the manifest over the changed files."""
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps({"format_version": 3, "files": entries, "files_sha256": digest}))


class Planted:
    """A pickle that creates a file when it is unpickled (pickle calls open(path, "w"))."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------- resume


def test_resume_three_plus_three_steps_equals_six_bitwise(tmp_path):
    model, optimizer, scheduler = build()
    straight = train(model, optimizer, scheduler, range(STEPS))
    expected = adapter_copy(model)

    model, optimizer, scheduler = build()
    first = train(model, optimizer, scheduler, range(3))
    save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=scheduler, data_state={"next": 3})
    torch.manual_seed(12345)  # the checkpoint's RNG state must replace this
    model, optimizer, scheduler = build()
    state = load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    second = train(model, optimizer, scheduler, range(state["data_state"]["next"], STEPS))

    assert first + second == straight
    assert same(adapter_copy(model), expected)


def test_load_returns_step_data_state_and_extra(tmp_path):
    model, _, _ = build()
    save_checkpoint(tmp_path, step=7, model=model, data_state={"epoch": 1, "batch": 3}, extra={"note": "x"})
    assert load_checkpoint(tmp_path, model=model) == {
        "step": 7,
        "data_state": {"epoch": 1, "batch": 3},
        "extra": {"note": "x"},
    }


def test_checkpoint_is_safetensors_and_json_only_and_holds_no_base(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(1))
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler)
    assert path == tmp_path / "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "optimizer.safetensors",
        "rng-rank00000.safetensors", "trainer_state.json",
    ]  # fmt: skip
    keys = load_file(str(path / "adapter_model.safetensors")).keys()
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    state = load_file(str(path / "optimizer.safetensors"))
    # Per adapter parameter: its fp32 value and AdamW's moments and step; nothing of the frozen base.
    names = {k.rsplit("::", 1)[0] for k in state}
    assert names == {k.removeprefix("base_model.model.") for k in keys}
    assert {k.rsplit("::", 1)[1] for k in state} == {"fp32", "exp_avg", "exp_avg_sq", "step"}
    assert (tmp_path / "latest").read_text() == "step-00000001\n"
    assert not list(tmp_path.glob(".*"))  # no temporary folder or file left behind


def test_checkpoint_adapter_loads_as_a_peft_adapter_folder(tmp_path):
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(2))
    path = save_checkpoint(tmp_path, step=2, model=model)
    fresh, _, _ = build()
    load_adapter(fresh, path)
    assert same(adapter_copy(fresh), adapter_copy(model))


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


def test_data_state_that_is_not_json_is_refused_before_writing(tmp_path):
    model, _, _ = build()
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, step=1, model=model, data_state={"sampler": object()})
    assert not tmp_path.joinpath("step-00000001").exists()


def test_manifest_covers_every_file_the_state_json_included(tmp_path):
    _, path = two_checkpoints(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    expected = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in path.iterdir() if p.name != MANIFEST
    }  # fmt: skip
    assert manifest["files"] == expected and STATE_FILE in expected


def test_find_latest_of_an_empty_or_missing_root_is_none(tmp_path):
    assert find_latest(tmp_path) is None
    assert find_latest(tmp_path / "nowhere") is None


def test_load_from_a_missing_path_says_it_does_not_exist(tmp_path):
    model, _, _ = build()
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere: the path does not exist"):
        load_checkpoint(tmp_path / "nowhere", model=model)
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        load_checkpoint(tmp_path, model=model)


# ---------------------------------------------------------------------------------------------- damage
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_state(folder: Path, **changes) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    for key, value in changes.items():
        if key == "batch":
            state["data_state"]["batch"] = value
        else:
            state[key] = value
    (folder / STATE_FILE).write_text(json.dumps(state))


def _swap_in_other_run(folder: Path) -> None:
    other = folder.parent / "other-run"
    shutil.copytree(folder, other)
    shutil.rmtree(folder)
    folder.symlink_to(other, target_is_directory=True)


DAMAGE = {
    "adapter truncated": lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:100]),
    "adapter emptied (bytes never reached the disk)": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
    "optimizer byte flipped": lambda f: _flip(f / "optimizer.safetensors"),
    "rng state deleted": lambda f: (f / "rng-rank00000.safetensors").unlink(),
    "state step edited": lambda f: _edit_state(f, step=5),
    "state data position edited": lambda f: _edit_state(f, batch=40),
    "state emptied": lambda f: (f / STATE_FILE).write_bytes(b""),
    "file added": lambda f: (f / "optimizer.pt").write_bytes(b"planted"),
    "manifest deleted (save interrupted)": lambda f: (f / MANIFEST).unlink(),
    "manifest entry edited": lambda f: (f / MANIFEST).write_text(
        (f / MANIFEST).read_text().replace('"size": ', '"size": 1', 1)),
    "manifest not JSON": lambda f: (f / MANIFEST).write_bytes(b"\xff\xfe{"),
    "file replaced by a symbolic link": lambda f: (
        (f / "rng-rank00000.safetensors").unlink(),
        (f / "rng-rank00000.safetensors").symlink_to(f.parent / "step-00000001" / "rng-rank00000.safetensors"),
    ),
    "folder replaced by a symbolic link to another run": _swap_in_other_run,
    "folder deleted": shutil.rmtree,
    "folder replaced by a file": lambda f: (shutil.rmtree(f), f.write_text("not a checkpoint")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_one_logged_line(tmp_path, damage, caplog):
    root = tmp_path / "checkpoints"
    first, second = two_checkpoints(root)
    expected_model, _, _ = build()
    load_checkpoint(first, model=expected_model)
    DAMAGE[damage](second)

    with caplog.at_level(logging.WARNING, logger="lora_dist.checkpoint"):
        assert find_latest(root) == first
    assert len(caplog.records) == 1 and "step-00000002 is damaged" in caplog.messages[0]
    assert "\n" not in caplog.messages[0]
    model, optimizer, scheduler = build()
    assert load_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler)["step"] == 1
    assert same(adapter_copy(model), adapter_copy(expected_model))
    assert scheduler.last_epoch == 1


@pytest.mark.parametrize("damage", [d for d in DAMAGE if d not in ("folder deleted", "folder replaced by a file")])
def test_loading_a_damaged_checkpoint_by_name_refuses_in_one_line_and_changes_nothing(tmp_path, damage):
    _, second = two_checkpoints(tmp_path)
    DAMAGE[damage](second)
    model, optimizer, scheduler = build()
    before, rng = adapter_copy(model), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"step-00000002 is damaged \(.*\); resume from .*step-00000001 instead") as err:
        load_checkpoint(second, model=model, optimizer=optimizer, scheduler=scheduler)
    assert "\n" not in str(err.value)
    assert same(adapter_copy(model), before) and torch.equal(torch.get_rng_state(), rng)
    assert not optimizer.state and scheduler.last_epoch == 0


def test_a_damaged_only_checkpoint_leaves_nothing_to_resume(tmp_path):
    model, _, _ = build()
    path = save_checkpoint(tmp_path, step=1, model=model)
    _flip(path / "adapter_model.safetensors")
    assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        load_checkpoint(tmp_path, model=model)


# ---------------------------------------------------------------------------------------------- latest
def _other_run(tmp_path: Path) -> Path:
    model, _, _ = build()
    return save_checkpoint(tmp_path / "other-run" / "checkpoints", step=9, model=model)


BAD_LATEST = {
    "relative path out of the run": lambda root, other: (root / "latest").write_text("../../other-run/checkpoints/step-00000009\n"),
    "absolute path": lambda root, other: (root / "latest").write_text(f"{other}\n"),
    "step name with a path inside": lambda root, other: (root / "latest").write_text("step-00000001/../step-00000001"),
    "not a step name": lambda root, other: (root / "latest").write_text("checkpoint-1"),
    "empty": lambda root, other: (root / "latest").write_text(""),
    "non-UTF-8 bytes": lambda root, other: (root / "latest").write_bytes(b"step-0000000\xff"),
    "a directory": lambda root, other: ((root / "latest").unlink(), (root / "latest").mkdir()),
    "a symbolic link": lambda root, other: ((root / "latest").unlink(), (root / "latest").symlink_to(other / MANIFEST)),
}


@pytest.mark.parametrize("bad", list(BAD_LATEST))
def test_a_latest_that_does_not_name_a_step_folder_of_this_run_is_refused_in_one_line(tmp_path, bad):
    root = tmp_path / "run" / "checkpoints"
    model, _, _ = build()
    save_checkpoint(root, step=1, model=model)
    other = _other_run(tmp_path)
    BAD_LATEST[bad](root, other)
    for call in (lambda: find_latest(root), lambda: load_checkpoint(root, model=model)):
        with pytest.raises(CheckpointError, match=r"latest .*(names|is not)") as err:
            call()
        assert "\n" not in str(err.value) and str(root / "latest") in str(err.value)


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("changed", "expected"), [
    ({"rank": 8}, "lora.rank 4 -> 8"),
    ({"targets": ("q_proj",)}, "lora.target_modules ['q_proj', 'v_proj'] -> ['q_proj']"),
])
def test_resuming_with_other_lora_settings_names_the_mismatch(tmp_path, changed, expected):
    model, optimizer, scheduler = build()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, scheduler=scheduler)
    model, optimizer, scheduler = build(**changed)
    with pytest.raises(CheckpointError, match=f"other LoRA settings \\({expected.replace('[', '.').replace(']', '.')}\\)"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


# ---------------------------------------------------------------------------------------------- pickles
def test_a_planted_pickle_with_a_recomputed_manifest_is_refused_and_never_runs(tmp_path):
    _, path = two_checkpoints(tmp_path)
    sentinel = tmp_path / "pwned"
    torch.save({"state": Planted(sentinel)}, path / "optimizer.safetensors")  # a torch pickle where tensors belong
    rewrite_manifest(path)
    model, optimizer, scheduler = build()
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is not a safetensors file"):
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not sentinel.exists()
    pickle.loads(pickle.dumps(Planted(sentinel)))  # the planted object does create the file when unpickled
    assert sentinel.exists()


def _legacy_copy(tmp_path: Path, name: str) -> Path:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name / "checkpoints" / "step-00000002"


def _rewrite_legacy_manifest(folder: Path) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    for name in state["files"]:
        data = (folder / name).read_bytes()
        state["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("target", ["optimizer.pt", "scheduler.pt", "rng-rank00000.pt"])
def test_a_planted_pickle_in_a_format_2_checkpoint_is_refused_and_never_runs(tmp_path, target):
    path = _legacy_copy(tmp_path, "single")
    sentinel = tmp_path / "pwned"
    torch.save({"state": Planted(sentinel)}, path / target)
    _rewrite_legacy_manifest(path)
    from lora_dist import checkpoint

    with pytest.raises(CheckpointError, match=f"{target} holds more than tensors and plain data .*refused unread"):
        checkpoint._torch_load_data(path / target)
    assert not sentinel.exists()


def test_a_planted_pickle_in_a_format_2_deepspeed_file_is_refused_and_never_runs(tmp_path):
    # The three DeepSpeed classes on the allowlist do not help it: any other global stops the load.
    path = _legacy_copy(tmp_path, "zero2-2proc")
    sentinel = tmp_path / "pwned"
    target = path / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Planted(sentinel)}, target)
    _rewrite_legacy_manifest(path)
    from lora_dist import checkpoint

    assert checkpoint.find_latest(path.parent) == path  # the manifest is valid: only the content is hostile
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt holds more than tensors"):
        checkpoint._legacy_zero_state(path, engine=None)  # refused before any engine is touched
    assert not sentinel.exists()


def _forge_state(folder: Path) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    del state["lora"]
    (folder / STATE_FILE).write_text(json.dumps(state))


def _forge_tensor(folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    key = next(k for k in tensors if k.endswith("::exp_avg"))
    tensors[key] = torch.zeros(3)
    save_file(tensors, str(folder / "optimizer.safetensors"))


def _forge_rng(folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({"torch": torch.zeros(3, dtype=torch.uint8)}, str(folder / "rng-rank00000.safetensors"),
              metadata={"python": "[3, [1, 2], null]"})


FORGED = {  # edits with a recomputed manifest: data that is not what this tool writes
    "state without its LoRA settings": (_forge_state, r"trainer_state.json has no valid 'lora'"),
    "optimizer tensor of another shape": (_forge_tensor, r"exp_avg has shape \(3,\), the model \(4, 64\)"),
    "RNG state of the wrong kind": (_forge_rng, r"rng-rank00000.safetensors holds no valid RNG state"),
}


@pytest.mark.parametrize("forged", list(FORGED))
def test_forged_data_with_a_recomputed_manifest_is_refused_in_one_line(tmp_path, forged):
    _, path = two_checkpoints(tmp_path)
    forge, message = FORGED[forged]
    forge(path)
    rewrite_manifest(path)
    model, optimizer, scheduler = build()
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- format 2
def test_the_format_2_single_process_fixture_resumes_as_the_old_code_did(tmp_path):
    record = json.loads((FIXTURES / "single.json").read_text())
    shutil.copytree(FIXTURES / "single", tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "lora_dist", "train", str(REPO / "configs/tiny-cpu.yaml"), *record["overrides"],
         f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"],
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    expected = load_file(str(FIXTURES / "single-expected-adapter.safetensors"))
    assert same(got, expected)
    records = map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
    assert {str(r["step"]): r["loss"] for r in records if r.get("kind") == "train"} == record["expected_losses"]
    # The run's own checkpoint at the end is in the new format, beside the old one.
    assert (tmp_path / "run/checkpoints/step-00000004" / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------- full disk, read-only
SAVE_UNDER_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import build, train
    from lora_dist.checkpoint import save_checkpoint
    from lora_dist.errors import UserError

    root, limit = Path(sys.argv[1]), int(sys.argv[2])
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, range(1))
    save_checkpoint(root, step=1, model=model, optimizer=optimizer, scheduler=scheduler)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_checkpoint(root, step=2, model=model, optimizer=optimizer, scheduler=scheduler)
    except UserError as err:  # what the CLI does with it
        print(err, file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.parametrize("limit", [1, 6000])  # the first write fails / the adapter fits, the optimizer state does not
def test_a_save_on_a_full_disk_keeps_the_previous_checkpoint_latest_and_says_so_in_one_line(tmp_path, limit):
    root = tmp_path / "checkpoints"
    script = SAVE_UNDER_LIMIT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(root), str(limit)], capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert line.startswith(f"could not write checkpoint {root / 'step-00000002'} (File too large")
    assert f"{root / 'step-00000001'} stays the latest" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # nothing half-written
    model, optimizer, scheduler = build()
    assert load_checkpoint(root, model=model, optimizer=optimizer, scheduler=scheduler)["step"] == 1


def _make_read_only(folder: Path) -> None:
    """Permission bits bind everyone but root; as root (CI) use the immutable attribute, which binds root too."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        subprocess.run(["chattr", "+i", str(folder)], check=True)


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_a_save_into_a_read_only_folder_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    first, _ = two_checkpoints(tmp_path)
    shutil.rmtree(tmp_path / "step-00000002")
    (tmp_path / "latest").write_text("step-00000001\n")
    model, optimizer, scheduler = build()
    _make_read_only(tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000003 \(.*\); .*step-00000001 "
                                                  r"stays the latest: free disk space or make .* writable"):
            save_checkpoint(tmp_path, step=3, model=model, optimizer=optimizer, scheduler=scheduler)
    finally:
        _make_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert find_latest(tmp_path) == first


def test_training_into_a_read_only_checkpoint_folder_exits_2_with_one_line(tmp_path):
    record = json.loads((FIXTURES / "single.json").read_text())
    shutil.copytree(FIXTURES / "single", tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    args = [sys.executable, "-m", "lora_dist", "train", str(REPO / "configs/tiny-cpu.yaml"), *record["overrides"],
            f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    _make_read_only(root)
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        _make_writable(root)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lora-dist: error: could not write checkpoint") and "step-00000002 stays the latest" in last
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]


# ---------------------------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_of_crashed_saves_are_removed_and_checkpoints_kept(tmp_path):
    _, second = two_checkpoints(tmp_path)
    stale = [tmp_path / ".step-00000003.tmp-partial", tmp_path / ".latest.tmp-k2j4", tmp_path / ".step-00000004.partial",
             tmp_path / ".step-00000002.old-x81s"]
    stale[0].mkdir()
    (stale[0] / "adapter_model.safetensors").write_bytes(b"half")
    stale[1].write_text("step-0000")
    stale[2].mkdir()
    stale[3].mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert find_latest(tmp_path) == second
