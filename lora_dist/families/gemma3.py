"""Gemma 3 text models (`model_type` "gemma3_text", Gemma3ForCausalLM): Gemma 2's layout with q/k norms.

Per-head q/k RMSNorms (Gemma's `1 + w` kind) before RoPE; local (sliding, RoPE base 10k) and global
layers, each with its own mask and cos/sin tables from the model's forward; `query_pre_attn_scalar`
scaling; soft-capping where the config sets it (null in the released checkpoints). Bidirectional
attention (`use_bidirectional_attention`, an embedding-model variant) is refused. The multimodal
Gemma3ForConditionalGeneration (`model_type` "gemma3") is another class and is not run here.
"""

from lora_dist.families.decoder import GEMMA_NORM, Family


def _check(config) -> list[str]:
    if config.use_bidirectional_attention:
        return ["use_bidirectional_attention=True (the fast attention is causal)"]
    return []


FAMILY = Family(
    model_type="gemma3_text",
    module="transformers.models.gemma3.modeling_gemma3",
    causal_lm="Gemma3ForCausalLM",
    decoder_layer="Gemma3DecoderLayer",
    attention="Gemma3Attention",
    mlp="Gemma3MLP",
    norm_class="Gemma3RMSNorm",
    norm=GEMMA_NORM,
    layout="sandwich",
    activation_key="hidden_activation",
    qk_norm="head",
    attn_softcap=True,
    final_softcap=True,
    check=_check,
)
