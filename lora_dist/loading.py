"""Load a Hugging Face causal LM and its tokenizer, quantized to 4 or 8 bits as it loads.

Quantization goes through transformers' `BitsAndBytesConfig`, not `quant.quantize_model`: the
checkpoint is quantized tensor by tensor as it streams in (straight onto the GPU with a device_map),
so peak memory is the quantized model, never the dense one; `quantize_model` needs the dense model
in memory first. It yields the same bitsandbytes `Linear4bit` / `Linear8bitLt` classes (uint8 4-bit
storage, which DeepSpeed leaves alone), works on the CPU as well as on CUDA (measured with
transformers 5.24 + bitsandbytes 0.50.2), and keeps the output head dense.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_dist import quant
from lora_dist.choices import BITS, QUANT_TYPES, check_choice
from lora_dist.errors import ConfigError


def load_base_model(
    name_or_path: str,
    bits: int | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device_map=None,
    attn_implementation: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    require_tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a local folder or a hub id, ready for `apply_lora_to_model`.

    Args:
        name_or_path: folder written by `save_pretrained`, or a hub id ("meta-llama/Llama-3.1-8B").
        bits: 4 (QLoRA NF4/FP4), 8 (LLM.int8(), outlier threshold 6.0 as transformers sets it) or
            None for a dense model.
        quant_type: "nf4" or "fp4" (4-bit only).
        double_quant: also quantize the 4-bit absmax statistics.
        compute_dtype: dtype of the 4-bit matmul and of every weight left dense (embeddings,
            norms, lm_head); the dense model's dtype when `bits` is None.
        device_map: passed to transformers; default with `bits` on a CUDA machine: the current
            device (each rank sets its own before loading), else the CPU.
        attn_implementation: "eager", "sdpa", "flash_attention_2", ...; default: transformers' choice.
        dtype: dtype the checkpoint is loaded in (and 4/8-bit weights quantized from), "auto" for
            the checkpoint's own; default: `compute_dtype`.
        require_tokenizer: raise if the folder has no tokenizer (else return None for it).

    Returns:
        (model in eval mode, tokenizer or None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    check_choice("bits", bits, BITS, none_ok=True)
    check_choice("quant_type", quant_type, QUANT_TYPES)
    check_local_path(name_or_path)

    kwargs: dict = {"dtype": compute_dtype if dtype is None else dtype}
    if bits is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"could not load a model from {name_or_path!r}: {_first_line(err)}") from None

    for module in model.modules():
        quant.keep_portable_layout(module)  # see quant.keep_portable_layout: no silent CPU repack
    head = model.get_output_embeddings()
    if head is not None and quant.bits_of(head) is not None:
        raise RuntimeError(f"transformers quantized the output head of {name_or_path}; it must stay dense")

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        if require_tokenizer:
            raise FileNotFoundError(
                f"{name_or_path!r} has no usable tokenizer ({_first_line(err)}); save one beside the model "
                f"with tokenizer.save_pretrained"
            ) from None
        tokenizer = None
    return model, tokenizer


def load_tokenizer(name_or_path: str) -> object:
    """The tokenizer of a model folder or hub id.

    Raises:
        FileNotFoundError: none can be loaded from there (the message names the path and why).
    """
    from transformers import AutoTokenizer

    check_local_path(name_or_path)  # "folder does not exist" beats a hub-id syntax error
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        first = _first_line(err)
        raise FileNotFoundError(f"model.path {name_or_path!r}: no tokenizer could be loaded ({first})") from None


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (transformers' checkpointing, non-reentrant).

    Raises:
        ConfigError: the model class does not support it.
    """
    # Non-reentrant checkpointing works with a frozen embedding (no input that requires grad).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The text decoder's layers of a Hugging Face causal LM, wrapped (LoRAModel) or not, or None.

    Asks the model itself (`get_decoder()`), so a multimodal checkpoint (Gemma 3's
    Gemma3ForConditionalGeneration) gives its language model's layers, not its vision tower's.
    """
    for module in model.modules():
        get_decoder = getattr(module, "get_decoder", None)
        if not callable(get_decoder):
            continue
        try:
            layers = getattr(get_decoder(), "layers", None)
        except (AttributeError, NotImplementedError, TypeError):
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def disable_kv_cache(model: nn.Module) -> None:
    """Training needs no KV cache, and it clashes with checkpointing: off in the config and in a
    multimodal model's text config (Gemma 3 keeps `use_cache` there only)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    texts = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for c in texts:
        if getattr(c, "use_cache", False):
            c.use_cache = False


def check_local_path(name_or_path: str) -> None:
    """Clear errors for a local path that is not a model folder (hub ids pass through).

    Raises:
        ConfigError: the path is a file. FileNotFoundError: a folder without config.json, or a local-looking
        path that does not exist.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.path {name_or_path} is a file; give the model folder (the one with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} has no config.json: not a Hugging Face model folder")
        return
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
