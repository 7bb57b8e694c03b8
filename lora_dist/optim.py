"""The optimization of the adapters: parameter groups, LoRAOptimizer, the LR schedule, apply_lora_to_model.

The same groups and the same schedule serve the single-process path and DeepSpeed (which is handed
`param_groups` and `make_lr_scheduler`), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lora_dist.choices import SCHEDULES, check_choice
from lora_dist.model import LoRAConfig, LoRAModel


def param_groups(model: LoRAModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters: decay on lora_A / lora_B, none on biases."""
    decay = [p for layer in model.lora_layers.values() for p in layer.adapter_parameters()]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    no_decay = model.trainable_biases()
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule used with and without DeepSpeed: LR multiplier at optimizer step k (0-based)

        k < warmup:  (k + 1) / (warmup + 1)
        after:       cosine 0.5 * (1 + cos(pi * t)) | linear 1 - t | constant 1,
                     t = (k - warmup) / (total - warmup), clamped to [0, 1].

    Step it once after every optimizer step (DeepSpeed's engine does so itself).
    """
    check_choice("schedule", schedule, SCHEDULES)
    if schedule != "constant" and total_steps is None:
        raise ValueError(f"schedule {schedule!r} needs total_steps; use 'constant' to train without an end")

    def multiplier(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        t = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


class LoRAOptimizer:
    """An optimizer over exactly `model.get_trainable_parameters()`.

    Weight decay applies to lora_A / lora_B weights, never to biases. Any optimizer class that
    takes param groups works (torch's, bitsandbytes' 8-bit and paged ones); the wrapped instance is
    `self.optimizer`, which is what LR schedulers and DeepSpeed take.

    Args:
        model: the LoRAModel whose adapters to train.
        lr: learning rate.
        weight_decay: decoupled weight decay for the adapter matrices.
        optimizer_class: the optimizer to build (default `torch.optim.AdamW`).
        **optimizer_kwargs: passed through (betas, eps, ...).
    """

    def __init__(
        self,
        model: LoRAModel,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        **optimizer_kwargs: Any,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.model = model
        self.optimizer = optimizer_class(param_groups(model, weight_decay), lr=lr, **optimizer_kwargs)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


def apply_lora_to_model(
    base_model: nn.Module,
    lora_config: LoRAConfig | dict[str, Any],
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    merge_weights: bool = False,
) -> tuple[LoRAModel, LoRAOptimizer]:
    """Wrap `base_model` with LoRA and build its optimizer: returns (LoRAModel, LoRAOptimizer)."""
    model = LoRAModel(base_model, lora_config, merge_weights=merge_weights)
    return model, LoRAOptimizer(model, lr=lr, weight_decay=weight_decay)
