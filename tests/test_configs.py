"""Every shipped config loads, is headed by the command that runs it, and divides its batch as DeepSpeed needs."""

import re
from pathlib import Path

import pytest

from lora_dist import distributed
from lora_dist.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _intended_world_size(path: Path) -> int:
    """Processes of the command heading the recipe: `--num_gpus N` / `--num-gpus N`, else one."""
    found = re.search(r"--num[_-]gpus[ =](\d+)", path.read_text().splitlines()[0])
    return int(found.group(1)) if found else 1


def test_the_five_recipes_ship():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "llama3-8b-qlora-24gb.yaml", "mistral-7b-qlora-24gb.yaml",
            "qwen2.5-7b-qlora-24gb.yaml", "llama3-70b-qlora-zero3-8gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_derives_a_deepspeed_config_whose_batch_adds_up(path):
    cfg = load_config(path)
    world = _intended_world_size(path)
    ds = distributed.deepspeed_config(cfg, world, total_steps=cfg.train.max_steps)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    # DeepSpeed refuses a config where train_batch_size != micro * accum * world.
    assert ds["train_batch_size"] == micro * accum * world
    assert micro == cfg.train.micro_batch_size
    if cfg.train.global_batch_size is not None:  # every recipe's global batch is what it says it is
        assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["zero_optimization"]["stage"] == cfg.distributed.zero_stage
    assert ds["lora_dist"]["total_steps"] == cfg.train.max_steps
    assert ds["lora_dist"]["warmup_steps"] < cfg.train.max_steps


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_headed_by_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("lora-dist train" in first or "lora_dist train" in first), first
    assert f"configs/{path.name}" in first


def test_70b_recipe_is_meant_for_8_ranks_under_zero3_bf16():
    path = CONFIGS[0].parent / "llama3-70b-qlora-zero3-8gpu.yaml"
    cfg = load_config(path)
    ds = distributed.deepspeed_config(cfg, _intended_world_size(path), total_steps=cfg.train.max_steps)
    assert _intended_world_size(path) == 8 and ds["zero_optimization"]["stage"] == 3
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1, 8)
    assert ds["train_batch_size"] == 1 * 8 * 8 == cfg.train.global_batch_size == 64
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    # Small adapters must still be partitioned under ZeRO-3: DeepSpeed keeps params below this
    # threshold (default 1e5 elements) whole on every rank, e.g. a 70B k_proj's lora_B (1024 x 16).
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
