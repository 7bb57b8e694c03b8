"""Datasets -> tokens: loading, templates, label masking, packing, and a resumable loader.

The pipeline, top to bottom:
    load (file | saved folder | hub) -> check rows (error or skip) -> split off eval
    -> tokenize with labels (cached by fingerprint) -> drop rows with no target -> pack (optional)
and `make_dataloader` turns a tokenized dataset into per-rank, per-epoch, resumable batches.

Label convention: `labels` equal `input_ids` where the loss applies and IGNORE_INDEX (-100) elsewhere;
the model shifts them (token t predicts labels[t + 1]). The first token of every sample is never a
target, so packing samples end to end adds no target that crosses from one sample into the next.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lora_dist.errors import DataError

IGNORE_INDEX = -100
FORMATS = ("text", "instruction", "chat")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt of an instruction row; the response and EOS follow. Rows without input drop the Input block."""
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Part of every cache fingerprint: any edit of this module (templates, masking, packing) invalidates
# tokenizations cached by the older code, with no version number to forget to bump.
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@dataclass
class DataConfig:
    """Where the training data comes from and how it becomes token sequences (the `data:` section)."""

    path: str = ""
    """Local .json/.jsonl/.csv/.parquet file, a folder written by `save_to_disk`, or a hub dataset name."""
    format: str = "instruction"
    """"text" (one text column), "instruction" (instruction / input / output) or "chat" (messages)."""
    max_seq_len: int = 512
    """Tokens per sequence: longer samples are truncated (the head is kept); packed rows hold at most this."""
    text_field: str = "text"
    """Column holding the text when format is "text"."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation, in [0, 1); 0 for none. Ignored when eval_path is set."""
    eval_path: str | None = None
    """Separate evaluation data (same kinds of path and format as `path`); replaces eval_fraction."""
    split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict folder."""
    packing: bool = False
    """Pack short samples into sequences of up to max_seq_len tokens; position_ids restart at each sample
    so attention never crosses samples (the model must be called with use_cache=False)."""
    mask_prompt: bool = True
    """Loss on response tokens only (assistant turns for chat); False trains on every token."""
    skip_malformed: bool = False
    """Skip rows missing needed fields and count them, instead of stopping at the first one."""
    shuffle: bool = True
    """Shuffle the training order each epoch (deterministic from the train seed); eval is never shuffled."""
    cache_dir: str | None = None
    """Where `datasets` keeps loaded files and cached tokenizations (None: its default, ~/.cache/huggingface)."""
    num_proc: int | None = None
    """Processes for tokenization (None: in this process)."""

    def problems(self) -> list[str]:
        """Every problem with this config, one line each naming the key and the fix (empty when valid)."""
        found = []
        if not isinstance(self.path, str) or not self.path.strip():
            found.append("data.path is empty: set it to a .jsonl/.json/.csv/.parquet file, "
                         "a saved dataset folder or a hub dataset name")
        else:
            found += _path_problems("data.path", self.path)
        if self.eval_path is not None:
            found += _path_problems("data.eval_path", self.eval_path)
        if self.format not in FORMATS:
            found.append(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not _is_int(self.max_seq_len) or self.max_seq_len < 2:
            found.append(f"data.max_seq_len must be an integer of at least 2 "
                         f"(one prompt token and one target), got {self.max_seq_len!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            found.append(f"data.text_field must be a column name, got {self.text_field!r}")
        if (not isinstance(self.eval_fraction, (int, float)) or isinstance(self.eval_fraction, bool)
                or not 0 <= self.eval_fraction < 1):
            found.append(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if not isinstance(self.split, str) or not self.split:
            found.append(f"data.split must be a split name such as 'train', got {self.split!r}")
        for name in ("packing", "mask_prompt", "skip_malformed", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                found.append(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        if self.num_proc is not None and (not _is_int(self.num_proc) or self.num_proc < 1):
            found.append(f"data.num_proc must be a positive integer or null, got {self.num_proc!r}")
        return found


@dataclass
class DataStats:
    """Counts from one `build_datasets` call, for the run summary."""

    rows_read: int = 0
    """Rows in the source (train source plus eval_path source when set)."""
    malformed_skipped: int = 0
    """Rows skipped for missing or wrong-typed fields (only with skip_malformed)."""
    truncated: int = 0
    """Samples cut to max_seq_len."""
    no_target_dropped: int = 0
    """Samples dropped because truncation left them no target token."""
    train_samples: int = 0
    """Tokenized training samples (before packing)."""
    eval_samples: int = 0
    """Tokenized eval samples (before packing)."""
    train_sequences: int = 0
    """Training rows the loader sees (packed rows when packing)."""
    train_target_tokens: int = 0
    """Tokens with a label in the training set."""


# --------------------------------------------------------------------------------------------------
# build_datasets


def build_datasets(
    cfg: DataConfig, tokenizer: Any, *, seed: int, stats: DataStats | None = None
) -> tuple[Any, Any | None]:
    """Load, check, split and tokenize the data of `cfg`.

    Args:
        cfg: the data section; validated here too (`cfg.problems()`).
        tokenizer: a transformers tokenizer; its chat template renders "chat" rows when it has one.
        seed: seed of the held-out split.
        stats: filled with counts (rows read, skipped, truncated, ...) when given.

    Returns:
        (train, eval or None): `datasets.Dataset`s with columns input_ids and labels (lists of ints, at
        most max_seq_len long), plus position_ids when packing. Tokenizing and packing are cached by
        `datasets` under a fingerprint of the source, the config and the tokenizer.

    Raises:
        DataError: missing file, unreadable data, empty dataset, or a malformed row (without skip_malformed).
    """
    stats = stats if stats is not None else DataStats()
    problems = cfg.problems()
    if problems:
        raise DataError("; ".join(problems))

    train_raw = _checked_rows(_load(cfg.path, cfg), cfg, cfg.path, stats)
    if cfg.eval_path is not None:
        eval_raw = _checked_rows(_load(cfg.eval_path, cfg), cfg, cfg.eval_path, stats)
    elif cfg.eval_fraction > 0:
        train_raw, eval_raw = _split(train_raw, cfg.eval_fraction, seed, cfg.path)
    else:
        eval_raw = None

    train, stats.train_target_tokens = _tokenized(train_raw, cfg, tokenizer, stats, cfg.path)
    stats.train_samples = len(train)
    eval_ = None
    if eval_raw is not None:
        eval_, _ = _tokenized(eval_raw, cfg, tokenizer, stats, cfg.eval_path or cfg.path)
        stats.eval_samples = len(eval_)

    if cfg.packing:
        train = _packed(train, cfg)
        eval_ = _packed(eval_, cfg) if eval_ is not None else None
    stats.train_sequences = len(train)
    return train, eval_


def _load(path: str, cfg: DataConfig):
    """One `datasets.Dataset` from a local file, a saved folder or the hub."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_file():
            if local.stat().st_size == 0:
                raise DataError(f"{path}: the data file is empty")
            builder = FILE_TYPES.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type {local.suffix!r}; "
                                f"use one of {', '.join(FILE_TYPES)} or a saved dataset folder")
            kwargs = {"features": _csv_string_features(local)} if builder == "csv" else {}
            return datasets.load_dataset(builder, data_files=str(local), split="train",
                                         cache_dir=cfg.cache_dir, **kwargs)
        if local.is_dir():
            if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
                return _pick_split(datasets.load_from_disk(str(local)), cfg.split, path)
            return datasets.load_dataset(str(local), split=cfg.split, cache_dir=cfg.cache_dir)
        if _looks_local(path):
            raise DataError(f"data file not found: {path}")
        return datasets.load_dataset(path, split=cfg.split, cache_dir=cfg.cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, DatasetGenerationError, HTTP errors)
        where = "local data" if local.exists() else "a hub dataset (is it public and are you online?)"
        raise DataError(f"could not load {path} as {where}: {_root_message(e)}") from e


def _root_message(error: BaseException) -> str:
    """First line of the innermost explicit cause ("JSON parse error ... in row 1", not "an error occurred")."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _pick_split(loaded, split: str, path: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has splits {', '.join(loaded)}, not {split!r}: set data.split")
        return loaded[split]
    return loaded


def _csv_string_features(path: Path):
    """Read every CSV column as text: pandas would make "42" an int and an empty cell a float NaN."""
    import datasets

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty CSV file (no header row)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _checked_rows(ds, cfg: DataConfig, source: str, stats: DataStats):
    """The rows of ds usable for cfg.format; raises on the first bad one unless skip_malformed."""
    stats.rows_read += len(ds)
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    needed = _needed_columns(cfg)
    missing = [c for c in needed if c not in ds.column_names]
    if missing and not (cfg.format == "instruction" and missing == ["input"]):
        wanted = {"text": f"a {cfg.text_field!r} column (set data.text_field to the text column)",
                  "instruction": "instruction and output columns (input optional)",
                  "chat": "a messages column (a list of {role, content})"}[cfg.format]
        raise DataError(f"{source} has no {', '.join(repr(c) for c in missing)} column "
                        f"(columns: {', '.join(ds.column_names) or 'none'}); "
                        f"data.format={cfg.format} needs {wanted}")

    present = [c for c in needed if c in ds.column_names]
    bad: list[tuple[int, str]] = []
    index = 0
    for batch in ds.select_columns(present).iter(batch_size=1000):
        for j in range(len(batch[present[0]])):
            problem = _row_problem({c: batch[c][j] for c in present}, cfg)
            if problem:
                bad.append((index, problem))
            index += 1
    if not bad:
        return ds
    if not cfg.skip_malformed:
        i, problem = bad[0]
        more = f" ({len(bad) - 1} more malformed rows)" if len(bad) > 1 else ""
        raise DataError(f"{source}: row {i} (counting from 0): {problem}{more}; "
                        f"fix the data or set data.skip_malformed=true to skip such rows")
    stats.malformed_skipped += len(bad)
    if len(bad) == len(ds):
        raise DataError(f"{source}: all {len(ds)} rows are malformed (row 0: {bad[0][1]})")
    bad_rows = {i for i, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in bad_rows])


def _needed_columns(cfg: DataConfig) -> list[str]:
    return {"text": [cfg.text_field], "instruction": ["instruction", "input", "output"],
            "chat": ["messages"]}[cfg.format]


def _row_problem(row: dict[str, Any], cfg: DataConfig) -> str | None:
    """Why a row cannot be rendered for cfg.format, or None when it can."""
    if cfg.format == "text":
        return _text_problem(row, cfg.text_field)
    if cfg.format == "instruction":
        problem = _text_problem(row, "instruction") or _text_problem(row, "output")
        if problem is None and row.get("input") is not None and not isinstance(row["input"], str):
            problem = f"'input' must be text, got {type(row['input']).__name__}"
        return problem
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' is missing or not a non-empty list"
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{k}] has no 'role'"
        if not isinstance(message.get("content"), str):
            return f"messages[{k}] has no text 'content'"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "no assistant message with content (nothing to learn)"
    return None


def _text_problem(row: dict[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return f"'{column}' is missing"
    if not isinstance(value, str):
        return f"'{column}' must be text, got {type(value).__name__}"
    if not value.strip():
        return f"'{column}' is empty"
    return None


def _split(ds, eval_fraction: float, seed: int, source: str):
    """Random held-out split; at least one row on each side."""
    n_eval = max(1, round(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise DataError(f"{source}: {len(ds)} rows are too few to hold out data.eval_fraction={eval_fraction} "
                        f"and still train; add rows, lower data.eval_fraction or set data.eval_path")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------------------------------
# Rendering and tokenizing


def _segments(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, bos: str, eos: str) -> list[tuple[str, bool]]:
    """The text of one row as consecutive (text, is_target) pieces; their concatenation is the sample.

    instruction: [BOS? + prompt, False], [output + EOS, True]. text: [BOS? + text + EOS, True].
    chat: the tokenizer's chat template when it has one, else "### Role:\n...\n\n" blocks with EOS
    closing each assistant turn; targets are the assistant turns (everything when mask_prompt is off).
    """
    if cfg.format == "text":
        pieces = [(bos + row[cfg.text_field] + eos, True)]
    elif cfg.format == "instruction":
        template = INSTRUCTION_TEMPLATE if row.get("input") else INSTRUCTION_TEMPLATE_NO_INPUT
        prompt = bos + template.format(instruction=row["instruction"], input=row.get("input") or "")
        pieces = [(prompt, False), (row["output"] + eos, True)]
    elif getattr(tokenizer, "chat_template", None):
        pieces = _chat_template_segments(row["messages"], tokenizer)
    else:
        pieces = [(bos, False)]
        for message in row["messages"]:
            header = f"### {message['role'].capitalize()}:\n"
            if message["role"] == "assistant":
                pieces += [(header, False), (message["content"] + eos, True), ("\n\n", False)]
            else:
                pieces.append((header + message["content"] + "\n\n", False))
    if not cfg.mask_prompt:
        pieces = [(text, True) for text, _ in pieces]
    return [(text, target) for text, target in pieces if text]


def _chat_template_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a templated conversation at assistant turns by rendering growing prefixes of it.

    A turn's text is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True): the
    reply plus whatever end-of-turn markers the template writes, which the model must learn to emit.
    """
    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else _empty_prompt_length(render)
        end = len(render(messages[: i + 1], False))
        if not (done <= start <= end <= len(full)):
            raise DataError("the tokenizer's chat template does not render a conversation as the sum of its "
                            "turns, so assistant turns cannot be located; use format 'instruction' or 'text'")
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return pieces


def _empty_prompt_length(render) -> int:
    """Length of the generation prompt of an empty conversation (0 where the template needs a message)."""
    try:
        return len(render([], True))
    except Exception:  # templates may index messages[0]
        return 0


def _bos_text(tokenizer: Any) -> str:
    """BOS as text when this tokenizer adds one by itself (Llama, Mistral), else "" (Qwen, GPT-2)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == tokenizer.bos_token_id else ""


def _tokenize_batch(batch: dict[str, list], cfg: DataConfig, tokenizer: Any) -> dict[str, list]:
    """Batched map function: rows -> input_ids, labels (-100 off target), num_targets, truncated.

    The whole sample is tokenized at once (so tokens are what the tokenizer gives for the full text),
    and each piece's token span is found as the common prefix of the tokens of the text up to that piece.
    A token that straddles a piece boundary goes to the later piece.
    """
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    bos, eos = _bos_text(tokenizer), tokenizer.eos_token or ""
    segments = [_segments(row, cfg, tokenizer, bos, eos) for row in rows]
    fulls = ["".join(text for text, _ in pieces) for pieces in segments]
    prefixes = [_prefix_texts(pieces) for pieces in segments]
    ids_of = _encode(tokenizer, fulls + [p for ps in prefixes for p in ps])
    full_ids, prefix_ids = ids_of[: len(rows)], iter(ids_of[len(rows):])

    out: dict[str, list] = {"input_ids": [], "labels": [], "num_targets": [], "truncated": []}
    for ids, pieces, prefix_texts in zip(full_ids, segments, prefixes):
        bounds = [0] + [_common_prefix(next(prefix_ids), ids) for _ in prefix_texts] + [len(ids)]
        labels = [IGNORE_INDEX] * len(ids)
        for (_, target), start, end in zip(pieces, bounds, bounds[1:]):
            if target:
                labels[start:end] = ids[start:end]
        if labels:
            labels[0] = IGNORE_INDEX  # nothing precedes the first token, so it is never a target
        labels = labels[: cfg.max_seq_len]
        out["input_ids"].append(ids[: cfg.max_seq_len])
        out["labels"].append(labels)
        out["num_targets"].append(sum(1 for t in labels if t != IGNORE_INDEX))
        out["truncated"].append(len(ids) > cfg.max_seq_len)
    return out


def _prefix_texts(pieces: list[tuple[str, bool]]) -> list[str]:
    """Text up to the end of each piece but the last."""
    ends, total = [], ""
    for text, _ in pieces[:-1]:
        total += text
        ends.append(total)
    return ends


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # Special tokens come from the rendered text (BOS/EOS/template markers), never added a second time.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _tokenized(raw, cfg: DataConfig, tokenizer: Any, stats: DataStats, source: str) -> tuple[Any, int]:
    """Tokenize raw rows (cached) and drop samples left without targets; returns (dataset, target tokens)."""
    fingerprint = _fingerprint(raw._fingerprint, "tokenize", cfg.format, cfg.text_field, cfg.max_seq_len,
                               cfg.mask_prompt, _tokenizer_fingerprint(tokenizer))
    tokenized = raw.map(
        _tokenize_batch,
        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer},
        batched=True,
        remove_columns=raw.column_names,
        new_fingerprint=fingerprint,
        num_proc=cfg.num_proc,
        desc="tokenizing",
    )
    stats.truncated += sum(tokenized["truncated"])
    kept = tokenized.filter(
        _has_targets, batched=True, input_columns=["num_targets"],
        new_fingerprint=_fingerprint(fingerprint, "has-targets"), desc="dropping samples without targets",
    )
    stats.no_target_dropped += len(tokenized) - len(kept)
    if len(kept) == 0:
        raise DataError(f"{source}: no sample keeps a target token within data.max_seq_len={cfg.max_seq_len} "
                        f"(prompts are longer); raise data.max_seq_len")
    return kept.remove_columns(["num_targets", "truncated"]), sum(kept["num_targets"])


def _has_targets(num_targets: list[int]) -> list[bool]:
    return [n > 0 for n in num_targets]


# --------------------------------------------------------------------------------------------------
# Packing


def _packed(ds, cfg: DataConfig):
    """Greedy in-order packing of samples into rows of at most max_seq_len tokens (cached)."""
    return ds.map(
        _pack_batch,
        fn_kwargs={"max_seq_len": cfg.max_seq_len},
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        new_fingerprint=_fingerprint(ds._fingerprint, "pack", cfg.max_seq_len),
        desc="packing",
    )


def _pack_batch(batch: dict[str, list], max_seq_len: int) -> dict[str, list]:
    """Concatenate samples while they fit; position_ids restart at 0 where a sample starts."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    row: dict[str, list] = {k: [] for k in out}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        if row["input_ids"] and len(row["input_ids"]) + len(ids) > max_seq_len:
            for k in out:
                out[k].append(row[k])
            row = {k: [] for k in out}
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += list(range(len(ids)))
    if row["input_ids"]:
        for k in out:
            out[k].append(row[k])
    return out


# --------------------------------------------------------------------------------------------------
# Loader


class ResumableLoader:
    """Deterministic micro batches of one rank's shard, reshuffled each epoch, with a resumable position.

    Epoch e orders the whole dataset by a permutation seeded from (seed, e); rank r takes every
    world_size-th index from r, so the ranks' shards are disjoint and together cover one global order:
    with micro batch m and k micro batches per rank per step, a step over n ranks sees the same samples as
    one process taking k*n micro batches. Iterating yields the rest of the current epoch, then moves to
    the next one; `state_dict()` after any batch resumes at the batch that follows it.
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad_token_id: int,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: pass the tokenizer's pad id (or its EOS id when it has none)")
        self.dataset = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.pad_token_id = pad_token_id
        self.epoch = 0
        self.batch = 0  # batches of this epoch already yielded
        n = len(self.dataset)
        # Every rank gets the same number of samples, so collectives line up: drop the uneven tail, or
        # (drop_last=False) repeat the first few samples of the order, as DistributedSampler does.
        self._per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        if len(self) == 0:
            raise DataError(f"{n} sequences are fewer than one micro batch per rank "
                            f"(micro_batch_size {micro_batch_size} x {world_size} ranks): "
                            f"add data or lower train.micro_batch_size")

    def __len__(self) -> int:
        """Micro batches per epoch on this rank."""
        if self.drop_last:
            return self._per_rank // self.micro_batch_size
        return math.ceil(self._per_rank / self.micro_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; a no-op when already in `epoch` (keeps a resumed position)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def indices(self, epoch: int) -> list[int]:
        """Dataset indices this rank reads in `epoch`, in order."""
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(n)
        else:
            order = np.arange(n)
        total = self._per_rank * self.world_size
        order = np.concatenate([order, order[: total - n]]) if total > n else order[:total]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = self.indices(self.epoch)
        m = self.micro_batch_size
        while self.batch < len(self):
            rows = self.dataset[indices[self.batch * m : (self.batch + 1) * m]]
            self.batch += 1
            yield collate(rows, self.pad_token_id)
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Position and the settings that fix the order (checked on load)."""
        epoch, batch = (self.epoch + 1, 0) if self.batch >= len(self) else (self.epoch, self.batch)
        return {"epoch": epoch, "batch": batch, "seed": self.seed, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "num_sequences": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; refuses one saved under settings that give a different order."""
        mine = self.state_dict()
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in ("seed", "world_size", "micro_batch_size",
                                                            "num_sequences") if k in state and state[k] != mine[k]]
        if changed:
            raise DataError(f"cannot resume the data order exactly: {', '.join(changed)} since the checkpoint; "
                            f"resume with the same data, seed, micro batch size and number of processes")
        if not 0 <= state["batch"] <= len(self):
            raise DataError(f"loader state batch {state['batch']} is outside an epoch of {len(self)} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def make_dataloader(
    dataset: Any,
    micro_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pad_token_id: int,
) -> ResumableLoader:
    """A ResumableLoader over a tokenized dataset from `build_datasets`.

    Args:
        dataset: rows with input_ids and labels (and position_ids when packed).
        micro_batch_size: rows per batch on each rank.
        rank, world_size: this process's shard (disjoint across ranks).
        seed: seed of the per-epoch order.
        shuffle: reshuffle each epoch (False: dataset order, e.g. for eval).
        drop_last: drop the last partial batch and the uneven tail across ranks (False pads the shards by
            repeating a few samples so that every rank runs the same number of batches).
        pad_token_id: id written into padding; padding is masked out of attention and labels.

    Returns:
        A loader yielding dicts of (B, T) long tensors: input_ids, labels and attention_mask, or
        input_ids, labels and position_ids for packed rows (call the model with use_cache=False).
    """
    return ResumableLoader(dataset, micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                           shuffle=shuffle, drop_last=drop_last, pad_token_id=pad_token_id)


def collate(rows: dict[str, list], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (columns of lists) to its longest row.

    Unpacked rows get an attention_mask (1 real, 0 pad). Packed rows get position_ids instead, and no
    attention_mask: HF Llama then derives per-sample causal masks from where position_ids restart (a
    2D attention_mask would switch that off). The padding tail counts from 0 again, a sample of its own.
    """
    lengths = [len(ids) for ids in rows["input_ids"]]
    width = max(lengths)

    def padded(column: str, fill: int) -> torch.Tensor:  # (B, T)
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows[column]], dtype=torch.long)

    batch = {"input_ids": padded("input_ids", pad_token_id), "labels": padded("labels", IGNORE_INDEX)}
    if "position_ids" in rows:
        batch["position_ids"] = torch.tensor(
            [p + list(range(width - len(p))) for p in rows["position_ids"]], dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------------------------------
# Random tokens (throughput runs)

RANDOM_TOKENS = "random-tokens"
"""`data.path` of a synthetic dataset: uniform random token ids, every token a target (for speed runs)."""


class RandomTokens:
    """`num_samples` sequences of `seq_len` uniform random token ids in [0, vocab_size); labels = inputs.

    Row i is drawn from a generator seeded by (seed, i) alone, so every rank and every launch mode sees
    the same row i without storing the set. Indexing with a list returns columns, as a `datasets.Dataset`
    does, so `ResumableLoader` reads it unchanged; rows have no padding (collate's attention_mask is all 1).
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        if num_samples < 1 or seq_len < 2 or vocab_size < 2:
            raise ValueError(f"RandomTokens needs num_samples >= 1, seq_len >= 2 and vocab_size >= 2, "
                             f"got {num_samples}, {seq_len}, {vocab_size}")
        self.num_samples, self.seq_len, self.vocab_size, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def row(self, index: int) -> list[int]:
        """The token ids of row `index` (seq_len of them)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"row {index} is outside {self.num_samples} random-token rows")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        return rng.integers(0, self.vocab_size, self.seq_len).tolist()

    def __getitem__(self, indices: list[int]) -> dict[str, list[list[int]]]:
        rows = [self.row(int(i)) for i in indices]
        return {"input_ids": rows, "labels": [list(r) for r in rows]}


# --------------------------------------------------------------------------------------------------
# Small helpers


def _fingerprint(*parts: Any) -> str:
    """A datasets fingerprint (hex) from our own parts, so caching never depends on pickling a tokenizer."""
    blob = json.dumps([_CODE_HASH, *[str(p) for p in parts]])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: the vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    parts = [type(tokenizer).__name__, rules, special, str(getattr(tokenizer, "chat_template", None) or ""),
             _bos_text(tokenizer)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _path_problems(key: str, path: str) -> list[str]:
    if not isinstance(path, str) or not path.strip():
        return [f"{key} must be a path or hub name, got {path!r}"]
    local = Path(path).expanduser()
    if not local.exists() and _looks_local(path):
        return [f"{key}: file not found: {path}"]
    if local.is_file() and local.suffix.lower() not in FILE_TYPES:
        return [f"{key}: unsupported file type {local.suffix!r}; use one of {', '.join(FILE_TYPES)}"]
    return []


def _looks_local(path: str) -> bool:
    """A path the user meant as local: it has a data-file suffix or starts like a filesystem path."""
    return Path(path).suffix.lower() in FILE_TYPES or path.startswith(("/", ".", "~")) or "\\" in path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "DataConfig", "DataError", "DataStats", "IGNORE_INDEX", "RANDOM_TOKENS", "RandomTokens", "ResumableLoader",
    "build_datasets", "collate", "make_dataloader",
]
