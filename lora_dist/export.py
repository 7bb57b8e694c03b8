"""Merged export: a standalone Hugging Face model folder with every adapter folded into its base weight.

What `LoRAModel.merge_and_export` and `lora-dist merge` write: plain safetensors shards, the base's
config without its quantization settings, its generation config and (when given) a tokenizer, which
`AutoModelForCausalLM.from_pretrained` loads with no lora_dist and no bitsandbytes. The model is
walked one module at a time, so memory holds the (quantized) model plus one shard.

This module sits below `lora_dist.model` (LoRAModel.merge_and_export calls it): it works on the
LoRAModel it is given and never imports model.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from lora_dist import quant
from lora_dist.errors import AdapterError
from lora_dist.files import publish_folder, temporary_folder
from lora_dist.layers import LoRALayer

if TYPE_CHECKING:  # annotations only: model.py imports this module
    from lora_dist.model import LoRAModel


def merge_and_export(
    model: LoRAModel,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a standalone Hugging Face model folder with every adapter folded into its base weight.

    Each quantized weight is dequantized, the adapter update added in fp32, and the sum cast to
    `dtype`, one linear at a time; tensors are flushed to a safetensors shard as soon as
    `max_shard_size` bytes are collected, so memory holds the (quantized) model plus one shard,
    never a second dense copy. The model itself is not modified. The folder loads with
    `AutoModelForCausalLM.from_pretrained(path)` alone: no lora_dist, no bitsandbytes.

    Args:
        model: a LoRAModel over a Hugging Face model (needs `.config`); merged or not.
        path: output folder; must not exist unless `overwrite=True`.
        dtype: dtype of every floating-point tensor written.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder.
        max_shard_size: bytes per shard (int, or "500MB" / "5GB" / "2GiB").

    Returns:
        The folder, as a Path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"export path {path} is a file; pass a folder path")
    if path.exists() and not overwrite:
        raise AdapterError(f"export folder {path} already exists; pass overwrite=True (--overwrite) to replace it")
    hf_config = getattr(model.base_model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise AdapterError("merge_and_export needs a Hugging Face model (with .config) under the LoRAModel")
    shard_bytes = _parse_size(max_shard_size)
    _refuse_tied_adapted_weights(model)

    tmp = temporary_folder(path)
    try:
        weight_map: dict[str, str] = {}
        shards: list[list[str]] = []
        shard: dict[str, torch.Tensor] = {}
        size = 0
        total = 0
        for name, tensor in _merged_tensors(model, dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                shards.append(_write_shard(tmp, len(shards), shard))
                shard, size = {}, 0
            shard[name] = tensor
            size += nbytes
            total += nbytes
        if shard:
            shards.append(_write_shard(tmp, len(shards), shard))
        del shard

        # Name the shards the way transformers expects once their count is known.
        if len(shards) == 1:
            os.replace(tmp / "shard-0.safetensors", tmp / "model.safetensors")
        else:
            for i, names in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / f"shard-{i}.safetensors", tmp / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        _plain_config(hf_config, dtype).save_pretrained(tmp)
        generation_config = getattr(model.base_model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_folder(tmp, path)  # fsynced, then renamed over any old folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return path


def _merged_tensors(model: LoRAModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every weight the plain model needs, one module at a time."""
    # Tied weights (embeddings / lm_head) are one Parameter: write it once, as save_pretrained does.
    # Only the model's own tensors are tracked (they outlive the walk, so their ids stay unique).
    seen: set[int] = set()

    def emit(name: str, t: torch.Tensor | None, owned: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        if t is None or (owned and id(t) in seen):
            return
        if owned:
            seen.add(id(t))
        cast = t.detach().to(dtype) if t.dtype.is_floating_point else t.detach()
        yield name, cast.to("cpu").contiguous()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, LoRALayer):
            yield from emit(prefix + "weight", _merged_weight(module), owned=False)
            yield from emit(prefix + "bias", module.base_layer.bias)
            return
        if quant.bits_of(module) is not None:
            yield from emit(prefix + "weight", quant.dequantize_weight(module), owned=False)
            yield from emit(prefix + "bias", module.bias)
            return
        for name, p in module.named_parameters(recurse=False):
            yield from emit(prefix + name, p)
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield from emit(prefix + name, b)
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    with torch.no_grad():
        yield from walk(model.base_model, "")


def _refuse_tied_adapted_weights(model: LoRAModel) -> None:
    # A tied lm_head / embedding is one tensor in the file; adapting one side unties them.
    owners: dict[int, list[str]] = {}
    for name, p in model.base_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in model.lora_layers.items():
        shared = owners.get(id(layer.base_layer.weight), [])
        if len(shared) > 1:
            others = [n for n in shared if not n.startswith(name + ".")]
            raise AdapterError(
                f"{name} is adapted but its weight is tied to {others[0]}; the merged model would need "
                f"them untied: set config.tie_word_embeddings=False and untie before training"
            )


def _merged_weight(layer: LoRALayer) -> torch.Tensor:
    """dequantize(W) + scaling * B @ A in fp32, (out, in), whatever the layer's merge state."""
    if not layer.merged:
        return quant.dequantize_weight(layer.base_layer) + layer.delta_weight(torch.float32)
    if layer.merged_weight is not None:  # quantized base merged without requantizing
        return layer.merged_weight.float()
    return quant.dequantize_weight(layer.base_layer)  # folded in place (dense) or requantized


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file(tensors, folder / f"shard-{index}.safetensors", metadata={"format": "pt"})
    return list(tensors)


def _plain_config(hf_config, dtype: torch.dtype):
    """The base's config without its quantization settings, declaring the exported dtype."""
    config = copy.deepcopy(hf_config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    return config


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise AdapterError(f"max_shard_size must be a positive byte count or like '500MB' / '5GB', got {size!r}")
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])
