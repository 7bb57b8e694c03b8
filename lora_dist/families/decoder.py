"""The training forwards every supported decoder-only family shares, steered by that family's `Family` table.

Only modules whose math a table describes are rebound: each decoder layer's attention, MLP and
RMSNorms, the final norm, and the causal LM's loss (and, for block checkpointing, the decoder layer).
The model's own forward still builds the embeddings (Gemma's sqrt(hidden) scaling in the model's
dtype, Granite's embedding multiplier), the masks (sliding windows, packed sequences) and the rotary
tables (Gemma 3's per-layer-type ones); each decoder layer's own forward still wires the residuals
(Gemma 2/3's sandwich norms, OLMo 2's post-norms, Granite's residual multiplier, Phi-3's residual
dropout) unless block checkpointing replaces it with the same wiring read from the table.

A family is patched only after `problems` has checked every class and config field the code below
relies on, so patching never fails half way and the first step meets no module it does not know.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_dist import kernels
from lora_dist.layers import supports_fast_path
from lora_dist.offload import offloaded_checkpoint

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention backends whose masks the fast attention reads: None or a (B, 1, T, T) bool/additive tensor.
flash_attention_2 passes 2D padding masks and flex_attention block masks, which it does not."""

ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": kernels.swiglu,
    "swish": kernels.swiglu,
    "gelu_pytorch_tanh": kernels.geglu_tanh,
}
"""`hidden_act` values (transformers' ACT2FN names) whose gated MLP has a fused kernel."""


@dataclass(frozen=True)
class Norm:
    """How a family's RMSNorm module computes (see `kernels.rms_norm`).

    Attributes:
        eps_attr: the module attribute holding epsilon.
        offset: 1.0 for norms stored as `x * (1 + w)`.
        fp32_weight: the weight multiplies in fp32 before the cast back (Gemma, OLMo 2).
    """

    eps_attr: str
    offset: float = 0.0
    fp32_weight: bool = False


LLAMA_NORM = Norm("variance_epsilon")  # weight * norm(x).to(dtype)
GEMMA_NORM = Norm("eps", offset=1.0, fp32_weight=True)  # (norm(x) * (1 + w.float())).to(dtype)
FP32_WEIGHT_NORM = Norm("variance_epsilon", fp32_weight=True)  # (w * norm(x)).to(dtype), OLMo 2

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Which RMSNorms a decoder layer holds, by where they sit around the two sublayers.
_LAYER_NORMS = {
    "pre_norm": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post_norm": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


@dataclass(frozen=True)
class Family:
    """One model family's fast path: the transformers classes it was written for and their quirks.

    Attributes:
        model_type: `config.model_type`, the registry key.
        module: the transformers module defining the classes below.
        causal_lm, decoder_layer, attention, mlp, norm_class: exact class names the code was checked
            against (a subclass or another class is refused).
        norm: how its RMSNorm computes.
        layout: where the norms sit: "pre_norm" (Llama), "sandwich" (Gemma 2/3: pre and post each
            sublayer), "post_norm" (OLMo 2: after each sublayer only).
        activation_key: the config field naming the MLP activation.
        qk_norm: None, "head" (RMSNorm over each head's q and k: Qwen3, Gemma 3) or "projection"
            (over the whole q and k projections: OLMo 2).
        fused_qkv: one `qkv_proj` linear (Phi-3) instead of q/k/v_proj.
        fused_gate_up: one `gate_up_proj` linear (Phi-3), gate first.
        attn_softcap: the attention module's `attn_logit_softcapping` caps its scores (Gemma 2; Gemma 3's
            attention reads none); refused under any attention but eager, the one that caps.
        final_softcap: `config.final_logit_softcapping` caps the logits (Gemma 2/3).
        logits_scaling: the logits are divided by `config.logits_scaling` (Granite).
        residual_multiplier: each sublayer's output is scaled by the layer's `residual_multiplier`
            before the residual add (Granite; only block checkpointing wires this itself).
        residual_dropout: each sublayer's output goes through `resid_attn_dropout` / `resid_mlp_dropout`
            (Phi-3; likewise).
        language_model: where the decoder stack (`.layers`, `.norm`) sits under the causal LM.
        lora_targets: the linears LoRA goes on for "all linears", as PEFT names them: name suffixes, or
            one regex over full module names where a suffix would also catch a vision tower's linears.
        check: extra config refusals: a list of one-line reasons, empty when supported.
    """

    model_type: str
    module: str
    causal_lm: str
    decoder_layer: str
    attention: str
    mlp: str
    norm_class: str
    norm: Norm
    layout: Literal["pre_norm", "sandwich", "post_norm"] = "pre_norm"
    activation_key: str = "hidden_act"
    qk_norm: Literal["head", "projection"] | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    logits_scaling: bool = False
    residual_multiplier: bool = False
    residual_dropout: bool = False
    language_model: str = "model"
    lora_targets: tuple[str, ...] | str = LLAMA_TARGETS
    check: Callable[[Any], list[str]] | None = None


# ------------------------------------------------------------------------------------ checks


def _is(module: object, family: Family, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == family.module


def problems(lm: nn.Module, family: Family) -> list[str]:
    """Everything about `lm` the fast path of `family` would get wrong; empty when it can run it."""
    config = lm.config.get_text_config()
    if not _is(lm, family, family.causal_lm):
        return [f"the model is a {type(lm).__name__}, the {family.model_type} fast path runs {family.causal_lm}"]
    found = []
    impl = config._attn_implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        found.append(f"attn_implementation={impl!r} (the fast path reads {' or '.join(ATTENTION_IMPLEMENTATIONS)} masks)")
    softcap = getattr(config, "attn_logit_softcapping", None) if family.attn_softcap else None
    if softcap is not None and impl != "eager":
        # transformers' sdpa attention cannot soft-cap: 5.17 drops the cap it is passed (and gives Gemma 2
        # sdpa by default), so the model's own forward would not cap while the fast path does; 5.24 raises
        found.append(f"attn_logit_softcapping={softcap} with attn_implementation={impl!r}, which does not "
                     f"soft-cap (set model.attn_implementation=eager: the attention that applies it)")
    if config.attention_dropout:
        found.append(f"attention_dropout={config.attention_dropout} (the fast attention has none)")
    activation = getattr(config, family.activation_key)
    if activation not in ACTIVATIONS:
        found.append(f"{family.activation_key}={activation!r} (fused: {', '.join(ACTIVATIONS)})")
    if family.check is not None:
        found += family.check(config)
    expected = ((family.decoder_layer, ""), (family.attention, ".self_attn"), (family.mlp, ".mlp"))
    text = lm.get_submodule(family.language_model)
    for index, layer in enumerate(text.layers):
        for name, attr in expected:
            module = layer.get_submodule(attr[1:]) if attr else layer
            if not _is(module, family, name):
                found.append(f"layers.{index}{attr} is a {type(module).__name__}, not a {name}")
        for norm in _norms_of(layer, family):
            if not _is(norm, family, family.norm_class):
                found.append(f"a norm of layers.{index} is a {type(norm).__name__}, not a {family.norm_class}")
        if found:
            break  # one layer's worth is enough to say why
    if not _is(text.norm, family, family.norm_class):
        found.append(f"{family.language_model}.norm is a {type(text.norm).__name__}, not a {family.norm_class}")
    return found


def _norms_of(layer: nn.Module, family: Family) -> list[nn.Module]:
    norms = [getattr(layer, name) for name in _LAYER_NORMS[family.layout]]
    if family.qk_norm:
        norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
    return norms


# ------------------------------------------------------------------------------------ patching


def patch(lm: nn.Module, family: Family, *, loss: bool, norms: bool, block_checkpointing: bool) -> None:
    """Rebind the forwards of `lm` (a causal LM that passed `problems`) to the fast paths, in place."""
    config = lm.config.get_text_config()
    activation = ACTIVATIONS[getattr(config, family.activation_key)]
    text = lm.get_submodule(family.language_model)
    for layer in text.layers:
        offloaded = hasattr(layer, "_lora_dist_offloader")  # offload.enable_activation_offload ran
        if offloaded and "_lora_dist_original_forward" not in layer.__dict__:
            # its per-layer offloaded checkpoint gives way to the blocks below, which offload each input
            layer.forward = layer._lora_dist_offload_original
        if block_checkpointing or offloaded:
            _bind(layer, _decoder_forward, family)
            layer._lora_dist_blocks = True  # offload enabled later only hands it an offloader
        _bind(layer.self_attn, _attention_forward, family)
        _bind(layer.mlp, _mlp_forward, family, activation)
        if norms:
            for norm in _norms_of(layer, family):
                _bind(norm, _norm_forward, family.norm)
    if norms:
        _bind(text.norm, _norm_forward, family.norm)
    # A head that is quantized or carries an adapter keeps the model's own logits and loss.
    if loss and type(lm.lm_head) is nn.Linear and lm.lm_head.bias is None:
        scale = 1.0 / config.logits_scaling if family.logits_scaling else 1.0
        softcap = config.final_logit_softcapping if family.final_softcap else None
        _bind(lm, _causal_lm_forward, scale, softcap)


def _bind(module: nn.Module, fn: Callable, *static: Any) -> None:
    """module.forward(...) becomes fn(module, *static, ...); the original stays for the fallbacks."""
    if "_lora_dist_original_forward" not in module.__dict__:
        module._lora_dist_original_forward = module.forward
    module.forward = functools.partial(fn, module, *static)


def group_or_plain(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of linears reading `x`: one fused LoRA call when all may take it, else each its own forward."""
    if all(supports_fast_path(m) for m in modules):
        return kernels.lora_group(x, modules)
    return tuple(m(x) for m in modules)


def _runs_fast(attention_mask: object, position_embeddings: object, kwargs: dict) -> bool:
    if kwargs.get("cache", kwargs.get("past_key_values")) is not None or position_embeddings is None:
        return False  # generation with a KV cache: the model's own attention
    if attention_mask is None:
        return True
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()))


def _attention_forward(self, family: Family, hidden_states, position_embeddings=None, attention_mask=None,
                       **kwargs):
    """Fused q/k/v LoRA (one linear for Phi-3), q/k norms, fused RoPE, attention, fused o LoRA."""
    if not _runs_fast(attention_mask, position_embeddings, kwargs):
        return self._lora_dist_original_forward(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
        )
    b, t, _ = hidden_states.shape
    d = self.head_dim
    if family.fused_qkv:
        (qkv,) = group_or_plain(hidden_states, (self.qkv_proj,))
        n_q, n_kv = self.config.num_attention_heads * d, self.config.num_key_value_heads * d
        q, k, v = qkv.split((n_q, n_kv, n_kv), dim=-1)  # q first, then k, then v, as Phi-3 packs them
    else:
        q, k, v = group_or_plain(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    if family.qk_norm == "projection":
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.view(b, t, -1, d), k.view(b, t, -1, d), v.view(b, t, -1, d)  # (B, T, H, D)
    if family.qk_norm == "head":
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = kernels.rope(q, k, *position_embeddings)
    softcap = self.attn_logit_softcapping if family.attn_softcap else None
    out = kernels.attention(q, k, v, scale=self.scaling, mask=attention_mask, softcap=softcap)
    (out,) = group_or_plain(out.reshape(b, t, -1), (self.o_proj,))
    return out, None


def _mlp_forward(self, family: Family, activation: Callable, x):
    if family.fused_gate_up:
        (gate_up,) = group_or_plain(x, (self.gate_up_proj,))
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate, up = group_or_plain(x, (self.gate_proj, self.up_proj))
    (out,) = group_or_plain(activation(gate, up, owned=True), (self.down_proj,))  # gate, up: ours alone
    return out


def _norm_forward(self, norm: Norm, x):
    if self.weight.requires_grad:  # a trained norm needs its weight gradient: the module's own path
        return self._lora_dist_original_forward(x)
    return kernels.rms_norm(x, self.weight, getattr(self, norm.eps_attr), offset=norm.offset,
                            fp32_weight=norm.fp32_weight)


def _causal_lm_forward(self, scale: float, softcap: float | None, input_ids=None, labels=None, **kwargs):
    """Causal LM forward whose loss never builds the full logits; logits come back as None."""
    if labels is None or kwargs.get("return_dict") is False:
        return self._lora_dist_original_forward(input_ids=input_ids, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    num_items = kwargs.pop("num_items_in_batch", None)  # as HF's loss: the sum divided by it when given
    kwargs.setdefault("use_cache", False)  # no cache is returned: none needs building
    outputs = self.model(input_ids=input_ids, **kwargs)
    loss = kernels.chunked_causal_lm_loss(outputs[0], self.lm_head.weight, labels, scale=scale, softcap=softcap,
                                          num_items=num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _decoder_forward(self, family: Family, hidden_states, *args, **kwargs):
    """A decoder layer checkpointed as two blocks, attention and MLP, each recomputed alone.

    Saves the residual stream twice per layer (x and x + attn(x)) instead of once, and in return
    the recompute of each block stops before its last GEMM (o_proj, down_proj) when nothing after
    it in the block needs its output saved (pre-norm layouts), and a block's backward never has the
    other block's saved tensors beside its own. With activation offload (the layer's offloader) both
    inputs wait in host memory: the second costs no GPU memory, only a copy each way. With its
    `save_attention` the attention block is not checkpointed: every tensor it saves waits in host
    memory instead, and its backward recomputes nothing.
    """
    if args or not (self.training and torch.is_grad_enabled()):
        return self._lora_dist_original_forward(hidden_states, *args, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "cache", "past_key_values")}
    layout = family.layout

    def residual(h, out, dropout: str):
        if family.residual_dropout:
            out = getattr(self, dropout)(out)
        if family.residual_multiplier:
            out = out * self.residual_multiplier
        return h + out

    def attention_block(h):
        x = h if layout == "post_norm" else self.input_layernorm(h)
        out = self.self_attn(hidden_states=x, **kwargs)[0]
        if layout != "pre_norm":
            out = self.post_attention_layernorm(out)
        return residual(h, out, "resid_attn_dropout")

    def mlp_block(h):
        if layout == "pre_norm":
            x = self.post_attention_layernorm(h)
        elif layout == "sandwich":
            x = self.pre_feedforward_layernorm(h)
        else:
            x = h
        out = self.mlp(x)
        if layout != "pre_norm":
            out = self.post_feedforward_layernorm(out)
        return residual(h, out, "resid_mlp_dropout")

    offloader = getattr(self, "_lora_dist_offloader", None)

    def checkpointed(block, h):
        if offloader is not None:
            return offloaded_checkpoint(block, h, offloader)
        return checkpoint(block, h, use_reentrant=False)

    if offloader is not None and offloader.save_attention:  # nothing recomputed: its saved tensors wait on the host
        others = [t for v in kwargs.values() for t in (v if isinstance(v, (tuple, list)) else (v,))]
        with offloader.saving(keep=others):  # rotary tables, masks: alive anyway
            hidden_states = attention_block(hidden_states)
    else:
        hidden_states = checkpointed(attention_block, hidden_states)
    return checkpointed(mlp_block, hidden_states)
