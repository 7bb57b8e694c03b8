"""The model families the fused training path runs, keyed by `config.model_type`, and its entry point.

A family is patched only when it is listed here, by code written and tested for it (one module per
family: its transformers classes and quirks in a `Family` table; the shared forwards in `decoder.py`).
Anything else raises `UnsupportedModel`: the training job refuses it under `model.fused_kernels=on`
and trains on the model's own forward under `auto`. Adding a family is one module and one line below.

    from lora_dist import families
    families.patch_model_for_speed(lora_model)        # raises UnsupportedModel for an unlisted family
    families.lora_targets("phi3")                     # ('qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj')
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_dist.errors import ConfigError
from lora_dist.families import (
    decoder,
    gemma,
    gemma2,
    gemma3,
    granite,
    llama,
    mistral,
    olmo2,
    phi3,
    qwen2,
    qwen3,
)
from lora_dist.families.decoder import Family
from lora_dist.model import LoRAModel

__all__ = ["FAMILIES", "Family", "UnsupportedModel", "lora_targets", "matmul_weights", "patch_model_for_speed"]

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma.FAMILY, gemma2.FAMILY, gemma3.FAMILY,
        gemma3.MULTIMODAL, phi3.FAMILY, olmo2.FAMILY, granite.FAMILY,
    )
}

MIXTURE_OF_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "olmoe", "granitemoe")
"""Families whose MLP is a router over experts: no fused path; LoRA on their attention trains on their own forward."""


class UnsupportedModel(ConfigError):
    """The fused training path has no code for this model (family or configuration); one line says which."""

    def __init__(self, family: str, reason: str):
        self.family = family
        self.reason = reason
        super().__init__(
            f"the fused training path does not run model_type {family!r}: {reason}; it runs "
            f"{', '.join(sorted(FAMILIES))}; set model.fused_kernels=auto (or off) to train on the model's own forward"
        )


def family_of(model_type: str | None) -> Family:
    """The `Family` registered for `model_type`, or UnsupportedModel saying why there is none."""
    family = FAMILIES.get(model_type or "")
    if family is not None:
        return family
    if model_type in MIXTURE_OF_EXPERTS:
        raise UnsupportedModel(model_type, "a mixture-of-experts model keeps its own forward "
                                           "(LoRA on its attention linears trains there)")
    raise UnsupportedModel(str(model_type), "no fast path has been written and tested for this family")


def lora_targets(model_type: str) -> tuple[str, ...] | str:
    """The linears that "LoRA on all linears" means for this family: PEFT's name suffixes, or one regex
    (a string, as `target_modules` takes it) where suffixes would also reach a vision tower."""
    return family_of(model_type).lora_targets


def matmul_weights(config: Any, num_layers: int | None = None) -> int:
    """N: weights of every matmul one token goes through (every layer's linears and the output head).

    Attention scores and the embedding are not counted; every listed family has a gated MLP (three
    intermediate-sized matrices, Phi-3's gate_up_proj being two of them) and q/k/v/o projections of
    `head_dim`-wide heads.
    """
    family_of(config.model_type)  # refuse a family whose linears this count does not describe
    config = config.get_text_config()
    d, inner = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * inner
    return (num_layers or config.num_hidden_layers) * per_layer + config.vocab_size * d


def patch_model_for_speed(
    model: nn.Module, loss: bool = True, norms: bool = True, block_checkpointing: bool = False
) -> nn.Module:
    """Route a listed family's training forward through the fused kernels, in place.

    Patches each decoder layer's attention (fused q/k/v LoRA, q/k norms, fused RoPE, SDPA or the
    soft-capped softmax, o LoRA), MLP (fused gate/up LoRA, SwiGLU or tanh-GeGLU, down LoRA), and,
    with `norms`, its RMSNorms; with `loss`, the causal LM computes a chunked loss (with the family's
    logit scaling and soft-capping) when given labels, and returns logits=None. Layers the fast path
    cannot run exactly (dropout, 8-bit, merged adapters, trained biases) and calls with a KV cache
    keep their own forward. Activation checkpointing stays the model's own switch
    (`gradient_checkpointing_enable`); it recomputes the patched forward.

    Args:
        model: a LoRAModel, or a Hugging Face causal LM of a listed family.
        loss: patch the loss (chunked linear + cross-entropy).
        norms: patch the RMSNorms.
        block_checkpointing: checkpoint each decoder layer as two blocks (attention, MLP) here,
            instead of the model's own per-layer checkpointing (leave that off): one more saved
            (tokens, hidden) tensor per layer, and o_proj's GEMM is not recomputed either.

    Returns:
        `model`, for chaining.

    Raises:
        UnsupportedModel: the family is not listed, or this model's classes or configuration are
            not what its fast path was written for; nothing has been changed.
    """
    lm = model.base_model if isinstance(model, LoRAModel) else model
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None) or type(lm).__name__
    family = family_of(model_type)
    found = decoder.problems(lm, family)
    if found:
        raise UnsupportedModel(model_type, "; ".join(found))
    if block_checkpointing and getattr(lm, "is_gradient_checkpointing", False):
        raise ValueError(
            "block_checkpointing replaces the model's own checkpointing: call "
            "model.gradient_checkpointing_disable() first, or pass block_checkpointing=False"
        )
    decoder.patch(lm, family, loss=loss, norms=norms, block_checkpointing=block_checkpointing)
    return model
