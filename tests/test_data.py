"""lora_dist.data: loading, bad files, label masking, chat rendering, long rows, packing without leaks, the data
report, and the loader whose global batches do not depend on the world size."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lora_dist import data
from lora_dist.data import (
    IGNORE_INDEX,
    INSTRUCTION_TEMPLATE_NO_INPUT,
    DataConfig,
    DataError,
    DataStats,
    build_datasets,
    max_chars_before_tokenizing,
)
from lora_dist.loader import collate, make_dataloader
from lora_dist.tiny import build_tiny_tokenizer

ROWS = [
    {"instruction": "What is 2 plus 40?", "input": "", "output": "42"},
    {"instruction": "Reverse the order of the words.", "input": "red blue green", "output": "green blue red"},
    {"instruction": "What is the capital of Peru?", "input": "", "output": "The capital of Peru is Lima."},
    {"instruction": "How many words are in the input?", "input": "cat dog", "output": "two"},
    {"instruction": "Give the opposite of the word 'hot'.", "input": "", "output": "cold"},
    {"instruction": "Which number comes after 7?", "input": "", "output": "8"},
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And of Chile?"},
    {"role": "assistant", "content": "Santiago."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(path, tokenizer, cache, seed=0, stats=None, **overrides):
    cfg = DataConfig(path=str(path), max_seq_len=overrides.pop("max_seq_len", 96), eval_fraction=0.0,
                     cache_dir=cache, **overrides)
    return build_datasets(cfg, tokenizer, seed=seed, stats=stats)


def targets(tokenizer, row) -> str:
    """The text of the tokens that carry a label."""
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


# --------------------------------------------------------------------------------------------------
# Label masking and rendering


def test_instruction_labels_cover_only_the_response_and_eos(tmp_path, tokenizer, cache):
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, cache)
    for row, source in zip(train, ROWS):
        assert targets(tokenizer, row) == source["output"] + tokenizer.eos_token
        assert row["input_ids"] == [t if l == IGNORE_INDEX else l for t, l in zip(row["input_ids"], row["labels"])]


def test_instruction_without_prompt_mask_labels_every_token_but_the_first(tmp_path, tokenizer, cache):
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, cache, mask_prompt=False)
    for row in train:
        assert row["labels"][0] == IGNORE_INDEX  # nothing precedes it
        assert row["labels"][1:] == row["input_ids"][1:]


def test_instruction_prompt_shows_input_block_only_when_there_is_input(tmp_path, tokenizer, cache):
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), tokenizer, cache)
    no_input, with_input = (tokenizer.decode(r["input_ids"]) for r in train)
    assert no_input == "### Instruction:\nWhat is 2 plus 40?\n\n### Response:\n42<|end|>"
    assert "### Input:\nred blue green\n\n### Response:\ngreen blue red<|end|>" in with_input


def test_text_format_trains_on_the_whole_text_from_the_configured_field(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "the sun is warm"}, {"body": "snow is cold"}])
    train, _ = build(path, tokenizer, cache, format="text", text_field="body")
    assert [tokenizer.decode(r["input_ids"]) for r in train] == ["the sun is warm<|end|>", "snow is cold<|end|>"]
    assert all(r["labels"][1:] == r["input_ids"][1:] for r in train)


def test_chat_with_template_renders_it_and_targets_assistant_turns(tmp_path, tokenizer, cache):
    train, _ = build(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), tokenizer, cache, format="chat")
    row = train[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    # Each assistant turn as the template writes it, end-of-turn marker included; users/system masked.
    assert targets(tokenizer, row) == "Lima.<|end|>\nSantiago.<|end|>\n"


def test_chat_without_template_uses_role_headers_and_targets_assistant_turns(tmp_path, tokenizer, cache):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    train, _ = build(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), plain, cache, format="chat")
    row = train[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "### System:\nBe brief.\n\n### User:\nCapital of Peru?\n\n### Assistant:\nLima.<|end|>\n\n"
        "### User:\nAnd of Chile?\n\n### Assistant:\nSantiago.<|end|>\n\n"
    )
    assert targets(tokenizer, row) == "Lima.<|end|>Santiago.<|end|>"


def test_truncation_keeps_the_head_and_drops_samples_left_without_targets(tmp_path, tokenizer, cache):
    full, _ = build(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, cache)
    longest = max(map(len, full["input_ids"]))
    long_prompt = {"instruction": "word " * 60, "input": "", "output": "fine"}
    long_answer = {"instruction": "Say it.", "input": "", "output": "word " * 60}
    stats = DataStats()
    train, _ = build(write_jsonl(tmp_path / "e.jsonl", ROWS + [long_prompt, long_answer]), tokenizer, cache,
                     stats=stats, max_seq_len=longest)
    assert (stats.truncated.count, stats.truncated.first_row) == (2, 6)
    # long_prompt (row 6)'s response starts past the cut: dropped, and reported with its row
    assert (stats.skipped["no_target"].count, stats.skipped["no_target"].first_row) == (1, 6)
    assert train["input_ids"][:-1] == full["input_ids"]
    assert len(train[-1]["input_ids"]) == longest and targets(tokenizer, train[-1]).startswith("word word")


def _words(n_chars: int, seed: int = 0) -> str:
    """Varied text of n_chars characters (words, digits and punctuation: many token boundaries)."""
    rng = random.Random(seed)
    vocab = ["the", "capital", "of", "Peru", "is", "Lima", "42,", "red.", "  ", "\n", "x" * 30, "é"]
    out, size = [], 0
    while size < n_chars:
        out.append(rng.choice(vocab))
        size += len(out[-1]) + 1
    return " ".join(out)[:n_chars]


class RecordingTokenizer:
    """The real tokenizer, recording the characters of text each call to it tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.calls.append([len(t) for t in texts])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


HUGE = 50  # times the character bound: a row far past what tokenizing may hold in memory


@pytest.mark.parametrize("fmt", ["instruction", "text", "chat"])
def test_a_huge_row_is_cut_before_tokenizing_and_keeps_the_tokens_of_the_uncut_text(tmp_path, tokenizer, cache, fmt):
    max_seq_len = 64
    bound = max_chars_before_tokenizing(tokenizer, max_seq_len)
    long_text = _words(HUGE * bound)
    if fmt == "instruction":
        rows = ROWS + [{"instruction": "Repeat it.", "input": "", "output": long_text}]
        full = INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction="Repeat it.") + long_text + tokenizer.eos_token
    elif fmt == "text":
        rows = [{"text": r["output"]} for r in ROWS] + [{"text": long_text}]
        full = long_text + tokenizer.eos_token
    else:
        rows = [{"messages": CHAT}] * len(ROWS) + [{"messages": CHAT[:2] + [{"role": "assistant", "content": long_text}]}]
        full = tokenizer.apply_chat_template(rows[-1]["messages"], tokenize=False)
    stats = DataStats()
    recorder = RecordingTokenizer(tokenizer)
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", rows), recorder, cache, stats=stats, max_seq_len=max_seq_len,
                     format=fmt)
    # The reference: the whole uncut sample through the tokenizer, then its head.
    reference = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert len(reference) > HUGE * max_seq_len
    assert train[len(ROWS)]["input_ids"] == reference[:max_seq_len]
    assert (stats.cut_for_length.count, stats.cut_for_length.first_row) == (1, len(ROWS))
    assert (stats.truncated.count, stats.truncated.first_row) == (1, len(ROWS))
    # The tokenizer never saw more than the bound in one text: memory no longer grows with the row.
    assert max(max(call) for call in recorder.calls) <= bound


def test_a_huge_prompt_leaves_no_target_and_its_row_is_reported(tmp_path, tokenizer, cache):
    bound = max_chars_before_tokenizing(tokenizer, 64)
    rows = ROWS + [{"instruction": _words(HUGE * bound), "input": "", "output": "fine"}]
    stats = DataStats()
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache, stats=stats, max_seq_len=64)
    assert len(train) == len(ROWS)
    assert (stats.skipped["no_target"].count, stats.skipped["no_target"].first_row) == (1, len(ROWS))
    assert stats.cut_for_length.count == 1


def test_tokenizer_calls_are_bounded_in_characters_whatever_the_batch(tmp_path, tokenizer, cache, monkeypatch):
    monkeypatch.setattr(data, "_ENCODE_CHARS", 2000)  # ~40 rows of ~130 characters per call
    recorder = RecordingTokenizer(tokenizer)
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", ROWS * 40), recorder, cache)
    assert all(sum(call) <= 2000 for call in recorder.calls) and len(recorder.calls) > 10
    assert train["input_ids"] == build(write_jsonl(tmp_path / "e.jsonl", ROWS * 40), tokenizer, cache)[0]["input_ids"]


def test_max_chars_bound_covers_the_longest_token(tokenizer):
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert max_chars_before_tokenizing(tokenizer, 100) == (100 + 16) * longest
    # No text of that many characters tokenizes into fewer than max_seq_len tokens, even the worst one:
    # the longest vocabulary entry repeated.
    token = max(tokenizer.get_vocab(), key=len)
    text = tokenizer.convert_tokens_to_string([token]) * (100 + 16)
    assert len(tokenizer(text[: max_chars_before_tokenizing(tokenizer, 100)], add_special_tokens=False)["input_ids"]) >= 100


# --------------------------------------------------------------------------------------------------
# Packing


def test_packed_rows_hold_whole_samples_and_restart_positions(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    unpacked, _ = build(path, tokenizer, cache)
    packed, _ = build(path, tokenizer, cache, packing=True)
    assert len(packed) < len(unpacked)
    pieces = []
    for row in packed:
        assert len(row["input_ids"]) <= 96
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        pieces += [row["input_ids"][a:b] for a, b in itertools.pairwise(starts)]
    assert pieces == unpacked["input_ids"]


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sample_logits_equal_the_sample_alone(tmp_path, tokenizer, cache, attn):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    unpacked, _ = build(path, tokenizer, cache)
    packed, _ = build(path, tokenizer, cache, packing=True)
    model = _tiny_llama(attn)
    batch = collate(packed[:1], tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # a 2D mask would switch off HF's per-sample masks
    with torch.no_grad():
        # use_cache=False: with a cache HF Llama ignores the position_ids restarts (leak measured ~0.5).
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        offset, n_samples = 0, 0
        for ids in unpacked["input_ids"]:
            if offset + len(ids) > len(packed[0]["input_ids"]):
                break
            alone = model(input_ids=torch.tensor([ids])).logits
            # fp32, same matmuls over a different key set: differences are reduction-order rounding (~1e-6).
            torch.testing.assert_close(logits[:, offset : offset + len(ids)], alone, atol=1e-5, rtol=1e-5)
            offset, n_samples = offset + len(ids), n_samples + 1
    assert n_samples >= 2


def test_packed_loss_equals_token_weighted_loss_of_separate_samples(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    unpacked, _ = build(path, tokenizer, cache)
    packed, _ = build(path, tokenizer, cache, packing=True)
    model = _tiny_llama("sdpa")
    with torch.no_grad():
        packed_batch = collate(packed[:], tokenizer.pad_token_id)
        packed_loss = model(**packed_batch, use_cache=False).loss
        total, count = 0.0, 0
        for ids, labels in zip(unpacked["input_ids"], unpacked["labels"]):
            n = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * n
            count += n
    # Same per-token terms in a different summation order: fp32 rounding only.
    torch.testing.assert_close(packed_loss, total / count, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Loader


def numbered(n: int):
    """n rows whose input_ids are [i, i+1], so a batch shows which rows it holds."""
    return datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)],
                                       "labels": [[IGNORE_INDEX, i + 1] for i in range(n)]})


def rows_seen(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["input_ids"][:, 0]]


def rank_loaders(ds, world_size: int, global_batch: int, micro: int = 2, seed: int = 5, **kwargs):
    """The loaders of every rank of a world, as each process of a training job would build its own."""
    accumulation = global_batch // (micro * world_size)
    return [make_dataloader(ds, micro, rank=r, world_size=world_size, accumulation=accumulation, seed=seed,
                            pad_token_id=0, **kwargs) for r in range(world_size)]


def global_batches(loaders, steps: int) -> list[dict[str, torch.Tensor]]:
    """What `steps` optimizer steps read over all ranks: each step's micro batches in (micro step, rank) order."""
    streams = [itertools.chain.from_iterable(itertools.repeat(loader)) for loader in loaders]
    out = []
    for _ in range(steps):
        micro = [next(s) for _ in range(loaders[0].accumulation) for s in streams]
        out.append({k: torch.cat([b[k] for b in micro]) for k in micro[0]})
    return out


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_global_batches_across_epochs_are_the_same_at_1_2_and_4_ranks():
    ds = numbered(30)  # 3 steps of 8 rows per epoch, 6 rows left out: step 4 is the next epoch's first
    runs = {w: global_batches(rank_loaders(ds, w, global_batch=8), steps=10) for w in (1, 2, 4)}
    assert_same_batches(runs[1], runs[2])
    assert_same_batches(runs[1], runs[4])
    epoch_rows = [sorted(int(i) for b in runs[1][e * 3 : e * 3 + 3] for i in b["input_ids"][:, 0]) for e in range(3)]
    assert all(len(set(rows)) == 24 for rows in epoch_rows)  # no row twice within an epoch
    assert epoch_rows[0] != epoch_rows[1]  # each epoch leaves out other rows


def test_every_world_size_counts_the_same_optimizer_steps_per_epoch():
    ds = numbered(495)  # the tiny default: 495 training rows, global batch 16, micro batch 8
    for w in (1, 2):
        loaders = rank_loaders(ds, w, global_batch=16, micro=8)
        assert loaders[0].steps_per_epoch == 30 and len(loaders[0]) == 30 * loaders[0].accumulation


def test_ranks_read_disjoint_rows_that_make_up_each_global_batch():
    ds = numbered(50)
    one = rank_loaders(ds, 1, global_batch=12)[0]
    shards = [rows_seen(loader) for loader in rank_loaders(ds, 3, global_batch=12)]
    assert [len(s) for s in shards] == [16, 16, 16]  # 4 steps x 2 micro batches of 2
    assert len(set(shards[0] + shards[1] + shards[2])) == 48
    order = one.global_order(0).tolist()
    for step in range(4):
        on_ranks = sorted(i for s in shards for i in s[4 * step : 4 * step + 4])
        assert on_ranks == sorted(order[12 * step : 12 * step + 12])


def test_loader_order_is_fixed_by_seed_and_changes_each_epoch():
    ds = numbered(40)
    a = make_dataloader(ds, 4, seed=3, pad_token_id=0)
    first, second = rows_seen(a), rows_seen(a)  # a moves to epoch 1 by itself
    assert first == rows_seen(make_dataloader(ds, 4, seed=3, pad_token_id=0))
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    assert first != rows_seen(make_dataloader(ds, 4, seed=4, pad_token_id=0))


@pytest.mark.parametrize("saved_at, resumed_at", [(2, 1), (2, 4), (4, 1), (1, 2)])
def test_resume_at_another_world_size_continues_the_same_global_batches(saved_at, resumed_at):
    ds = numbered(30)
    uninterrupted = global_batches(rank_loaders(ds, 1, global_batch=8), steps=9)
    first = rank_loaders(ds, saved_at, global_batch=8)
    done = global_batches(first, steps=4)  # epoch 0's 3 steps and the first of epoch 1
    states = [loader.state_dict() for loader in first]
    assert all(s == states[0] for s in states)  # one position, whichever rank saved it
    assert (states[0]["epoch"], states[0]["sample"]) == (1, 8)
    assert first[0].epoch_progress() == 1 + 8 / 30

    resumed = rank_loaders(ds, resumed_at, global_batch=8)
    for loader in resumed:
        loader.load_state_dict(states[0])
        loader.set_epoch(1)  # what a training loop calls at the top of the epoch: keeps the position
    assert_same_batches(done + global_batches(resumed, steps=5), uninterrupted)


def test_state_at_the_end_of_an_epoch_points_at_the_next_one():
    loader = make_dataloader(numbered(30), 2, accumulation=4, seed=5, pad_token_id=0)
    rows_seen(loader)
    assert (loader.state_dict()["epoch"], loader.state_dict()["sample"]) == (1, 0)
    partial = make_dataloader(numbered(30), 2, accumulation=4, seed=5, pad_token_id=0)
    for i, _ in enumerate(partial):
        if i == len(partial) - 1:  # the epoch's last batch taken, the generator not yet exhausted
            break
    assert (partial.state_dict()["epoch"], partial.state_dict()["sample"]) == (1, 0)


def test_state_from_the_per_rank_loader_resumes_after_the_rows_it_had_read():
    # The format main wrote before global batches: this rank's micro batches into the epoch, and the
    # world size and micro batch size they were counted in. That loader dealt the epoch's order out to
    # ranks in turn, so after 3 micro batches of 2 on each of 2 ranks it had read the order's first 12 rows.
    old = {"epoch": 1, "batch": 3, "seed": 5, "world_size": 2, "micro_batch_size": 2, "num_sequences": 41}
    loader = make_dataloader(numbered(41), 2, accumulation=2, seed=5, pad_token_id=0)
    loader.load_state_dict(old)
    order = loader.global_order(1).tolist()
    assert rows_seen(loader) == order[12:40]  # the rest of epoch 1 in whole global batches of 4
    assert loader.epoch == 2


@pytest.mark.parametrize("key, value, message", [
    ("seed", 6, "seed 6 -> 5"), ("global_batch_size", 16, "global_batch_size 16 -> 8"),
    ("num_sequences", 31, "num_sequences 31 -> 30"), ("shuffle", False, "shuffle False -> True"),
])
def test_loader_refuses_a_state_saved_with_another_order_or_global_batch(key, value, message):
    state = rank_loaders(numbered(30), 2, global_batch=8)[0].state_dict()
    with pytest.raises(DataError, match=message):
        rank_loaders(numbered(30), 1, global_batch=8)[0].load_state_dict({**state, key: value})


def test_single_stream_without_drop_last_keeps_a_short_last_batch():
    loader = make_dataloader(numbered(11), 4, shuffle=False, drop_last=False, pad_token_id=0)
    assert len(loader) == 3 and [len(b["input_ids"]) for b in loader] == [4, 4, 3]


def test_several_readers_without_drop_last_are_refused():
    with pytest.raises(ValueError, match="drop_last=False reads one stream"):
        make_dataloader(numbered(11), 4, rank=0, world_size=2, drop_last=False, pad_token_id=0)


def test_loader_with_fewer_rows_than_one_global_batch_raises():
    with pytest.raises(DataError, match=r"5 training sequences are fewer than one global batch \(8 = micro batch 2 "
                                        r"x 2 accumulated x 2 processes\)"):
        make_dataloader(numbered(5), 2, world_size=2, accumulation=2, pad_token_id=0)


def test_collate_right_pads_and_masks_padding_out_of_attention_and_labels():
    batch = collate({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [-100]]}, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_of_packed_rows_starts_the_padding_as_its_own_segment():
    batch = collate({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [-100]],
                     "position_ids": [[0, 1, 0], [0]]}, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert "attention_mask" not in batch


# --------------------------------------------------------------------------------------------------
# Sources, splits, bad data, caching


def _write_all_kinds(tmp_path) -> dict[str, str]:
    base = datasets.Dataset.from_list(ROWS)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    paths["json"] = str(tmp_path / "d.json")
    base.to_csv(tmp_path / "d.csv", index=False)
    paths["csv"] = str(tmp_path / "d.csv")
    base.to_parquet(tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    base.save_to_disk(tmp_path / "saved")
    paths["saved"] = str(tmp_path / "saved")
    datasets.DatasetDict({"train": base}).save_to_disk(tmp_path / "saved-dict")
    paths["saved-dict"] = str(tmp_path / "saved-dict")
    return paths


def test_every_source_kind_gives_the_same_tokens(tmp_path, tokenizer, cache):
    # CSV matters most: "42" and "8" must stay text, not become integers.
    results = {kind: build(p, tokenizer, cache)[0]["input_ids"] for kind, p in _write_all_kinds(tmp_path).items()}
    assert all(ids == results["jsonl"] for ids in results.values()), [k for k, v in results.items()]


def test_eval_fraction_holds_out_rows_disjoint_from_training(tmp_path, tokenizer, cache):
    rows = [{"instruction": f"Which number comes after {i}?", "input": "", "output": str(i + 1)} for i in range(40)]
    cfg = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25, cache_dir=cache)
    train, eval_ = build_datasets(cfg, tokenizer, seed=0)
    assert (len(train), len(eval_)) == (30, 10)
    assert not {tuple(r) for r in train["input_ids"]} & {tuple(r) for r in eval_["input_ids"]}
    assert build_datasets(cfg, tokenizer, seed=0)[1]["input_ids"] == eval_["input_ids"]


def test_eval_path_is_used_instead_of_a_split(tmp_path, tokenizer, cache):
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", ROWS), eval_path=write_jsonl(tmp_path / "b.jsonl", ROWS[:2]),
                     cache_dir=cache)
    train, eval_ = build_datasets(cfg, tokenizer, seed=0)
    assert (len(train), len(eval_)) == (len(ROWS), 2)


def test_missing_file_raises_a_data_error_naming_it(tmp_path, tokenizer, cache):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        build(tmp_path / "nope.jsonl", tokenizer, cache)


@pytest.mark.parametrize("name, content", [("empty.csv", "instruction,input,output\n"), ("empty.jsonl", "")])
def test_empty_file_raises_a_data_error(tmp_path, tokenizer, cache, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="empty"):
        build(tmp_path / name, tokenizer, cache)


def test_unparsable_jsonl_names_the_line_and_the_fix(tmp_path, tokenizer, cache):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 3: Expecting value \(column 32\); each line of a "
                                        r"\.jsonl file .* must be one JSON object"):
        build(tmp_path / "broken.jsonl", tokenizer, cache)


@pytest.mark.parametrize("name, content, where", [
    ("list.json", '[{"instruction": "a", "output": "b"},\n 7]', "item 1 is a JSON int, not an object"),
    ("cut.json", '[{"instruction": "a", "output": "b"},\n {"instruction": ', r"line 2: Expecting value \(column 18\)"),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n["a", "b"]\n', "line 2 is a JSON list, not an object"),
])
def test_json_that_is_not_a_list_of_objects_names_where(tmp_path, tokenizer, cache, name, content, where):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}: {where}"):
        build(tmp_path / name, tokenizer, cache)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_text_file_with_non_utf8_bytes_names_the_line(tmp_path, tokenizer, cache, name):
    good = [json.dumps(r) for r in ROWS[:2]] if name != "d.csv" else ["instruction,input,output", "a,,b"]
    bad = '{"instruction": "caf\xe9", "input": "", "output": "b"}' if name != "d.csv" else "caf\xe9,,b"
    lines = good + [bad] if name != "d.json" else ["[" + good[0] + ",", bad + "]"]
    (tmp_path / name).write_bytes("\n".join(lines).encode("latin-1"))
    line = len(lines)
    with pytest.raises(DataError, match=rf"{name}: line {line} is not UTF-8 text \(byte \d+\); re-save the file as UTF-8"):
        build(tmp_path / name, tokenizer, cache)


def test_non_utf8_byte_split_across_scan_chunks_is_placed_exactly(tmp_path, tokenizer, cache, monkeypatch):
    monkeypatch.setattr(data, "_SCAN_BYTES", 16)
    text = (json.dumps(ROWS[0]) + "\n").encode() * 3 + "é".encode()[:1] + b"x\n"  # a cut 2-byte character
    (tmp_path / "d.jsonl").write_bytes(text)
    offset = len(text) - 3
    with pytest.raises(DataError, match=rf"line 4 is not UTF-8 text \(byte {offset}\)"):
        build(tmp_path / "d.jsonl", tokenizer, cache)


def test_saved_dataset_holding_non_utf8_text_is_a_data_error(tmp_path, tokenizer, cache):
    import pyarrow as pa

    # pyarrow keeps string bytes unchecked when built from buffers, as its JSON reader does.
    raw = [b"caf\xe9"] + [r["instruction"].encode() for r in ROWS[1:]]
    offsets = np.cumsum([0] + [len(b) for b in raw]).astype(np.int32)
    bad = pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(raw))])
    table = pa.table({"instruction": bad, "input": [r["input"] for r in ROWS], "output": [r["output"] for r in ROWS]})
    datasets.Dataset(table).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved: one of rows 0 to 5 \(counting from 0\) holds text that is not UTF-8"):
        build(tmp_path / "saved", tokenizer, cache)


def test_malformed_csv_line_and_broken_parquet_are_one_line_errors(tmp_path, tokenizer, cache):
    (tmp_path / "d.csv").write_text("instruction,input,output\na,,b\na,b,c,d\n")
    with pytest.raises(DataError, match=r"could not read .*d.csv as CSV: .*Expected 3 fields in line 3, saw 4; "
                                        r"fix that line"):
        build(tmp_path / "d.csv", tokenizer, cache)
    (tmp_path / "d.parquet").write_bytes(b"PAR1 but not parquet")
    with pytest.raises(DataError, match=r"could not read .*d.parquet as Parquet: .*; re-export it"):
        build(tmp_path / "d.parquet", tokenizer, cache)


def test_directory_named_like_a_file_and_folder_without_data_are_refused(tmp_path, tokenizer, cache):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=r"train.jsonl is a directory, not a .jsonl file: name the data file itself"):
        build(tmp_path / "train.jsonl", tokenizer, cache)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"folder is a folder with no .* files and no dataset written by save_to_disk"):
        build(tmp_path / "folder", tokenizer, cache)


def test_non_utf8_file_inside_a_data_folder_is_named(tmp_path, tokenizer, cache):
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", ROWS)
    (tmp_path / "folder" / "b.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"folder/b.jsonl: line 1 is not UTF-8"):
        build(tmp_path / "folder", tokenizer, cache)


@contextlib.contextmanager
def unreadable(path):
    """`path` unreadable to this process: mode 000, and as root (which reads anyway) a nobody effective uid."""
    os.chmod(path, 0)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)  # the real uid stays 0, so it can be switched back
    try:
        yield
    finally:
        if as_root:
            os.seteuid(0)
        os.chmod(path, 0o644)


def test_unreadable_file_is_named_with_the_fix(tokenizer, cache):
    folder = Path(tempfile.mkdtemp(prefix="lora-dist-unreadable-"))  # under /tmp: every user may traverse it
    try:
        folder.chmod(0o755)
        path = write_jsonl(folder / "d.jsonl", ROWS)
        with unreadable(path), pytest.raises(DataError, match=r"d.jsonl cannot be read \(Permission denied\): "
                                                                r"check its permissions"):
            build(path, tokenizer, cache)
    finally:
        shutil.rmtree(folder)


def test_malformed_row_error_names_the_row_and_the_missing_field(tmp_path, tokenizer, cache):
    rows = ROWS[:3] + [{"instruction": "What is 1 plus 1?", "input": ""}] + ROWS[3:]
    with pytest.raises(DataError, match=r"row 3 \(counting from 0\): 'output' is missing.*skip_malformed"):
        build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache)


def test_skip_malformed_reports_each_reason_with_its_first_row(tmp_path, tokenizer, cache):
    rows = ROWS + [{"instruction": "", "input": "", "output": "x"},       # row 6: empty
                   {"instruction": "q", "input": "", "output": None},     # row 7: missing
                   {"instruction": "q", "input": 3, "output": "y"},       # row 8: not text
                   {"instruction": "", "input": "", "output": "z"}]       # row 9: empty
    stats = DataStats()
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache, stats=stats, skip_malformed=True)
    assert len(train) == len(ROWS) == stats.train_samples
    assert {k: (t.count, t.first_row) for k, t in stats.skipped.items()} == {
        "empty_field": (2, 6), "missing_field": (1, 7), "not_text": (1, 8)}
    assert (stats.rows_read, stats.rows_skipped) == (10, 4)


def test_data_report_counts_tokens_and_flattens_for_metrics(tmp_path, tokenizer, cache):
    rows = ROWS + [{"instruction": "q", "input": "", "output": None}]
    stats = DataStats()
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache, stats=stats, skip_malformed=True,
                     eval_path=write_jsonl(tmp_path / "e.jsonl", [{"instruction": "", "output": "x"}] + ROWS[:2]))
    assert stats.train_tokens == sum(map(len, train["input_ids"]))
    assert stats.train_target_tokens == sum(t != IGNORE_INDEX for row in train["labels"] for t in row)
    flat = stats.as_dict()
    assert flat == {
        "data/rows_read": 10, "data/rows_skipped": 2,
        "data/skipped/empty_field": 1, "data/skipped/empty_field/first_row": 0,  # row 0 of e.jsonl
        "data/skipped/missing_field": 1, "data/skipped/missing_field/first_row": 6,
        "data/truncated": 0, "data/cut_for_length": 0,
        "data/train_samples": 6, "data/eval_samples": 2, "data/train_sequences": 6,
        "data/train_tokens": stats.train_tokens, "data/train_target_tokens": stats.train_target_tokens,
    }
    assert all(type(v) is int for v in flat.values())
    line = stats.summary()
    assert "\n" not in line
    assert line.startswith("data: 10 rows read, 2 skipped (empty_field 1, first: e.jsonl row 0; "
                           "missing_field 1, first: d.jsonl row 6), 6 train / 2 eval samples")
    assert f"{stats.train_tokens:,} train tokens ({stats.train_target_tokens:,} targets)" in line


def test_skip_reasons_are_a_closed_list():
    with pytest.raises(ValueError, match="unknown skip reason 'bad'"):
        DataStats().skip("bad", 1, 0, "d.jsonl")


def test_chat_rows_without_an_assistant_turn_are_malformed(tmp_path, tokenizer, cache):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="row 1 .*no assistant message"):
        build(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, cache, format="chat")


def test_missing_column_error_lists_the_columns_present(tmp_path, tokenizer, cache):
    with pytest.raises(DataError, match=r"no 'text' column \(columns: instruction, input, output\)"):
        build(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer, cache, format="text")


def test_problems_lists_every_config_problem_at_once(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "missing.jsonl"), format="xml", max_seq_len=0, eval_fraction=1.5)
    found = cfg.problems()
    assert len(found) == 4, found
    assert any("data.path" in p for p in found) and any("data.format" in p for p in found)
    assert DataConfig(path="some-org/some-dataset").problems() == []  # a hub name is not checked offline


def test_second_build_loads_the_tokenization_from_the_cache(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first, _ = build(path, tokenizer, cache, packing=True)
    files = {f["filename"]: os.stat(f["filename"]).st_mtime_ns for f in first.cache_files}
    reloaded = build_tiny_tokenizer()  # an equal tokenizer, not the same object
    second, _ = build(path, reloaded, cache, packing=True)
    assert [f["filename"] for f in second.cache_files] == list(files)
    assert all(os.stat(f).st_mtime_ns == t for f, t in files.items())  # read back, not rewritten
    assert second["input_ids"] == first["input_ids"]


def test_changing_max_seq_len_misses_the_cache(tmp_path, tokenizer, cache):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a, _ = build(path, tokenizer, cache, max_seq_len=96, mask_prompt=False)
    b, _ = build(path, tokenizer, cache, max_seq_len=12, mask_prompt=False)
    assert a.cache_files != b.cache_files and max(map(len, b["input_ids"])) == 12
