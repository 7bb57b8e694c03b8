"""quant.py, the bitsandbytes boundary: quantize_model keeps weights within the 4-bit error, refuses bad choices."""

import copy

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from lora_dist import dequantize_weight, quantize_model
from lora_dist.choices import check_choice

IN, OUT = 128, 64  # multiples of 64: bitsandbytes' CPU 4-bit kernel needs them


def test_quantize_model_keeps_weights_within_4bit_error():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT))
    dense = copy.deepcopy(model)
    quantize_model(model, bits=4, quant_type="nf4", double_quant=False, compute_dtype=torch.float32, skip_modules=())
    for i in (0, 2):
        w, q = dense[i].weight, dequantize_weight(model[i])
        absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
        code = bnbF.get_4bit_type("nf4", device="cpu").sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        assert ((q - w).reshape(-1, 64).abs() <= half_gap * absmax + 1e-7).all()
        assert torch.equal(model[i].bias, dense[i].bias)


def test_quantize_model_skips_named_modules_and_rejects_bad_bits():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(IN, OUT))
    model.add_module("lm_head", nn.Linear(OUT, OUT))
    quantize_model(model, bits=8)
    assert type(model.lm_head) is nn.Linear and type(model.body) is not nn.Linear
    with pytest.raises(ValueError, match="bits must be one of 4, 8, got 3"):
        quantize_model(nn.Linear(IN, OUT), bits=3)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_model(nn.Sequential(nn.Linear(IN, OUT)), bits=4, quant_type="int4")


def test_a_choice_is_checked_against_its_one_tuple_and_bool_is_no_int():
    check_choice("bits", 4, (4, 8))
    check_choice("bits", None, (4, 8), none_ok=True)
    with pytest.raises(ValueError, match="bits must be one of 4, 8, got True"):
        check_choice("bits", True, (4, 8))
    with pytest.raises(ValueError, match="bits must be one of 4, 8 or None, got 16"):
        check_choice("bits", 16, (4, 8), none_ok=True)
