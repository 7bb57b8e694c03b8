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
        kw.update(overrides)
        config = AutoConfig.for_model(self.model_type, **kw)
        config.use_cache = False
        return config


_LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)

SHAPES: dict[str, Shape] = {
    "tiny": Shape("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, rope_theta=10000.0,
                                max_position_embeddings=256)),
    "llama3.2-1b": Shape("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       rope_theta=500000.0, max_position_embeddings=131072,
                                       tie_word_embeddings=True)),
    "llama3-8b": Shape("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, **_LLAMA3)),
    "qwen2.5-7b": Shape("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                      rope_theta=1000000.0, max_position_embeddings=32768,
                                      tie_word_embeddings=False)),
    "mistral-7b": Shape("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                        rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None)),
    # all 80 layers hold 35 GB in NF4: the bench measures a few and computes the rest
    "llama3-70b": Shape("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, **_LLAMA3)),
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
    config = shape(name).hf_config(num_layers, attn_implementation=attn_implementation or "sdpa")
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
    """Rotary embeddings hold computed (non-persistent) frequencies that `to_empty` left uninitialized:
    build each again from the config on `device`."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, type(module)(config=config).to(device))
