"""LoRAOptimizer (adapter parameters only) and apply_lora_to_model (wrap + optimizer in one call)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_dist.model import LoRAConfig, LoRAModel


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
        decay = [p for layer in model.lora_layers.values() for p in layer.adapter_parameters()]
        no_decay = model.trainable_biases()
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = optimizer_class(groups, lr=lr, **optimizer_kwargs)

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
