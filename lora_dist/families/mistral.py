"""Mistral (`model_type` "mistral"): Llama's layout with an optional sliding attention window.

When the sequence is longer than `config.sliding_window`, the model's own forward builds a banded
causal mask; the fast attention applies that mask as it is (no window of its own to get wrong).
"""

from lora_dist.families.decoder import LLAMA_NORM, Family

FAMILY = Family(
    model_type="mistral",
    module="transformers.models.mistral.modeling_mistral",
    causal_lm="MistralForCausalLM",
    decoder_layer="MistralDecoderLayer",
    attention="MistralAttention",
    mlp="MistralMLP",
    norm_class="MistralRMSNorm",
    norm=LLAMA_NORM,
)
