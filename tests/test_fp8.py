"""FP8 base GEMMs (kernels.set_fp8_base_gemms): e4m3 operands scaled per row, fp32 accumulation.

References: the same quantized operands multiplied in float64 (the FP8 product must equal it up to
fp32 accumulation), and the unquantized fp32 product (the FP8 rounding itself, bounded by e4m3's
precision). CPU: torch._scaled_mm runs there with row-wise scales.
"""

import pytest
import torch
from torch import nn

from lora_dist import kernels
from lora_dist.layers import LoRALayer

E4M3_REL = 2.0**-4  # half a unit in the last place of e4m3's 3 mantissa bits, relative to the value


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def fp8():
    kernels.set_fp8_base_gemms(True)
    yield
    kernels.set_fp8_base_gemms(False)


def test_fp8_rows_put_each_row_max_on_448_and_round_within_e4m3_precision():
    torch.manual_seed(0)
    t = torch.randn(64, 256) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows across six decades
    q, scale = kernels.fp8_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))
    back = q.float() * scale
    # normal e4m3 values round within 2^-4 relative; values below e4m3's smallest normal (2^-6 of
    # the row's scale units) within half its subnormal step, 2^-10 of a scale unit
    assert ((back - t).abs() <= E4M3_REL * t.abs() + 2.0**-10 * scale).all()


def _group(outs=(96, 64), rank=16, bias=False):
    torch.manual_seed(1)
    layers = []
    for out in outs:
        layer = LoRALayer.from_base(nn.Linear(128, out, bias=bias), rank=rank, alpha=2 * rank)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.05)
        layers.append(layer)
    return layers


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_group_equals_the_products_of_its_quantized_operands(fp8, bias, dtype, rtol):
    # forward: y_i = deq(q(x)) @ deq(q(W_i)).T + s B A x (+ b); backward: x's gradient through the base
    # = deq(q(g_i)) @ deq(q(W_i.T)).T, both with fp32 accumulation over K = 128 / 96 terms: ~1e-7 in
    # fp32; bf16 (what CUDA runs) adds its rounding of the output and of the adapter part, 2^-9 each
    layers = [layer.to(dtype) for layer in _group(bias=bias)]
    x = torch.randn(2, 40, 128, dtype=dtype, requires_grad=True)
    ys = kernels.lora_group(x, layers)
    gs = [torch.randn_like(y) for y in ys]
    grad_x = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), x)[0].reshape(-1, 128)

    def deq(t):
        q, s = kernels.fp8_rows(t)
        return q.double() * s.double()

    x2 = x.detach().reshape(-1, 128)
    ref_grad = torch.zeros_like(x2, dtype=torch.float64)
    for y, g, layer in zip(ys, gs, layers):
        w = layer.base_layer.weight.detach()
        update = layer.scaling * (x2.double() @ layer.lora_A.weight.double().t()) @ layer.lora_B.weight.double().t()
        ref = deq(x2) @ deq(w).t() + update
        if bias:
            ref = ref + layer.base_layer.bias.double()
        assert rel_err(y.reshape(ref.shape), ref) < rtol
        g2 = g.reshape(-1, w.shape[0])
        adapter = layer.scaling * (g2.double() @ layer.lora_B.weight.double()) @ layer.lora_A.weight.double()
        ref_grad += deq(g2) @ deq(w.t().contiguous()).t() + adapter
    assert rel_err(grad_x, ref_grad) < rtol


def test_fp8_forward_only_keeps_xs_gradient_through_the_base_in_the_compute_dtype():
    # forward as with FP8 both ways (the same quantized products); x's gradient through W_i is the
    # fp32 product g_i @ W_i exactly (fp32 accumulation over 96 terms: 1e-6)
    layers = _group()
    x = torch.randn(2, 40, 128, requires_grad=True)
    kernels.set_fp8_base_gemms(True)
    try:
        both = kernels.lora_group(x, layers)
        kernels.set_fp8_base_gemms(True, backward=False)
        ys = kernels.lora_group(x, layers)
    finally:
        kernels.set_fp8_base_gemms(False)
    assert all(torch.equal(a, b) for a, b in zip(ys, both))
    gs = [torch.randn_like(y) for y in ys]
    grad_x = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), x)[0].reshape(-1, 128)
    ref = torch.zeros(80, 128, dtype=torch.float64)
    for g, layer in zip(gs, layers):
        w = layer.base_layer.weight.detach().double()
        g2 = g.reshape(80, -1).double()
        ref += g2 @ w + layer.scaling * (g2 @ layer.lora_B.weight.double()) @ layer.lora_A.weight.double()
    assert rel_err(grad_x, ref) < 1e-6


def test_fp8_group_is_within_e4m3_rounding_of_the_exact_product_and_not_equal_to_it(fp8):
    # Per product the rounding of both operands (<= 2^-4 relative each) averages over K terms of
    # random sign: the relative error of y is about 2^-4 / sqrt(3) ~ 3.6e-2 per operand pair,
    # bounded here by 2^-3; above 1e-3 shows the products really ran in FP8.
    layers = _group()
    x = torch.randn(80, 128)
    ys = kernels.lora_group(x, layers)
    kernels.set_fp8_base_gemms(False)
    exact = kernels.lora_group(x, layers)
    for y, ref in zip(ys, exact):
        assert 1e-3 < rel_err(y, ref) < 2.0**-3


def _train(fp8_on: bool, steps: int = 40) -> list[float]:
    from lora_dist import bench

    kernels.set_fp8_base_gemms(fp8_on)
    try:
        setup = bench.Setup(shape="tiny", model_path=None, layers=2, seq=32, micro_batch=4, rank=16, alpha=32.0,
                            quant="nf4", double_quant=True, lr=1e-2, seed=0, device="cpu", dtype=torch.float32)
        side = bench.build_ours(setup, checkpointing=True)
        batch = bench.make_batch(setup, 512)
        return [float(bench.train_step(side, batch)) for _ in range(steps)]
    finally:
        kernels.set_fp8_base_gemms(False)


def test_tiny_model_trains_in_fp8_as_it_does_without():
    # NF4 base, checkpointing, 40 AdamW steps memorizing one batch: the loss falls by ~2 nats either
    # way. FP8 perturbs every base product by ~4e-2 relative (see above), a fixed function of the
    # inputs: the curves agree within 3% at every step. An end-to-end check: the operand test above is
    # the one that pins each product.
    ref, got = _train(False), _train(True)
    assert ref[0] - ref[-1] > 1.0 and got != ref  # it learns, and the FP8 products really ran
    # measured: at most 1.8% apart along the curve (mid-way), 2e-4 at both ends
    assert all(abs(a - b) < 0.03 * b for a, b in zip(got, ref))


@pytest.mark.gpu
def test_cuda_bf16_fp8_group_equals_the_products_of_its_quantized_operands(fp8):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    # The H200's FP8 tensor cores (torch._scaled_mm, row-wise scales) against the same quantized operands
    # in float64: fp32 accumulation, then one rounding to bf16 (2^-9 relative per element): bound 1e-2.
    layers = [layer.cuda().to(torch.bfloat16) for layer in _group(outs=(128, 64))]
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ys = kernels.lora_group(x, layers)
    gs = [torch.randn_like(y) for y in ys]
    grad_x = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), x)[0]

    def deq(t):
        q, s = kernels.fp8_rows(t)
        return q.double() * s.double()

    ref_grad = 0
    for y, g, layer in zip(ys, gs, layers):
        w, a, b = (t.detach() for t in (layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight))
        x2 = x.detach()
        ref = deq(x2) @ deq(w).t() + layer.scaling * (x2.double() @ a.double().t()) @ b.double().t()
        assert rel_err(y, ref) < 1e-2
        ref_grad = ref_grad + deq(g) @ deq(w.t().contiguous()).t() + layer.scaling * (g.double() @ b.double()) @ a.double()
    assert rel_err(grad_x, ref_grad) < 1e-2


def _bits_or_nan(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values as (NaN positions, bit patterns elsewhere): a NaN's sign bit is not part of the contract."""
    nan = q.float().isnan()
    return nan, q.view(torch.uint8).masked_fill(nan, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8192, 4096), (37, 14336), (5, 33)])
def test_cuda_fp8_rows_kernel_is_the_torch_function_bit_for_bit(dtype, shape, monkeypatch):
    # triton_ops.fp8_rows against kernels._fp8_rows_fn run eagerly: the same fp32 multiplier (torch's
    # 448 / amax is amax.reciprocal() * 448; a correctly rounded division instead differed in its last bit
    # and moved values near an e4m3 midpoint to the other neighbour: 11 of 33.5M fp32 values, 1,525 of
    # 530k bf16 ones on the H200), the same scale amax * fp32(1/448), one cast: equal bits, scales equal.
    # Rows: an all-zero one (the clamp), a NaN one (NaN throughout, as torch's amax keeps it), an inf one.
    from lora_dist import triton_ops

    torch.manual_seed(0)
    t = (torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, device="cuda") * 10).to(dtype)
    t[0] = 0
    t[1, 3], t[2, 5] = float("nan"), float("inf")
    q, s = triton_ops.fp8_rows(t, kernels.E4M3_MAX)
    ref_q, ref_s = kernels._fp8_rows_fn(t)
    assert q.dtype == torch.float8_e4m3fn and q.shape == ref_q.shape and s.shape == ref_s.shape
    assert all(torch.equal(a, b) for a, b in zip(_bits_or_nan(q), _bits_or_nan(ref_q)))
    assert torch.equal(s.nan_to_num(), ref_s.nan_to_num()) and torch.equal(s.isnan(), ref_s.isnan())
    assert q[1].float().isnan().all() and not q[0].float().isnan().any()
    calls, kernel = [], triton_ops.fp8_rows
    monkeypatch.setattr(triton_ops, "fp8_rows", lambda *a: calls.append(a) or kernel(*a))
    got_q, _ = kernels.fp8_rows(t)  # what the FP8 GEMMs call: this kernel
    assert len(calls) == 1 and torch.equal(got_q.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1536, 4160), (48, 80)])
def test_cuda_fp8_weight_goes_from_packed_4bit_to_e4m3_as_the_torch_functions_of_its_bf16_dequantize(
        quant_type, double_quant, weight_dtype, shape):
    # One kernel from the packed weight (bitsandbytes' dequantize op for op, rounded to bf16, times the
    # plan's multiplier per row or, transposed, per column, rounded to e4m3) against bitsandbytes'
    # dequantize then the eager torch functions: equal bits and scales, both directions, the plan's
    # first launch (Triton's JIT) and its later ones (the cached runner).
    from lora_dist import quant

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)).to(weight_dtype).cuda()
    quant.quantize_model(holder, bits=4, quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=torch.bfloat16, skip_modules=())
    base = holder[0]
    w = quant.dequantize_weight(base, torch.bfloat16)
    for transpose, ref_fn in ((False, kernels._fp8_rows_fn), (True, kernels._fp8_cols_fn)):
        ref_q, ref_s = ref_fn(w)
        for _ in range(2):
            q, s = kernels._fp8_weight(base, torch.bfloat16, transpose)
            assert q.dtype == torch.float8_e4m3fn and q.shape == ref_q.shape and q.is_contiguous()
            assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    plans = kernels._DEQUANTIZE_PLANS[base]
    assert all(isinstance(plans[("fp8", t)][1], kernels._Fp8WeightPlan) for t in (False, True))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize, shape", [(128, (130, 192)), (256, (40, 4160)), (4096, (24, 8192))])
def test_cuda_fp8_weight_kernel_at_other_blocksizes(quant_type, blocksize, shape):
    # The kernel looks a scale up once per span of a tile's row (min(tile width, blocksize) values): blocks
    # that cross rows (192 and 4160 are not multiples of 128 and 256), tiles narrower than the row's 128
    # (gcd(4160, 128) = 64), blocks wider than a tile (4096). Against bitsandbytes' own dequantize then
    # the eager torch functions: equal bits.
    import bitsandbytes.functional as bnbF

    from lora_dist import triton_ops

    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    assert triton_ops.dequantizes_to_fp8(packed, state)
    deq = bnbF.dequantize_4bit(packed, state)
    for transpose, ref_fn in ((False, kernels._fp8_rows_fn), (True, kernels._fp8_cols_fn)):
        ref_q, _ = ref_fn(deq)
        mult, _ = kernels._fp8_factors(deq, 0 if transpose else 1)
        q = triton_ops.dequantize_4bit_fp8(packed, state, mult.reshape(-1).contiguous(), transpose)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.gpu
def test_cuda_fp8_weight_kernel_refuses_what_its_tiles_do_not_cover():
    # Rows not a multiple of 16 values, a blocksize not a power of two (a span could cross a block), a row of
    # more tiles than a grid dimension holds (16 x an odd number of columns past 65535 tiles): the caller
    # then quantizes a bf16 dequantize through the torch functions.
    import copy

    import bitsandbytes.functional as bnbF

    from lora_dist import triton_ops

    def state_of(shape):
        return bnbF.quantize_4bit(torch.randn(shape, device="cuda", dtype=torch.bfloat16), blocksize=64)

    packed, state = state_of((8, 48))
    assert triton_ops.dequantizes_to_fp8(packed, state)
    odd_block = copy.copy(state)
    odd_block.blocksize = 96
    assert not triton_ops.dequantizes_to_fp8(packed, odd_block)
    assert not triton_ops.dequantizes_to_fp8(*state_of((8, 24)))
    assert not triton_ops.dequantizes_to_fp8(*state_of((2, 16 * 65537)))
    assert triton_ops.dequantizes_to_fp8(*state_of((2, 16 * 65535)))


@pytest.mark.gpu
def test_cuda_fp8_group_over_4bit_weights_is_the_same_through_the_direct_kernel_as_through_bf16(fp8, monkeypatch):
    # The fused path's FP8 GEMMs with the weights' e4m3 operands made straight from their packed data,
    # then again through a bf16 dequantize and the torch functions (the direct kernel turned off):
    # the same operands, so the same outputs and gradients, bit for bit.
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")
    from lora_dist import quant, triton_ops

    torch.manual_seed(0)
    layers = []
    for out in (512, 128):
        holder = nn.Sequential(nn.Linear(256, out, bias=False)).cuda()
        quant.quantize_model(holder, bits=4, compute_dtype=torch.bfloat16, skip_modules=())  # NF4, double quant
        layers.append(LoRALayer.from_base(holder[0], rank=16, alpha=32).cuda())
        nn.init.normal_(layers[-1].lora_B.weight, std=0.05)
    x = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)

    def run():
        xi = x.clone().requires_grad_(True)
        ys = kernels.lora_group(xi, layers)
        loss = sum((y.float() * (i + 1)).sin().sum() for i, y in enumerate(ys))
        grads = torch.autograd.grad(loss, [xi, *[layer.lora_B.weight for layer in layers]])
        return [y.detach() for y in ys], grads

    direct = run()
    assert all(("fp8", t) in kernels._DEQUANTIZE_PLANS[layer.base_layer] for layer in layers for t in (False, True))
    for layer in layers:
        kernels._DEQUANTIZE_PLANS.pop(layer.base_layer)
    monkeypatch.setattr(triton_ops, "dequantizes_to_fp8", lambda packed, state: False)
    through_bf16 = run()
    for a, b in zip([*direct[0], *direct[1]], [*through_bf16[0], *through_bf16[1]]):
        assert torch.equal(a, b)


def test_fp8_is_taken_only_where_it_can_run(fp8):
    x = torch.zeros(32, 128)
    assert kernels._fp8_takes(x, _group())
    assert not kernels._fp8_takes(x, _group(outs=(96, 40)))  # every width a multiple of 16
    assert not kernels._fp8_takes(torch.zeros(32, 120), [])
    kernels.set_fp8_base_gemms(False)
    assert not kernels._fp8_takes(x, _group())


def test_fp8_rows_of_zero_and_inf_rows():
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, float("inf"), 2.0, 3.0]])
    q, scale = kernels.fp8_rows(t)
    assert torch.equal(q[0].float(), torch.zeros(4))  # no NaN from an all-zero row
    assert torch.isinf(scale[1]).all()  # documented: an inf row gives a non-finite product


def test_fp8_backward_only_keeps_the_loss_forward_and_takes_fp8_in_the_recompute_and_x_gradient():
    # Two groups in a chain under non-reentrant checkpointing, a loss linear in the output (its gradient
    # does not depend on the output's value). forward=False: the loss is the non-FP8 model's bit for bit;
    # the recompute (inside backward) runs the FP8 products, so every gradient equals the one of FP8 both
    # ways bit for bit (the same recomputed activations, the same FP8 x gradient), but the second B's:
    # it reads x @ A.T kept from the forward (not recomputed), so it is the non-FP8 run's.
    from torch.utils.checkpoint import checkpoint

    first, second = _group(outs=(128,)), _group(outs=(96,))
    x = torch.randn(2, 40, 128)
    c = torch.randn(2, 40, 96)

    def run(**switches):
        kernels.set_fp8_base_gemms(**switches)
        try:
            xi = x.clone().requires_grad_()
            y = checkpoint(lambda t: kernels.lora_group(kernels.lora_group(t, first)[0], second)[0], xi,
                           use_reentrant=False)
            loss = (y * c).sum()
            params = [p for layer in first + second for p in (layer.lora_A.weight, layer.lora_B.weight)]
            return loss.detach(), torch.autograd.grad(loss, [xi, *params])
        finally:
            kernels.set_fp8_base_gemms(False)

    plain_loss, plain_grads = run(on=False)
    fp8_loss, fp8_grads = run(on=True)
    loss, grads = run(on=True, forward=False)
    assert torch.equal(loss, plain_loss) and not torch.equal(loss, fp8_loss)
    # (x, first A, first B, second A, second B)
    assert all(torch.equal(a, b) for a, b in zip(grads[:4], fp8_grads[:4]))
    assert torch.equal(grads[4], plain_grads[4]) and not torch.equal(grads[4], fp8_grads[4])
    assert not torch.equal(grads[0], plain_grads[0])  # the FP8 products really ran in backward
    # without checkpointing nothing is recomputed: forward as without FP8, x's gradient in FP8
    kernels.set_fp8_base_gemms(True, forward=False)
    try:
        xi = x.clone().requires_grad_()
        y = kernels.lora_group(xi, second)[0]
        g = torch.randn_like(y)
        grad_x = torch.autograd.grad((y * g).sum(), xi)[0]
    finally:
        kernels.set_fp8_base_gemms(False)
    kernels.set_fp8_base_gemms(True)
    try:
        xj = x.clone().requires_grad_()
        ref_y = kernels.lora_group(xj, second)[0]
        ref_grad = torch.autograd.grad((ref_y * g).sum(), xj)[0]
    finally:
        kernels.set_fp8_base_gemms(False)
    assert torch.equal(y.detach(), kernels.lora_group(x, second)[0]) and torch.equal(grad_x, ref_grad)
