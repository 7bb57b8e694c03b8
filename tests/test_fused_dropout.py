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
@pytest.mark.parametrize("width", [64, 8])  # rank 64: the Triton kernels; rank 8: torch's dropout on CUDA
def test_cuda_bf16_fused_dropout_statistics_and_backward_mask(width):
    x = torch.ones(4096, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers = [layer.cuda() for layer in _identity_group(1, width)]
    assert (kernels._dropout_ops(x, (P,), [width]) is None) == (width % 16 != 0)
    torch.manual_seed(11)
    (y,) = kernels.lora_group(x, layers)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - P)) < 5 * ((P * (1 - P) / kept.numel()) ** 0.5)
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, kept)  # backward drew the forward's mask again on the GPU


# ---------------------------------------------------------------- CUDA: masks drawn inside Triton kernels
# The kernels' masks come from a Philox seed, not torch's generator: the reference rebuilds each
# layer's mask with triton_ops.dropout_mask (the same draw) and computes with plain torch ops.


def _masked_reference(x, a_cat, g_xa, masks, p):
    """(xa, A's gradient, x's adapter gradient) in fp32 from explicit masks."""
    r = a_cat.shape[0] // len(masks)
    drops = [torch.where(m.bool(), x.float() / (1 - p), 0.0).to(x.dtype).float() for m in masks]
    a = a_cat.float()
    g = g_xa.float()
    xa = torch.cat([d @ a[i * r : (i + 1) * r].t() for i, d in enumerate(drops)], 1)
    grad_a = torch.cat([g[:, i * r : (i + 1) * r].t() @ d for i, d in enumerate(drops)], 0)
    grad_x = sum(torch.where(m.bool(), (g[:, i * r : (i + 1) * r] @ a[i * r : (i + 1) * r]) / (1 - p), 0.0)
                 for i, m in enumerate(masks))
    return xa, grad_a, grad_x


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("m", "k", "groups"), [(4096, 1024, 3), (1000, 200, 2), (64, 64, 1)])
def test_cuda_dropout_kernels_equal_plain_products_on_their_own_masks(dtype, rtol, m, k, groups):
    # fp32: IEEE products (no TF32) in another summation order, sums of <= 4096 terms: ~1e-6, bound
    # 1e-5. bf16: inputs rounded alike on both sides (the dropped value to bf16, as torch's dropout
    # output is); the kernels round their fp32 results to bf16 once: 2^-8 = 3.9e-3 relative per
    # element at most, bound 1e-2. A wrong mask or scale on 1 element in 1000 moves these by > 3e-2.
    from lora_dist import triton_ops

    torch.manual_seed(0)
    r = 16
    x = torch.randn(m, k, device="cuda").to(dtype)
    a_cat = (torch.randn(groups * r, k, device="cuda") * 0.1).to(dtype)
    g_xa = torch.randn(m, groups * r, device="cuda").to(dtype)
    seed = triton_ops.dropout_seed(x.device)
    masks = [triton_ops.dropout_mask(m, k, i, P, seed) for i in range(groups)]
    kept = torch.stack(masks).float().mean().item()
    assert abs(kept - (1 - P)) < 5 * (P * (1 - P) / (groups * m * k)) ** 0.5
    if groups > 1:
        assert (masks[0] != masks[1]).float().mean().item() > 0.3  # independent: 2 p (1 - p) = 0.42 differ
    ref_xa, ref_a, ref_x = _masked_reference(x, a_cat, g_xa, masks, P)
    assert rel_err(triton_ops.dropout_project(x, a_cat, groups, P, seed), ref_xa) < rtol
    assert rel_err(triton_ops.dropout_a_grad(x, g_xa, groups, P, seed), ref_a) < rtol
    assert rel_err(triton_ops.dropout_input_grad(g_xa, a_cat, k, groups, P, seed), ref_x) < rtol


@pytest.mark.gpu
def test_cuda_fused_group_with_dropout_equals_the_plain_layers_on_the_kernels_masks(monkeypatch):
    # The whole group through the kernels (fp32, r = 16 each: the kernel path), against each layer's
    # own function y = W x + s B A (mask * x / (1 - p)) with the masks the kernels drew.
    from lora_dist import triton_ops

    layers = [layer.cuda() for layer in _group(outs=(128, 64, 64), ranks=(16, 16, 16))]
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    monkeypatch.setattr(triton_ops, "dropout_seed", lambda device: seed)
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    ys = kernels.lora_group(x, layers)
    gs = [torch.randn_like(y) for y in ys]
    params = [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    got = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), [x, *params])
    x2 = x.detach().reshape(-1, 64).requires_grad_(True)
    refs = []
    for i, layer in enumerate(layers):
        mask = triton_ops.dropout_mask(x2.shape[0], 64, i, P, seed).bool()
        dropped = torch.where(mask, x2 / (1 - P), 0.0)
        update = (dropped @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
        refs.append(x2 @ layer.base_layer.weight.t() + layer.scaling * update)
    ref_grads = torch.autograd.grad(sum((y * g.reshape(y.shape)).sum() for y, g in zip(refs, gs)), [x2, *params])
    for y, ref in zip(ys, refs):
        assert rel_err(y.reshape(ref.shape), ref) < FP32_RTOL
    assert rel_err(got[0].reshape(-1, 64), ref_grads[0]) < FP32_RTOL
    for g, ref in zip(got[1:], ref_grads[1:]):
        assert rel_err(g, ref) < FP32_RTOL


@pytest.mark.gpu
def test_cuda_groups_the_dropout_kernels_take_and_refuse():
    x = torch.zeros(256, 128, device="cuda", dtype=torch.bfloat16)
    assert kernels._dropout_ops(x, (P, P), [16, 16]) is not None
    assert kernels._dropout_ops(x, (P, 0.1), [16, 16]) is None  # one p per group
    assert kernels._dropout_ops(x, (P, P), [16, 32]) is None  # equal ranks
    assert kernels._dropout_ops(x, (P,), [8]) is None  # a multiple of 16
    assert kernels._dropout_ops(x, (P,), [256]) is None  # up to 128
    assert kernels._dropout_ops(x[:0], (P,), [16]) is None  # no rows
    assert kernels._dropout_ops(x.cpu(), (P,), [16]) is None  # CUDA only
