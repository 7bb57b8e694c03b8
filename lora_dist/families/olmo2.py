"""OLMo 2 (`model_type` "olmo2"): norms after each sublayer, q/k norms over the whole projections.

Each sublayer is `x + norm(f(x))` (no norm on its input); q_norm and k_norm are RMSNorms over the
full q (heads * head_dim) and k projections, before the heads are split and rotated. Its RMSNorm
multiplies by the weight in fp32 before rounding (`(w * norm(x)).to(dtype)`), unlike Llama's.
"""

from lora_dist.families.decoder import FP32_WEIGHT_NORM, Family

FAMILY = Family(
    model_type="olmo2",
    module="transformers.models.olmo2.modeling_olmo2",
    causal_lm="Olmo2ForCausalLM",
    decoder_layer="Olmo2DecoderLayer",
    attention="Olmo2Attention",
    mlp="Olmo2MLP",
    norm_class="Olmo2RMSNorm",
    norm=FP32_WEIGHT_NORM,
    layout="post_norm",
    qk_norm="projection",
)
