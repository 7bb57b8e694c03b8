"""lora_dist.tiny: the embedded default's model, tokenizer and shipped dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist import quantize_model
from lora_dist.tiny import DEFAULT_DATASET, build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_tiny_model_and_tokenizer_load_back_through_auto_classes(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    c = model.config
    assert c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (128, 2, 4, 2, 256)
    assert c.vocab_size % 64 == 0 and c.vocab_size >= len(tokenizer)
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|pad|>", "<|end|>")
    assert (c.pad_token_id, c.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_same_seed_writes_identical_weights_and_tokenizer(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_dir, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert (tiny_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_building_does_not_move_the_global_torch_seed(tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_model(tmp_path / "m", hidden=64, intermediate=128)
    assert torch.equal(torch.rand(3), expected)


def test_rebuilding_replaces_the_folder_whole(tmp_path):
    out = build_tiny_model(tmp_path / "m", hidden=64, intermediate=128)
    (out / "stale.txt").write_text("left from an older build")
    build_tiny_model(out, hidden=64, intermediate=128)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind


def test_tokenizer_round_trips_any_text(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "What is 47 plus 5? Ünïcödé → 漢字 🙂\n\tend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("47", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(d) for d in "47"]


def test_chat_template_renders_turns_and_the_generation_prompt(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|user|>\nCapital of Peru?<|end|>\n<|assistant|>\nLima.<|end|>\n")
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|end|>\n<|assistant|>\n")


def test_tiny_model_quantizes_to_4bit_and_runs_forward_and_backward(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    quantize_model(model, bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(True)
    ids = torch.randint(0, 400, (2, 16))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_width_not_a_multiple_of_64_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden=96 must be a positive multiple of 64"):
        build_tiny_model(tmp_path / "m", hidden=96)


def test_shipped_dataset_is_what_its_generator_writes(tmp_path):
    script = DEFAULT_DATASET.parent / "make_dataset.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "d.jsonl")], check=True, capture_output=True)
    assert (tmp_path / "d.jsonl").read_bytes() == DEFAULT_DATASET.read_bytes()


def test_shipped_dataset_has_a_few_hundred_distinct_instruction_rows():
    rows = [json.loads(line) for line in DEFAULT_DATASET.read_text().splitlines()]
    assert 300 <= len(rows) <= 1000
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in rows)
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
