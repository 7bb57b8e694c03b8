"""Adapters that travel: save and load in the PEFT layout, and export a merged standalone model.

An adapter folder holds two files, the layout Hugging Face PEFT, vLLM and TGI read:

    adapter_config.json          PEFT's LoraConfig fields (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<name in the HF model>.lora_A.weight  (r, in)
                                 base_model.model.<name in the HF model>.lora_B.weight  (out, r)

The safetensors metadata also records a SHA-256 of the tensors and of the config text (checked on
load, so a damaged file or a config from another save is an error, never a silently wrong model) and
how the base was quantized when the adapter was trained (so `run_merge` can fold it into the same
weights it learned against). PEFT ignores that metadata.

Every write goes to a temporary folder beside the target and is renamed into place: a crash leaves
either the old folder or the new one, never a half-written one.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora_dist import quant
from lora_dist.layers import LoRALayer, lora_scaling
from lora_dist.model import LoRAConfig, LoRAModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# PEFT options that change what an adapter computes and that LoRALayer does not implement.
_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D bases)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layers_to_transform": "layers_to_transform",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "megatron_config",
}


# ---------------------------------------------------------------------------------------------- save
def save_adapter(
    model: LoRAModel,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the adapter of `model` to the folder `path` in the PEFT layout.

    Args:
        model: the LoRAModel whose adapter tensors (and trained biases) to save; merged or not.
        path: folder to create (or refresh); its other files are left alone.
        base_model_name_or_path: recorded for `from_pretrained`/`lora-dist merge`; default: the
            base model's own `name_or_path`.
        overwrite: replace the adapter files of an existing folder (False: refuse).

    Returns:
        The folder, as a Path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"adapter path {path} is a file; pass a folder path (it is created if missing)")
    if path.is_dir() and not overwrite and any((path / f).exists() for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)):
        raise ValueError(f"{path} already holds an adapter; pass overwrite=True to replace it")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.base_model, "name_or_path", None) or None

    config_text = json.dumps(_peft_config(model, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in model.adapter_state_dict().items()}
    metadata = {
        "format": "pt",
        "lora_dist_version": _version(),
        "lora_dist_tensors_sha256": _tensors_sha256(tensors),
        "lora_dist_config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "lora_dist_base_quantization": json.dumps(_base_quantization(model)),
    }

    def write(folder: Path) -> None:
        save_file(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)
        (folder / ADAPTER_CONFIG).write_text(config_text)

    if not path.exists():
        with _staging(path) as tmp:
            write(tmp)
            os.replace(tmp, path)
        return path
    # An existing folder may hold other files (a tokenizer, a checkpoint): replace our two files
    # one by one, weights first. If a crash falls between the two, the config's hash no longer
    # matches the one recorded in the weights and loading says so.
    with _staging(path) as tmp:
        write(tmp)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(tmp / name, path / name)
    return path


def _version() -> str:
    try:
        return importlib.metadata.version("lora_dist")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _peft_config(model: LoRAModel, base_model_name_or_path: str | None) -> dict[str, Any]:
    """Our LoRAConfig written with PEFT's LoraConfig field names (PEFT fills in the rest)."""
    cfg = model.lora_config
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    exclude = cfg.exclude_modules if cfg.exclude_modules is None or isinstance(cfg.exclude_modules, str) \
        else sorted(cfg.exclude_modules)
    is_causal_lm = type(model.base_model).__name__.endswith("ForCausalLM")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal_lm else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "exclude_modules": exclude,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "bias": cfg.bias,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
    }


def _base_quantization(model: LoRAModel) -> dict[str, Any] | None:
    """How the adapted linears' base was quantized ({"bits", "quant_type", ...}), None if dense."""
    for layer in model.lora_layers.values():
        base = layer.base_layer
        if layer.bits == 4:
            compute_dtype = str(base.compute_dtype or torch.float32).removeprefix("torch.")
            return {"bits": 4, "quant_type": base.weight.quant_type,
                    "double_quant": bool(base.weight.compress_statistics), "compute_dtype": compute_dtype}
        if layer.bits == 8:
            return {"bits": 8}
    return None


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _staging:
    """A temporary folder beside `target` (same filesystem, so os.replace is a rename), removed on exit."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- read
def _adapter_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"adapter path {path} is a file; pass the folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}: not an adapter folder (save one with save_adapter)")
    if not (path / ADAPTER_WEIGHTS).is_file() and not (path / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save the adapter again")
    return path


def _read_config(folder: Path) -> tuple[dict[str, Any], bytes]:
    raw = (folder / ADAPTER_CONFIG).read_bytes()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / ADAPTER_CONFIG} is not valid JSON ({err}); save the adapter again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / ADAPTER_CONFIG} holds {type(config).__name__}, not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} is a {config['peft_type']} adapter; lora_dist reads LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{folder / ADAPTER_CONFIG} lacks {key!r}: not a PEFT LoRA config")
    return config, raw


def _read_weights(folder: Path, config_raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors keyed by their names in the HF model, and the file's metadata; integrity checked."""
    file = folder / ADAPTER_WEIGHTS
    if file.is_file():
        try:
            with safe_open(file, framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(file)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is damaged or truncated ({err}); save the adapter again") from None
    else:
        # Older PEFT default. weights_only refuses anything but tensors: no code runs on load.
        file = folder / "adapter_model.bin"
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad pickle
            raise ValueError(f"{file} is damaged or not a tensor file ({err}); save the adapter again") from None
        metadata = {}
    if "lora_dist_tensors_sha256" in metadata and _tensors_sha256(tensors) != metadata["lora_dist_tensors_sha256"]:
        raise ValueError(f"{file} does not match the checksum recorded when it was saved; save the adapter again")
    config_sha = hashlib.sha256(config_raw).hexdigest()
    if "lora_dist_config_sha256" in metadata and config_sha != metadata["lora_dist_config_sha256"]:
        raise ValueError(
            f"{folder / ADAPTER_CONFIG} is not the config saved with {file.name} (edited, or the save "
            f"was interrupted); save the adapter again"
        )
    return {_model_key(k): v for k, v in tensors.items()}, metadata


def _model_key(file_key: str) -> str:
    """`base_model.model.x.lora_A[.adapter].weight` -> `x.lora_A.weight` (the name inside the HF model)."""
    key = file_key.removeprefix(PEFT_PREFIX)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _lora_config(config: dict[str, Any], base_model: nn.Module | None = None) -> LoRAConfig:
    """PEFT's LoraConfig fields -> LoRAConfig; refuses options that change the computation we don't do."""
    for key, what in _UNSUPPORTED_PEFT.items():
        if config.get(key):
            raise ValueError(f"the adapter uses {what} ({key}={config[key]!r}), which lora_dist does not support")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(
            f"the adapter was initialized with init_lora_weights={init!r}, which also changes the base "
            f"weights; convert it to a plain LoRA adapter with PEFT first"
        )
    targets = config["target_modules"]
    if targets == "all-linear":
        targets = _all_linear_names(base_model)
    return LoRAConfig(
        rank=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout") or 0.0,
        target_modules=targets,
        exclude_modules=config.get("exclude_modules"),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        use_rslora=bool(config.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
        bias=config.get("bias") or "none",
    )


def _all_linear_names(base_model: nn.Module | None) -> list[str]:
    # PEFT's "all-linear": every linear but the output head, named by its last component.
    if base_model is None:
        raise ValueError("target_modules='all-linear' needs the base model to resolve; use from_pretrained")
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in base_model.named_modules()
        if name and quant.is_supported_linear(m) and m is not head
    }
    return sorted(names - {"base_layer", "lora_A", "lora_B"})  # the insides of LoRA layers already there


# ---------------------------------------------------------------------------------------------- load
def load_adapter(model: LoRAModel, path: str | os.PathLike) -> None:
    """Copy an adapter saved by lora_dist or PEFT into `model`'s LoRA layers, all or nothing.

    Every key, shape and scaling is checked before anything is copied; the first mismatch is an
    error naming its key. Tensors are cast to the adapter's dtype and device.
    """
    folder = _adapter_folder(path)
    config, raw = _read_config(folder)
    tensors, _ = _read_weights(folder, raw)
    _check_fits(model, _lora_config(config, model.base_model), tensors, _origin(folder, config))
    _copy_in(model, tensors)


def from_pretrained(base_model: nn.Module, path: str | os.PathLike) -> LoRAModel:
    """Wrap `base_model` with the LoRA layers an adapter folder describes and load its weights.

    On any error `base_model` is left as it was (no LoRA layers, same trainable flags).
    """
    folder = _adapter_folder(path)
    config, raw = _read_config(folder)
    tensors, _ = _read_weights(folder, raw)
    lora_config = _lora_config(config, base_model)
    if any(isinstance(m, LoRALayer) for m in base_model.modules()):
        raise ValueError("base_model already has LoRA layers; pass a plain base model")
    trainable = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        model = LoRAModel(base_model, lora_config)
        _check_fits(model, lora_config, tensors, _origin(folder, config))
    except Exception:
        _strip_lora(base_model)
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise
    _copy_in(model, tensors)
    return model


def _origin(folder: Path, config: dict[str, Any]) -> str:
    return f"{folder} (saved for {config.get('base_model_name_or_path') or 'an unrecorded base'})"


def _check_fits(model: LoRAModel, file_config: LoRAConfig, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Raise on the first key, shape or scaling of the adapter that does not fit `model`."""
    if model.merged and model.lora_layers:
        raise ValueError("the model is merged; call model.unmerge() before loading an adapter into it")
    expected = model.adapter_state_dict()
    for key in tensors:
        if key in expected:
            continue
        if _has_module(model.base_model, key.rsplit(".", 2)[0]):
            raise ValueError(
                f"adapter key {key!r} has no counterpart in the model (the model's LoRA config targets "
                f"other modules or another bias mode); adapter: {origin}"
            )
        raise ValueError(
            f"adapter key {key!r} names a module this model does not have (another architecture?); "
            f"adapter: {origin}"
        )
    for key, param in expected.items():
        if key not in tensors:
            raise ValueError(f"adapter lacks {key!r}, which the model's LoRA config expects; adapter: {origin}")
        got, want = tuple(tensors[key].shape), tuple(param.shape)
        if got != want:
            hint = ""
            if key.endswith(("lora_A.weight", "lora_B.weight")):
                r_got, r_want = (got[0], want[0]) if key.endswith("lora_A.weight") else (got[-1], want[-1])
                hint = f" (adapter rank {r_got}, model rank {r_want})" if r_got != r_want else \
                    " (the base's layer sizes differ: adapter saved for another model size?)"
            raise ValueError(f"adapter key {key!r} has shape {got} but the model expects {want}{hint}")
        if not tensors[key].dtype.is_floating_point:
            raise ValueError(f"adapter key {key!r} has dtype {tensors[key].dtype}; expected floating point")
    for name, layer in model.lora_layers.items():
        alpha, rank = file_config.alpha_for(name), file_config.rank_for(name)
        scaling = lora_scaling(alpha, rank, file_config.use_rslora)
        if not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
            raise ValueError(
                f"adapter scales {name!r} by {scaling:g} (lora_alpha={alpha}, r={rank}, use_rslora="
                f"{file_config.use_rslora}) but the model scales it by {layer.scaling:g}; build the model "
                f"with the adapter's config (LoRAModel.from_pretrained)"
            )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def _copy_in(model: LoRAModel, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.base_model.named_parameters(remove_duplicate=False))
    for key, tensor in tensors.items():
        params[key].copy_(tensor)


def _strip_lora(base_model: nn.Module) -> None:
    """Put every LoRALayer's base linear back where the layer was."""
    for name, module in list(base_model.named_modules()):
        if isinstance(module, LoRALayer):
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, module.base_layer)


# ---------------------------------------------------------------------------------------------- export
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
        raise ValueError(f"export path {path} is a file; pass a folder path")
    if path.exists() and not overwrite:
        raise ValueError(f"export folder {path} already exists; pass overwrite=True (--overwrite) to replace it")
    hf_config = getattr(model.base_model, "config", None)
    if hf_config is None or not hasattr(hf_config, "save_pretrained"):
        raise ValueError("merge_and_export needs a Hugging Face model (with .config) under the LoRAModel")
    shard_bytes = _parse_size(max_shard_size)
    _refuse_tied_adapted_weights(model)

    with _staging(path) as tmp:
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
        swap_into_place(tmp, path)
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
            raise ValueError(
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


def swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder to `path`; an existing one is moved aside first, then removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive byte count or like '500MB' / '5GB', got {size!r}")
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


# ---------------------------------------------------------------------------------------------- CLI
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
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if bits not in ("auto", None, 4, 8):
        raise ValueError(f"bits must be 'auto', None, 4 or 8, got {bits!r}")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise ValueError(f"output folder {out} already exists; pass --overwrite to replace it")
    folder = _adapter_folder(adapter)
    _, raw = _read_config(folder)
    _, metadata = _read_weights(folder, raw)
    recorded = json.loads(metadata.get("lora_dist_base_quantization", "null")) or {}
    quantization = recorded if bits == "auto" else {"bits": bits} if bits else {}
    # A dense base loads straight in the export dtype; a quantized one in the dtype it was
    # quantized from in training, so the same blocks round to the same codes.
    compute_dtype = getattr(torch, quantization.get("compute_dtype", "bfloat16")) if quantization else DTYPES[dtype]
    from lora_dist.loading import load_base_model  # transformers is imported only when merging

    base_model, tokenizer = load_base_model(
        base,
        bits=quantization.get("bits"),
        quant_type=quantization.get("quant_type", "nf4"),
        double_quant=quantization.get("double_quant", True),
        compute_dtype=compute_dtype,
        require_tokenizer=False,
    )
    if (folder / "tokenizer_config.json").is_file():  # an adapter that added tokens ships its tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(base_model, folder)
    return merge_and_export(model, out_path, dtype=DTYPES[dtype], tokenizer=tokenizer, overwrite=overwrite)


def describe_adapter(path: str) -> str:
    """`lora-dist inspect`: rank, targets, parameter counts and base model of an adapter folder."""
    folder = _adapter_folder(path)
    config, raw = _read_config(folder)
    tensors, metadata = _read_weights(folder, raw)
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors if ".lora_A." in k})
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    counts = {"lora_A": 0, "lora_B": 0, "biases": 0}
    for key, t in tensors.items():
        counts["lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else "biases"] += t.numel()
    ranks = sorted({tensors[m + ".lora_A.weight"].shape[0] for m in modules})
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    scaling = lora_scaling(alpha, r, rslora)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))

    if "lora_dist_version" in metadata:
        saved_by = f"lora_dist {metadata['lora_dist_version']} (checksums verified)"
        trained_on = _describe_quantization(json.loads(metadata.get("lora_dist_base_quantization", "null")))
    else:
        saved_by, trained_on = "PEFT or another tool (no checksum recorded)", "not recorded"
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
    lines = [
        f"adapter:     {folder}",
        f"saved by:    {saved_by}",
        f"base model:  {config.get('base_model_name_or_path') or '(not recorded)'}",
        f"trained on:  {trained_on}",
        f"rank:        r={r} (in the file: {', '.join(map(str, ranks)) or '-'}), lora_alpha={alpha}, "
        f"scaling {scaling:g}{' (rsLoRA)' if rslora else ''}",
        f"targets:     {', '.join(targets) or '-'} ({len(modules)} modules)",
        f"parameters:  {sum(counts.values()):,} ({parts}) in {len(tensors)} tensors, {dtypes}, "
        f"{nbytes / 2**20:.2f} MiB",
    ]
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        lines.append(f"patterns:    rank {config.get('rank_pattern') or {}}, alpha {config.get('alpha_pattern') or {}}")
    return "\n".join(lines)


def _describe_quantization(q: dict[str, Any] | None) -> str:
    if not q:
        return "dense base weights"
    if q["bits"] == 8:
        return "8-bit (LLM.int8) base weights"
    double = ", double quant" if q.get("double_quant") else ""
    return f"4-bit {q.get('quant_type', 'nf4')}{double} base weights, compute {q.get('compute_dtype', '?')}"
