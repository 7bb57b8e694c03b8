"""Datasets -> tokens: loading, templates, label masking, packing, and a resumable loader.

(Interface stub: bodies land shortly.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad data: a missing file, an empty dataset or a malformed row (the message names it)."""


@dataclass
class DataConfig:
    """Where the training data comes from and how it becomes token sequences."""

    path: str = ""
    """Local .json/.jsonl/.csv/.parquet file, a folder written by `Dataset.save_to_disk`, or a hub dataset name."""
    format: str = "instruction"
    """"text" (one field of plain text), "instruction" (instruction/input/output) or "chat" (messages)."""
    max_seq_len: int = 512
    """Tokens per sequence; longer samples are truncated, packed sequences are exactly this long."""
    text_field: str = "text"
    """Column holding the text for format "text"."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation (0 for none); ignored when `eval_path` is set."""
    eval_path: str | None = None
    """Separate evaluation data in the same format; overrides `eval_fraction`."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    packing: bool = False
    """Pack short samples into full `max_seq_len` sequences, with position_ids restarting per sample."""
    mask_prompt: bool = True
    """Compute the loss on response tokens only (labels -100 on the prompt)."""
    skip_malformed: bool = False
    """Skip rows missing needed fields (and count them) instead of stopping with an error."""
    shuffle: bool = True
    """Shuffle the training order each epoch (deterministic for a seed)."""
    num_proc: int | None = None
    """Worker processes for tokenization (None: in-process)."""

    def problems(self) -> list[str]:
        """Every problem with this config, one line each (empty when valid)."""
        return []


def build_datasets(cfg: DataConfig, tokenizer: Any, *, seed: int) -> tuple[Any, Any | None]:
    """Load, split and tokenize; returns (train, eval or None) with input_ids/labels/position_ids columns."""
    raise NotImplementedError


class ResumableLoader:
    """Deterministic per-epoch, per-rank batches with a resumable position."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, int]) -> None:
        raise NotImplementedError


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
    """A ResumableLoader over a tokenized dataset."""
    raise NotImplementedError
