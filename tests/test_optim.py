"""optim.py: the parameter groups, LoRAOptimizer (torch and bitsandbytes optimizers) and the LR schedule."""

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lora_dist import LoRAModel, LoRAOptimizer, apply_lora_to_model
from lora_dist.optim import make_lr_scheduler, param_groups
from test_model import ATTN, batch, tiny_llama


def test_optimizer_decays_adapter_weights_but_not_biases():
    base = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model = LoRAModel(base, {"target_modules": ["0"], "bias": "lora_only"})
    opt = LoRAOptimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in no_decay["params"]] == [1]
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.get_trainable_parameters()}


def test_optimizer_state_dict_round_trips():
    model, opt = apply_lora_to_model(tiny_llama(), {"target_modules": ATTN}, lr=1e-2)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state_dict()
    fresh = LoRAOptimizer(model, lr=1e-2)
    fresh.load_state_dict(state)
    a = opt.state[model.get_trainable_parameters()[0]]["exp_avg"]
    b = fresh.state[model.get_trainable_parameters()[0]]["exp_avg"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer_class", [bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit, bnb.optim.PagedAdamW])
def test_bitsandbytes_optimizers_train_the_adapter(optimizer_class):
    model = LoRAModel(tiny_llama(), {"target_modules": ATTN, "rank": 4})
    # min_8bit_size=0: our tiny adapters (256 values) are below bnb's default 4096, which would keep fp32 state
    opt = LoRAOptimizer(model, lr=1e-2, optimizer_class=optimizer_class, min_8bit_size=0)
    ids = batch()
    before = [p.detach().clone() for p in model.get_trainable_parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = model.get_trainable_parameters()
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    state = opt.state[after[0]]["state1"]
    assert state.dtype == (torch.float32 if optimizer_class is bnb.optim.PagedAdamW else torch.uint8)
    fresh = LoRAOptimizer(model, lr=1e-2, optimizer_class=optimizer_class, min_8bit_size=0)
    fresh.load_state_dict(opt.state_dict())
    assert torch.equal(fresh.state[after[0]]["state1"], state)


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_lr_scheduler(optimizer, schedule="cosine", warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup (k + 1) / 3 for k = 0, 1; then 0.5 (1 + cos(pi t)), t = (k - 2) / 4
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_linear_and_constant_schedules():
    def lrs(schedule):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_lr_scheduler(optimizer, schedule=schedule, warmup_steps=0, total_steps=4)
        out = []
        for _ in range(5):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs("linear") == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lrs("constant") == [1.0] * 5


def test_deepspeed_gets_the_same_groups_as_the_plain_optimizer():
    # setup_engine hands DeepSpeed param_groups(...): the groups LoRAOptimizer builds, by identity.
    model = LoRAModel(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), {"target_modules": ["0"], "bias": "all"})
    groups = param_groups(model, 0.1)
    built = LoRAOptimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in built]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
