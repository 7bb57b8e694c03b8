"""Phi-3, Phi-3.5 and Phi-4 (`model_type` "phi3"): fused `qkv_proj` and `gate_up_proj` linears.

LoRA goes on the fused linears themselves, as PEFT does it (one adapter over q|k|v, one over
gate|up); the fast path splits their outputs (q, k, v in that order; gate first, then up). Partial
rotary embeddings (Phi-4-mini's `partial_rotary_factor`) rotate the first dims of each head only;
LongRoPE scaling is in the model's cos/sin tables. Residual dropout (`resid_pdrop`) stays the
decoder layer's own.
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="phi3",
    module="transformers.models.phi3.modeling_phi3",
    causal_lm="Phi3ForCausalLM",
    decoder_layer="Phi3DecoderLayer",
    attention="Phi3Attention",
    mlp="Phi3MLP",
    norm_class="Phi3RMSNorm",
    norm=LLAMA_NORM,
    fused_qkv=True,
    fused_gate_up=True,
    residual_dropout=True,
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
)
