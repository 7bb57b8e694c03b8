"""Adapters that travel: save and load them in the PEFT layout, inspect them, export a merged model.

One function per task; the first four are also LoRAModel methods, which run the same code:

    save_adapter(model, path)          model.save_adapter(path)
    load_adapter(model, path)          model.load_adapter(path)
    from_pretrained(base, path)        LoRAModel.from_pretrained(base, path)
    merge_and_export(model, path)      model.merge_and_export(path)
    describe_adapter(path)             what `lora-dist inspect` prints
    run_merge(base, adapter, out)      what `lora-dist merge` runs

Layering (no module imports one above it, not even inside a function): the folder format lives in
`lora_dist.adapter_files` and the merged export in `lora_dist.export`, both below `lora_dist.model`
so that LoRAModel's methods can call them; this module sits above `lora_dist.model`, because
`from_pretrained` and `run_merge` build LoRAModels.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_dist.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CARD,
    PEFT_PREFIX,
    describe_quantization,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lora_dist.errors import AdapterError
from lora_dist.export import merge_and_export
from lora_dist.layers import lora_scaling
from lora_dist.model import LoRAModel

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MODEL_CARD",
    "PEFT_PREFIX",
    "describe_adapter",
    "from_pretrained",
    "load_adapter",
    "merge_and_export",
    "read_adapter",
    "run_merge",
    "save_adapter",
]

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def from_pretrained(base_model: nn.Module, path: str | os.PathLike) -> LoRAModel:
    """Wrap `base_model` with the LoRA layers an adapter folder (ours or PEFT's) describes and load it.

    The same as `LoRAModel.from_pretrained(base_model, path)`. On any error `base_model` is left as
    it was (no LoRA layers, same trainable flags).
    """
    return LoRAModel.from_pretrained(base_model, path)


def run_merge(
    base: str,
    adapter: str,
    out: str,
    dtype: str = "bf16",
    overwrite: bool = False,
    bits: int | None | str = "auto",
) -> Path:
    """`lora-dist merge`: load base + adapter and export the merged model to `out`.

    Args:
        base: base model folder or hub id.
        adapter: adapter folder (ours or PEFT's).
        out: output folder for the standalone model.
        dtype: "bf16", "fp16" or "fp32".
        overwrite: replace `out` if it exists.
        bits: how to load the base before merging. "auto" (default): quantize it the way it was
            when the adapter was trained, if the adapter records that (a QLoRA adapter learned to
            correct the quantized weights, so it is folded into those), else dense. None: dense.
            4 or 8: that quantization (NF4 for 4).
    """
    if dtype not in DTYPES:
        raise AdapterError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if bits not in ("auto", None, 4, 8):
        raise AdapterError(f"bits must be 'auto', None, 4 or 8, got {bits!r}")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise AdapterError(f"output folder {out} already exists; pass --overwrite to replace it")
    folder, _, _, metadata = read_adapter(adapter)
    recorded = json.loads(metadata.get("lora_dist_base_quantization", "null")) or {}
    if bits != "auto":
        recorded = {"bits": bits, "dtype": recorded.get("dtype")} if bits else {"bits": None}
    load = _merge_loading(recorded)
    from lora_dist.loading import (
        load_base_model,  # transformers is imported only when merging
    )

    base_model, tokenizer = load_base_model(base, require_tokenizer=False, **load)
    if (folder / "tokenizer_config.json").is_file():  # an adapter that added tokens ships its tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LoRAModel.from_pretrained(base_model, folder)
    return merge_and_export(model, out_path, dtype=DTYPES[dtype], tokenizer=tokenizer, overwrite=overwrite)


def _merge_loading(recorded: dict[str, Any]) -> dict[str, Any]:
    """load_base_model arguments that rebuild the base an adapter was trained on, for a faithful merge.

    A dense base loads in its checkpoint's own dtype ("auto"): the merge adds the fp32 update to the
    original weights and rounds once, to the export dtype. A quantized base is quantized again from
    the dtype it was loaded in for training (quantization is deterministic: the same codes), and
    the merge adds the update to its fp32 dequantization.
    """
    bits = recorded.get("bits")
    if bits is None:
        return {"bits": None, "dtype": "auto", "compute_dtype": torch.float32}
    dtype = recorded.get("dtype")
    if bits == 4:
        compute = getattr(torch, recorded.get("compute_dtype") or dtype or "bfloat16")
        return {"bits": 4, "quant_type": recorded.get("quant_type", "nf4"),
                "double_quant": recorded.get("double_quant", True), "compute_dtype": compute,
                "dtype": getattr(torch, dtype) if dtype else compute}  # older adapters: quantized from compute
    if dtype is None:
        logger.warning("the adapter does not record the dtype its 8-bit base was loaded in; loading the "
                       "checkpoint in its own dtype (save the adapter again with this lora_dist to record it)")
    return {"bits": 8, "dtype": getattr(torch, dtype) if dtype else "auto", "compute_dtype": torch.float32}




def describe_adapter(path: str) -> str:
    """`lora-dist inspect`: rank, targets, parameter counts and base model of an adapter folder."""
    folder, config, tensors, metadata = read_adapter(path)
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors if ".lora_A." in k})
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    counts = {"lora_A": 0, "lora_B": 0, "biases": 0, "full base tensors": 0}
    for key, t in tensors.items():
        kind = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else \
            "biases" if key.endswith(".bias") else "full base tensors"
        counts[kind] += t.numel()
    ranks = sorted({tensors[m + ".lora_A.weight"].shape[0] for m in modules})
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    scaling = lora_scaling(alpha, r, rslora)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))

    if "lora_dist_version" in metadata:
        saved_by = f"lora_dist {metadata['lora_dist_version']} (checksums verified)"
        trained_on = describe_quantization(json.loads(metadata.get("lora_dist_base_quantization", "null")))
    else:
        saved_by, trained_on = "PEFT or another tool (no checksum recorded)", "not recorded"
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
    lines = [
        f"adapter:     {folder}",
        f"saved by:    {saved_by}",
        f"base model:  {config.get('base_model_name_or_path') or '(not recorded)'}",
        f"trained on:  {trained_on}",
        (f"rank:        r={r} (in the file: {', '.join(map(str, ranks)) or '-'}), lora_alpha={alpha}, "
         f"scaling {scaling:g}{' (rsLoRA)' if rslora else ''}"),
        f"targets:     {', '.join(targets) or '-'} ({len(modules)} modules)",
        (f"parameters:  {sum(counts.values()):,} ({parts}) in {len(tensors)} tensors, {dtypes}, "
         f"{nbytes / 2**20:.2f} MiB"),
    ]
    if config.get("modules_to_save"):
        lines.append(f"saved whole: {', '.join(config['modules_to_save'])} (modules_to_save)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        lines.append(f"patterns:    rank {config.get('rank_pattern') or {}}, alpha {config.get('alpha_pattern') or {}}")
    return "\n".join(lines)
