"""`kernels.adapter_copies`: each adapter weight cast (and B scaled) once per micro batch, not per use.

The copies change nothing the step computes (bitwise, with checkpointing, with dropout), are made
once each, are gone when the scope ends (a second step sees the optimizer's update), and are what
the planner counts. Tiny random family models from test_families (CPU).
"""

from __future__ import annotations

import types

import pytest
import torch

from lora_dist import families, kernels, plan
from lora_dist.loading import decoder_layers
from test_families import batch, build


def _fused(model_type: str, dtype: torch.dtype, dropout: float = 0.0, checkpointing: bool = True):
    model = build(model_type, bits=4, dtype=dtype)
    if dropout:
        for layer in model.lora_layers.values():
            layer.lora_dropout = torch.nn.Dropout(dropout)
    if checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    families.patch_model_for_speed(model)
    return model


def _steps(model, tokens: torch.Tensor, steps: int, copies: bool) -> list[tuple[float, list[torch.Tensor]]]:
    """`steps` SGD steps; per step the loss and the adapter gradients."""
    torch.manual_seed(7)  # the dropout masks
    params = model.get_trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.5)
    out = []
    for _ in range(steps):
        with kernels.adapter_copies() if copies else torch.enable_grad():
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # separate q/k/v and fused qkv_proj
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_copies_change_nothing_and_do_not_outlive_their_scope(model_type, dtype, dropout):
    # Two steps from the same start, with and without the scope: equal bit for bit. The second
    # step's forward reads the adapters the first step's update wrote: a copy kept past its scope
    # would make it differ (lr 0.5 moves every adapter).
    tokens = batch()
    ref = _steps(_fused(model_type, dtype, dropout), tokens, 2, copies=False)
    got = _steps(_fused(model_type, dtype, dropout), tokens, 2, copies=True)
    assert ref[0][0] != ref[1][0]
    for (loss_r, grads_r), (loss_g, grads_g) in zip(ref, got, strict=True):
        assert loss_g == loss_r
        assert all(torch.equal(g, r) for g, r in zip(grads_g, grads_r, strict=True))
    assert kernels._COPIES is None


def test_each_copy_is_made_once_and_reused_by_recompute_and_backward(monkeypatch):
    model = _fused("llama", torch.bfloat16)
    uses, makes = [], []
    copy_of = kernels._copy_of

    def counted(key, sources, make):
        uses.append(key)
        return copy_of(key, sources, lambda: makes.append(key) or make())

    monkeypatch.setattr(kernels, "_copy_of", counted)
    with kernels.adapter_copies():
        table = kernels._COPIES.table
        model(input_ids=batch(), labels=batch()).loss.backward()
        copies = dict(table)
    # per layer: A of the q/k/v, o, gate/up and down groups; B of the seven linears
    layers = len(decoder_layers(model))
    assert len(makes) == len(set(makes)) == len(copies) == layers * (4 + 7)
    # forward, the checkpointed recompute and backward each read them, but the recompute stops before
    # the down projection's output half (torch's early stop: it saves nothing), which reads its B
    assert len(uses) == 3 * len(makes) - layers
    assert all(t.dtype == torch.bfloat16 for *_, t in copies.values())


def test_nested_scopes_share_the_outer_copies():
    with kernels.adapter_copies():
        outer = kernels._COPIES
        with kernels.adapter_copies():
            assert kernels._COPIES is outer
        assert kernels._COPIES is outer
    assert kernels._COPIES is None


def test_planner_counts_the_copies_a_step_makes():
    model = _fused("llama", torch.bfloat16)
    with kernels.adapter_copies():
        table = kernels._COPIES.table
        model(input_ids=batch(), labels=batch()).loss.backward()
        made = sum(plan._rounded(t.numel() * t.element_size()) for *_, t in table.values())
    facts = types.SimpleNamespace(layers=[plan._describe_layer(l, 4) for l in decoder_layers(model)], fused=True)
    predicted = plan._adapter_copy_bytes(facts, 2)
    # the planner rounds each A to the allocator's 512 B apart; a group's A is one tensor (at most 512 B
    # less per grouped linear: 3 + 2 per layer here)
    assert 0 <= predicted - made <= 512 * 5 * len(facts.layers)
    assert made > 0


def test_a_weight_changed_in_place_inside_a_scope_is_copied_again_and_dtypes_get_their_own_copies():
    a = torch.randn(4, 8)
    with kernels.adapter_copies():
        first = kernels._a_cat((a,), torch.bfloat16)
        assert kernels._a_cat((a,), torch.bfloat16) is first  # reused
        assert kernels._a_cat((a,), torch.float16).dtype == torch.float16  # the dtype is part of the key
        with torch.no_grad():
            a.add_(1.0)  # as an optimizer step would, inside the scope
        again = kernels._a_cat((a,), torch.bfloat16)
        assert again is not first and torch.equal(again, a.to(torch.bfloat16))
        b = torch.randn(8, 4)
        assert torch.equal(kernels._scaled_b(b, 2.0, torch.bfloat16), (b * 2.0).to(torch.bfloat16))
        assert torch.equal(kernels._scaled_b(b, 0.5, torch.bfloat16), (b * 0.5).to(torch.bfloat16))  # scaling: key
