"""bitsandbytes in one place: quantize a model's linears, dequantize and requantize a weight.

This is the only module that imports bitsandbytes. Everything else asks it questions
(`is_supported_linear`, `bits_of`, `dequantize_weight`) so that layer and model code stay plain torch.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

# bitsandbytes warns at import that an optional kernel for its CPU-repacked 4-bit layout is missing;
# we never use that layout (see keep_portable_layout), so the line is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
from bitsandbytes.functional import (  # noqa: E402
    _convert_weight_packed_for_cpu_inverse,  # CPU AVX512 repack; see dequantize_weight
)
from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit  # noqa: E402

from lora_dist.choices import BITS, QUANT_TYPES, check_choice  # noqa: E402


def is_supported_linear(module: torch.nn.Module) -> bool:
    """True for every base a `LoRALayer` can wrap: `nn.Linear` and the bitsandbytes linears.

    Other `nn.Linear` subclasses are refused: some are read by their parent as a weight
    (MultiheadAttention's out_proj), and an 8-bit layer that keeps fp16 weights for training has no
    int8 weight to merge into.
    """
    if isinstance(module, Linear8bitLt):
        return not module.state.has_fp16_weights
    return type(module) is torch.nn.Linear or isinstance(module, Linear4bit)


def bits_of(module: torch.nn.Module) -> int | None:
    """4 or 8 for a quantized linear, None for a dense one."""
    if isinstance(module, Linear4bit):
        return 4
    if isinstance(module, Linear8bitLt):
        return 8
    return None


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter holds: a packed 4-bit tensor holds two per byte."""
    quant_state = getattr(param, "quant_state", None)
    if isinstance(param, Params4bit) and quant_state is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def _int8_scales(layer: Linear8bitLt) -> torch.Tensor:
    # bitsandbytes keeps SCB on the weight until the first forward, then on layer.state.
    scb = getattr(layer.weight, "SCB", None)
    return scb if scb is not None else layer.state.SCB


def _unpacked_4bit(weight: Params4bit) -> tuple[torch.Tensor, "bnbF.QuantState"]:
    """(packed data, quant state) in bitsandbytes' portable layout, without touching `weight`.

    On AVX512-BF16 CPUs an eval-mode forward repacks `weight.data` in place into a CPU-only
    layout; its inverse mutates the quant state it is given, so it works on a copy here.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    state = copy.deepcopy(state)
    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        # bitsandbytes 0.50 leaves a non-nested absmax in the packed (transposed, bf16) layout.
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def keep_portable_layout(layer: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight in place on an eval-mode CPU forward.

    On AVX512-BF16 CPUs bitsandbytes 0.50 rewrites `weight.data` into a CPU-only layout on the
    first no-grad eval forward, rounding the absmax statistics to bf16 on the way: the base would
    silently change under a frozen-weight training run that evaluates. The dequantize-and-matmul
    path it falls back to computes the same product in the compute dtype.
    """
    if isinstance(layer, Linear4bit):
        layer.support_avx512bf16_for_cpu = False


@torch.no_grad()
def packed_4bit(layer: Linear4bit) -> tuple[torch.Tensor, "bnbF.QuantState"]:
    """A 4-bit linear's (packed data, quant state) in bitsandbytes' portable layout, `layer` untouched."""
    return _unpacked_4bit(layer.weight)


@torch.no_grad()
def dequantize_weight(layer: torch.nn.Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (out_features, in_features) weight a linear computes with, as a new tensor."""
    if isinstance(layer, Linear4bit):
        data, state = packed_4bit(layer)
        return bnbF.dequantize_4bit(data, state).to(dtype)
    if isinstance(layer, Linear8bitLt):
        cb = layer.weight.data
        return bnbF.int8_vectorwise_dequant(cb, _int8_scales(layer)).to(dtype)
    return layer.weight.detach().to(dtype).clone()


@dataclass
class QuantSnapshot:
    """What `requantize_` replaced, so `restore_` can put it back bit for bit."""

    data: torch.Tensor
    quant_state: object  # bnb QuantState (4-bit) or the int8 scales tensor (8-bit)
    scales_on_weight: bool = False


@torch.no_grad()
def requantize_(layer: torch.nn.Linear, weight: torch.Tensor) -> QuantSnapshot:
    """Quantize `weight` (out, in) into `layer` in place with its own settings; return what it held."""
    if isinstance(layer, Linear4bit):
        param = layer.weight
        old = QuantSnapshot(param.data, param.quant_state)
        data, state = bnbF.quantize_4bit(
            weight.to(param.quant_state.dtype).contiguous(),
            blocksize=param.blocksize,
            compress_statistics=param.compress_statistics,
            quant_type=param.quant_type,
            quant_storage=param.quant_storage,
        )
        param.data, param.quant_state = data, state
        layer.quant_state = state
        return old
    if isinstance(layer, Linear8bitLt):
        on_weight = getattr(layer.weight, "SCB", None) is not None
        old = QuantSnapshot(layer.weight.data, _int8_scales(layer), scales_on_weight=on_weight)
        cb, scb, _ = bnbF.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        _set_int8(layer, cb, scb, on_weight)
        return old
    raise TypeError(f"requantize_ needs a bitsandbytes linear, got {type(layer).__name__}")


def _set_int8(layer: Linear8bitLt, cb: torch.Tensor, scb: torch.Tensor, on_weight: bool) -> None:
    layer.weight.data = cb
    if on_weight:
        layer.weight.CB, layer.weight.SCB = cb, scb
    else:
        layer.state.CB, layer.state.SCB = cb, scb


@torch.no_grad()
def restore_(layer: torch.nn.Linear, snapshot: QuantSnapshot) -> None:
    """Put back exactly what `requantize_` replaced (the same tensors, not a re-quantization)."""
    if isinstance(layer, Linear4bit):
        layer.weight.data, layer.weight.quant_state = snapshot.data, snapshot.quant_state
        layer.quant_state = snapshot.quant_state
    else:
        _set_int8(layer, snapshot.data, snapshot.quant_state, snapshot.scales_on_weight)


def _quantized_copy(
    linear: torch.nn.Linear,
    bits: int,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
) -> torch.nn.Linear:
    has_bias = linear.bias is not None
    device = linear.weight.device
    if bits == 4:
        layer = Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,  # DeepSpeed casts float storage under bf16: keep bytes
            device="meta",
        )
        layer.weight = Params4bit(
            linear.weight.detach().to(compute_dtype or torch.float32),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
            module=layer,
        )._quantize(device)
    else:
        layer = Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(
            linear.weight.detach().to(torch.float16), requires_grad=False, has_fp16_weights=False
        )._quantize(device)
    if has_bias:
        # a 4-bit layer computes in compute_dtype; an int8 layer ignores it and follows the input
        bias_dtype = (compute_dtype if bits == 4 else None) or linear.bias.dtype
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(bias_dtype).clone(), requires_grad=False)
    return layer


@torch.no_grad()
def quantize_model(
    model: torch.nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    skip_modules: tuple[str, ...] | list[str] = ("lm_head",),
) -> torch.nn.Module:
    """Replace every `nn.Linear` of `model` in place with a bitsandbytes layer holding its weights.

    Args:
        model: any module; its dense linears are swapped, everything else is left alone.
        bits: 4 (QLoRA's NF4/FP4 blockwise) or 8 (LLM.int8()).
        quant_type: "nf4" or "fp4" (4-bit only).
        double_quant: quantize the 4-bit absmax statistics too (QLoRA's double quantization).
        compute_dtype: dtype the 4-bit matmul runs in; None lets bitsandbytes follow the input.
        skip_modules: module-name suffixes to keep dense (the output head by default).

    Returns:
        `model`, for chaining.
    """
    check_choice("bits", bits, BITS)  # a dense model needs no quantize_model call
    check_choice("quant_type", quant_type, QUANT_TYPES)
    skip = tuple(skip_modules)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and not any(_suffix_match(name, s) for s in skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = _quantized_copy(linear, bits, quant_type, double_quant, compute_dtype)
        keep_portable_layout(layer)
        setattr(parent, child, layer)
    return model


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)
