"""Fast paths for LoRA training on a frozen (4-bit, 8-bit-free or dense) base.

Three pieces, each usable alone:

- `lora_group(x, layers)`: one autograd function for several LoRALayers that read the same input
  (q/k/v, gate/up, or a single linear). Forward dequantizes each 4-bit base weight into a
  temporary, runs one GEMM, and folds the rank-r update into that output in place (`addmm_`);
  the adapter inputs of the whole group come from one `x @ cat(A).T`. It saves only `x` (the
  compute-dtype input) and the (M, sum r) adapter activations; backward dequantizes the base again
  and frees it at once. The plain path (and PEFT's) keeps an fp32 copy of `x` per linear and runs
  five to eight elementwise kernels per linear.
- `chunked_causal_lm_loss(hidden, weight, labels)`: the output head and cross-entropy over chunks of
  tokens, with the gradient of the hidden states computed in the forward, so the (tokens, vocab)
  logits never exist in full, in fp32 or otherwise.
- `patch_model_for_speed(model)`: applies both to a Hugging Face Llama-architecture causal LM
  (wrapped in a LoRAModel or not), plus fused RMSNorm, RoPE and SwiGLU (torch.compile'd on CUDA).
  Explicit and opt-in: nothing here runs unless it is called.

Numerics. The adapter path runs in the compute dtype of the activations (bf16 on GPU) with fp32
accumulation, as under `torch.autocast`; the adapter weights and their gradients stay fp32. The
plain path casts the activations to fp32 first. The bf16 rounding of `x @ A.T` and of the scaled
B (exact when alpha / r is a power of two) each add a relative error of at most 2**-9 to an update
that is itself small next to the base output, whose own bf16 rounding (2**-9) both paths share.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist import quant

IGNORE_INDEX = -100

# ------------------------------------------------------------------------------------ helpers


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: gradients of fp32 adapter weights, not rounded to bf16 first."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # fp32 accumulator written as is
        except (RuntimeError, TypeError):
            pass
    return (a @ b).float()


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight a base linear computes with, in `dtype` (a temporary for 4-bit)."""
    if quant.bits_of(base) == 4:
        return quant.dequantize_weight(base, dtype)
    return base.weight.detach().to(dtype)


def supports_fast_path(layer: nn.Module) -> bool:
    """Whether `lora_group` can run this layer: an unmerged LoRALayer without dropout over a dense
    or 4-bit base (8-bit bases keep bitsandbytes' own int8 matmul, which this path would change)."""
    from lora_dist.layers import LoRALayer  # layers imports this module lazily too

    return (
        isinstance(layer, LoRALayer)
        and not layer.merged
        and isinstance(layer.lora_dropout, nn.Identity)
        and quant.bits_of(layer.base_layer) != 8
    )


# ------------------------------------------------------------------------------------ LoRA linear


class _LoRAProject(torch.autograd.Function):
    """xa = x @ cat(A_i).T: the adapter inputs of every layer of a group, from one read of x.

    The only function of a group that saves an activation (x). Its partner `_LoRAOutput` saves
    none, so a checkpointed layer's recompute, which stops once every saved tensor is back
    (torch's non-reentrant early stop), never reruns a base GEMM whose output backward does not
    need: the down projection's, about a quarter of a Llama layer's FLOPs.
    """

    @staticmethod
    def forward(ctx, x2, *a_params):
        # x2: (M, in); a_params: (r_i, in) each
        a_cat = torch.cat([a.to(x2.dtype) for a in a_params])  # (R, in)
        ctx.save_for_backward(x2)
        ctx.ranks = [a.shape[0] for a in a_params]
        ctx.dtypes = [a.dtype for a in a_params]
        return x2 @ a_cat.t()  # (M, R)

    @staticmethod
    def backward(ctx, g_xa):
        (x2,) = ctx.saved_tensors
        # grad of x comes from _LoRAOutput.backward, which folds g_xa @ A into its own GEMM output
        grad_a_cat = _mm_f32(g_xa.t(), x2)  # (R, in)
        grads, start = [], 0
        for needs, r, dtype in zip(ctx.needs_input_grad[1:], ctx.ranks, ctx.dtypes):
            grads.append(grad_a_cat[start : start + r].to(dtype) if needs else None)
            start += r
        return (None, *grads)


class _LoRAOutput(torch.autograd.Function):
    """y_i = x @ W_i.T (+ bias_i) + (x @ A_i.T) @ (s_i B_i).T, given xa = x @ cat(A).T."""

    @staticmethod
    def forward(ctx, x2, xa, layers, *b_params):
        dtype = x2.dtype
        outs, start = [], 0
        for layer, b in zip(layers, b_params):
            r = b.shape[1]
            # The rank-r product first, then the base GEMM accumulates onto it (beta = 1): the
            # compute-bound GEMM reads the update in its epilogue almost for free, where adding
            # it afterwards would be a memory-bound pass over y.
            y = xa[:, start : start + r] @ (b.to(dtype) * layer.scaling).t()  # (M, out)
            bias = layer.base_layer.bias
            if bias is not None:
                y += bias.to(dtype)
            w = _base_weight(layer.base_layer, dtype)  # (out, in), freed after the GEMM
            y.addmm_(x2, w.t())
            del w
            outs.append(y)
            start += r
        # Nothing goes through save_for_backward (see _LoRAProject): xa is tiny (M, R) and kept as
        # is; the adapters are parameters, which the optimizer changes only after backward.
        ctx.xa = xa.detach()
        ctx.layers = layers
        ctx.a_params = [layer.lora_A.weight for layer in layers]
        ctx.b_params = b_params
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        xa, layers, b_params = ctx.xa, ctx.layers, ctx.b_params
        dtype = xa.dtype
        m = xa.shape[0]
        gs = [None if g is None else g.reshape(m, -1).to(dtype) for g in grads]
        # d xa = [g_i @ (s_i B_i)]: (M, R), one slice per layer
        g_xa = torch.cat(
            [
                g @ (b.to(dtype) * layer.scaling) if g is not None else xa.new_zeros(m, b.shape[1])
                for g, b, layer in zip(gs, b_params, layers)
            ],
            dim=1,
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            a_cat = torch.cat([a.to(dtype) for a in ctx.a_params])  # (R, in)
            grad_x = g_xa @ a_cat  # (M, in): the adapter part first, the big GEMMs accumulate onto it
            for g, layer in zip(gs, layers):
                if g is None:
                    continue
                w = _base_weight(layer.base_layer, dtype)  # dequantize again, free at once
                grad_x.addmm_(g, w)
                del w
        grad_bs, start = [], 0
        for g, b, layer, needs in zip(gs, b_params, layers, ctx.needs_input_grad[3:]):
            r = b.shape[1]
            if g is None or not needs:
                grad_bs.append(None)
            else:
                grad_bs.append((_mm_f32(g.t(), xa[:, start : start + r]) * layer.scaling).to(b.dtype))
            start += r
        return (grad_x, g_xa, None, *grad_bs)


def lora_group(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """Run several LoRALayers that share the input `x` through one fused autograd function.

    Args:
        x: (..., in_features) in the compute dtype (bf16 on GPU).
        layers: LoRALayers with the same in_features, each passing `supports_fast_path`.

    Returns:
        One (..., out_features_i) tensor per layer, in x's dtype.
    """
    layers = tuple(layers)
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    a_params = [layer.lora_A.weight for layer in layers]
    xa = _LoRAProject.apply(x2, *a_params)  # (M, R)
    outs = _LoRAOutput.apply(x2, xa, layers, *[layer.lora_B.weight for layer in layers])
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)


def lora_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """One LoRALayer's forward through the fused path: (..., in) -> (..., out)."""
    return lora_group(x, (layer,))[0]


def _group_or_plain(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    if all(supports_fast_path(layer) for layer in layers):
        return lora_group(x, layers)
    return tuple(layer(x) for layer in layers)


# ------------------------------------------------------------------------------------ fused elementwise ops
# Each op is an autograd function whose forward and backward are plain torch functions; on CUDA
# those functions are torch.compile'd (one fused kernel each), on the CPU they run eagerly. The
# math follows Hugging Face Llama's own modules so both paths compute the same function.


def _rmsnorm_fwd(x, weight, eps: float):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return weight * (xf * rstd).to(x.dtype), rstd


def _rmsnorm_bwd(g, x, weight, rstd):
    n = x.float() * rstd  # (..., d)
    gn = g.float() * weight.float()
    gx = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
    return gx.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_fwd(q, k, cos, sin):
    # q: (B, T, H, D), k: (B, T, Hkv, D), cos/sin: (B, T, D); computed in fp32, rounded once
    c, s = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    qf, kf = q.float(), k.float()
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


def _rope_bwd(gq, gk, cos, sin):
    # rotate_half is a signed permutation R with R.T = -R
    c, s = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    gqf, gkf = gq.float(), gk.float()
    return (gqf * c - _rotate_half(gqf * s)).to(gq.dtype), (gkf * c - _rotate_half(gkf * s)).to(gk.dtype)


def _swiglu_fwd(gate, up):
    return F.silu(gate) * up  # HF: act_fn(gate_proj(x)) * up_proj(x), both rounded in bf16


def _swiglu_bwd(g, gate, up):
    gf, upf = gate.float(), up.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    gg = g.float()
    d_gate = gg * upf * sig * (1 + gf * (1 - sig))
    d_up = gg * silu
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


_COMPILED: dict[str, Callable] = {}
_COMPILE_ENABLED = True


def set_compile(enabled: bool) -> None:
    """Turn torch.compile of the fused elementwise ops on or off (on by default, CUDA only)."""
    global _COMPILE_ENABLED
    _COMPILE_ENABLED = enabled


def _fused(fn: Callable, *args):
    if not (_COMPILE_ENABLED and args[0].is_cuda):
        return fn(*args)
    compiled = _COMPILED.get(fn.__name__)
    if compiled is None:
        compiled = torch.compile(fn, fullgraph=True)  # dynamic after a second shape
        _COMPILED[fn.__name__] = compiled
    try:
        return compiled(*args)
    except Exception as err:  # a compiler failure must not stop training: run eagerly
        warnings.warn(f"torch.compile failed for {fn.__name__} ({type(err).__name__}: {err}); running eagerly")
        _COMPILED[fn.__name__] = fn
        return fn(*args)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _fused(_rmsnorm_fwd, x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        return _fused(_rmsnorm_bwd, g.contiguous(), x, weight, rstd), None, None


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _fused(_rope_fwd, q, k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        gq, gk = _fused(_rope_bwd, gq.contiguous(), gk.contiguous(), cos, sin)
        return gq, gk, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _fused(_swiglu_fwd, gate, up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        return _fused(_swiglu_bwd, g.contiguous(), gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, `weight * (x / rms(x))` with HF's casts; the weight gets no gradient."""
    return _RMSNorm.apply(x, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (B, T, H, D) and k (B, T, Hkv, D) with cos/sin (B, T, D)."""
    return _RoPE.apply(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for backward."""
    return _SwiGLU.apply(gate, up)


# ------------------------------------------------------------------------------------ chunked LM loss


def _ce_chunk(logits, labels, inv_count):
    # logits: (C, V) compute dtype; labels: (C,) with IGNORE_INDEX; inv_count: 0-d fp32 tensor.
    # HF upcasts the logits to fp32 before its cross-entropy; so does this.
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (C, 1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).unsqueeze(1)  # (C, 1)
    target = lf.gather(1, safe)
    loss_sum = torch.where(valid.unsqueeze(1), lse - target, 0.0).sum()
    cols = torch.arange(lf.shape[1], device=lf.device).unsqueeze(0)  # (1, V)
    grad = torch.exp(lf - lse) - (cols == safe).to(lf.dtype)  # softmax - one_hot
    grad = grad * (valid.unsqueeze(1).to(lf.dtype) * inv_count)
    return loss_sum, grad.to(logits.dtype)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        # hidden: (N, d), weight: (V, d) frozen, labels: (N,) already shifted
        # A micro batch with no labelled token (a prompt cut off before its response) scores 0 with a
        # zero gradient, as HF's loss does given num_items_in_batch: every term of the sum is masked,
        # so dividing by max(count, 1) changes nothing else. Stays on the device: no sync.
        count = (labels != IGNORE_INDEX).sum().float().clamp(min=1.0)
        inv_count = 1.0 / count
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            logits = h @ weight.t()  # (C, V), the only logits alive at a time
            loss_sum, grad_logits = _fused(_ce_chunk, logits, labels[start : start + chunk_tokens], inv_count)
            del logits
            total += loss_sum
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_tokens])
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx, g):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * g.to(grad_hidden.dtype), None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T`, as Hugging Face causal LMs compute it.

    The gradient of `hidden` is computed chunk by chunk in the forward (the head is frozen), so
    only (chunk_tokens, vocab) logits exist at any time.

    Args:
        hidden: (B, T, d) final hidden states.
        weight: (V, d) output head weight (frozen).
        labels: (B, T) token ids; position t is scored against labels[:, t + 1]; -100 is ignored.
        chunk_tokens: tokens per chunk; default: equal chunks of at most about 2**28 logits.

    Returns:
        Scalar fp32 loss; 0 (with a zero gradient) when no label counts.
    """
    vocab, d = weight.shape
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T)
    n = shifted.numel()
    chunks = -(-n * vocab // 2**28)  # ceil: about 2**28 logits per chunk
    chunk = chunk_tokens or -(-n // chunks)  # equal chunks, so one compiled shape
    return _ChunkedLMLoss.apply(hidden.reshape(-1, d), weight, shifted.reshape(-1), chunk)


# ------------------------------------------------------------------------------------ model patching


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Llama self-attention for training: fused q/k/v LoRA, fused RoPE, causal SDPA, fused o LoRA."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if attention_mask is not None or cache is not None or position_embeddings is None:
        return self._lora_dist_original_forward(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
        )
    b, t, _ = hidden_states.shape
    d = self.head_dim
    q, k, v = _group_or_plain(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    q, k = rope(q.view(b, t, -1, d), k.view(b, t, -1, d), *position_embeddings)  # (B, T, H, D)
    v = v.view(b, t, -1, d)
    # (B, T, H, D) viewed as (B, H, T, D): the kernel's output transposes back without a copy
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=self.scaling,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    out = out.transpose(1, 2).reshape(b, t, -1)
    (out,) = _group_or_plain(out, (self.o_proj,))
    return out, None


def _mlp_forward(self, x):
    gate, up = _group_or_plain(x, (self.gate_proj, self.up_proj))
    (out,) = _group_or_plain(swiglu(gate, up), (self.down_proj,))
    return out


def _rmsnorm_forward(self, x):
    if self.weight.requires_grad:  # a trained norm needs its weight gradient: the module's own path
        return self._lora_dist_original_forward(x)
    return rms_norm(x, self.weight, self.variance_epsilon)


def _causal_lm_forward(self, input_ids=None, labels=None, **kwargs):
    """Causal LM forward whose loss never builds the full logits; logits come back as None."""
    if labels is None or kwargs.get("return_dict") is False:
        return self._lora_dist_original_forward(input_ids=input_ids, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    kwargs.pop("num_items_in_batch", None)
    outputs = self.model(input_ids=input_ids, **kwargs)
    hidden = outputs[0]  # (B, T, d)
    loss = chunked_causal_lm_loss(hidden, self.lm_head.weight, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _decoder_forward(self, hidden_states, *args, **kwargs):
    """Llama decoder layer checkpointed as two blocks, attention and MLP, each recomputed alone.

    Saves the residual stream twice per layer (x and x + attn(x)) instead of once, and in return
    the recompute of each block stops before its last GEMM (o_proj, down_proj), whose output
    backward never reads.
    """
    if args or not (self.training and torch.is_grad_enabled()):
        return self._lora_dist_original_forward(hidden_states, *args, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "cache", "past_key_values")}

    def attention_block(h):
        out = self.self_attn(hidden_states=self.input_layernorm(h), **kwargs)[0]
        return h + out

    def mlp_block(h):
        return h + self.mlp(self.post_attention_layernorm(h))

    from torch.utils.checkpoint import checkpoint

    hidden_states = checkpoint(attention_block, hidden_states, use_reentrant=False)
    return checkpoint(mlp_block, hidden_states, use_reentrant=False)


def _bind(module: nn.Module, fn: Callable) -> None:
    if not hasattr(module, "_lora_dist_original_forward"):
        module._lora_dist_original_forward = module.forward
    module.forward = types.MethodType(fn, module)


def _find_causal_lm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        inner = module._modules.get("model")
        if "lm_head" in module._modules and hasattr(inner, "layers"):
            return module
    raise TypeError(
        "patch_model_for_speed needs a Hugging Face Llama-architecture causal LM (a module with "
        f".model.layers and .lm_head), got {type(model).__name__}; use lora_group directly for other models"
    )


def patch_model_for_speed(
    model: nn.Module, loss: bool = True, norms: bool = True, block_checkpointing: bool = False
) -> nn.Module:
    """Route a Llama-architecture causal LM's training forward through the fast paths, in place.

    Patches each decoder layer's attention (fused q/k/v LoRA, fused RoPE, SDPA, o LoRA), MLP
    (fused gate/up LoRA, fused SwiGLU, down LoRA), and, with `norms`, its RMSNorms; with `loss`,
    the causal LM forward computes a chunked loss when given labels (and returns logits=None).
    Layers the fast path cannot run (dropout, 8-bit or merged adapters, padding masks, caches)
    fall back to their own forward. Activation checkpointing stays the model's own switch
    (`gradient_checkpointing_enable`); it recomputes the patched forward.

    Args:
        model: a LoRAModel or a Hugging Face causal LM with `.model.layers` and `.lm_head`.
        loss: patch the loss (chunked linear + cross-entropy).
        norms: patch the RMSNorms.
        block_checkpointing: checkpoint each decoder layer as two blocks (attention, MLP) here,
            instead of the model's own per-layer checkpointing (leave that off): one more saved
            (tokens, hidden) tensor per layer, and o_proj's GEMM is not recomputed either.

    Returns:
        `model`, for chaining.
    """
    lm = _find_causal_lm(model)
    if block_checkpointing and getattr(lm, "is_gradient_checkpointing", False):
        raise ValueError(
            "block_checkpointing replaces the model's own checkpointing: call "
            "model.gradient_checkpointing_disable() first, or pass block_checkpointing=False"
        )
    for layer in lm.model.layers:
        if block_checkpointing:
            _bind(layer, _decoder_forward)
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            kind = type(attn).__name__
            raise TypeError(f"{kind} is not a Llama-style attention; patch_model_for_speed cannot run it")
        _bind(attn, _attention_forward)
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and _is_silu(mlp):
            _bind(mlp, _mlp_forward)
        if norms:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                _bind(norm, _rmsnorm_forward)
    if norms and hasattr(lm.model, "norm"):
        _bind(lm.model.norm, _rmsnorm_forward)
    if loss and type(lm.lm_head) is nn.Linear and lm.lm_head.bias is None:
        _bind(lm, _causal_lm_forward)
    return model


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
