"""What the distributed tests train: a tiny model, its data, and the single-process reference run.

Shared by the pytest process (reference, no DeepSpeed) and `ds_worker.py` (DeepSpeed, 2 ranks), so
both sides build bit-identical models and feed the same samples in the same micro batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist import LoRAConfig, LoRAModel, LoRAOptimizer, quantize_model
from lora_dist.distributed import make_lr_scheduler

WIDTH = 64  # bitsandbytes' CPU kernels want multiples of 64
MICRO = 2  # samples per rank per micro batch
ACCUM = 2  # micro batches per optimizer step
WORLD = 2
GLOBAL_BATCH = MICRO * ACCUM * WORLD
LR = 2e-2
WEIGHT_DECAY = 0.01
WARMUP = 1
# Small enough that every step clips (the adapter gradient norm is ~0.1-1 here): clipping is exercised.
GRAD_CLIP = 0.05
EQUIV_STEPS = 4
RESUME_STEPS = 6
RESUME_AT = 3

# fp32 tolerances of a DeepSpeed run against reference_run, on 2 ranks (test_zero.py) and 8 ranks
# (test_eight_ranks.py). Each gradient element is the mean of 8 per-sample gradients: one process
# adds them as 4 micro batches in one order; DeepSpeed per rank, then gloo's all-reduce over the
# ranks in its own order. Each order rounds differently by a few ulps of the largest term (2**-24 ~
# 6e-8 relative), which the losses show directly. Adam divides each element by its own RMS, so
# where the terms nearly cancel that rounding becomes a visible part of that element's step (at
# most LR = 2e-2): hence the adapter bound 5e-5 = 2.5e-3 LR. A run that skips the all-reduce, a
# step or the LR schedule moves elements by ~LR and fails both by orders of magnitude. Observed
# (|w| <= 0.16): 2 ranks, dense/nf4/int8 x stages 0-3: losses within 6.2e-8 relative, adapters
# within 9.2e-6 absolute; 8 ranks, nf4 x stages 2-3: 3.1e-8 and 4.3e-7.
FP32_LOSS_RTOL = 1e-6
FP32_ADAPTER_ATOL = 5e-5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, WIDTH)
        self.v_proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.v_proj(torch.relu(self.q_proj(x))))


class TinyNet(nn.Module):
    """Two residual blocks and a head: (B, 64) -> (B, 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def build_model(base: str, dropout: float = 0.0, seed: int = 0, bias: str = "none") -> LoRAModel:
    """base: "dense", "nf4" or "int8"; the same weights and adapter init on every call."""
    torch.manual_seed(seed)
    net = TinyNet()
    if base == "nf4":
        quantize_model(net, bits=4, compute_dtype=torch.float32)
    elif base == "int8":
        quantize_model(net, bits=8)
    torch.manual_seed(seed + 1)
    return LoRAModel(net, LoRAConfig(rank=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"], bias=bias))


def frozen_tensors(model: LoRAModel) -> list[torch.Tensor]:
    """Every tensor of the base (frozen parameters and buffers), as one process holds them."""
    trainable = {id(p) for p in model.get_trainable_parameters()}
    return [p for p in model.parameters() if id(p) not in trainable] + list(model.buffers())


def dataset(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps * GLOBAL_BATCH, WIDTH, generator=g)  # (N, 64)
    y = torch.randn(steps * GLOBAL_BATCH, WIDTH, generator=g)
    return x, y


def micro_batch(data, step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's micro batch m of a step: global samples are laid out rank-major, then micro batch."""
    start = step * GLOBAL_BATCH + (rank * ACCUM + micro) * MICRO
    x, y = data
    return x[start : start + MICRO], y[start : start + MICRO]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def reference_run(base: str, steps: int, dropout: float = 0.0, bias: str = "none") -> tuple[list[float], LoRAModel]:
    """One process, no DeepSpeed: the same global batch as micro batches of MICRO, accumulated.

    Returns (per-step mean loss, the trained model).
    """
    model = build_model(base, dropout, bias=bias)
    model.train()
    optimizer = LoRAOptimizer(model, lr=LR, weight_decay=WEIGHT_DECAY).optimizer
    scheduler = make_lr_scheduler(optimizer, schedule="cosine", warmup_steps=WARMUP, total_steps=steps)
    data = dataset(steps)
    n_micro = WORLD * ACCUM
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for i in range(n_micro):
            x, y = micro_batch(data, step, i // ACCUM, i % ACCUM)
            loss = loss_fn(model(x), y)
            (loss / n_micro).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.get_trainable_parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        losses.append(total / n_micro)
    return losses, model


def finish_worker(path: Path, results: dict[str, Any]) -> None:
    """A worker rank's last act: write its results, wait for every rank, leave the group, exit 0.

    os._exit skips the interpreter's teardown of the DeepSpeed engines the process built: once in CI
    a rank that had built 14 of them aborted there ("terminate called without an active exception",
    after destroy_process_group), failing a run whose results were all written.
    """
    import torch.distributed as dist

    path.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
