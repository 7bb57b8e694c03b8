"""The optimizer side of one process without DeepSpeed, behind the methods the loop calls on DeepSpeed's engine.

`train.py` drives whichever engine `build_engine` returns through one code path: `engine(**batch)`,
`engine.backward(loss)` and `engine.step()` after every micro batch, then `get_global_grad_norm()`
and `was_step_applied()` once per optimizer step, `lr_scheduler`, `train()` / `eval()`. `PlainEngine`
implements exactly that subset with a torch AdamW, with DeepSpeed ZeRO's semantics: it counts micro
batches, clips and updates at the accumulation boundary, and skips an update (and its schedule step)
whose gradient norm is not finite.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lora_dist import distributed
from lora_dist.model import LoRAModel
from lora_dist.optim import LoRAOptimizer, make_lr_scheduler

if TYPE_CHECKING:
    from lora_dist.config import Config


class PlainEngine:
    """A LoRAModel and its AdamW and LR schedule, driven like DeepSpeed's engine (one process).

    Args:
        model: the LoRAModel to train.
        optimizer: a torch optimizer over `model.get_trainable_parameters()`.
        lr_scheduler: stepped after every applied update.
        grad_accum: micro batches per optimizer step.
        grad_clip: max global gradient norm, None for no clipping.
    """

    def __init__(
        self,
        model: LoRAModel,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        grad_accum: int,
        grad_clip: float | None,
    ):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self._micro = 0
        self._loss_finite: torch.Tensor | None = None  # on the loss's device, read once at the boundary
        self._norm: float | None = None
        self._applied = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> PlainEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PlainEngine:
        return self.train(False)

    def zero_optimization_partition_weights(self) -> bool:
        return False  # the ZeRO-3 question the gather policy asks; never here

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """Accumulate the gradient of `loss`, divided by the micro batch count if `scale_wrt_gas` (as DeepSpeed).

        Whether the loss is finite stays on its device until the boundary: reading it here would hold the
        host until the forward has run, and the GPU idle until the host had queued backward's first kernels."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        (loss / self.grad_accum if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        """Count a micro batch; at the boundary clip and update, or skip a step with a non-finite loss or norm."""
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._norm = float(norm)
        loss_finite = self._loss_finite is None or bool(self._loss_finite)
        self._applied = loss_finite and math.isfinite(self._norm)
        if self._applied:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_finite = None

    def get_global_grad_norm(self) -> float | None:
        """The pre-clip global gradient norm of the last optimizer step."""
        return self._norm

    def was_step_applied(self) -> bool:
        """Whether the last optimizer step updated the weights (False: skipped for a non-finite loss or norm)."""
        return self._applied


def build_engine(cfg: Config, model: LoRAModel, *, world_size: int, total_steps: int, use_deepspeed: bool) -> Any:
    """DeepSpeed's engine (`distributed.setup_engine`) or a `PlainEngine`, configured from `cfg` alike."""
    if use_deepspeed:
        return distributed.setup_engine(model, distributed.deepspeed_config(cfg, world_size, total_steps))
    t = cfg.train
    optimizer = LoRAOptimizer(model, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps).optimizer
    scheduler = make_lr_scheduler(
        optimizer, schedule=t.schedule, warmup_steps=distributed.warmup_steps(cfg, total_steps), total_steps=total_steps
    )
    return PlainEngine(model, optimizer, scheduler, grad_accum=t.accumulation(world_size), grad_clip=t.grad_clip)


def checkpoint_state(engine: Any) -> dict[str, Any]:
    """The keyword arguments `lora_dist.checkpoint` takes for this engine's optimizer and schedule state.

    DeepSpeed's engine saves its own (sharded) state; a PlainEngine hands over its torch state dicts,
    in the single-process checkpoint format.
    """
    if isinstance(engine, PlainEngine):
        return {"optimizer": engine.optimizer, "scheduler": engine.lr_scheduler}
    return {"engine": engine}
