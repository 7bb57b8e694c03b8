"""Gemma 3 text models (`model_type` "gemma3_text", Gemma3ForCausalLM): Gemma 2's layout with q/k norms.

Per-head q/k RMSNorms (Gemma's `1 + w` kind) before RoPE; local (sliding, RoPE base 10k) and global
layers, each with its own mask and cos/sin tables from the model's forward; `query_pre_attn_scalar`
scaling; final-logit soft-capping where the config sets it (null in the released checkpoints). No
attention soft-capping: Gemma3Attention (transformers 5.17 and 5.24) never passes its
`attn_logit_softcapping` on to the attention function, whatever the config says. Bidirectional
attention (`use_bidirectional_attention`, an embedding-model variant) is refused.

Two entries: `gemma3_text` (Gemma3ForCausalLM: the 1B checkpoint, or any text-only config) and
`gemma3` (Gemma3ForConditionalGeneration: what the released 4B/12B/27B checkpoints load as, its
decoder under `model.language_model`, a SigLIP vision tower beside it). On the latter the fast path
runs the language model; images, if any, go through the model's own vision tower and projector,
LoRA targets only the language model's linears, and, as that class's own forward, no final-logit
soft-capping is applied.
"""

import dataclasses

from lora_dist.families.decoder import GEMMA_NORM, Family


def _check(config) -> list[str]:
    # a field of transformers >= 5.2x's config; older releases have no bidirectional variant
    if getattr(config, "use_bidirectional_attention", False):
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
    final_softcap=True,
    check=_check,
)

MULTIMODAL = dataclasses.replace(
    FAMILY,
    model_type="gemma3",
    causal_lm="Gemma3ForConditionalGeneration",
    final_softcap=False,  # Gemma3ForConditionalGeneration.forward does not cap its logits
    language_model="model.language_model",
    lora_targets=r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
)
