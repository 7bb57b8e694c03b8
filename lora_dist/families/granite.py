"""IBM Granite 3.x dense models (`model_type` "granite"): Llama's layout with four multipliers.

- `embedding_multiplier` on the embeddings: the model's own forward.
- `residual_multiplier` on each sublayer output before the residual add: the decoder layer's own
  forward (and block checkpointing's wiring).
- `attention_multiplier` as the attention scale instead of head_dim ** -0.5: the module's `scaling`.
- logits divided by `logits_scaling`: folded into the chunked loss.
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="granite",
    module="transformers.models.granite.modeling_granite",
    causal_lm="GraniteForCausalLM",
    decoder_layer="GraniteDecoderLayer",
    attention="GraniteAttention",
    mlp="GraniteMLP",
    norm_class="GraniteRMSNorm",
    norm=LLAMA_NORM,
    logits_scaling=True,
    residual_multiplier=True,
)
