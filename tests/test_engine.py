"""engine.PlainEngine: DeepSpeed's engine methods over a torch AdamW, with ZeRO's step semantics."""

import copy
import math

import pytest
import torch
from torch import nn

from lora_dist import LoRAModel
from lora_dist.engine import PlainEngine, checkpoint_state
from lora_dist.optim import LoRAOptimizer, make_lr_scheduler


def _engine(accum=2, clip=None):
    torch.manual_seed(0)
    model = LoRAModel(nn.Sequential(nn.Linear(64, 64)), {"target_modules": ["0"], "rank": 4, "init": "gaussian"})
    with torch.no_grad():  # lora_B starts at zero: give it values so both factors get gradients
        model.lora_layers["0"].lora_B.weight.normal_()
    optimizer = LoRAOptimizer(model, lr=1e-2).optimizer
    scheduler = make_lr_scheduler(optimizer, schedule="linear", total_steps=4)
    return PlainEngine(model, optimizer, scheduler, grad_accum=accum, grad_clip=clip)


def _loss(engine, seed):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed))
    return engine(x).square().mean()


def test_updates_once_per_accumulation_window_with_the_summed_gradient():
    engine, reference = _engine(), _engine()
    ref_params = reference.module.get_trainable_parameters()
    for seed in (1, 2):
        engine.backward(_loss(engine, seed), scale_wrt_gas=False)
        before = [p.detach().clone() for p in engine.module.get_trainable_parameters()]
        engine.step()
    # after micro batch 1 nothing moved; after micro batch 2 the update applied
    assert engine.was_step_applied() and engine.lr_scheduler.last_epoch == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, engine.module.get_trainable_parameters()))
    # the reference: one backward of the summed loss, one AdamW step (same float ops in another order)
    (_loss(reference, 1) + _loss(reference, 2)).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref_params])
    reference.optimizer.step()
    assert engine.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-6)
    for p, q in zip(engine.module.get_trainable_parameters(), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # fp32 sums of 2 terms in another order
    assert all(p.grad is None for p in engine.module.get_trainable_parameters())


def test_scale_wrt_gas_divides_by_the_window_as_deepspeed_does():
    a, b = _engine(), _engine()
    a.backward(_loss(a, 1))  # default: divided by grad_accum (2)
    b.backward(_loss(b, 1) / 2, scale_wrt_gas=False)
    for p, q in zip(a.module.get_trainable_parameters(), b.module.get_trainable_parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_window_is_skipped_without_touching_weights_or_schedule(poison):
    engine = _engine(accum=1, clip=1.0)
    before = copy.deepcopy([p.detach() for p in engine.module.get_trainable_parameters()])
    loss = _loss(engine, 1)
    if poison == "loss":
        loss = loss * float("nan")
    else:
        engine.module.lora_layers["0"].lora_A.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    engine.backward(loss)
    engine.step()
    assert not engine.was_step_applied() and engine.lr_scheduler.last_epoch == 0
    assert all(torch.equal(b, p) for b, p in zip(before, engine.module.get_trainable_parameters()))
    assert all(p.grad is None for p in engine.module.get_trainable_parameters())


def test_an_infinite_loss_with_finite_gradients_early_in_the_window_skips_the_update():
    # The loss's finiteness is kept on its device per micro batch and read at the boundary: an inf in
    # the first of two micro batches (a constant, so its gradient stays finite) still skips the window.
    engine = _engine(accum=2, clip=1.0)
    before = copy.deepcopy([p.detach() for p in engine.module.get_trainable_parameters()])
    engine.backward(_loss(engine, 1) + float("inf"))
    engine.step()
    engine.backward(_loss(engine, 2))
    engine.step()
    assert math.isfinite(engine.get_global_grad_norm())
    assert not engine.was_step_applied() and engine.lr_scheduler.last_epoch == 0
    assert all(torch.equal(b, p) for b, p in zip(before, engine.module.get_trainable_parameters()))
    engine.backward(_loss(engine, 3))  # the next window starts clean
    engine.step()
    engine.backward(_loss(engine, 4))
    engine.step()
    assert engine.was_step_applied() and engine.lr_scheduler.last_epoch == 1


def test_checkpoints_keep_the_single_process_format():
    engine = _engine()
    assert checkpoint_state(engine) == {"optimizer": engine.optimizer, "scheduler": engine.lr_scheduler}
