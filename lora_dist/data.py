"""Datasets -> tokens: loading, templates, label masking and packing.

The pipeline, top to bottom:
    load (file | saved folder | hub; bad files named with line and fix) -> check rows (error or skip)
    -> split off eval -> cut huge rows to a character bound -> tokenize with labels (cached by
    fingerprint) -> drop rows with no target -> pack (optional)
with every row dropped, truncated or cut counted in `DataStats`. `lora_dist.loader` turns a tokenized
dataset into one rank's share of global batches that no world size changes, resumable.

Label convention: `labels` equal `input_ids` where the loss applies and IGNORE_INDEX (-100) elsewhere;
the model shifts them (token t predicts labels[t + 1]). The first token of every sample is never a
target, so packing samples end to end adds no target that crosses from one sample into the next.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_dist.errors import DataError

IGNORE_INDEX = -100
FORMATS = ("text", "instruction", "chat")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ROW_COLUMN = "_lora_dist_row"
"""Column that carries each row's number in its source through splitting and tokenizing (then removed)."""

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
class RowTally:
    """How many rows one reason touched, and where the first of them is."""

    count: int = 0
    first_row: int | None = None
    """Row number of the first such row in its source, counting from 0 (None when count is 0)."""
    source: str = ""
    """The file or dataset that first row is in."""

    def add(self, count: int, first_row: int, source: str) -> None:
        """Count `count` more rows; the first source to report one keeps the first-row place."""
        if count <= 0:
            return
        if self.count == 0:
            self.first_row, self.source = first_row, source
        self.count += count

    def where(self) -> str:
        return f"first: {Path(self.source).name} row {self.first_row}" if self.count else ""


SKIP_REASONS = {
    "missing_field": "a needed field is missing or null",
    "empty_field": "a needed text field is empty",
    "not_text": "a field that must be text is not",
    "bad_messages": "'messages' is not a list of {role, content}",
    "no_assistant_turn": "a conversation has no assistant turn with content",
    "no_target": "truncation to data.max_seq_len left no target token",
}
"""Why rows leave the data, by short name (the keys of DataStats.skipped and of its metrics)."""


@dataclass
class DataStats:
    """What `build_datasets` read, kept, dropped and cut: the data report of a run.

    Rows are those of the source files (train and eval together); samples are tokenized rows. Every
    reason a row left the data is counted in `skipped` with the first such row, so nothing vanishes
    silently: malformed rows (only with data.skip_malformed, else the first one is an error) and samples
    that truncation left without a target token.
    """

    rows_read: int = 0
    """Rows in the sources (train plus eval_path when set)."""
    skipped: dict[str, RowTally] = field(default_factory=dict)
    """Rows dropped, per reason (a key of SKIP_REASONS)."""
    truncated: RowTally = field(default_factory=RowTally)
    """Samples longer than data.max_seq_len tokens, cut to it (the head is kept)."""
    cut_for_length: RowTally = field(default_factory=RowTally)
    """Rows so long that their text was cut to a bounded number of characters before tokenizing (see
    `max_chars_before_tokenizing`); they are truncated samples too."""
    train_samples: int = 0
    """Tokenized training samples (before packing)."""
    eval_samples: int = 0
    """Tokenized eval samples (before packing)."""
    train_sequences: int = 0
    """Training rows the loader sees (packed rows when packing)."""
    train_tokens: int = 0
    """Tokens of the training samples."""
    train_target_tokens: int = 0
    """Tokens with a label in the training samples."""

    def skip(self, reason: str, count: int, first_row: int, source: str) -> None:
        """Count `count` rows of `source` dropped for `reason`, the first of them at `first_row`."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; one of {', '.join(SKIP_REASONS)}")
        self.skipped.setdefault(reason, RowTally()).add(count, first_row, source)

    @property
    def rows_skipped(self) -> int:
        return sum(t.count for t in self.skipped.values())

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Every count as one flat dict of ints, for metrics.jsonl and a W&B summary.

        Keys: rows_read, rows_skipped, skipped/<reason> and skipped/<reason>/first_row for each reason
        seen, truncated (+ /first_row), cut_for_length (+ /first_row), train_samples, eval_samples,
        train_sequences, train_tokens, train_target_tokens; each behind `prefix`.
        """
        out = {"rows_read": self.rows_read, "rows_skipped": self.rows_skipped}
        for reason, tally in sorted(self.skipped.items()):
            out[f"skipped/{reason}"] = tally.count
            out[f"skipped/{reason}/first_row"] = tally.first_row
        for name in ("truncated", "cut_for_length"):
            tally = getattr(self, name)
            out[name] = tally.count
            if tally.count:
                out[f"{name}/first_row"] = tally.first_row
        for name in ("train_samples", "eval_samples", "train_sequences", "train_tokens", "train_target_tokens"):
            out[name] = getattr(self, name)
        return {prefix + k: v for k, v in out.items()}

    def summary(self) -> str:
        """One console line: rows read, skipped (per reason, first row), samples, tokens, truncated, cut."""
        parts = [f"data: {self.rows_read:,} rows read", f"{self.rows_skipped:,} skipped"]
        if self.skipped:
            parts[-1] += " (" + "; ".join(f"{reason} {t.count:,}, {t.where()}"
                                          for reason, t in sorted(self.skipped.items())) + ")"
        parts.append(f"{self.train_samples:,} train / {self.eval_samples:,} eval samples")
        if self.train_sequences != self.train_samples:
            parts[-1] += f" ({self.train_sequences:,} packed rows)"
        parts.append(f"{self.train_tokens:,} train tokens ({self.train_target_tokens:,} targets)")
        parts.append(f"{self.truncated.count:,} truncated to data.max_seq_len"
                     + (f" ({self.truncated.where()})" if self.truncated.count else ""))
        if self.cut_for_length.count:
            parts.append(f"{self.cut_for_length.count:,} cut for length before tokenizing "
                         f"({self.cut_for_length.where()})")
        return ", ".join(parts)


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

    train = _tokenized(train_raw, cfg, tokenizer, stats, cfg.path, train=True)
    eval_ = None
    if eval_raw is not None:
        eval_ = _tokenized(eval_raw, cfg, tokenizer, stats, cfg.eval_path or cfg.path, train=False)

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
            builder = FILE_TYPES.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type {local.suffix!r}; "
                                f"use one of {', '.join(FILE_TYPES)} or a saved dataset folder")
            _check_file(local, path)
            kwargs = {"features": _csv_string_features(local)} if builder == "csv" else {}
            try:
                return datasets.load_dataset(builder, data_files=str(local), split="train",
                                             cache_dir=cfg.cache_dir, **kwargs)
            except Exception as e:  # datasets wraps its parsers' errors in many types
                raise DataError(_parse_failure(local, path, builder, e)) from e
        if local.is_dir():
            if local.suffix.lower() in FILE_TYPES:
                raise DataError(f"{path} is a directory, not a {local.suffix} file: name the data file itself")
            if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
                return _pick_split(datasets.load_from_disk(str(local)), cfg.split, path)
            data_files = [p for p in sorted(local.rglob("*")) if p.suffix.lower() in FILE_TYPES and p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(local).parts)]
            if not data_files:
                raise DataError(f"{path} is a folder with no {'/'.join(FILE_TYPES)} files and no dataset written "
                                f"by save_to_disk: name a data file or such a folder")
            for file in data_files:
                _check_file(file, str(file))
            return datasets.load_dataset(str(local), split=cfg.split, cache_dir=cfg.cache_dir)
        if _looks_local(path):
            raise DataError(f"data file not found: {path}")
        return datasets.load_dataset(path, split=cfg.split, cache_dir=cfg.cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, DatasetGenerationError, HTTP errors)
        where = "local data" if local.exists() else "a hub dataset (is it public and are you online?)"
        raise DataError(f"could not load {path} as {where}: {_root_message(e)}") from e


_SCAN_BYTES = 1 << 20


def _check_file(file: Path, name: str) -> None:
    """Refuse a data file that is empty or unreadable, or a text one (JSON, JSON lines, CSV) that is not UTF-8.

    pyarrow's JSON reader stores invalid UTF-8 as it is and fails only later, when a row is read, with
    no file or row named; this scan names the line. It streams the file (memory stays one chunk).
    """
    text = FILE_TYPES[file.suffix.lower()] in ("json", "csv")
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    try:
        with open(file, "rb") as f:
            while chunk := f.read(_SCAN_BYTES if text else 1):
                offset += len(chunk)
                if not text:
                    return  # readable and not empty: pyarrow checks the rest of a Parquet file
                pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous chunk
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    at = max(err.start - pending, 0)
                    bad_line = line + chunk.count(b"\n", 0, at)
                    raise DataError(f"{name}: line {bad_line} is not UTF-8 text (byte {offset - len(chunk) + at}); "
                                    f"re-save the file as UTF-8") from None
                line += chunk.count(b"\n")
            if offset == 0:
                raise DataError(f"{name}: the data file is empty")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"{name}: the file ends inside a UTF-8 character (line {line}); "
                                f"it may be cut short: re-save it as UTF-8") from None
    except IsADirectoryError:
        raise DataError(f"{name} is a directory, not a file: name the data file itself") from None
    except OSError as err:
        raise DataError(f"{name} cannot be read ({err.strerror}): check its permissions") from None


def _parse_failure(file: Path, name: str, builder: str, error: Exception) -> str:
    """One line for a file `datasets` could not parse: where the problem is, when we can find it, and the fix."""
    if builder == "json":
        where = _json_problem(file)
        if where:
            return f"{name}: {where}; each line of a .jsonl file (or item of a .json list) must be one JSON object"
        return f"could not read {name} as JSON: {_root_message(error)}; fix the file"
    if builder == "csv":
        return (f"could not read {name} as CSV: {_root_message(error)}; fix that line (quote fields that hold "
                f"commas, quotes or line breaks)")
    return (f"could not read {name} as Parquet: {_root_message(error)}; re-export it "
            f"(pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet)")


def _json_problem(file: Path) -> str | None:
    """Where a JSON or JSON-lines file stops being a list of objects ("line 4: Expecting value (column 3)")."""
    with open(file, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if file.suffix.lower() == ".json" and head.startswith("["):  # one JSON document: a list of rows
            try:
                items = json.load(f)
            except json.JSONDecodeError as err:
                return f"line {err.lineno}: {err.msg} (column {err.colno})"
            kinds = [(i, type(item).__name__) for i, item in enumerate(items) if not isinstance(item, dict)]
            return f"item {kinds[0][0]} is a JSON {kinds[0][1]}, not an object" if kinds else None
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                item = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} (column {err.colno})"
            if not isinstance(item, dict):
                return f"line {number} is a JSON {type(item).__name__}, not an object"
    return None


def _root_message(error: BaseException) -> str:
    """First line of the innermost explicit cause ("JSON parse error ... in row 1", not "an error occurred")."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__


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
    """The rows of ds usable for cfg.format, numbered by source row; raises on the first bad one unless skip_malformed."""
    stats.rows_read += len(ds)
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    if ROW_COLUMN in ds.column_names:
        raise DataError(f"{source} has a column named {ROW_COLUMN!r}, which lora_dist uses itself: rename it")
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
    bad: dict[str, list[int]] = {}  # reason -> source rows
    first: tuple[int, str] | None = None  # (row, message) of the first bad row
    index = 0
    # Only the columns the format reads go on: less to tokenize and cache, and text in other columns
    # (even bytes that are not UTF-8, which pyarrow keeps as they are) is never decoded.
    ds = ds.select_columns(present)
    try:
        for batch in ds.iter(batch_size=1000):
            for j in range(len(batch[present[0]])):
                problem = _row_problem({c: batch[c][j] for c in present}, cfg)
                if problem:
                    bad.setdefault(problem[0], []).append(index)
                    first = first or (index, problem[1])
                index += 1
    except UnicodeDecodeError:  # a hub or folder dataset whose files were not checked for UTF-8
        last = min(index + 999, len(ds) - 1)
        raise DataError(f"{source}: one of rows {index} to {last} (counting from 0) holds text that is not UTF-8; "
                        f"re-save the data as UTF-8") from None
    # Source row numbers travel with the rows (through the split and tokenizing) for the data report.
    ds = ds.add_column(ROW_COLUMN, np.arange(len(ds), dtype=np.int64))
    if first is None:
        return ds
    n_bad = sum(map(len, bad.values()))
    if not cfg.skip_malformed:
        more = f" ({n_bad - 1} more malformed rows)" if n_bad > 1 else ""
        raise DataError(f"{source}: row {first[0]} (counting from 0): {first[1]}{more}; "
                        f"fix the data or set data.skip_malformed=true to skip such rows")
    for reason, rows in bad.items():
        stats.skip(reason, len(rows), rows[0], source)
    if n_bad == len(ds):
        raise DataError(f"{source}: all {len(ds)} rows are malformed (row 0: {first[1]})")
    bad_rows = {i for rows in bad.values() for i in rows}
    return ds.select([i for i in range(len(ds)) if i not in bad_rows])


def _needed_columns(cfg: DataConfig) -> list[str]:
    return {"text": [cfg.text_field], "instruction": ["instruction", "input", "output"],
            "chat": ["messages"]}[cfg.format]


def _row_problem(row: dict[str, Any], cfg: DataConfig) -> tuple[str, str] | None:
    """(reason in SKIP_REASONS, message) saying why a row cannot be rendered for cfg.format, or None."""
    if cfg.format == "text":
        return _text_problem(row, cfg.text_field)
    if cfg.format == "instruction":
        problem = _text_problem(row, "instruction") or _text_problem(row, "output")
        if problem is None and row.get("input") is not None and not isinstance(row["input"], str):
            problem = "not_text", f"'input' must be text, got {type(row['input']).__name__}"
        return problem
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "bad_messages", "'messages' is missing or not a non-empty list"
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return "bad_messages", f"messages[{k}] has no 'role'"
        if not isinstance(message.get("content"), str):
            return "bad_messages", f"messages[{k}] has no text 'content'"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "no_assistant_turn", "no assistant message with content (nothing to learn)"
    return None


def _text_problem(row: dict[str, Any], column: str) -> tuple[str, str] | None:
    value = row.get(column)
    if value is None:
        return "missing_field", f"'{column}' is missing"
    if not isinstance(value, str):
        return "not_text", f"'{column}' must be text, got {type(value).__name__}"
    if not value.strip():
        return "empty_field", f"'{column}' is empty"
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
    except Exception:  # noqa: BLE001  templates may index messages[0] and fail in any way
        return 0


def _bos_text(tokenizer: Any) -> str:
    """BOS as text when this tokenizer adds one by itself (Llama, Mistral), else "" (Qwen, GPT-2)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == tokenizer.bos_token_id else ""


def _tokenize_batch(batch: dict[str, list], cfg: DataConfig, tokenizer: Any, max_chars: int) -> dict[str, list]:
    """Batched map function: rows -> input_ids, labels (-100 off target), and per-row counts and flags.

    The whole sample is tokenized at once (so tokens are what the tokenizer gives for the full text),
    and each piece's token span is found as the common prefix of the tokens of the text up to that piece.
    A token that straddles a piece boundary goes to the later piece. A sample longer than `max_chars`
    characters is cut to that length first (see `max_chars_before_tokenizing`).
    """
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    bos, eos = _bos_text(tokenizer), tokenizer.eos_token or ""
    segments, cut = [], []
    for row in rows:
        pieces, was_cut = _cut_pieces(_segments(_cut_fields(row, cfg, max_chars), cfg, tokenizer, bos, eos), max_chars)
        segments.append(pieces)
        cut.append(was_cut or any(_field_texts(row, cfg, longer_than=max_chars)))
    fulls = ["".join(text for text, _ in pieces) for pieces in segments]
    prefixes = [_prefix_texts(pieces) for pieces in segments]
    ids_of = _encode(tokenizer, fulls + [p for ps in prefixes for p in ps])
    full_ids, prefix_ids = ids_of[: len(rows)], iter(ids_of[len(rows):])

    out: dict[str, list] = {"input_ids": [], "labels": [], "num_targets": [], "num_tokens": [], "truncated": [],
                            "cut": [], ROW_COLUMN: batch[ROW_COLUMN]}
    for ids, pieces, prefix_texts, was_cut in zip(full_ids, segments, prefixes, cut):
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
        out["num_tokens"].append(min(len(ids), cfg.max_seq_len))
        out["truncated"].append(len(ids) > cfg.max_seq_len)
        out["cut"].append(was_cut)
    return out


def max_chars_before_tokenizing(tokenizer: Any, max_seq_len: int) -> int:
    """Characters of a sample's text that are enough for its first `max_seq_len` tokens: the rest is cut.

    No token of this tokenizer stands for more characters than its longest vocabulary entry, L
    (byte-level BPE writes one character per byte, so its entries are at least as long as the text
    they cover). A text of (max_seq_len + margin) * L characters therefore has at least max_seq_len +
    margin tokens, and cutting a longer text there changes tokens only next to the cut (merges are
    local), margin tokens past the max_seq_len that are kept. Tokenizing costs about 200 bytes of memory
    per character (measured with a fast BPE tokenizer), so an unbounded row of 40 MB took over 13 GiB;
    with this bound a row costs at most ~200 * (max_seq_len + 16) * L bytes (max_seq_len 4096 and
    L = 128: ~110 MB).
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return (max_seq_len + _CUT_MARGIN_TOKENS) * max(longest, 1)


_CUT_MARGIN_TOKENS = 16
_ENCODE_CHARS = 1 << 20
"""Characters handed to the tokenizer in one call (at most; a single longer text goes alone)."""


def _cut_fields(row: dict[str, Any], cfg: DataConfig, max_chars: int) -> dict[str, Any]:
    """The row with each text it renders cut to max_chars (bounds the work of templates on huge rows)."""
    if not any(_field_texts(row, cfg, longer_than=max_chars)):
        return row
    row = dict(row)
    if cfg.format == "chat":
        row["messages"] = [{**m, "content": m["content"][:max_chars]} for m in row["messages"]]
    else:
        for name in _needed_columns(cfg):
            if isinstance(row.get(name), str):
                row[name] = row[name][:max_chars]
    return row


def _field_texts(row: dict[str, Any], cfg: DataConfig, longer_than: int) -> Iterator[str]:
    """The texts a row renders that are longer than `longer_than` characters."""
    if cfg.format == "chat":
        texts = [m["content"] for m in row["messages"]]
    else:
        texts = [row.get(name) for name in _needed_columns(cfg)]
    return (t for t in texts if isinstance(t, str) and len(t) > longer_than)


def _cut_pieces(pieces: list[tuple[str, bool]], max_chars: int) -> tuple[list[tuple[str, bool]], bool]:
    """The pieces of a sample cut to max_chars characters in all, and whether anything was cut."""
    out, total = [], 0
    for text, target in pieces:
        if total + len(text) > max_chars:
            if max_chars > total:
                out.append((text[: max_chars - total], target))
            return out, True
        out.append((text, target))
        total += len(text)
    return out, False


def _prefix_texts(pieces: list[tuple[str, bool]]) -> list[str]:
    """Text up to the end of each piece but the last."""
    ends, total = [], ""
    for text, _ in pieces[:-1]:
        total += text
        ends.append(total)
    return ends


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in calls of at most _ENCODE_CHARS characters (bounded tokenizer memory)."""
    ids: list[list[int]] = []
    start = 0
    while start < len(texts):
        end, chars = start + 1, len(texts[start])
        while end < len(texts) and chars + len(texts[end]) <= _ENCODE_CHARS:
            chars += len(texts[end])
            end += 1
        # Special tokens come from the rendered text (BOS/EOS/template markers), never added a second time.
        ids += tokenizer(texts[start:end], add_special_tokens=False)["input_ids"]
        start = end
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _tokenized(raw, cfg: DataConfig, tokenizer: Any, stats: DataStats, source: str,
               train: bool) -> Any:
    """Tokenize raw rows (cached), drop samples left without targets, and count what happened."""
    max_chars = max_chars_before_tokenizing(tokenizer, cfg.max_seq_len)
    fingerprint = _fingerprint(raw._fingerprint, "tokenize", cfg.format, cfg.text_field, cfg.max_seq_len,
                               cfg.mask_prompt, max_chars, _tokenizer_fingerprint(tokenizer))
    tokenized = raw.map(
        _tokenize_batch,
        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "max_chars": max_chars},
        batched=True,
        remove_columns=raw.column_names,
        new_fingerprint=fingerprint,
        num_proc=cfg.num_proc,
        desc="tokenizing",
    )
    counts = tokenized.select_columns([ROW_COLUMN, "num_targets", "num_tokens", "truncated", "cut"]).to_pandas()
    short = counts[counts["cut"] & (counts["num_tokens"] < cfg.max_seq_len)]
    if len(short):
        # Only a tokenizer whose normalizer deletes characters packs more text into a token than its
        # longest entry: then the cut lost text the sample would have kept.
        row = int(short[ROW_COLUMN].min())
        raise DataError(f"{source}: row {row} (counting from 0) is over {max_chars:,} characters and, cut there "
                        f"before tokenizing, gave fewer than data.max_seq_len tokens; shorten that row")
    for name, flags in (("truncated", counts["truncated"]), ("cut_for_length", counts["cut"])):
        if flags.any():
            getattr(stats, name).add(int(flags.sum()), int(counts[ROW_COLUMN][flags].min()), source)
    empty = counts["num_targets"] == 0
    if empty.any():
        stats.skip("no_target", int(empty.sum()), int(counts[ROW_COLUMN][empty].min()), source)
    if empty.all():
        raise DataError(f"{source}: no sample keeps a target token within data.max_seq_len={cfg.max_seq_len} "
                        f"(prompts are longer); raise data.max_seq_len")
    kept = tokenized.filter(
        _has_targets, batched=True, input_columns=["num_targets"],
        new_fingerprint=_fingerprint(fingerprint, "has-targets"), desc="dropping samples without targets",
    ) if empty.any() else tokenized
    if train:
        stats.train_samples = len(kept)
        stats.train_tokens = int(counts["num_tokens"][~empty].sum())
        stats.train_target_tokens = int(counts["num_targets"][~empty].sum())
    else:
        stats.eval_samples = len(kept)
    return kept.remove_columns([ROW_COLUMN, "num_targets", "num_tokens", "truncated", "cut"])


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
            for k, column in out.items():
                column.append(row[k])
            row = {k: [] for k in out}
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += list(range(len(ids)))
    if row["input_ids"]:
        for k, column in out.items():
            column.append(row[k])
    return out


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
    "IGNORE_INDEX",
    "SKIP_REASONS",
    "DataConfig",
    "DataError",
    "DataStats",
    "RowTally",
    "build_datasets",
    "max_chars_before_tokenizing",
]
