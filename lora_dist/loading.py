"""Load a Hugging Face causal LM and its tokenizer, quantized to 4/8-bit as it loads (work in progress)."""

from __future__ import annotations

import torch


def load_base_model(name_or_path: str, bits: int | None = None, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, device_map=None,
                    attn_implementation: str | None = None):
    """Return (model, tokenizer); quantized linears except lm_head when `bits` is 4 or 8."""
    raise NotImplementedError
