"""Every shipped config loads, validates and is headed by the command that runs it."""

from pathlib import Path

import pytest

from lora_dist.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_five_recipes_ship():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "llama3-8b-qlora-24gb.yaml", "mistral-7b-qlora-24gb.yaml",
            "qwen2.5-7b-qlora-24gb.yaml", "llama3-70b-qlora-zero3-8gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.train.lr > 0 and cfg.lora.rank > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_headed_by_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("lora-dist train" in first or "lora_dist train" in first), first
    assert f"configs/{path.name}" in first


def test_70b_recipe_divides_its_global_batch_over_8_ranks():
    cfg = load_config(CONFIGS[0].parent / "llama3-70b-qlora-zero3-8gpu.yaml")
    assert cfg.distributed.zero_stage == 3
    assert cfg.train.accumulation(8) * cfg.train.micro_batch_size * 8 == cfg.train.global_batch_size
