"""lora-dist generate: the trained tiny default answers a training prompt; the base alone does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_dist import cli, data, generate, tiny
from lora_dist.config import load_config
from lora_dist.errors import AdapterError, ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny default trained as shipped (200 steps, ~20 s on 2 idle cores), W&B off."""
    from lora_dist import train

    out = tmp_path_factory.mktemp("tiny")
    train.train(load_config(TINY, [f"train.output_dir={out}", "wandb.mode=disabled"]))
    return out


@pytest.fixture(scope="module")
def training_row(trained):
    """A row of the training split (not the held-out one) whose answer is a sentence."""
    from transformers import AutoTokenizer

    cfg = load_config(TINY, [f"train.output_dir={trained}"])
    tokenizer = AutoTokenizer.from_pretrained(trained / "tiny-llama")
    train_ds, _ = data.build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    texts = {tokenizer.decode(row["input_ids"]) for row in train_ds}
    for line in tiny.DEFAULT_DATASET.read_text().splitlines():
        row = json.loads(line)
        if row["output"].startswith("The capital of") and any(
                f"{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n{row['output']}" in t
                if row["input"] else f"{row['instruction']}\n\n### Response:\n{row['output']}" in t for t in texts):
            return row
    raise AssertionError("no training row starts with 'The capital of'")


def _start(answer: str) -> str:
    return " ".join(answer.split()[:3])  # "The capital of": what a model that learned the task writes first


def test_trained_adapter_greedily_writes_the_start_of_a_training_answer_and_the_base_does_not(trained, training_row):
    kw = {"template": "instruction", "input_text": training_row["input"] or None, "max_new_tokens": 16}
    model, tokenizer = generate.load_for_generation(str(trained / "tiny-llama"), str(trained / "adapter"), device="cpu")
    reply = generate.generate(model, tokenizer, training_row["instruction"], **kw)
    assert reply.startswith(_start(training_row["output"])), (reply, training_row)

    base, tokenizer = generate.load_for_generation(str(trained / "tiny-llama"), None, bits="4", device="cpu")
    alone = generate.generate(base, tokenizer, training_row["instruction"], **kw)
    assert not alone.startswith(_start(training_row["output"])), alone


def test_adapter_records_its_4bit_base_and_the_run_its_template(trained):
    quantization = generate.recorded_quantization(trained / "adapter")
    assert (quantization["bits"], quantization["quant_type"], quantization["compute_dtype"]) == (4, "nf4", "float32")
    assert generate.trained_template(trained / "adapter") == "instruction"


def test_merged_adapter_writes_the_same_greedy_tokens(trained, training_row):
    # fp32 on the CPU: merged (dequantized W + delta, one matmul) and unmerged outputs differ by ~3e-7
    # in the logits (README numerics table), far below the gap between the top two tokens of a trained row.
    args = (str(trained / "tiny-llama"), str(trained / "adapter"))
    kw = {"template": "instruction", "input_text": training_row["input"] or None, "max_new_tokens": 8}
    unmerged = generate.generate(*generate.load_for_generation(*args, device="cpu"), training_row["instruction"], **kw)
    merged = generate.generate(*generate.load_for_generation(*args, merge=True, device="cpu"),
                               training_row["instruction"], **kw)
    assert merged == unmerged


def test_cli_streams_the_reply_to_stdout(trained, training_row, capsys):
    argv = ["generate", "--base", str(trained / "tiny-llama"), "--adapter", str(trained / "adapter"),
            "--prompt", training_row["instruction"], "--max-new-tokens", "16", "--device", "cpu"]
    if training_row["input"]:
        argv += ["--input", training_row["input"]]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith(_start(training_row["output"]))


def test_sampling_with_a_seed_repeats_and_differs_from_greedy_somewhere(trained, training_row):
    model, tokenizer = generate.load_for_generation(str(trained / "tiny-llama"), str(trained / "adapter"), device="cpu")
    kw = {"template": "instruction", "input_text": training_row["input"] or None, "max_new_tokens": 12}
    a = generate.generate(model, tokenizer, training_row["instruction"], temperature=1.5, seed=3, **kw)
    b = generate.generate(model, tokenizer, training_row["instruction"], temperature=1.5, seed=3, **kw)
    others = {generate.generate(model, tokenizer, training_row["instruction"], temperature=1.5, seed=s, **kw)
              for s in range(4, 8)}
    assert a == b and len(others | {a}) > 1


def test_chat_template_is_the_tokenizers_when_it_has_one(trained):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained / "tiny-llama")
    assert generate.format_prompt(tokenizer, "hi", "chat") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert generate.format_prompt(tokenizer, "hi", "instruction") == "### Instruction:\nhi\n\n### Response:\n"


def test_missing_adapter_folder_is_one_line_exit_2(trained, tmp_path, capsys):
    code = cli.main(["generate", "--base", str(trained / "tiny-llama"), "--adapter", str(tmp_path / "none"),
                     "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_missing_base_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        generate.load_for_generation(str(tmp_path / "no-model") + "/", None, bits="none", device="cpu")


def test_adapter_for_another_base_is_refused_in_one_line(trained, tmp_path):
    other = tiny.build_tiny_model(tmp_path / "wider", hidden=192, intermediate=384, heads=4, kv_heads=2)
    with pytest.raises(AdapterError, match="does not fit base"):
        generate.load_for_generation(str(other), str(trained / "adapter"), device="cpu")
