"""Llama 2 and 3.x (`model_type` "llama"): the reference layout the other families differ from.

Pre-norm decoder (`x + attn(norm(x))`, `x + mlp(norm(x))`), RMSNorm `w * norm(x).to(dtype)`, SwiGLU,
grouped-query attention, any RoPE scaling (Llama 3.1's "llama3" rope is in the cos/sin tables the
model itself builds).
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="llama",
    module="transformers.models.llama.modeling_llama",
    causal_lm="LlamaForCausalLM",
    decoder_layer="LlamaDecoderLayer",
    attention="LlamaAttention",
    mlp="LlamaMLP",
    norm_class="LlamaRMSNorm",
    norm=LLAMA_NORM,
)
