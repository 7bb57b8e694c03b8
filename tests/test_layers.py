"""LoRALayer over dense, 8-bit and 4-bit bases: init, reference update, merge/unmerge, gradients, errors.

Tolerances come from a first-order rounding bound (Higham, "Accuracy and Stability of Numerical
Algorithms", ch. 3): two ways of computing y = x W^T + b + s (x A^T) B^T that each round the
weights and the output once to a format with unit roundoff u, and accumulate K products in fp32,
differ by at most (6 u + 2 (K + r) u32) * |y|abs elementwise, where
|y|abs = |x| |W|^T + |b| + s (|x| |A|^T) |B|^T. Six roundings: merged weight, merged output;
dequantized base weight, base output, update, sum.
"""


import pytest
import torch
from torch import nn

from lora_dist import LoRALayer, dequantize_weight, quantize_model

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
BASES = ["dense", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq"]
DTYPES = [torch.float32, torch.bfloat16]
IN, OUT, RANK = 128, 64, 8  # multiples of 64: bitsandbytes' CPU 4-bit kernel needs them


def make_base(kind: str, dtype: torch.dtype, in_f: int = IN, out_f: int = OUT) -> nn.Linear:
    linear = nn.Linear(in_f, out_f)
    if kind == "dense":
        return linear.to(dtype)
    holder = nn.Sequential(linear)
    quantize_model(
        holder,
        bits=8 if kind == "int8" else 4,
        quant_type=kind[:3] if kind != "int8" else "nf4",
        double_quant=kind.endswith("-dq"),
        compute_dtype=dtype,
        skip_modules=(),
    )
    return holder[0]


def randomize_adapter(layer: LoRALayer, std: float = 0.05) -> None:
    """Move B off zero, as training would, so merges have something to fold."""
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, std)


def abs_bound(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """|y|abs of the rounding bound above, in fp32."""
    xa = x.float().abs()
    w = dequantize_weight(layer.base_layer).abs()
    bias = layer.base_layer.bias
    b = 0 if bias is None else bias.float().abs()
    a_abs, b_abs = layer.lora_A.weight.float().abs(), layer.lora_B.weight.float().abs()
    return xa @ w.T + b + layer.scaling * (xa @ a_abs.T) @ b_abs.T


def rounding_tol(layer: LoRALayer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    k = layer.in_features
    return (6 * U[dtype] + 2 * (k + layer.rank) * U[torch.float32]) * abs_bound(layer, x)


def base_bytes(base: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor bitsandbytes would save for the base: packed weight, quant state, scales, bias."""
    return {k: v.clone() for k, v in base.state_dict().items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BASES)
def test_output_at_init_equals_base_output_exactly(kind, dtype):
    layer = LoRALayer.from_base(make_base(kind, dtype), rank=RANK, alpha=16)
    x = torch.randn(4, 7, IN, dtype=dtype)
    with torch.no_grad():
        # lora_B starts at zero, so the update is exactly 0 and adding it changes no bit
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", BASES)
def test_update_matches_hand_computed_reference(kind):
    layer = LoRALayer.from_base(make_base(kind, torch.float32), rank=RANK, alpha=32)
    randomize_adapter(layer)
    layer.train()  # int8 eval quantizes activations; training mode runs the exact dequantized matmul
    x = torch.randn(5, IN)
    with torch.no_grad():
        update = layer(x) - layer.base_layer(x)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        reference = x @ a.T @ b.T * (32 / RANK)
    # fp32: the subtraction cancels the base output, so the error scales with |y|abs, not |update|
    tol = 4 * (IN + RANK) * U[torch.float32] * abs_bound(layer, x)
    assert (update - reference).abs().le(tol).all()
    assert update.abs().max() > 1e-2  # the adapter really contributed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BASES)
def test_merged_output_equals_unmerged_after_training(kind, dtype):
    torch.manual_seed(1)
    layer = LoRALayer.from_base(make_base(kind, dtype), rank=RANK, alpha=16)
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.5)
    for _ in range(3):
        x = torch.randn(16, IN, dtype=dtype)
        loss = layer(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.lora_B.weight.abs().max() > 0
    with torch.no_grad():
        # three small steps leave an update below bf16 rounding; make it large so that a merge
        # which dropped or mis-scaled it could not pass
        layer.lora_B.weight.mul_(1000)
    x = torch.randn(6, IN, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)  # training mode: exact dequantized matmul for int8 too
        layer.merge_lora_weights()
        merged = layer(x)
    assert merged.dtype == dtype
    tol = rounding_tol(layer, x, dtype)
    update = (x.float() @ layer.delta_weight().T).abs()
    assert (update > tol).float().mean() > 0.5  # a merge that lost the update would fail here
    diff = (merged.float() - unmerged.float()).abs()
    assert diff.le(tol).all(), diff.max()


@pytest.mark.parametrize("kind", BASES)
def test_fp32_merged_output_within_1e5_of_unmerged(kind):
    """The headline tolerance: unit-scale inputs, fp32, max abs diff <= 1e-5."""
    layer = LoRALayer.from_base(make_base(kind, torch.float32), rank=RANK, alpha=16)
    randomize_adapter(layer)
    x = torch.randn(32, IN)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge_lora_weights()
        merged = layer(x)
    assert (merged - unmerged).abs().max() <= 1e-5


def test_int8_eval_output_within_llm_int8_activation_bound():
    """In eval, Linear8bitLt quantizes each input row to int8 (LLM.int8()): |dx| <= max|x_row| / 254.

    The base output then moves by at most (max|x_row| / 254) * sum_k |W_jk|, plus fp16 rounding
    of the input and output (u16 = 2^-11, a few roundings of |y|abs).
    """
    layer = LoRALayer.from_base(make_base("int8", torch.float32), rank=RANK, alpha=16)
    randomize_adapter(layer)
    layer.merge_lora_weights()
    x = torch.randn(8, IN)
    with torch.no_grad():
        merged = layer.eval()(x)
        layer.unmerge_lora_weights()
        unmerged = layer(x)
    w_abs_rowsum = dequantize_weight(layer.base_layer).abs().sum(dim=1)  # (out,)
    step = x.abs().amax(dim=1, keepdim=True) / 254  # (B, 1)
    tol = step * w_abs_rowsum + 4 * U[torch.float16] * abs_bound(layer, x)
    diff = (merged - unmerged).abs()
    assert diff.le(tol).all()
    assert diff.max() > 0  # the activation quantization is real, so the bound is exercised


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("kind", BASES)
def test_merge_then_unmerge_restores_base_bitwise(kind, requantize, dtype):
    base = make_base(kind, dtype)
    layer = LoRALayer.from_base(base, rank=RANK, alpha=16)
    randomize_adapter(layer)
    x = torch.randn(3, IN, dtype=dtype)
    with torch.no_grad():
        layer(x)  # int8 moves its scales to layer.state on the first forward: test that layout
    before = base_bytes(base)
    before_weight = base.weight.data.clone()
    layer.merge_lora_weights(requantize=requantize)
    assert layer.merged
    layer.unmerge_lora_weights()
    assert not layer.merged
    after = base_bytes(base)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(base.weight.data, before_weight)
    if kind.startswith(("nf4", "fp4")):
        assert base.weight.quant_state is not None


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_requantized_4bit_merge_error_within_one_code_step(kind):
    """requantize=True rounds dequant(W) + delta to the nearest 4-bit code of its block.

    Per weight the added error is at most half the widest gap of the code book times the block's
    absmax (NF4: (1 - 0.7230) / 2 = 0.139; FP4: wider), plus the absmax's own 8-bit quantization
    with double quant (relative 1/127 of the absmax at most).
    """
    base = make_base(kind, torch.float32)
    layer = LoRALayer.from_base(base, rank=RANK, alpha=16)
    randomize_adapter(layer)
    exact = dequantize_weight(base) + layer.delta_weight()
    layer.merge_lora_weights(requantize=True)
    requantized = dequantize_weight(base)
    state = base.weight.quant_state
    code = state.code.float().sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    blocks = exact.reshape(-1, state.blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True) * (1 + 1 / 127)
    err = (requantized - exact).reshape(-1, state.blocksize).abs()
    assert err.le(half_gap * absmax + 1e-7).all()
    # and the merged layer computes with the requantized weight
    x = torch.randn(4, IN)
    with torch.no_grad():
        out = layer(x)
    ref = x @ requantized.T + base.bias
    assert (out - ref).abs().max() <= 1e-5


def test_requantized_int8_merge_error_within_half_scale_step():
    """LLM.int8() rows: error per weight <= row absmax / 254 (half a step), plus the fp16 cast."""
    base = make_base("int8", torch.float32)
    layer = LoRALayer.from_base(base, rank=RANK, alpha=16)
    randomize_adapter(layer)
    exact = dequantize_weight(base) + layer.delta_weight()
    layer.merge_lora_weights(requantize=True)
    err = (dequantize_weight(base) - exact).abs()
    row_absmax = exact.abs().amax(dim=1, keepdim=True)
    assert err.le(row_absmax / 254 + 2 * U[torch.float16] * exact.abs() + 1e-6).all()
    assert base.weight.dtype == torch.int8  # stays 8-bit in memory


def test_eval_forward_leaves_4bit_base_layout_untouched():
    """bitsandbytes 0.50 would repack (and round absmax to bf16) on an eval CPU forward; we opt out."""
    base = make_base("nf4-dq", torch.float32)
    layer = LoRALayer.from_base(base, rank=RANK)
    before = base.weight.data.clone()
    absmax = base.weight.quant_state.absmax.clone()
    with torch.no_grad():
        layer.eval()(torch.randn(2, IN))
    assert torch.equal(base.weight.data, before)
    assert torch.equal(base.weight.quant_state.absmax, absmax)


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"), reason="needs AVX512")
def test_merge_reads_a_weight_bitsandbytes_repacked_for_the_cpu():
    """A base repacked by bitsandbytes before we wrapped it still dequantizes to the same weight."""
    base = make_base("nf4", torch.float32)
    reference = dequantize_weight(base)
    base.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        base.eval()(torch.randn(2, IN))
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    # the repack rounds absmax to bf16 (relative 2^-8), so dequantized weights move by that much
    assert torch.allclose(dequantize_weight(base), reference, rtol=2**-8, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BASES)
def test_gradients_reach_only_adapter(kind, dtype):
    layer = LoRALayer.from_base(make_base(kind, dtype), rank=RANK)
    randomize_adapter(layer)
    layer(torch.randn(4, IN, dtype=dtype)).float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    for name, p in layer.base_layer.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name


def test_merged_layer_refuses_to_train():
    layer = LoRALayer(IN, OUT, rank=4)
    layer.merge_lora_weights()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, IN))
    with torch.no_grad():
        layer(torch.randn(2, IN))  # inference while merged is fine


def test_merge_weights_true_starts_merged_and_unmerges_exactly():
    base = nn.Linear(IN, OUT)
    original = base.weight.detach().clone()
    layer = LoRALayer.from_base(base, rank=4, merge_weights=True)
    assert layer.merged  # B is zero at init, so the merged weight equals the original
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.1)
    layer.unmerge_lora_weights()
    assert torch.equal(base.weight, original)


def test_dense_merge_folds_update_into_base_weight():
    layer = LoRALayer(IN, OUT, rank=4, alpha=8)
    randomize_adapter(layer)
    original = layer.base_layer.weight.detach().clone()
    layer.merge_lora_weights()
    expected = original + layer.lora_B.weight @ layer.lora_A.weight * 2.0
    assert torch.allclose(layer.base_layer.weight, expected, atol=1e-6)


def test_constructor_builds_dense_base_with_public_attributes():
    layer = LoRALayer(IN, OUT, rank=4, alpha=8, dropout=0.1, bias=False)
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (IN, OUT, 4, 8)
    assert layer.scaling == 2.0 and layer.merged is False and layer.merge_weights is False
    assert layer.base_layer.bias is None
    assert set(layer.state_dict()) == {"base_layer.weight", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, IN) and layer.lora_B.weight.shape == (OUT, 4)


def test_rslora_scales_by_alpha_over_sqrt_rank():
    assert LoRALayer(IN, OUT, rank=16, alpha=8, use_rslora=True).scaling == 2.0


def test_gaussian_init_keeps_b_zero_and_a_small():
    layer = LoRALayer(IN, OUT, rank=16, init="gaussian")
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert abs(layer.lora_A.weight.std().item() - 1 / 16) < 0.01  # 2048 draws: std error ~1.6e-3


def test_dropout_only_touches_the_adapter_path():
    layer = LoRALayer(IN, OUT, rank=4, dropout=0.5)
    randomize_adapter(layer)
    x = torch.randn(3, IN)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # eval: dropout is off
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_fp16_input_runs_and_returns_fp16(kind):
    layer = LoRALayer.from_base(make_base(kind, torch.float16), rank=4)
    randomize_adapter(layer)
    x = torch.randn(2, 3, IN, dtype=torch.float16)
    out = layer(x)
    assert out.dtype == torch.float16 and out.shape == (2, 3, OUT)
    ref = layer.base_layer(x).float() + x.float() @ layer.delta_weight().T
    assert (out.float() - ref).abs().le(rounding_tol(layer, x, torch.float16)).all()


def test_wrapping_does_not_copy_the_base():
    base = make_base("nf4", torch.float32)
    data_ptr = base.weight.data_ptr()
    layer = LoRALayer.from_base(base, rank=4)
    assert layer.base_layer is base and base.weight.data_ptr() == data_ptr


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "init must be one of"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALayer(IN, OUT, **kwargs)


def test_from_base_rejects_unsupported_module():
    with pytest.raises(TypeError, match="nn.Linear, bitsandbytes Linear8bitLt or Linear4bit; got Conv1d"):
        LoRALayer.from_base(nn.Conv1d(4, 4, 1))


def test_from_base_rejects_in_out_mismatch():
    with pytest.raises(ValueError, match="base is 128->64 but the layer was asked for 64->64"):
        LoRALayer.from_base(nn.Linear(IN, OUT), in_features=64)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_adapter_is_float32_over_a_bf16_base(kind):
    """AdamW steps of ~lr are below bf16's resolution near 1 (2^-8): bf16 adapters would not move."""
    layer = LoRALayer.from_base(make_base(kind, torch.bfloat16), rank=4)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    out = layer(torch.randn(2, IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_int8_bias_keeps_its_dtype():
    base = make_base("int8", torch.bfloat16)  # compute_dtype is a 4-bit setting; int8 ignores it
    assert base.bias.dtype == torch.float32


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merged_quantized_layer_computes_in_the_base_compute_dtype(kind):
    layer = LoRALayer.from_base(make_base(kind, torch.bfloat16), rank=4)
    layer.merge_lora_weights()
    # 4-bit: its compute dtype (bf16 here), not fp32 (8x the packed bytes); int8 has none: fp32
    expected = torch.bfloat16 if kind == "nf4" else torch.float32
    assert layer.merged_weight.dtype == expected
