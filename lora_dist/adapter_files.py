"""Adapter folders in the PEFT layout: write a LoRAModel's adapter, read and verify one, fit it to a model.

An adapter folder holds the files Hugging Face PEFT writes, which PEFT, transformers, vLLM, TGI and
llama.cpp's `convert_lora_to_gguf.py` read:

    adapter_config.json          every field PEFT 0.21's LoraConfig writes (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<name in the HF model>.lora_A.weight  (r, in)
                                 base_model.model.<name in the HF model>.lora_B.weight  (out, r)
                                 (+ trained biases, and base tensors the adapter carries in full)
    README.md                    a short model card: base, LoRA settings, training summary

The safetensors metadata also records a SHA-256 of the tensors and of the config text (checked on
load, so a damaged file or a config from another save is an error, never a silently wrong model) and
how the base was quantized and in which dtype it was loaded when the adapter was trained (so
`lora-dist merge` rebuilds the very weights it learned against). PEFT ignores that metadata.

Supported from PEFT files beyond plain LoRA on linears (anything else that changes the computation
is refused by name): base weights saved by `save_embedding_layers` (used when they differ from the
base, ignored with a logged line when identical) and `modules_to_save` (the saved modules replace
the base's, and are saved again). A new folder is built beside the target and published with
fsync; in an existing folder each file is replaced atomically.

This module sits below `lora_dist.model` (LoRAModel's adapter methods call it): it works on the
LoRAModel it is given and never imports model.py. The public spellings are in `lora_dist.adapters`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lora_dist import quant
from lora_dist.errors import AdapterError, read_text
from lora_dist.files import (
    atomic_write_bytes,
    atomic_write_text,
    publish_folder,
    temporary_folder,
)
from lora_dist.layers import LoRALayer, lora_scaling
from lora_dist.lora_config import LoRAConfig

if TYPE_CHECKING:  # annotations only: model.py imports this module
    from lora_dist.model import LoRAModel

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"
PEFT_PREFIX = "base_model.model."

# The PEFT release whose adapter_config.json we write field for field (and test against).
PEFT_FORMAT_VERSION = "0.21.2"
# Fields PEFT 0.21.2 writes that lora_dist has no setting for, with PEFT's defaults.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "fan_in_fan_out": False, "kasa_config": None,
    "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_bias": False, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "monteclora_config": None, "qalora_group_size": 16, "revision": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "velora_config": None,
}

# PEFT options that change what an adapter computes and that LoRALayer does not implement.
_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D bases)",
    "layers_to_transform": "layers_to_transform",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "megatron_config",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


# ---------------------------------------------------------------------------------------------- save
def save_adapter(
    model: LoRAModel,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = True,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter of `model` to the folder `path` in the PEFT layout, durably.

    Args:
        model: the LoRAModel whose adapter tensors (and trained biases) to save; merged or not.
        path: folder to create (or refresh); its other files are left alone. A new folder gets a
            model card (README.md), refreshed on later saves; an existing folder without ours gets none.
        base_model_name_or_path: recorded for `from_pretrained`/`lora-dist merge`; default: the
            base model's own `name_or_path`.
        overwrite: replace the adapter files of an existing folder (False: refuse).
        training: a short training summary for the model card ({"steps": 100, "eval_loss": 1.6}).

    Returns:
        The folder, as a Path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"adapter path {path} is a file; pass a folder path (it is created if missing)")
    if path.is_dir() and not overwrite and any((path / f).exists() for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)):
        raise AdapterError(f"{path} already holds an adapter; pass overwrite=True to replace it")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.base_model, "name_or_path", None) or None

    config = _peft_config(model, base_model_name_or_path)
    config_text = _config_json(config)
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in _saved_tensors(model).items()}
    quantization = _base_quantization(model)
    metadata = {
        "format": "pt",
        "lora_dist_version": _version(),
        "lora_dist_tensors_sha256": _tensors_sha256(tensors),
        "lora_dist_config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "lora_dist_base_quantization": json.dumps(quantization),
    }
    card = _model_card(config, quantization, training)
    _warn_about_clients(model, path)

    if not path.exists():
        tmp = temporary_folder(path)
        try:
            save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata=metadata)
            (tmp / ADAPTER_CONFIG).write_text(config_text, encoding="utf-8")
            (tmp / MODEL_CARD).write_text(card, encoding="utf-8")
            publish_folder(tmp, path)  # fsyncs every file and both folders
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path
    # An existing folder may hold other files (a tokenizer, a checkpoint): replace our files one by
    # one, weights first, each atomically and durably. If a crash falls between two, the config's
    # hash no longer matches the one recorded in the weights and loading says so.
    atomic_write_bytes(path / ADAPTER_WEIGHTS, safetensors_bytes(tensors, metadata=metadata))
    atomic_write_text(path / ADAPTER_CONFIG, config_text)
    # The card is refreshed where we wrote it; a folder laid out by someone else (a checkpoint, a
    # README of the user's) gets none added and keeps its own.
    card_path = path / MODEL_CARD
    if card_path.is_file() and _CARD_MARK in card_path.read_text(encoding="utf-8", errors="replace"):
        atomic_write_text(card_path, card)
    return path


def _version() -> str:
    try:
        return importlib.metadata.version("lora_dist")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _saved_tensors(model: LoRAModel) -> dict[str, torch.Tensor]:
    """The adapter tensors, trained biases and the base tensors the adapter carries, by HF name."""
    tensors = dict(model.adapter_state_dict())
    for name in sorted(model.carried_weights):
        tensors[name] = _base_tensor(model.base_model, name).detach()
    return tensors


def _number(value: float) -> int | float:
    """16.0 -> 16: PEFT and its readers write integral alphas as JSON integers."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _peft_config(model: LoRAModel, base_model_name_or_path: str | None) -> dict[str, Any]:
    """Our LoRAConfig as the complete adapter_config.json PEFT 0.21 writes."""
    cfg = model.lora_config
    exclude = cfg.exclude_modules if cfg.exclude_modules is None or isinstance(cfg.exclude_modules, str) \
        else sorted(cfg.exclude_modules)
    is_causal_lm = type(model.base_model).__name__.endswith("ForCausalLM")
    config = dict(_PEFT_DEFAULTS)
    config.update({
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "task_type": "CAUSAL_LM" if is_causal_lm else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": _number(cfg.alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules),
        "exclude_modules": exclude,
        # Key order is priority order (the first matching key wins): kept as given, never sorted.
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": {key: _number(value) for key, value in cfg.alpha_pattern.items()},
        "use_rslora": cfg.use_rslora,
        "bias": cfg.bias,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "modules_to_save": list(model.modules_to_save) if model.modules_to_save else None,
        "inference_mode": True,
    })
    return config


def _config_json(config: dict[str, Any]) -> str:
    # Top-level keys sorted as PEFT writes them; nested dicts keep their order (pattern priority).
    return json.dumps({key: config[key] for key in sorted(config)}, indent=2) + "\n"


def _base_quantization(model: LoRAModel) -> dict[str, Any]:
    """How the adapted linears' base was stored when the adapter was trained: what a faithful merge rebuilds.

    Returns {"bits": 4 | 8 | None, "dtype": the dtype the checkpoint was loaded in (4-bit: the one
    the weights were quantized from, which bitsandbytes records in the quant state)} plus, for
    4-bit, "quant_type", "double_quant", "blocksize", "compute_dtype" (the matmul's dtype), and for
    8-bit "compute_dtype" (LLM.int8 follows its input: the dense weights' dtype) and "threshold".
    """
    dtype = _dense_dtype(model)
    for layer in model.lora_layers.values():
        base = layer.base_layer
        if layer.bits == 4:
            state = base.weight.quant_state
            return {"bits": 4, "quant_type": base.weight.quant_type,
                    "double_quant": bool(base.weight.compress_statistics), "blocksize": int(base.weight.blocksize),
                    "compute_dtype": _dtype_name(base.compute_dtype or torch.float32),
                    "dtype": _dtype_name(state.dtype)}
        if layer.bits == 8:
            # Int8Params round the loaded weight to fp16 and then to int8: the codes depend on the
            # dtype the checkpoint was loaded in (bf16 rounds first), so that is recorded.
            return {"bits": 8, "compute_dtype": _dtype_name(dtype), "dtype": _dtype_name(dtype),
                    "threshold": float(base.state.threshold)}
    return {"bits": None, "dtype": _dtype_name(dtype)}


def _dense_dtype(model: LoRAModel) -> torch.dtype:
    """The dtype of the base's dense floating-point weights (embeddings, norms, head)."""
    adapter = {id(p) for p in model.get_trainable_parameters()}
    for p in model.base_model.parameters():
        if p.dtype.is_floating_point and id(p) not in adapter:
            return p.dtype
    return torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _portability(model: LoRAModel) -> list[str]:
    """What llama.cpp's converter and vLLM (one lora_alpha and r per adapter) compute differently."""
    cfg = model.lora_config
    problems = []
    if cfg.use_rslora:
        problems.append("rsLoRA scaling (llama.cpp applies alpha / r)")
    if any(layer.alpha != cfg.alpha for layer in model.lora_layers.values()):
        problems.append("per-module alpha_pattern (llama.cpp and vLLM apply one lora_alpha)")
    if any(layer.rank != cfg.rank for layer in model.lora_layers.values()):
        problems.append("per-module rank_pattern (vLLM scales every module by lora_alpha / r)")
    if model.lora_config.bias != "none":
        problems.append("trained biases (llama.cpp's converter refuses them)")
    if model.carried_weights:
        problems.append("full base tensors (vLLM refuses modules_to_save, llama.cpp full embeddings)")
    return problems


_WARNED: weakref.WeakKeyDictionary[LoRAModel, list[str]] = weakref.WeakKeyDictionary()


def _warn_about_clients(model: LoRAModel, path: Path) -> None:
    problems = _portability(model)
    # Once per model and set of problems: a training run saves the same adapter at every checkpoint.
    if problems and _WARNED.get(model) != problems:
        _WARNED[model] = problems
        logger.warning(
            "adapter %s uses %s: PEFT and lora_dist load it exactly; see the README's 'Serving the adapter' "
            "before converting it for llama.cpp or vLLM", path, "; ".join(problems),
        )


_CARD_MARK = "<!-- written by lora_dist: rewritten on every save of this adapter -->"


def _model_card(config: dict[str, Any], quantization: dict[str, Any], training: dict[str, Any] | None) -> str:
    """A short model card: PEFT-style YAML header, then the base, the LoRA settings and the training."""
    base = config["base_model_name_or_path"]
    header = ["---", f"base_model: {json.dumps(base or '')}", "library_name: peft", "tags:"]
    header += [f"- {json.dumps('base_model:adapter:' + base)}"] if base else []
    header += ["- lora", "- lora_dist", "---", ""]
    targets = config["target_modules"]
    lines = [
        _CARD_MARK,
        "",
        f"# LoRA adapter for {base or 'an unrecorded base model'}",
        "",
        "Saved by lora_dist in the PEFT layout: load it with `peft.PeftModel.from_pretrained(base, path)` or",
        "`lora_dist.LoRAModel.from_pretrained(base, path)`.",
        "",
        f"- Base model: {base or '(not recorded)'}, trained on {describe_quantization(quantization)}",
        (f"- LoRA: r={config['r']}, lora_alpha={config['lora_alpha']}, dropout={config['lora_dropout']}, "
         f"rsLoRA={config['use_rslora']}, bias={config['bias']}"),
        f"- Target modules: {targets if isinstance(targets, str) else ', '.join(targets)}",
    ]
    if config["exclude_modules"]:
        lines.append(f"- Excluded modules: {config['exclude_modules']}")
    if config["rank_pattern"] or config["alpha_pattern"]:
        lines.append(f"- Per-module patterns: rank {config['rank_pattern']}, alpha {config['alpha_pattern']}")
    if config["modules_to_save"]:
        lines.append(f"- Modules saved in full: {', '.join(config['modules_to_save'])}")
    if training:
        lines.append("- Training: " + ", ".join(f"{k} {v}" for k, v in training.items()))
    return "\n".join(header + lines) + "\n"


# ---------------------------------------------------------------------------------------------- read
def _adapter_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter folder {path} does not exist: check the path")
    if not path.is_dir():
        raise AdapterError(
            f"adapter path {path} is a file; pass the folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}: not an adapter folder (save one with save_adapter)")
    if not (path / ADAPTER_WEIGHTS).is_file() and not (path / "adapter_model.bin").is_file():
        raise AdapterError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save the adapter again")
    return path


def _read_config(folder: Path) -> tuple[dict[str, Any], bytes]:
    file = folder / ADAPTER_CONFIG
    text = read_text(file, ADAPTER_CONFIG, AdapterError)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{file} is not valid JSON ({err}); save the adapter again") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file} holds {type(config).__name__}, not a JSON object; save the adapter again")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder} is a {config['peft_type']} adapter; lora_dist reads LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{file} lacks {key!r}: not a PEFT LoRA config")
    return config, text.encode("utf-8")


def _read_weights(folder: Path, config_raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors keyed by their names in the HF model, and the file's metadata; integrity checked."""
    file = folder / ADAPTER_WEIGHTS
    if file.is_file():
        try:
            with safe_open(file, framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(file)
        except (SafetensorError, OSError) as err:
            raise AdapterError(f"{file} is damaged or truncated ({err}); save the adapter again") from None
    else:
        # Older PEFT default. weights_only refuses anything but tensors: no code runs on load.
        file = folder / "adapter_model.bin"
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- torch raises several types for a bad pickle
            raise AdapterError(f"{file} is damaged or not a tensor file ({err}); save the adapter again") from None
        metadata = {}
    if "lora_dist_tensors_sha256" in metadata and _tensors_sha256(tensors) != metadata["lora_dist_tensors_sha256"]:
        raise AdapterError(f"{file} does not match the checksum recorded when it was saved; save the adapter again")
    if "lora_dist_config_sha256" in metadata and hashlib.sha256(config_raw).hexdigest() != metadata["lora_dist_config_sha256"]:
        raise AdapterError(
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
            raise AdapterError(f"the adapter uses {what} ({key}={config[key]!r}), which lora_dist does not support")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise AdapterError(
            f"the adapter was initialized with init_lora_weights={init!r}, which also changes the base "
            f"weights; convert it to a plain LoRA adapter with PEFT first"
        )
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear_names(base_model)
    try:
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
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{ADAPTER_CONFIG}: {err}") from None


def _all_linear_names(base_model: nn.Module | None) -> list[str]:
    # PEFT's "all-linear": the full names of every linear but the output head.
    if base_model is None:
        raise AdapterError("target_modules='all-linear' needs the base model to resolve; use from_pretrained")
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    return sorted(
        name for name, m in base_model.named_modules()
        if name and quant.is_supported_linear(m) and m is not head
        and not name.endswith((".base_layer", ".lora_A", ".lora_B"))  # the insides of LoRA layers already there
    )


def read_adapter(path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter folder saved by lora_dist or PEFT, verifying what lora_dist recorded.

    Returns:
        (folder, adapter_config.json as a dict, tensors keyed by their names in the HF model,
        the safetensors metadata). A missing, damaged or mismatched file is an AdapterError.
    """
    folder = _adapter_folder(path)
    config, raw = _read_config(folder)
    tensors, metadata = _read_weights(folder, raw)
    return folder, config, tensors, metadata


# ---------------------------------------------------------------------------------------------- load
def load_adapter(model: LoRAModel, path: str | os.PathLike) -> None:
    """Copy an adapter saved by lora_dist or PEFT into `model`'s LoRA layers, all or nothing.

    Every key, shape and scaling is checked before anything is copied; the first mismatch is an
    error naming its key. Tensors are cast to the adapter's dtype and device.
    """
    folder, config, tensors, _ = read_adapter(path)
    file_config = _lora_config(config, model.base_model)
    origin = _origin(folder, config)
    full = _full_tensors(model, config, tensors, origin)
    _check_fits(model, file_config, tensors, full, origin)
    _copy_in(model, tensors, full, config)


def wrap_and_load(model_class: type[LoRAModel], base_model: nn.Module, path: str | os.PathLike) -> LoRAModel:
    """Wrap `base_model` in `model_class` as an adapter folder describes, and load its weights.

    What `LoRAModel.from_pretrained` runs (it passes its own class, so a subclass gets itself back).
    On any error `base_model` is left as it was (no LoRA layers, same trainable flags).
    """
    folder, config, tensors, _ = read_adapter(path)
    lora_config = _lora_config(config, base_model)
    if any(isinstance(m, LoRALayer) for m in base_model.modules()):
        raise AdapterError("base_model already has LoRA layers; pass a plain base model")
    origin = _origin(folder, config)
    trainable = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        try:
            # The file's ranks are facts, not choices: a rank above a layer's size is logged, not refused.
            model = model_class(base_model, lora_config, allow_rank_above_layer_size=True)
        except (TypeError, ValueError) as err:
            raise AdapterError(f"{err}; adapter: {origin}") from None
        full = _full_tensors(model, config, tensors, origin)
        _check_fits(model, lora_config, tensors, full, origin)
    except Exception:
        _strip_lora(base_model)
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise
    _copy_in(model, tensors, full, config)
    return model


def _origin(folder: Path, config: dict[str, Any]) -> str:
    return f"{folder} (saved for {config.get('base_model_name_or_path') or 'an unrecorded base'})"


def _full_tensors(
    model: LoRAModel, config: dict[str, Any], tensors: dict[str, torch.Tensor], origin: str
) -> dict[str, str]:
    """The file's keys that are whole base tensors, each with why it is there.

    Two kinds, the ones PEFT writes: the weights of the input and output embeddings (PEFT's
    `save_embedding_layers`, as `<name>.weight`, or `<name>.base_layer.weight` when LoRA wraps the
    layer) and every tensor of a `modules_to_save` module. Returns {key: "embedding" | "module"}.
    """
    base = model.base_model
    full: dict[str, str] = {}
    for module_name in _modules_to_save(model, config, origin):
        module = base.get_submodule(module_name)
        for key in module.state_dict():
            full[f"{module_name}.{key}"] = "module"
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(base, getter)() if hasattr(base, getter) else None
        name = _module_name(base, layer.base_layer if isinstance(layer, LoRALayer) else layer)
        if name is not None:
            full.setdefault(f"{name}.weight", "embedding")
    return {key: kind for key, kind in full.items() if key in tensors or kind == "module"}


def _modules_to_save(model: LoRAModel, config: dict[str, Any], origin: str) -> list[str]:
    """Full names of the modules PEFT wraps for `modules_to_save` (its rule: the name ends with a key)."""
    keys = config.get("modules_to_save") or []
    if not keys:
        return []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise AdapterError(f"modules_to_save must be a list of module names, got {keys!r}; adapter: {origin}")
    names = [n for n, _ in model.base_model.named_modules() if n and any(n.endswith(k) for k in keys)]
    names = [n for n in names if not any(n.startswith(m + ".") for m in names)]  # the outermost only
    for name in names:
        module = model.base_model.get_submodule(name)
        if isinstance(module, LoRALayer) or any(isinstance(m, LoRALayer) for m in module.modules()):
            raise AdapterError(
                f"modules_to_save names {name}, which the adapter's target_modules also adapt (PEFT leaves it "
                f"out of LoRA there); lora_dist does not support that combination; adapter: {origin}"
            )
        if any(quant.bits_of(m) is not None for m in module.modules()):
            raise AdapterError(
                f"modules_to_save names {name}, which is quantized in this base; load the base with that module "
                f"dense; adapter: {origin}"
            )
    return names


def _module_name(root: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in root.named_modules() if m is module), None)


def _base_tensor(root: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(root.get_submodule(module_name) if module_name else root, attr)


def _check_fits(
    model: LoRAModel,
    file_config: LoRAConfig,
    tensors: dict[str, torch.Tensor],
    full: dict[str, str],
    origin: str,
) -> None:
    """Raise on the first key, shape or scaling of the adapter that does not fit `model`."""
    if model.merged and model.lora_layers:
        raise AdapterError("the model is merged; call model.unmerge() before loading an adapter into it")
    expected = model.adapter_state_dict()
    for key in tensors:
        if key in expected or key in full:
            continue
        if _has_module(model.base_model, key.rsplit(".", 2)[0]):
            raise AdapterError(
                f"adapter key {key!r} has no counterpart in the model (the model's LoRA config targets "
                f"other modules or another bias mode); adapter: {origin}"
            )
        raise AdapterError(
            f"adapter key {key!r} names a module this model does not have (another architecture?); "
            f"adapter: {origin}"
        )
    for key, param in expected.items():
        if key not in tensors:
            raise AdapterError(f"adapter lacks {key!r}, which the model's LoRA config expects; adapter: {origin}")
        got, want = tuple(tensors[key].shape), tuple(param.shape)
        if got != want:
            hint = ""
            if key.endswith(("lora_A.weight", "lora_B.weight")):
                r_got, r_want = (got[0], want[0]) if key.endswith("lora_A.weight") else (got[-1], want[-1])
                hint = f" (adapter rank {r_got}, model rank {r_want})" if r_got != r_want else \
                    " (the base's layer sizes differ: adapter saved for another model size?)"
            raise AdapterError(f"adapter key {key!r} has shape {got} but the model expects {want}{hint}")
        if not tensors[key].dtype.is_floating_point:
            raise AdapterError(f"adapter key {key!r} has dtype {tensors[key].dtype}; expected floating point")
    owners: dict[int, list[str]] = {}
    for name, p in model.base_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for key, kind in full.items():
        if key not in tensors:
            raise AdapterError(f"adapter lacks {key!r} of its modules_to_save; adapter: {origin}")
        target = _base_tensor(model.base_model, key)
        tied = [n for n in owners.get(id(target), []) if n != key]
        if kind == "module" and tied:
            # PEFT trains a separate copy of the module; writing into a tied tensor would change both.
            raise AdapterError(f"modules_to_save tensor {key!r} is tied to {tied[0]!r} in this base; load the base "
                               f"with tie_word_embeddings=False; adapter: {origin}")
        if not target.dtype.is_floating_point or not tensors[key].dtype.is_floating_point:
            raise AdapterError(f"adapter key {key!r} replaces a {target.dtype} base tensor; only dense floating-point "
                               f"base tensors can be replaced; adapter: {origin}")
        if tensors[key].shape != target.shape:
            raise AdapterError(
                f"adapter key {key!r} has shape {tuple(tensors[key].shape)} but the base's is {tuple(target.shape)} "
                f"(the vocabulary was resized in training?): resize the base first "
                f"(model.resize_token_embeddings), as PEFT requires too; adapter: {origin}"
            )
    for name, layer in model.lora_layers.items():
        alpha, rank = file_config.alpha_for(name), file_config.rank_for(name)
        scaling = lora_scaling(alpha, rank, file_config.use_rslora)
        if not math.isclose(scaling, layer.scaling, rel_tol=1e-6):
            raise AdapterError(
                f"adapter scales {name!r} by {scaling:g} (lora_alpha={alpha}, r={rank}, use_rslora="
                f"{file_config.use_rslora}) but the model scales it by {layer.scaling:g}; build the model "
                f"with the adapter's config (from_pretrained)"
            )


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def _copy_in(model: LoRAModel, tensors: dict[str, torch.Tensor], full: dict[str, str], config: dict[str, Any]) -> None:
    params = dict(model.base_model.named_parameters(remove_duplicate=False))
    identical = []
    for key, tensor in tensors.items():
        if key not in full:
            params[key].copy_(tensor)
            continue
        target = _base_tensor(model.base_model, key)
        if full[key] == "embedding" and torch.equal(tensor.to(target.dtype), target.detach().cpu()):
            identical.append(key)  # PEFT would copy the same values in: nothing to carry
            continue
        target.copy_(tensor)
        model.carried_weights.add(key)
    if "module" in full.values():
        model.modules_to_save = list(config["modules_to_save"])
    if identical:
        logger.info("adapter stores %s identical to the base's: ignored", ", ".join(identical))


def _strip_lora(base_model: nn.Module) -> None:
    """Put every LoRALayer's base linear back where the layer was."""
    for name, module in list(base_model.named_modules()):
        if isinstance(module, LoRALayer):
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, module.base_layer)


def describe_quantization(q: dict[str, Any] | None) -> str:
    """One line on the base an adapter was trained on, from its recorded quantization (None: not recorded)."""
    loaded = f", loaded in {q['dtype']}" if q and q.get("dtype") else ""
    if not q or not q.get("bits"):
        return f"dense base weights{loaded}"
    if q["bits"] == 8:
        return f"8-bit (LLM.int8) base weights{loaded}"
    double = ", double quant" if q.get("double_quant") else ""
    return f"4-bit {q.get('quant_type', 'nf4')}{double} base weights, compute {q.get('compute_dtype', '?')}{loaded}"
