"""Gemma 2 (`model_type` "gemma2"): Gemma's norms and GeGLU, plus four quirks.

- Sandwich norms: each sublayer is `x + post_norm(f(pre_norm(x)))`.
- Attention scores scaled by `query_pre_attn_scalar ** -0.5` (the module's `scaling`) and soft-capped
  (`attn_logit_softcapping * tanh(s / cap)`): SDPA cannot cap, so those layers take the explicit
  softmax, as the model's own eager attention does (transformers refuses sdpa for Gemma 2).
- Alternating sliding-window and global layers, through the per-layer masks the model builds.
- Final logits soft-capped by `final_logit_softcapping`, folded into the chunked loss.
"""

from lora_dist.families.decoder import GEMMA_NORM, Family

FAMILY = Family(
    model_type="gemma2",
    module="transformers.models.gemma2.modeling_gemma2",
    causal_lm="Gemma2ForCausalLM",
    decoder_layer="Gemma2DecoderLayer",
    attention="Gemma2Attention",
    mlp="Gemma2MLP",
    norm_class="Gemma2RMSNorm",
    norm=GEMMA_NORM,
    layout="sandwich",
    activation_key="hidden_activation",
    attn_softcap=True,
    final_softcap=True,
)
