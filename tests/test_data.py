"""lora_dist.data: loading, label masking, chat rendering, packing without leaks, and the resumable loader."""

from __future__ import annotations

import copy
import json
import os

import datasets
import pytest
import torch

from lora_dist.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    DataStats,
    build_datasets,
    collate,
    make_dataloader,
)
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
    assert (stats.truncated, stats.no_target_dropped) == (2, 1)  # long_prompt's response starts past the cut
    assert train["input_ids"][:-1] == full["input_ids"]
    assert len(train[-1]["input_ids"]) == longest and targets(tokenizer, train[-1]).startswith("word word")


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
        pieces += [row["input_ids"][a:b] for a, b in zip(starts, starts[1:])]
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


def test_loader_order_is_fixed_by_seed_and_changes_each_epoch():
    ds = numbered(40)
    a = make_dataloader(ds, 4, seed=3, pad_token_id=0)
    b = make_dataloader(ds, 4, seed=3, pad_token_id=0)
    first, second = rows_seen(a), rows_seen(a)  # a moves to epoch 1 by itself
    assert first == rows_seen(b)
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    assert first != rows_seen(make_dataloader(ds, 4, seed=4, pad_token_id=0))


def test_rank_shards_are_disjoint_and_together_cover_the_global_order():
    ds = numbered(50)
    one = make_dataloader(ds, 2, seed=1, pad_token_id=0)
    shards = [rows_seen(make_dataloader(ds, 2, rank=r, world_size=3, seed=1, pad_token_id=0)) for r in range(3)]
    assert all(len(s) == 16 for s in shards)  # 50 // 3 = 16 per rank, 8 batches of 2
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    assert not set(shards[0]) & set(shards[2])
    # A step of 1 micro batch on each of 3 ranks holds the samples of 3 micro batches of one process.
    global_order = one.indices(0)
    for step in range(8):
        on_ranks = sorted(i for s in shards for i in s[2 * step : 2 * step + 2])
        assert on_ranks == sorted(global_order[6 * step : 6 * step + 6])


def test_resumed_loader_yields_exactly_the_batches_of_an_uninterrupted_run():
    ds = numbered(30)
    reference = make_dataloader(ds, 4, seed=5, pad_token_id=0)
    uninterrupted = [rows_seen(reference) for _ in range(3)]  # 3 epochs of 7 batches

    first = make_dataloader(ds, 4, seed=5, pad_token_id=0)
    seen = [rows_seen(first)]
    partial = []
    for batch in first:  # stop after 3 batches of epoch 1
        partial += batch["input_ids"][:, 0].tolist()
        if len(partial) == 12:
            break
    state = first.state_dict()

    resumed = make_dataloader(ds, 4, seed=5, pad_token_id=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop calls at the top of the epoch: keeps the position
    seen.append(partial + rows_seen(resumed))
    seen.append(rows_seen(resumed))
    assert state["epoch"] == 1 and state["batch"] == 3
    assert seen == uninterrupted


def test_loader_refuses_state_saved_with_another_world_size():
    ds = numbered(30)
    state = make_dataloader(ds, 2, rank=0, world_size=2, pad_token_id=0).state_dict()
    with pytest.raises(DataError, match="world_size 2 -> 1"):
        make_dataloader(ds, 2, pad_token_id=0).load_state_dict(state)


def test_loader_without_drop_last_gives_every_rank_the_same_number_of_batches():
    ds = numbered(11)
    loaders = [make_dataloader(ds, 4, rank=r, world_size=2, shuffle=False, drop_last=False, pad_token_id=0)
               for r in range(2)]
    seen = [rows_seen(l) for l in loaders]
    assert [len(l) for l in loaders] == [2, 2]
    assert len(seen[0]) == len(seen[1]) == 6  # the last batch of each rank is partial (6 = 4 + 2)
    assert set(seen[0] + seen[1]) == set(range(11))  # 12 slots: sample 0 is repeated once to even them


def test_loader_with_fewer_rows_than_one_batch_per_rank_raises():
    with pytest.raises(DataError, match="fewer than one micro batch"):
        make_dataloader(numbered(5), 4, world_size=2, pad_token_id=0)


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


def test_unparsable_file_error_gives_the_parser_reason(tmp_path, tokenizer, cache):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match="could not load .*broken.jsonl as local data: .*JSON parse error"):
        build(tmp_path / "broken.jsonl", tokenizer, cache)


def test_malformed_row_error_names_the_row_and_the_missing_field(tmp_path, tokenizer, cache):
    rows = ROWS[:3] + [{"instruction": "What is 1 plus 1?", "input": ""}] + ROWS[3:]
    with pytest.raises(DataError, match=r"row 3 \(counting from 0\): 'output' is missing.*skip_malformed"):
        build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache)


def test_skip_malformed_drops_and_counts_bad_rows(tmp_path, tokenizer, cache):
    rows = ROWS + [{"instruction": "", "input": "", "output": "x"}, {"instruction": "q", "input": "", "output": None}]
    stats = DataStats()
    train, _ = build(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, cache, stats=stats, skip_malformed=True)
    assert stats.malformed_skipped == 2 and len(train) == len(ROWS)


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
