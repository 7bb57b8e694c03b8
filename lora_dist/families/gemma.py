"""Gemma 1 (`model_type` "gemma"): RMSNorm as `norm(x) * (1 + w)` in fp32, tanh-GeGLU, scaled embeddings.

The embedding scaling by sqrt(hidden_size), rounded to the model's dtype as the model does it, stays
in the model's own forward. head_dim is its own config field (256 for Gemma-7B, not hidden / heads).
"""

from lora_dist.families.decoder import GEMMA_NORM, Family

FAMILY = Family(
    model_type="gemma",
    module="transformers.models.gemma.modeling_gemma",
    causal_lm="GemmaForCausalLM",
    decoder_layer="GemmaDecoderLayer",
    attention="GemmaAttention",
    mlp="GemmaMLP",
    norm_class="GemmaRMSNorm",
    norm=GEMMA_NORM,
)
