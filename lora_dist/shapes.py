"""Named model shapes and the one builder of random-weight models, read by the training job and the bench.

A shape is a Hugging Face `model_type` and the config fields that size it. Random weights make
throughput and memory runs possible with no download (`model.path: random:llama3-8b`,
`lora-dist bench --shape llama3-8b`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shape:
    """One model shape: its family (`config.model_type`) and the config fields that size it."""

    model_type: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.fields["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.fields["vocab_size"])

    def hf_config(self, num_layers: int | None = None, **overrides: Any):
        """The transformers config of this shape (optionally with fewer layers)."""
        from transformers import AutoConfig

        kw = dict(self.fields)
        if num_layers is not None:
            kw["num_hidden_layers"] = num_layers
            if "layer_types" in kw:  # families with per-layer attention kinds list one per layer
                kw["layer_types"] = kw["layer_types"][:num_layers]
        kw.update({k: v for k, v in overrides.items() if v is not None})  # None: the shape's own choice
        config = AutoConfig.for_model(self.model_type, **kw)
        config.use_cache = False
        return config


_LLAMA3 = {"num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192}

# Gemma 3 12B: five local (sliding window, RoPE base 10k) layers, then one global layer.
_GEMMA3_LAYER_TYPES = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)]

SHAPES: dict[str, Shape] = {
    "tiny": Shape("llama", {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 10000.0, "max_position_embeddings": 256,
    }),
    "llama3.2-1b": Shape("llama", {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    }),
    "llama3-8b": Shape("llama", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        **_LLAMA3,
    }),
    "qwen2.5-7b": Shape("qwen2", {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    }),
    # all 80 layers hold 35 GB in NF4: the bench measures a few and computes the rest
    "llama3-70b": Shape("llama", {
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        **_LLAMA3,
    }),
    # Below: the published config.json fields of each model (for Gemma 3, its text_config).
    "mistral-7b": Shape("mistral", {  # v0.3 (v0.1: vocab 32000, rope_theta 1e4, sliding_window 4096)
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32768, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "sliding_window": None,
    }),
    "qwen3-8b": Shape("qwen3", {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }),
    "gemma2-9b": Shape("gemma2", {
        "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "vocab_size": 256000, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "rope_theta": 10000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        # the attention that soft-caps: transformers 5.17 would give sdpa, which drops the cap (5.24: eager)
        "attn_implementation": "eager",
    }),
    "gemma3-12b": Shape("gemma3_text", {
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "vocab_size": 262208, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "layer_types": _GEMMA3_LAYER_TYPES,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }),
    # LongRoPE's 48 short/long factors are left out: they change cos/sin values, no shape and no FLOP.
    "phi3.5-mini": Shape("phi3", {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "rope_theta": 10000.0, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "sliding_window": 262144, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "tie_word_embeddings": False,
    }),
    "olmo2-7b": Shape("olmo2", {  # OLMo-2-1124-7B
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 100352, "rope_theta": 500000.0, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }),
    "granite3.1-8b": Shape("granite", {  # granite-3.1-8b-base: Llama's layout with its four multipliers
        "hidden_size": 4096, "intermediate_size": 12800, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 49155, "rope_theta": 10000000.0, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 16.0,
    }),
}


def shape(name: str) -> Shape:
    """The shape called `name`; KeyError names the known ones."""
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(sorted(SHAPES))}") from None


def build_random_model(
    name: str,
    *,
    bits: int | None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype=None,
    device="cpu",
    seed: int = 0,
    num_layers: int | None = None,
    attn_implementation: str | None = None,
):
    """A causal LM of shape `name` with random weights, its linears quantized to `bits` (None: dense).

    Built on the meta device, then allocated straight on `device` in `compute_dtype` (default bf16)
    and quantized there: no dense copy on the CPU and nothing written to disk. Every weight is drawn
    from its own generator on `device`, seeded by (seed, parameter index), so ranks that build it
    agree bit for bit. Norm weights are 1 (0 for families whose norm is `x * (1 + w)`), other weights
    N(0, 0.02), the usual init of these families. The head stays dense.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dist import quant

    compute_dtype = compute_dtype or torch.bfloat16
    device = torch.device(device)
    # transformers' choice (sdpa) unless the shape names one (Gemma 2: eager, the attention that soft-caps)
    config = shape(name).hf_config(num_layers, attn_implementation=attn_implementation)
    old = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every module its own new tensor: tie the head to the embedding again
    unit_offset_norms = config.model_type.startswith("gemma")  # their norm computes x * (1 + w)
    with torch.no_grad():
        for index, (pname, param) in enumerate(model.named_parameters()):
            if pname.endswith("norm.weight"):
                param.fill_(0.0 if unit_offset_norms else 1.0)
            elif pname.endswith(".bias"):
                param.zero_()
            else:
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
                param.normal_(0.0, 0.02, generator=gen)
    _recompute_buffers(model, config, device)
    if bits is not None:
        quant.quantize_model(model, bits, quant_type, double_quant, compute_dtype, skip_modules=("lm_head",))
    return model


def _recompute_buffers(model, config, device) -> None:
    """Rebuild the computed (non-persistent) buffers that `to_empty` left uninitialized.

    Rotary embeddings (frequencies) are built again from the config on `device`; Gemma's scaled
    embeddings get their sqrt(hidden_size) factor back (held as a Python float beside the buffer).
    """
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, type(module)(config=config).to(device))
        elif kind.endswith("ScaledWordEmbedding"):
            module.embed_scale.fill_(module.scalar_embed_scale)
