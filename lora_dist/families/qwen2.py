"""Qwen2 and Qwen2.5 (`model_type` "qwen2"): Llama's layout with biases on q/k/v.

The biases live in the base linears, which the fused LoRA GEMM adds (frozen ones only: a trained
bias, `lora.bias: lora_only`, keeps the layer's own forward). Layers from `max_window_layers` on
may use a sliding window, applied through the mask the model builds.
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="qwen2",
    module="transformers.models.qwen2.modeling_qwen2",
    causal_lm="Qwen2ForCausalLM",
    decoder_layer="Qwen2DecoderLayer",
    attention="Qwen2Attention",
    mlp="Qwen2MLP",
    norm_class="Qwen2RMSNorm",
    norm=LLAMA_NORM,
)
