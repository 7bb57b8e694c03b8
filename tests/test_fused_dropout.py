"""LoRA dropout in the fused path (kernels.lora_group): the plain path's function, its statistics,
and masks drawn again in backward rather than stored.

Reference: LoRALayer's plain forward, y = base(x) + s * B(A(dropout(x))), which on the CPU draws
its masks from the same generator in the same order (q, k, v), so with the same seed both paths
drop the same entries and differ only in summation order.
"""

import pytest
import torch
from torch import nn

from lora_dist import config as config_mod
from lora_dist import families, kernels, shapes
from lora_dist.layers import LoRALayer, supports_fast_path
from lora_dist.model import LoRAConfig, LoRAModel

# fp32, the same masks: the paths differ in summation order only (base and update summed inside
# one GEMM vs apart; s = alpha / r = 2 is exact either way) over sums of <= 64 terms: a few ulps,
# ~1e-6 relative; 1e-5 leaves room and still fails on any mask or scale difference (>= 1e-2).
FP32_RTOL = 1e-5
P = 0.3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _group(p: float = P, outs=(64, 32, 48), ranks=(4, 8, 2), seed: int = 0) -> list[LoRALayer]:
    torch.manual_seed(seed)
    layers = []
    for out, r in zip(outs, ranks):
        layer = LoRALayer.from_base(nn.Linear(64, out, bias=False), rank=r, alpha=2 * r, dropout=p)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.05)  # nonzero, so A and the adapter path of x get gradients
        layers.append(layer)
    return layers


def _run(layers, fused: bool, seed: int = 7):
    """Outputs, and gradients of sum_i <y_i, c_i> w.r.t. x and every adapter, from one seeded draw."""
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    torch.manual_seed(seed)
    ys = kernels.lora_group(x, layers) if fused else [layer(x) for layer in layers]
    gen = torch.Generator().manual_seed(4)
    loss = sum((y * torch.randn(y.shape, generator=gen)).sum() for y in ys)
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    grads = torch.autograd.grad(loss, [x, *params])
    return ys, grads, torch.get_rng_state()


def test_fused_dropout_equals_plain_path_with_the_same_masks():
    layers = _group()
    assert all(supports_fast_path(layer) for layer in layers)
    ys, grads, rng_after = _run(layers, fused=True)
    ys_ref, grads_ref, rng_after_ref = _run(layers, fused=False)
    assert all(rel_err(y, r) < FP32_RTOL for y, r in zip(ys, ys_ref))
    assert all(rel_err(g, r) < FP32_RTOL for g, r in zip(grads, grads_ref))
    # backward replays its draws without advancing the generator: later draws stay aligned too
    assert torch.equal(rng_after, rng_after_ref)


def test_fused_dropout_is_not_a_no_op():
    # The control for the test above: other masks (another seed) or no dropout give other values.
    layers = _group()
    ys, grads, _ = _run(layers, fused=True)
    ys_other, grads_other, _ = _run(layers, fused=True, seed=8)
    ys_none, _, _ = _run(_group(p=0.0), fused=True)
    for y, y_other, y_none in zip(ys, ys_other, ys_none):
        assert rel_err(y, y_other) > 1e-3 and rel_err(y, y_none) > 1e-3
    assert all(rel_err(g, r) > 1e-3 for g, r in zip(grads[1::2], grads_other[1::2]))  # x and every A


def test_eval_mode_applies_no_dropout():
    layers = _group()
    for layer in layers:
        layer.eval()
    ys, grads, _ = _run(layers, fused=True)
    ys_none, grads_none, _ = _run(_group(p=0.0), fused=True)
    assert all(torch.equal(y, r) for y, r in zip(ys, ys_none))
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_none))


def test_fused_dropout_saves_only_the_input_and_no_mask():
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(2, 16, 64, requires_grad=True)
    for p in (0.0, P):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernels.lora_group(x, _group(p=p))
        assert saved == [(32, 64)]  # x as (M, in): no (M, in) mask, no dropped copy


def _identity_group(n_layers: int, width: int = 64) -> list[LoRALayer]:
    """Layers computing y = dropout(x): zero base, A = B = I, s = 1."""
    layers = []
    for _ in range(n_layers):
        layer = LoRALayer.from_base(nn.Linear(width, width, bias=False), rank=width, alpha=width, dropout=P)
        with torch.no_grad():
            layer.base_layer.weight.zero_()
            layer.lora_A.weight.copy_(torch.eye(width))
            layer.lora_B.weight.copy_(torch.eye(width))
        layers.append(layer)
    return layers


def test_fused_dropout_keeps_1_minus_p_scales_by_its_inverse_and_backward_uses_the_forward_mask():
    x = torch.ones(4096, 64, requires_grad=True)
    torch.manual_seed(11)
    (y,) = kernels.lora_group(x, _identity_group(1))
    kept = y != 0
    n = kept.numel()
    # binomial keep fraction: mean 1 - p, std sqrt(p (1 - p) / n) ~ 9e-4; 5 sigma
    assert abs(kept.float().mean().item() - (1 - P)) < 5 * ((P * (1 - P) / n) ** 0.5)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - P)), rtol=1e-6, atol=0)
    y.sum().backward()
    # dL/dx = mask / (1 - p) of the forward's draw: with x = 1 that is y itself, entry for entry
    assert torch.equal(x.grad, y.detach())


def test_layers_of_a_group_draw_independent_masks():
    x = torch.ones(4096, 64)
    torch.manual_seed(12)
    y1, y2 = kernels.lora_group(x, _identity_group(2))
    both = ((y1 != 0) & (y2 != 0)).float().mean().item()
    n = y1.numel()
    keep2 = (1 - P) ** 2  # independent masks; the same mask would give 1 - p = 0.7
    assert abs(both - keep2) < 5 * ((keep2 * (1 - keep2) / n) ** 0.5)


def test_tiny_model_with_dropout_trains_through_the_fused_path_like_the_plain_one():
    # Same masks, drawn in the same order (q, k, v, o, gate, up, down) by both forwards.
    def model(patched: bool) -> LoRAModel:
        base = shapes.build_random_model("tiny", bits=None, compute_dtype=torch.float32, seed=0)
        torch.manual_seed(0)
        m = LoRAModel(base, LoRAConfig(rank=8, alpha=16, dropout=0.1, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for layer in m.lora_layers.values():
                layer.lora_B.weight.normal_(0, 0.02)
        if patched:
            families.patch_model_for_speed(m)
        return m.train()

    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for patched in (True, False):
        m = model(patched)
        torch.manual_seed(5)
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in m.get_trainable_parameters()]))
    (loss, grads), (ref_loss, ref_grads) = results
    # fused RMSNorm/RoPE/loss too: summation orders over <= 512 terms, as test_kernels' model test
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_shipped_8b_recipe_with_dropout_runs_every_adapter_on_the_fused_path():
    cfg = config_mod.load_config("configs/llama3-8b-qlora-24gb.yaml")
    assert cfg.lora.dropout > 0
    base = shapes.build_random_model("tiny", bits=4, compute_dtype=torch.float32, seed=0)
    model = LoRAModel(base, cfg.lora)
    assert model.lora_layers and all(supports_fast_path(layer) for layer in model.lora_layers.values())


@pytest.mark.gpu
def test_cuda_bf16_fused_dropout_statistics_and_backward_mask():
    x = torch.ones(4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers = [layer.cuda() for layer in _identity_group(1)]
    torch.manual_seed(11)
    (y,) = kernels.lora_group(x, layers)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - P)) < 5 * ((P * (1 - P) / kept.numel()) ** 0.5)
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, kept)  # backward drew the forward's mask again on the GPU
