"""The resumable, world-size-independent global-batch loader, collation, and random-token rows.

`make_dataloader` turns a tokenized dataset from `data.build_datasets` into one rank's share of global
batches that no world size changes, resumable at any world size; `collate` right-pads a batch;
`RandomTokens` is the synthetic dataset behind `data.path=random-tokens` (speed runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lora_dist.data import IGNORE_INDEX
from lora_dist.errors import DataError

# --------------------------------------------------------------------------------------------------
# Loader


class ResumableLoader:
    """One rank's micro batches, cut from one global order of rows that the world size does not change.

    Epoch e orders all n rows by a permutation seeded from (seed, e) (dataset order when shuffle is off)
    and cuts that order into global batches of G = micro_batch_size * accumulation * world_size rows, one
    per optimizer step. The last n % G rows of an epoch's order are left out of that epoch (the next epoch
    reorders everything, so every row still comes up). A global batch is read in `accumulation` micro
    steps; in micro step j, rank r reads rows [(j * world_size + r) * m, (j * world_size + r + 1) * m) of it.

    So for one G, every step reads the same rows at any world size, and when the micro batch size is the
    same too, the same micro batches: 1 process x 4 micro batches reads what 4 processes x 1 read. The
    position is kept in global terms (epoch, rows of its order consumed), so a state saved at one world
    size resumes at another at the same place. Iterating yields the rest of the current epoch, then
    moves to the next one; `state_dict()` after any batch resumes at the batch that follows it.
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad_token_id: int,
    ) -> None:
        if micro_batch_size < 1 or accumulation < 1:
            raise ValueError(f"micro_batch_size and accumulation must be at least 1, "
                             f"got {micro_batch_size} and {accumulation}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not drop_last and world_size * accumulation > 1:
            # A short last global batch would leave some ranks' micro batches empty; evaluation, the one
            # reader that keeps every row, reads a single stream and splits the batches itself.
            raise ValueError("drop_last=False reads one stream of micro batches: use world_size=1, accumulation=1")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: pass the tokenizer's pad id (or its EOS id when it has none)")
        self.dataset = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.pad_token_id = pad_token_id
        self.global_batch_size = micro_batch_size * accumulation * world_size
        self.num_rows = len(self.dataset)
        self.epoch = 0
        self._start = 0  # rows of this epoch's order consumed before the first batch yielded since then
        self._yielded = 0  # micro batches yielded by this rank since `_start`
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order), reused within an epoch
        if len(self) == 0:
            raise DataError(f"{self.num_rows} training sequences are fewer than one global batch "
                            f"({self.global_batch_size} = micro batch {micro_batch_size} x {accumulation} "
                            f"accumulated x {world_size} processes): add data or lower train.global_batch_size "
                            f"(or train.micro_batch_size)")

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch; the same at every world size for one global batch size."""
        return self.num_rows // self.global_batch_size

    def __len__(self) -> int:
        """Micro batches per epoch on this rank (steps_per_epoch * accumulation when drop_last)."""
        if self.drop_last:
            return self.steps_per_epoch * self.accumulation
        return math.ceil(self.num_rows / self.micro_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; a no-op when already in `epoch` (keeps a resumed position)."""
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    def global_order(self, epoch: int) -> np.ndarray:
        """All row indices in the order of `epoch`, before it is cut into global batches."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._order = (epoch, order)
        return self._order[1]

    def _batches_left(self) -> int:
        """Micro batches this rank has still to read in the current epoch."""
        rows_left = self.num_rows - self._start
        if self.drop_last:
            total = rows_left // self.global_batch_size * self.accumulation
        else:
            total = math.ceil(rows_left / self.micro_batch_size)
        return total - self._yielded

    def _rows_consumed(self) -> int:
        """Rows of the current epoch's order read by all ranks together (exact at every micro step)."""
        return self._start + self._yielded * self.micro_batch_size * self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.global_order(self.epoch)
        m, k, w = self.micro_batch_size, self.accumulation, self.world_size
        while self._batches_left() > 0:
            step, micro_step = divmod(self._yielded, k)
            first = self._start + step * self.global_batch_size + (micro_step * w + self.rank) * m
            self._yielded += 1
            yield collate(self.dataset[order[first : first + m].tolist()], self.pad_token_id)
        self.epoch, self._start, self._yielded = self.epoch + 1, 0, 0

    def epoch_progress(self) -> float:
        """Epochs done so far, with the fraction of the current one (for metrics)."""
        return self.epoch + self._rows_consumed() / max(self.num_rows, 1)

    def state_dict(self) -> dict[str, Any]:
        """The position in global terms and the settings that fix the order (checked on load).

        `sample` counts rows of epoch `epoch`'s order already read by all ranks together; `batch` (this
        rank's micro batches into the epoch) is informational and ignored on load.
        """
        if self._batches_left() <= 0:
            epoch, sample = self.epoch + 1, 0
        else:
            epoch, sample = self.epoch, self._rows_consumed()
        return {"epoch": epoch, "sample": sample, "batch": sample // (self.micro_batch_size * self.world_size),
                "seed": self.seed, "shuffle": self.shuffle, "num_sequences": self.num_rows,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position, whatever world size saved it.

        Refuses a state saved under settings that give another order or other global batches (seed,
        shuffle, row count, global batch size). A state from the earlier per-rank loader (epoch, batch,
        world_size, micro_batch_size) resumes after the rows it had read: that loader dealt the same
        per-epoch order out to the ranks, so its first `batch` micro batches on every rank were the
        order's first batch * micro_batch_size * world_size rows.
        """
        if "sample" in state:
            sample = int(state["sample"])
            compared = ("seed", "shuffle", "num_sequences", "global_batch_size")
        else:
            sample = int(state["batch"]) * int(state["micro_batch_size"]) * int(state["world_size"])
            compared = ("seed", "num_sequences")
        mine = self.state_dict()
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in compared if k in state and state[k] != mine[k]]
        if changed:
            raise DataError(f"cannot resume the data order exactly: {', '.join(changed)} since the checkpoint; "
                            f"resume with the same data, seed, shuffle setting and global batch size")
        if not 0 <= sample <= self.num_rows:
            raise DataError(f"loader state sample {sample} is outside an epoch of {self.num_rows} rows")
        self.epoch, self._start, self._yielded = int(state["epoch"]), sample, 0


def make_dataloader(
    dataset: Any,
    micro_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    accumulation: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pad_token_id: int,
) -> ResumableLoader:
    """A ResumableLoader over a tokenized dataset from `build_datasets`.

    Args:
        dataset: rows with input_ids and labels (and position_ids when packed).
        micro_batch_size: rows per batch on each rank.
        rank, world_size: this process's place among the data-parallel ranks.
        accumulation: micro batches per optimizer step on each rank. The global batch is
            micro_batch_size * accumulation * world_size rows; pass the training job's accumulation so
            that batches are cut the same at every world size.
        seed: seed of the per-epoch order.
        shuffle: reshuffle each epoch (False: dataset order, e.g. for eval).
        drop_last: leave the last n % global batch rows out of each epoch (False, for one reader only,
            keeps them as a short last batch).
        pad_token_id: id written into padding; padding is masked out of attention and labels.

    Returns:
        A loader yielding dicts of (B, T) long tensors: input_ids, labels and attention_mask, or
        input_ids, labels and position_ids for packed rows (call the model with use_cache=False).
    """
    return ResumableLoader(dataset, micro_batch_size, rank=rank, world_size=world_size, accumulation=accumulation,
                           seed=seed, shuffle=shuffle, drop_last=drop_last, pad_token_id=pad_token_id)


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


__all__ = [
    "RANDOM_TOKENS",
    "RandomTokens",
    "ResumableLoader",
    "collate",
    "make_dataloader",
]
