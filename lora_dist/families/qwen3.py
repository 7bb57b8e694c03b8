"""Qwen3 dense models (`model_type` "qwen3"): Llama's layout with an RMSNorm on each head's q and k.

The q/k norms run over head_dim, after the projections and before RoPE; the optional sliding window
comes through the model's mask. Qwen3-MoE is another `model_type` and is not run here.
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="qwen3",
    module="transformers.models.qwen3.modeling_qwen3",
    causal_lm="Qwen3ForCausalLM",
    decoder_layer="Qwen3DecoderLayer",
    attention="Qwen3Attention",
    mlp="Qwen3MLP",
    norm_class="Qwen3RMSNorm",
    norm=LLAMA_NORM,
    qk_norm="head",
)
