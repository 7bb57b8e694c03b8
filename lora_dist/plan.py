"""`lora-dist plan`: the peak GPU memory of one training step, predicted from config.json alone.

    lora-dist plan configs/llama3-8b-qlora-24gb.yaml --gpu-mem 24
    lora-dist plan configs/llama3-8b-qlora-24gb.yaml data.max_seq_len=4096 --world-size 2
    lora-dist plan --measure --out $OUT/plan.json      # GPU: predicted vs measured

The model is built on the meta device (no weights, no GPU), wrapped by the real `LoRAModel` (so
the adapter count is the job's own) and, where the job would, patched by
`families.patch_model_for_speed` (so the fused path is taken exactly when the job takes it). Every
byte count below is read off that model or derived from what the code saves for backward; the
formulas and their reasons sit beside each term. It predicts what `torch.cuda.max_memory_allocated`
reports (the caching allocator's live bytes); the CUDA context lives outside it and is added only
when judging whether a card fits.

Notation: M = micro_batch * seq_len tokens, d hidden, q/kv the query and key/value widths, I the MLP
width, V the vocabulary, L layers, r a LoRA rank, e bytes of the compute dtype (2 for bf16), P the
adapter bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_dist.config import BUILTIN_MODEL, Config, load_config
from lora_dist.errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BLOCKSIZE_4BIT = 64  # bitsandbytes Params4bit's default block (one absmax per 64 weights)
BLOCKSIZE_NESTED = 256  # double quant: one fp32 absmax per 256 quantized absmax bytes
NF4_CODE_BYTES = 16 * 4  # each 4-bit QuantState holds its 16-entry fp32 code table
DYNAMIC_MAP_BYTES = 256 * 4  # double quant's 8-bit code table (each layer's state holds its own copy)
CUDA_ALLOC_ROUND = 512  # the caching allocator rounds every block up to 512 bytes
CUBLAS_WORKSPACE = 32 * 2**20  # torch's default cuBLAS workspace on Hopper, allocated through the allocator
CUDA_CONTEXT = 600 * 2**20  # CUDA context + kernels on an H100/H200 with torch 2.x (outside the allocator)
SAFETY = 0.90  # predicted peak / allocator budget the auto micro batch stays under (fragmentation, error)
CHECKPOINT_SPEED = 0.76  # tokens/s with per-layer checkpointing / without (12,332 / 16,264 measured, 8B)
FLAT_TOKENS = 256  # tokens/s ~ M / (M + FLAT_TOKENS): small micro batches run less efficient GEMMs (heuristic)


# ------------------------------------------------------------------------------------ the model, described


@dataclass
class _Linear:
    """One linear of a decoder layer as the training step sees it."""

    name: str  # suffix inside the layer: "self_attn.q_proj"
    in_features: int
    out_features: int
    rank: int  # 0: no adapter
    dropout: bool
    bits: int | None

    @property
    def fast(self) -> bool:
        """LoRALayer.forward's own fused path on CUDA: 4-bit base (kernels.lora_linear); its dropout mask
        is drawn again in backward, never stored."""
        return self.rank > 0 and self.bits == 4


@dataclass
class _Layer:
    """A decoder layer reduced to what decides its saved activations."""

    linears: dict[str, _Linear]
    llama_like: bool  # q/k/v/o + gate/up/down (or Phi-3's fused pairs): what the per-tensor formulas follow
    qk_norm: bool  # Qwen3/OLMo2-style per-head norms on q and k
    gated: bool  # an MLP gated by SiLU or tanh-GELU: what the fused kernels' gated activation runs
    fused_pairs: bool = False  # Phi-3: one qkv_proj (q|k|v) and one gate_up_proj (gate|up) linear
    layout: str = "pre_norm"  # where the norms sit: "pre_norm", "sandwich" (Gemma 2/3), "post_norm" (OLMo 2)
    qk_norm_kind: str = ""  # "head" (Qwen3, Gemma 3: over each head) or "projection" (OLMo 2)
    q_features: int = 0  # q's width (heads x head_dim); k and v: kv_features each
    kv_features: int = 0

    @property
    def by_name(self) -> dict[str, _Linear]:
        """The linears by their own name ("q_proj"), without their path inside the layer."""
        return {n.rsplit(".", 1)[-1]: l for n, l in self.linears.items()}


@dataclass
class ModelFacts:
    """Everything `plan_memory` needs from the model, read once from the meta-device build."""

    name: str
    model_type: str
    layers: list[_Layer]
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    tied: bool
    base_terms: dict[str, int]
    adapter_param_bytes: int
    adapter_tensors: int
    fused: bool  # the job routes the forward through families.patch_model_for_speed
    chunked_loss: bool  # ... and its loss through the chunked linear + cross-entropy
    fused_norms: bool
    rotary_dim: int = 0  # dims of each head RoPE rotates (Phi-4-mini's partial_rotary_factor); 0: head_dim
    rope_tables: int = 1  # cos/sin pairs per forward (Gemma 3: one for local, one for global layers)
    rope_bytes: int = 0  # bytes per cos/sin value; 0: the compute dtype's (OLMo 2 hands them over in fp32)


_ROPE_TABLES = {"gemma3": (2, 0), "gemma3_text": (2, 0), "olmo2": (1, 4)}
"""(rope_tables, rope_bytes) where a family's rotary embedding differs from Llama's (traced on the CPU:
tests/test_plan.py counts what autograd keeps for each listed family)."""


def model_config(cfg: Config, num_layers: int | None = None) -> Any:
    """The transformers config of `cfg.model.path`: read from config.json only (or a shape, or the tiny default)."""
    from transformers import AutoConfig

    shape_name = cfg.model.random_shape()
    if shape_name is not None:
        from lora_dist.shapes import shape

        return shape(shape_name).hf_config(num_layers)
    if cfg.model.path == BUILTIN_MODEL:
        built = cfg.output_dir / "tiny-llama" / "config.json"
        if built.is_file():
            config = AutoConfig.from_pretrained(built.parent)
        else:
            config = _tiny_default_config()
    else:
        from lora_dist.loading import check_local_path

        check_local_path(cfg.model.path)
        try:
            try:  # a local folder, or a hub model already in the cache: no network
                config = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
            except OSError:
                config = AutoConfig.from_pretrained(cfg.model.path)  # the hub: config.json only
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError([f"model.path {cfg.model.path!r}: no config.json could be read ({first})"]) from None
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return config


def _tiny_default_config() -> Any:
    """The LlamaConfig `tiny.build_tiny_model` writes, from its own defaults (no tokenizer training)."""
    import inspect

    from transformers import LlamaConfig

    from lora_dist import tiny

    p = {k: v.default for k, v in inspect.signature(tiny.build_tiny_model).parameters.items()}
    return LlamaConfig(
        vocab_size=-(-tiny.TOKENIZER_VOCAB // 64) * 64, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        tie_word_embeddings=False,
    )


def describe_model(cfg: Config, num_layers: int | None = None) -> ModelFacts:
    """Build `cfg`'s model on the meta device with the job's LoRA layers and read off its facts."""
    from transformers import AutoModelForCausalLM

    from lora_dist import families
    from lora_dist.model import LoRAModel

    hf = model_config(cfg, num_layers)
    hf.use_cache = False
    dtype = TORCH_DTYPES[cfg.model.compute_dtype]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # dense weights load in the compute dtype, as load_base_model asks
    try:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(hf, attn_implementation=cfg.model.attn_implementation or "sdpa")
    finally:
        torch.set_default_dtype(old)
    head = base.get_output_embeddings()
    base_terms = _base_bytes(base, head, cfg.model.bits, cfg.model.double_quant, DTYPE_BYTES[cfg.model.compute_dtype])
    try:
        model = LoRAModel(base, cfg.lora)
    except (ValueError, TypeError) as err:
        raise ConfigError([f"lora: {err}"]) from None
    trainable = model.get_trainable_parameters()

    mode = cfg.model.fused_kernels
    fused = False
    if mode == "on" or (mode == "auto" and cfg.model.bits == 4):  # train._patch_for_speed's rule, on CUDA
        try:
            families.patch_model_for_speed(model)
            fused = True
        except families.UnsupportedModel:
            fused = False
    chunked = fused and "_lora_dist_original_forward" in base.__dict__  # patched: lm_head is a plain Linear
    layers_module = _decoder_layers(base)
    layers = [_describe_layer(layer, cfg.model.bits) for layer in layers_module]
    norms = fused and any(
        "_lora_dist_original_forward" in m.__dict__ for m in layers_module[0].modules() if "norm" in type(m).__name__.lower()
    )
    text = getattr(hf, "text_config", hf)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    rotary_dim = int(head_dim * (getattr(text, "partial_rotary_factor", None) or 1.0))
    rope_tables, rope_bytes = _ROPE_TABLES.get(str(hf.model_type), (1, 0))
    return ModelFacts(
        name=cfg.model.path, model_type=str(hf.model_type), layers=layers, hidden=int(text.hidden_size),
        heads=heads, head_dim=head_dim, vocab=int(text.vocab_size),
        tied=head is not None and head.weight is base.get_input_embeddings().weight,
        base_terms=base_terms,
        adapter_param_bytes=sum(p.numel() * p.element_size() for p in trainable),
        adapter_tensors=len(trainable), fused=fused, chunked_loss=chunked, fused_norms=norms, rotary_dim=rotary_dim,
        rope_tables=rope_tables, rope_bytes=rope_bytes,
    )


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from lora_dist.loading import decoder_layers

    layers = decoder_layers(model)  # the language model's, also in a multimodal checkpoint
    if layers is not None:
        return layers
    raise ConfigError([f"{type(model).__name__} has no decoder layers (.layers); plan knows causal LMs only"])


def _describe_layer(layer: nn.Module, bits: int | None) -> _Layer:
    from lora_dist.layers import LoRALayer

    linears: dict[str, _Linear] = {}
    for name, module in layer.named_modules():
        if isinstance(module, LoRALayer):
            linears[name] = _Linear(name, module.in_features, module.out_features, module.rank,
                                    isinstance(module.lora_dropout, nn.Dropout), bits)
        elif type(module) is nn.Linear and not name.endswith(("lora_A", "lora_B", "base_layer")):
            linears[name] = _Linear(name, module.in_features, module.out_features, 0, False, bits)
    short = {n.rsplit(".", 1)[-1]: l for n, l in linears.items()}
    separate = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= short.keys()
    pairs = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= short.keys()
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    act = type(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)).__name__  # Phi-3: activation_fn
    q = kv = 0
    if separate:
        q, kv = short["q_proj"].out_features, short["k_proj"].out_features
    elif pairs:  # q first, then k and v of equal width (Phi-3's packing)
        q = attn.config.num_attention_heads * attn.head_dim
        kv = (short["qkv_proj"].out_features - q) // 2
    has = {name for name, _ in layer.named_children()}
    if {"pre_feedforward_layernorm", "post_feedforward_layernorm"} <= has:
        layout = "sandwich"
    elif "post_feedforward_layernorm" in has and "input_layernorm" not in has:
        layout = "post_norm"
    else:
        layout = "pre_norm"
    qk_norm = attn is not None and hasattr(attn, "q_norm")
    # q_norm's weight spans one head (per-head norm) or the whole projection
    qk_kind = ("head" if attn.q_norm.weight.shape[-1] == getattr(attn, "head_dim", -1) else "projection") if qk_norm else ""
    # the fused path's gated activations (kernels.swiglu, kernels.geglu_tanh): SiLU, or GELU with the tanh approximation
    return _Layer(linears, separate or pairs, qk_norm=qk_norm,
                  gated=act in ("SiLU", "SiLUActivation", "GELUTanh", "PytorchGELUTanh"),
                  fused_pairs=pairs and not separate, q_features=q, kv_features=kv, layout=layout, qk_norm_kind=qk_kind)


def _base_bytes(base: nn.Module, head: nn.Module | None, bits: int | None, double_quant: bool, e: int) -> dict[str, int]:
    """Bytes of the frozen base on the GPU, by kind.

    Every nn.Linear but the output head is quantized (quant.quantize_model with skip lm_head, and
    transformers' BitsAndBytesConfig alike). For an (out, in) weight, n = out * in:
      4-bit: n/2 packed bytes; one absmax per 64-weight block, fp32 (4 B) or, with double quant, one
             byte plus one fp32 absmax per 256 blocks; each layer's 16-entry fp32 code and 4-byte
             offset; bias in the compute dtype.
      8-bit: n int8 bytes + one fp32 scale (SCB) per output row; bias kept as loaded.
      dense: n * e.
    Every other parameter (embedding, norms, dense head) is in the compute dtype; buffers as built.
    Each tensor is rounded up to the allocator's 512-byte blocks.
    """
    terms = dict.fromkeys(
        ["packed 4-bit weights", "4-bit absmax", "double-quant state", "8-bit weights + SCB", "dense linears",
         "embedding", "output head", "norms and other", "linear biases"], 0)
    r = _rounded
    seen: set[int] = set()
    for name, module in base.named_modules():
        if type(module) is not nn.Linear:
            continue
        tied_head = module is head and module.weight is base.get_input_embeddings().weight
        if not tied_head:  # a tied head is the embedding: counted once, below
            seen.update(id(p) for p in module.parameters())
        n, out = module.in_features * module.out_features, module.out_features
        bias = 0 if module.bias is None else r(out * e)
        terms["linear biases"] += bias
        if module is head:
            terms["output head"] += 0 if tied_head else r(n * e)
        elif bits == 4:
            blocks = -(-n // BLOCKSIZE_4BIT)
            terms["packed 4-bit weights"] += r(-(-n // 2))
            if double_quant:
                terms["4-bit absmax"] += r(blocks)
                # absmax2, its own copy of the 256-entry dynamic code, the offset
                terms["double-quant state"] += r(-(-blocks // BLOCKSIZE_NESTED) * 4) + r(DYNAMIC_MAP_BYTES) + r(4)
            else:
                terms["4-bit absmax"] += r(blocks * 4)
            terms["double-quant state" if double_quant else "4-bit absmax"] += r(NF4_CODE_BYTES)
        elif bits == 8:
            terms["8-bit weights + SCB"] += r(n) + r(out * 4)
        else:
            terms["dense linears"] += r(n * e)
    embedding = base.get_input_embeddings()
    for p in base.parameters():
        if id(p) in seen:
            continue
        nbytes = r(p.numel() * e)
        if embedding is not None and p is embedding.weight:
            terms["embedding"] += nbytes
        else:
            terms["norms and other"] += nbytes
    for b in base.buffers():
        terms["norms and other"] += r(b.numel() * b.element_size())
    return terms


def _rounded(nbytes: int) -> int:
    return -(-nbytes // CUDA_ALLOC_ROUND) * CUDA_ALLOC_ROUND if nbytes else 0


# ------------------------------------------------------------------------------------ activations


def _layer_saved(layer: _Layer, facts: ModelFacts, e: int, first: bool = False, mask: int = 1) -> dict[str, float]:
    """Bytes per token a decoder layer keeps for backward when nothing is checkpointed.

    Traced from the code (kernels.py, layers.py, transformers' Llama modules, bitsandbytes):
    - norms: the fused RMSNorm saves its input (e) and an fp32 rstd (4 per token); HF's saves the
      fp32 copy of its input (4) and the fp32 rsqrt.
    - a linear group reading one input: the fused LoRA (kernels.lora_group / lora_linear) saves the
      input x (shared by the group: a view, counted once) and x @ A.T (r * e). A frozen 4-bit or
      dense base saves nothing (bitsandbytes' MatMul4Bit keeps only the weight); an 8-bit base saves
      x. The plain LoRA path (dropout, or no fused path) saves its own fp32 copy of x per linear (4 per
      feature; with dropout the dropped copy plus the mask: 1 byte on CUDA, whose native_dropout keeps a
      bool mask, 4 on the CPU, whose dropout multiplies by fp32 noise) and lora_A's fp32 output (4 r).
      The first layer's q/k/v input (the embedding's output, normed) needs no gradient: its dropout
      records nothing.
    - attention: SDPA (flash / cuDNN, GQA without repeating k/v) saves the rotated q and k, v, its
      output (which o_proj reads as a view) and an fp32 log-sum-exp per head; with Phi-3's fused
      qkv_proj, v is a view of the q|k|v output, which stays whole. q/k norms (Qwen3, Gemma 3 per
      head; OLMo 2 per projection) save their input and an fp32 rstd per row when fused, fp32 copies
      in HF's.
    - norms around the sublayers: Llama's two pre-norms; Gemma 2/3 add one after each sublayer; OLMo 2
      has only those after, so its LoRA groups read (and keep) the residual stream itself.
    - MLP: the fused gated activation (SiLU or tanh-GELU) saves gate and up (2 I e); HF's act_fn * up
      saves gate, act(gate) and up (3 I e); down_proj's input h as a linear input (above).
    - Rebuilt inputs (kernels.Rebuild): a fused group without dropout reading a fused norm's output
      (q/k/v, gate/up) or the fused activation's (down) keeps its producer's tensors instead of its
      input: nothing new, except in layer 0, whose input norm keeps nothing itself.
    """
    lin = layer.by_name
    fused = facts.fused
    norm = (e + 4 / facts.hidden) if facts.fused_norms else (4 + 4 / facts.hidden)  # per feature
    d = facts.hidden
    out: dict[str, float] = {}

    def group(names: tuple[str, ...], width: int, key: str, input_counted: bool = False,
              rebuilt: bool = False) -> None:
        members = [lin[n] for n in names]
        all_fast = fused and all(m.rank > 0 and m.bits != 8 for m in members)  # dropout: the mask is redrawn
        if rebuilt and all_fast and not any(m.dropout for m in members):
            # kernels.Rebuild: the input is made again from its producer's kept tensors (counted there);
            # layer 0's input norm keeps nothing (its input needs no gradient), so this keeps x and rstd
            out[f"{key}: x @ A.T"] = sum(m.rank for m in members) * e
            if first and key == "q/k/v":
                out[f"{key}: norm input and rstd (rebuilt from)"] = d * e + 4
            return
        saves_x = False
        for m in members:
            if m.rank and (all_fast or m.fast):
                saves_x = True
                out[f"{key}: x @ A.T"] = out.get(f"{key}: x @ A.T", 0) + m.rank * e
            elif m.rank:  # LoRALayer's plain path
                extra = width * 4 if (e != 4 or m.dropout) else 0
                if e == 4 and not m.dropout:
                    saves_x = True
                masked = m.dropout and not (first and key == "q/k/v")
                out[f"{key}: plain LoRA fp32 copies"] = (
                    out.get(f"{key}: plain LoRA fp32 copies", 0) + extra + (width * mask if masked else 0) + m.rank * 4)
            if m.bits == 8:
                saves_x = True
        if saves_x and not input_counted:
            out[f"{key}: input"] = width * e

    # The first layer's input is the frozen embedding's output, which needs no gradient: autograd
    # records nothing for that norm.
    post_norm = layer.layout == "post_norm"  # OLMo 2: no norm before the sublayers, one after each
    if not post_norm:
        out["input norm"] = 0 if first else d * norm
    pairs = layer.fused_pairs
    # after a pre-norm the group's input is the norm's output (rebuilt from it); with post norms it is
    # the residual stream itself, which the group keeps
    group(("qkv_proj",) if pairs else ("q_proj", "k_proj", "v_proj"), d, "q/k/v",
          rebuilt=facts.fused_norms and not post_norm)
    q, kv = layer.q_features, layer.kv_features
    if layer.qk_norm and facts.fused_norms:  # fused: the input in the compute dtype, an fp32 rstd per row
        rows = facts.heads + kv // facts.head_dim if layer.qk_norm_kind == "head" else 2
        out["q/k norms"] = (q + kv) * e + 4 * rows
    elif layer.qk_norm:
        out["q/k norms (HF)"] = (q + kv) * 4
    if pairs and fused:  # v is a view of the fused q|k|v output: attention keeps all of it (q, k rotate into new tensors)
        out["attention: q, k, the q|k|v output, output"] = (q + kv + (q + 2 * kv) + q) * e + facts.heads * 4
    else:
        out["attention: q, k, v, output"] = (2 * q + 2 * kv) * e + facts.heads * 4
    group(("o_proj",), q, "o", input_counted=True)  # o_proj reads SDPA's output as a view: saved once
    if layer.layout == "pre_norm":
        out["post-attention norm"] = d * norm  # Llama's name for the norm before the MLP
    else:  # a norm over the attention's output, then (sandwich) one before the MLP
        out["o: output norm"] = d * norm
        if layer.layout == "sandwich":
            out["pre-MLP norm"] = d * norm
    group(("gate_up_proj",) if pairs else ("gate_proj", "up_proj"), d, "gate/up",
          rebuilt=facts.fused_norms and not post_norm)
    inter = _intermediate(layer)
    out["MLP gate, up" + (" (fused gated activation)" if fused and layer.gated else ", act (HF)")] = (
        (2 if fused and layer.gated else 3) * inter * e)
    group(("down_proj",), inter, "down", rebuilt=fused and layer.gated)
    if layer.layout != "pre_norm":
        out["down: output norm"] = d * norm
    return out


def _layer_saved_generic(layer: _Layer, facts: ModelFacts, e: int, first: bool = False, mask: int = 1) -> dict[str, float]:
    """A layer outside the Llama structure: every linear's output and LoRA input kept (an estimate)."""
    d = facts.hidden
    out = {"norms (HF)": 2 * d * 4}
    out["linear outputs"] = sum(l.out_features for l in layer.linears.values()) * e
    out["LoRA inputs"] = sum(l.in_features * (4 if not l.fast else e) + l.rank * 4 for l in layer.linears.values() if l.rank)
    return out


def _layer_backward_extra(layer: _Layer, e: int, fused_act: bool, rebuilt_h: bool = False,
                          recompute_hidden: int = 0) -> tuple[float, int]:
    """(bytes per token, bytes) a layer's backward holds beyond its saved tensors, at its worst moment.

    The worse of `_backward_moments` (`recompute_hidden`: the model width when the layer is checkpointed,
    0 when not); for layers outside the Llama structure, three times the widest
    linear output. The absolute term: the largest weight the backward dequantizes (bitsandbytes and
    the fused path alike), in the compute dtype (fp16 for 8-bit).
    """
    if not layer.llama_like:
        widest = max(l.out_features for l in layer.linears.values())
        return 3 * widest * e, _dequant_temp(layer, e)
    return max(_backward_moments(layer, e, fused_act, rebuilt_h, recompute_hidden)), _dequant_temp(layer, e)


def _backward_moments(layer: _Layer, e: int, fused_act: bool, rebuilt_h: bool, hidden: int = 0) -> tuple[float, float]:
    """(attention, MLP) bytes per token held beyond the saved tensors at each block's worst moment.

    MLP: the activation's backward holds the gradient of h (I e) while h's saved copy is already
    freed (-I e when down_proj saved it); HF's also writes new d_gate and d_up (2 I e), the fused
    one writes them over its saved gate and up (one Triton kernel on CUDA). The down_proj moment: with
    h rebuilt (not saved), one row chunk of h (I e / REBUILD_CHUNKS), then grad h (I e) and one
    dequantized down weight; with h saved, grad h and the weight. Attention: the output gradient and
    dq, dk, dv ((2q + 2kv) e). With h rebuilt and `hidden` given (a checkpointed layer), the
    recompute: it rebuilds h (I e) beside the MLP input (d e); grad h is made only after it
    (kernels._Handoff: the output half of the group hands its gradients to the input half).
    """

    lin = layer.by_name
    inter = _intermediate(layer)
    down = lin["down_proj"]
    h_saved = (down.rank > 0 or down.bits == 8) and not rebuilt_h
    q, kv = layer.q_features, layer.kv_features
    act_moment = (1 if fused_act else 3) * inter - (inter if h_saved else 0)
    down_moment = inter  # with h rebuilt: its chunks (I / REBUILD_CHUNKS) are freed before grad h exists
    recompute_moment = inter + hidden if rebuilt_h and hidden else 0
    return (2 * q + 2 * kv) * e, max(act_moment, down_moment, recompute_moment) * e


_ATTENTION_KEYS = ("input norm", "q/k/v", "q/k norms", "attention", "o:")
"""`_layer_saved` keys of the attention block (the rest belong to the MLP block)."""


def _block_recompute(layer: _Layer, saved: dict[str, float], e: int, x_in: int, fused_act: bool,
                     rebuilt_h: bool, attention_saved: bool = False) -> float:
    """Bytes per token of the worse block of a layer checkpointed as two blocks (attention, MLP).

    Each block keeps its own input (in host memory with offload) and recomputes alone, so only that
    block's saved tensors and its backward's moment are on the GPU at once. With `attention_saved`
    (`model.offload_attention`) the attention block's saved tensors come back from the host instead of
    a recompute, one entry ahead: during the MLP's backward they are on the GPU already.
    """
    attn = sum(v for k, v in saved.items() if k.startswith(_ATTENTION_KEYS))
    mlp = sum(saved.values()) - attn
    attn_moment, mlp_moment = _backward_moments(layer, e, fused_act, rebuilt_h, x_in // e)
    if attention_saved:
        return max(attn + attn_moment + x_in, mlp - x_in + mlp_moment + attn)
    return max(attn - x_in + attn_moment, mlp - x_in + mlp_moment)


def _intermediate(layer: _Layer) -> int:
    """The MLP's width I (gate_proj's output, or half of Phi-3's gate_up_proj's)."""
    lin = layer.by_name
    return lin["gate_up_proj"].out_features // 2 if layer.fused_pairs else lin["gate_proj"].out_features


def _h_rebuilt(layer: _Layer, facts: ModelFacts) -> bool:
    """down_proj's input is rebuilt from gate and up (the fused group without dropout), not saved."""
    if not (facts.fused and layer.llama_like and layer.gated):
        return False
    down = layer.by_name["down_proj"]
    return down.rank > 0 and down.bits != 8 and not down.dropout


def _adapter_copy_bytes(facts: ModelFacts, e: int) -> int:
    """The compute-dtype copies of A and s * B that `kernels.adapter_copies` keeps for a micro batch.

    Every adapter on a fused path (the families' or a 4-bit LoRALayer's own): r (in + out) values
    each, from the first forward that uses them to the end of that micro batch's backward (not at
    the optimizer step). In fp32 a lone A is not copied; counted anyway (a few MB at most).
    """
    return sum(_rounded(lin.rank * lin.in_features * e) + _rounded(lin.rank * lin.out_features * e)
               for layer in facts.layers for lin in layer.linears.values()
               if lin.rank and lin.bits != 8 and (facts.fused or lin.fast))  # 8-bit: never on a fused path


def _dequant_temp(layer: _Layer, e: int) -> int:
    sizes = [l.in_features * l.out_features for l in layer.linears.values() if l.bits in (4, 8)]
    if not sizes:
        return 0
    bits = next(l.bits for l in layer.linears.values() if l.bits in (4, 8))
    return max(sizes) * (e if bits == 4 else 2)


# ------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Predicted peak GPU memory of one training step on one rank, with its parts (bytes)."""

    model: str
    micro_batch: int
    seq_len: int
    world_size: int
    zero_stage: int | None  # None: no DeepSpeed
    checkpointing: bool
    offload_activations: bool
    fused: bool
    chunked_loss: bool
    base: dict[str, int]
    adapters: dict[str, int]
    activations: dict[str, int]
    phases: dict[str, int]  # the peak candidates: end of forward (loss), backward of a layer, optimizer step
    peak_bytes: int  # what torch.cuda.max_memory_allocated would report
    peak_phase: str
    saved_for_backward: int  # what autograd keeps after a forward without checkpointing (the CPU tests count it)
    notes: list[str] = field(default_factory=list)

    @property
    def base_bytes(self) -> int:
        return sum(self.base.values())

    @property
    def adapter_bytes(self) -> int:
        return sum(self.adapters.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_gib"] = self.peak_bytes / GiB
        return d


def _uses_deepspeed(cfg: Config, world_size: int) -> bool:
    return cfg.distributed.engine == "deepspeed" or (cfg.distributed.engine == "auto" and world_size > 1)


def _adapter_terms(facts: ModelFacts, cfg: Config, world_size: int) -> tuple[dict[str, int], int | None, list[str]]:
    """Adapter parameters, gradients and optimizer state on one rank.

    Without DeepSpeed: torch AdamW over fp32 adapters: params P, grads P, exp_avg + exp_avg_sq 2P,
    (plus a 4-byte step per tensor where the optimizer keeps it on the GPU: fused AdamW).
    With DeepSpeed (shard_report's columns, checked against the 2-rank table of issue 4): params in
    the DeepSpeed precision (bf16/fp16 halve them), stage 3 keeps 1/N; grads the same, stage >= 2
    keeps 1/N; Adam moments fp32, stage >= 1 keeps 1/N; stage >= 1 keeps an fp32 master partition
    (1/N), stage 0 one whole fp32 master under bf16/fp16 only. Offloaded optimizer state is on the
    CPU. Under ZeRO-3 the job gathers every adapter for each micro batch's forward and backward
    (train._whole_adapters): the whole parameters exist again during the step.
    """
    p32 = facts.adapter_param_bytes  # fp32 adapters (LoRALayer's default dtype), biases as they are
    n = world_size
    notes: list[str] = []
    if not _uses_deepspeed(cfg, world_size):
        return ({"adapter parameters": p32, "adapter gradients": p32, "AdamW moments": 2 * p32,
                 "AdamW steps": facts.adapter_tensors * CUDA_ALLOC_ROUND}, None, notes)
    stage = cfg.distributed.zero_stage
    half = cfg.distributed.precision in ("bf16", "fp16")
    p = p32 // 2 if half else p32
    offload = cfg.distributed.offload_optimizer
    terms = {
        "adapter parameters": p // n if stage == 3 else p,
        "adapter gradients": p // n if stage >= 2 else p,
        "AdamW moments": 0 if offload else (2 * p32 // n if stage >= 1 else 2 * p32),
        "fp32 master": 0 if offload else (p32 // n if stage >= 1 else (p32 if half else 0)),
    }
    if stage == 3 and facts.fused:
        terms["ZeRO-3 gathered adapters"] = p
    terms["DeepSpeed gradient bucket"] = _bucket_bytes(cfg, stage, half)
    if offload:
        notes.append("optimizer state offloaded to the CPU: its moments and master copy are not on the GPU")
    return terms, stage, notes


def _bucket_bytes(cfg: Config, stage: int, half: bool) -> int:
    """DeepSpeed's contiguous-gradient bucket: `reduce_bucket_size` elements (5e8 by default), however
    small the adapters are. ZeRO 1/2 allocate it at each backward (stage_1_and_2.setup_buckets: the fp32
    accumulator at stage 1, the gradient dtype at stage 2; twice with overlap_comm), ZeRO-3 once, in the
    parameter dtype (stage3.py). 1.86 GiB in fp32: measured as the gap between the job under DeepSpeed
    and the bench on the same batch (11.6 vs 9.56 GiB, issue 8)."""
    zero = {}
    if cfg.distributed.ds_config:
        from lora_dist.errors import read_text

        zero = json.loads(read_text(cfg.distributed.ds_config, "distributed.ds_config", ConfigError)).get(
            "zero_optimization", {})
    if stage == 0 or not zero.get("contiguous_gradients", True):
        return 0
    elements = int(float(zero.get("reduce_bucket_size", 5e8)))
    width = 4 if (stage == 1 or not half) else 2
    copies = 2 if (zero.get("overlap_comm", stage == 3) and stage in (1, 2)) else 1
    return copies * elements * width


def plan_memory(
    cfg: Config,
    world_size: int = 1,
    *,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    checkpointing: bool | None = None,
    offload_activations: bool | None = None,
    facts: ModelFacts | None = None,
    device: str = "cuda",
) -> Plan:
    """Predict the peak GPU memory of one training step of `cfg` per rank.

    Args:
        cfg: the run configuration (the model is read from config.json on the meta device).
        world_size: data-parallel ranks (DeepSpeed's ZeRO stage applies when > 1 or engine=deepspeed).
        micro_batch: sequences per forward (default: train.micro_batch_size).
        seq_len: tokens per sequence (default: data.max_seq_len, the longest a batch can be).
        checkpointing: per-layer activation checkpointing (default: model.gradient_checkpointing).
        offload_activations: the checkpointed layer inputs live in host memory, two on the GPU at a
            time (`model.activation_offload`, `lora_dist.offload`; default: the config's setting).
        facts: a `describe_model(cfg)` result to reuse (searches call this many times).
        device: "cuda" (what the plan is for) or "cpu": only dropout masks differ (see _layer_saved);
            the CPU tests count saved tensors there.

    Returns:
        A `Plan`; `peak_bytes` is the prediction of torch.cuda.max_memory_allocated over a step.
    """
    facts = facts or describe_model(cfg)
    micro = micro_batch if micro_batch is not None else cfg.train.micro_batch_size
    if not isinstance(micro, int) or micro < 1:
        raise ConfigError([f"plan needs a numeric micro batch, got {micro!r}; use auto_micro_batch for 'auto'"])
    seq = seq_len or cfg.data.max_seq_len
    ckpt = cfg.model.gradient_checkpointing if checkpointing is None else checkpointing
    if offload_activations is None:
        offload_activations = cfg.model.activation_offload and ckpt
    e = DTYPE_BYTES[cfg.model.compute_dtype]
    m = micro * seq
    d, vocab = facts.hidden, facts.vocab
    notes: list[str] = []

    adapters, stage, adapter_notes = _adapter_terms(facts, cfg, world_size)
    notes += adapter_notes
    if cfg.model.cuda_graphs and facts.fused and not offload_activations and not _uses_deepspeed(cfg, world_size):
        notes.append("model.cuda_graphs: not counted here; on an H200 they added 2.1 GiB to Llama-3-8B's "
                     "checkpointed step (9.03 -> 11.17 GiB, 1.37 of it their pool's scratch)")
    mask = 1 if device == "cuda" else 4
    saved = [(_layer_saved if l.llama_like else _layer_saved_generic)(l, facts, e, first=i == 0, mask=mask)
             for i, l in enumerate(facts.layers)]
    if not all(l.llama_like for l in facts.layers):
        notes.append(f"{facts.model_type}: layers outside the Llama structure; activations estimated, not traced")
    per_layer = [sum(s.values()) for s in saved]
    extra = [_layer_backward_extra(l, e, facts.fused and l.gated, _h_rebuilt(l, facts), d if ckpt else 0)
             for l in facts.layers]
    x_in = d * e  # the residual stream entering a layer: what a checkpointed layer keeps
    norm = (e + 4 / d) if facts.fused_norms else (4 + 4 / d)

    # Per forward, whatever the layers: cos/sin (1, T, head_dim) each (position ids are (1, T)), shared
    # by all layers; int64 input_ids and labels (16 B per token) and the loss's shifted labels (8 B).
    rope = 2 * seq * (facts.rotary_dim or facts.head_dim) * (facts.rope_bytes or e) * facts.rope_tables
    shared = rope + m * 24
    final_norm = m * d * norm
    acts: dict[str, int] = {}
    # With activation offload the fused path checkpoints attention and MLP apart (families.decoder)
    blocks = ckpt and offload_activations and facts.fused and all(l.llama_like for l in facts.layers)
    if ckpt:
        kept = 2 if offload_activations else len(facts.layers)
        acts["checkpointed layer inputs"] = int(kept * m * x_in)
        if blocks:  # families' block checkpointing: the attention and the MLP recompute apart
            recompute = max(m * _block_recompute(l, sv, e, x_in, facts.fused and l.gated, _h_rebuilt(l, facts),
                                                 cfg.model.offload_attention) + t
                            for l, sv, (_, t) in zip(facts.layers, saved, extra))
        else:
            recompute = max(m * (s - x_in) + m * g + t for s, (g, t) in zip(per_layer, extra))
        acts["one layer recomputed + its backward"] = int(recompute)
    else:
        acts["saved by every layer"] = int(m * sum(per_layer))
        acts["backward of the last layer"] = int(m * extra[-1][0] + extra[-1][1])
    acts["cos/sin, token ids, labels"] = int(shared)
    acts["gradient of the residual stream"] = int(m * d * e)
    copies = _adapter_copy_bytes(facts, e)
    if copies:
        acts["adapter copies in the compute dtype"] = copies

    # Loss. Chunked (kernels.chunked_causal_lm_loss): chunks of C tokens with C * V ~ LOSS_CHUNK_LOGITS;
    # a chunk's logits and their gradient (2 C V e) exist at once, the hidden states (M d e) and their
    # gradient, computed in the forward (M d e), for the whole micro batch. HF's loss: logits (M V e),
    # their fp32 copy and log-softmax (8 M V) in the forward; in the backward the saved log-softmax,
    # its gradient and the input gradient in fp32 (12 M V).
    if facts.chunked_loss:
        from lora_dist.kernels import LOSS_CHUNK_LOGITS

        chunks = -(-m * vocab // LOSS_CHUNK_LOGITS)
        chunk = -(-m // chunks)
        loss_fwd = 2 * chunk * vocab * e + 2 * m * d * e
        loss_bwd = m * d * e
        loss_name = "chunked loss (one chunk of logits + grads)"
    else:
        loss_fwd = m * vocab * (e + 8) + m * d * e
        loss_bwd = 12 * m * vocab
        loss_name = "full logits loss (HF)"
        notes.append("loss through the model's own head: full (tokens x vocab) logits in fp32")
    acts[loss_name] = int(max(loss_fwd, loss_bwd))

    fixed = sum(facts.base_terms.values()) + sum(adapters.values()) + CUBLAS_WORKSPACE
    body = acts.get("checkpointed layer inputs", acts.get("saved by every layer"))
    if ckpt:
        at_loss = body + final_norm + shared + copies + loss_fwd
        at_backward = body + shared + copies + m * d * e + acts["one layer recomputed + its backward"]
    else:
        at_loss = body + final_norm + shared + copies + loss_fwd
        at_backward = body + shared + copies + m * d * e + acts["backward of the last layer"] + (
            loss_bwd if not facts.chunked_loss else 0)
    # The optimizer step: no activations; torch's foreach AdamW holds one temporary per moment size.
    at_step = shared + (0 if stage is not None else facts.adapter_param_bytes)
    phases = {"end of forward (loss)": int(fixed + at_loss), "backward of a layer": int(fixed + at_backward),
              "optimizer step": int(fixed + at_step)}
    phase = max(phases, key=phases.get)
    return Plan(
        model=facts.name, micro_batch=micro, seq_len=seq, world_size=world_size, zero_stage=stage,
        checkpointing=ckpt, offload_activations=offload_activations, fused=facts.fused,
        chunked_loss=facts.chunked_loss, base=dict(facts.base_terms),
        adapters={**adapters}, activations={**acts, "cuBLAS workspace": CUBLAS_WORKSPACE},
        phases=phases, peak_bytes=phases[phase], peak_phase=phase, notes=notes,
        saved_for_backward=int(m * (sum(per_layer) + d * norm) + rope
                               + (m * d * e if facts.chunked_loss else 4 * m * vocab)),
    )


# ------------------------------------------------------------------------------------ fitting a card


def per_rank_sequences(cfg: Config, world_size: int) -> int:
    """Sequences each rank processes per optimizer step (micro batch x accumulation), from the config.

    Raises:
        ConfigError: the global batch does not divide over the ranks, or `auto` has no global batch.
    """
    t = cfg.train
    if t.global_batch_size is not None:
        if t.global_batch_size % world_size:
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) does not divide over "
                              f"{world_size} processes; pick a multiple of {world_size}")
        return t.global_batch_size // world_size
    if not isinstance(t.micro_batch_size, int):
        raise ConfigError(["train.micro_batch_size=auto needs train.global_batch_size (the batch it keeps)"])
    return t.micro_batch_size * (t.grad_accum or 1)


def device_budget_bytes(device: torch.device | int | None = None) -> int:
    """Bytes the CUDA caching allocator may still use on `device`: free memory now plus what it holds,
    capped by `torch.cuda.set_per_process_memory_fraction` (the CUDA context is already outside it)."""
    free, total = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.5
    if get_fraction is not None:
        budget = min(budget, int(get_fraction(device) * total))
    return budget


def auto_micro_batch(cfg: Config, budget_bytes: int, world_size: int = 1,
                     facts: ModelFacts | None = None) -> tuple[int, int]:
    """The largest micro batch whose predicted peak fits `budget_bytes`, keeping the global batch.

    Args:
        cfg: the run configuration.
        budget_bytes: memory the caching allocator may use on one rank (the card minus the CUDA
            context, or an emulated card's cap).
        world_size: data-parallel ranks.

    Returns:
        (micro_batch, accumulation) with micro_batch * accumulation = sequences per rank per step;
        the predicted peak stays under SAFETY * budget_bytes.

    Raises:
        ConfigError: not even one sequence fits (the message names the plan's peak).
    """
    facts = facts or describe_model(cfg)
    total = per_rank_sequences(cfg, world_size)
    for micro in sorted((m for m in range(1, total + 1) if total % m == 0), reverse=True):
        plan = plan_memory(cfg, world_size, micro_batch=micro, facts=facts)
        if plan.peak_bytes <= SAFETY * budget_bytes:
            return micro, total // micro
    raise ConfigError(f"train.micro_batch_size=auto: even 1 sequence of {cfg.data.max_seq_len} tokens needs "
                      f"{plan.peak_bytes / GiB:.1f} GiB, over {SAFETY:.0%} of {budget_bytes / GiB:.1f} GiB; "
                      f"run `lora-dist plan` with --gpu-mem for the change that fits")


def resolve_auto_micro_batch(cfg: Config, budget_bytes: int, world_size: int = 1) -> tuple[Config, str]:
    """`cfg` with its micro batch set by `auto_micro_batch` for `budget_bytes` (the global batch kept),
    and the line the job prints at start. Every rank must pass the same budget (the smallest of them)."""
    facts = describe_model(cfg)
    micro, accum = auto_micro_batch(cfg, budget_bytes, world_size, facts)
    peak = plan_memory(cfg, world_size, micro_batch=micro, facts=facts).peak_bytes
    train = dataclasses.replace(cfg.train, micro_batch_size=micro, grad_accum=None,
                                global_batch_size=micro * accum * world_size)
    line = (f"train.micro_batch_size=auto: {micro} x {cfg.data.max_seq_len} tokens, {accum} accumulation step(s) x "
            f"{world_size} process(es); predicted peak {peak / GiB:.2f} GiB of {budget_bytes / GiB:.2f} GiB")
    return dataclasses.replace(cfg, train=train), line


def relative_speed(plan: Plan) -> float:
    """Rough tokens/s of a plan relative to an ideal one: recompute cost and small-GEMM inefficiency."""
    m = plan.micro_batch * plan.seq_len
    return (CHECKPOINT_SPEED if plan.checkpointing else 1.0) * m / (m + FLAT_TOKENS) * (
        0.95 if plan.offload_activations else 1.0)


def fit_advice(cfg: Config, gpu_mem_bytes: int, world_size: int = 1,
               facts: ModelFacts | None = None) -> tuple[bool, Plan, str]:
    """(fits, plan to run, one-paragraph advice) for a card of `gpu_mem_bytes`.

    The allocator gets the card minus the CUDA context; a plan fits when its peak stays under
    SAFETY of that. When the config does not fit, the candidates are every micro batch dividing the
    per-rank batch (accumulation keeps the global batch), with and without checkpointing; the
    fastest predicted one wins. Only if none fits: checkpointed inputs offloaded (model.activation_offload), then
    shorter sequences.
    """
    facts = facts or describe_model(cfg)
    budget = SAFETY * (gpu_mem_bytes - CUDA_CONTEXT)
    current = plan_memory(cfg, world_size, facts=facts)
    gib = gpu_mem_bytes / GiB
    if current.peak_bytes <= budget:
        return True, current, (f"fits a {gib:g} GiB card: peak {current.peak_bytes / GiB:.2f} GiB of "
                               f"{budget / GiB:.2f} GiB usable ({SAFETY:.0%} of the card minus the CUDA context)")
    total = per_rank_sequences(cfg, world_size)
    micros = [m for m in range(1, total + 1) if total % m == 0]
    candidates = [plan_memory(cfg, world_size, micro_batch=m, checkpointing=c, offload_activations=False, facts=facts)
                  for m in micros for c in (False, True)]
    fitting = [p for p in candidates if p.peak_bytes <= budget]
    head = f"does not fit a {gib:g} GiB card: peak {current.peak_bytes / GiB:.2f} GiB > {budget / GiB:.2f} GiB usable"
    if fitting:
        best = max(fitting, key=relative_speed)
        return False, best, head + "; fastest change that fits: " + _change(cfg, best, total)
    offloaded = [plan_memory(cfg, world_size, micro_batch=m, checkpointing=True, offload_activations=True,
                             facts=facts) for m in micros]
    offloaded = [p for p in offloaded if p.peak_bytes <= budget]
    if offloaded:
        best = max(offloaded, key=relative_speed)
        return False, best, head + ("; fastest change that fits: offload the checkpointed layer inputs "
                                    "(model.activation_offload=true) with " + _change(cfg, best, total))
    seq = cfg.data.max_seq_len
    while seq > 128:
        seq //= 2
        p = plan_memory(cfg, world_size, micro_batch=1, seq_len=seq, checkpointing=True, facts=facts)
        if p.peak_bytes <= budget:
            return False, p, head + "; even micro batch 1 with checkpointing does not; " + _change(cfg, p, total)
    return False, current, head + (
        "; no micro batch, checkpointing or sequence length fits: use a larger card "
        "(every rank holds the whole base: ZeRO shards only the adapters)"
    )


def _change(cfg: Config, plan: Plan, total: int) -> str:
    parts = []
    if plan.micro_batch != cfg.train.micro_batch_size:
        accum = total // plan.micro_batch
        parts.append(f"train.micro_batch_size={plan.micro_batch} (accumulation {accum})")
    if plan.checkpointing != cfg.model.gradient_checkpointing:
        parts.append(f"model.gradient_checkpointing={str(plan.checkpointing).lower()}")
    if plan.seq_len != cfg.data.max_seq_len:
        parts.append(f"data.max_seq_len={plan.seq_len}")
    peak = f" -> peak {plan.peak_bytes / GiB:.2f} GiB, relative speed {relative_speed(plan):.2f}"
    return (" ".join(parts) or "no change") + peak


# ------------------------------------------------------------------------------------ report


def format_plan(plan: Plan, others: list[Plan] = ()) -> str:
    """The breakdown as aligned lines (GiB), then the same config's other checkpointing modes."""
    def row(name: str, nbytes: int, indent: int = 2) -> str:
        return f"{' ' * indent}{name:<48}{nbytes / GiB:>9.3f} GiB"

    how = f"ZeRO-{plan.zero_stage} on {plan.world_size} ranks" if plan.zero_stage is not None else "1 process"
    title = (f"lora-dist plan: {plan.model}, micro batch {plan.micro_batch} x {plan.seq_len} tokens, "
             f"checkpointing {'on' if plan.checkpointing else 'off'}, {how}, "
             f"{'fused kernels' if plan.fused else 'plain forward'}")
    lines = [title]
    lines.append(row("quantized base", plan.base_bytes, 0))
    lines += [row(k, v) for k, v in plan.base.items() if v]
    lines.append(row("adapters and optimizer", plan.adapter_bytes, 0))
    lines += [row(k, v) for k, v in plan.adapters.items() if v]
    lines.append("activations and temporaries (each term at its own largest)")
    lines += [row(k, v) for k, v in plan.activations.items() if v]
    lines.append("peak candidates")
    lines += [row(k, v) for k, v in plan.phases.items()]
    lines.append(row(f"PEAK ({plan.peak_phase})", plan.peak_bytes, 0))
    lines.append(f"(torch.cuda.max_memory_allocated; the CUDA context adds ~{CUDA_CONTEXT / GiB:.1f} GiB on the card)")
    for other in others:
        what = (f"checkpointing {'on' if other.checkpointing else 'off'}"
                + (" + activation offload" if other.offload_activations else ""))
        lines.append(row(f"same batch, {what}", other.peak_bytes, 0))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `lora-dist plan`'s options to `parser`."""
    parser.add_argument("config", nargs="?", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", default=(), metavar="section.key=value", help="override a config value")
    parser.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                        help="the card's memory: say whether it fits, and the fastest change that makes it fit")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (ZeRO shards the adapters)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--measure", action="store_true",
                        help="GPU: measure peaks of the bench's training step against the predictions (needs CUDA)")
    parser.add_argument("--out", default=None, help="with --measure: write the table as JSON here")
    parser.add_argument("--quick", action="store_true", help="with --measure: few layers, small batches (a smoke run)")


def main(args: argparse.Namespace) -> int:
    """Run `lora-dist plan` (the GPU measurement with --measure is `plan_measure.measure`); returns the exit code."""
    if not args.config:
        raise ConfigError(["lora-dist plan needs a CONFIG (a YAML file, see configs/)"])
    if args.world_size < 1:
        raise ConfigError([f"--world-size must be >= 1, got {args.world_size}"])
    cfg = load_config(args.config, args.overrides)
    facts = describe_model(cfg)
    if args.gpu_mem is not None:
        if not args.gpu_mem > CUDA_CONTEXT / GiB:
            raise ConfigError([f"--gpu-mem {args.gpu_mem} GiB leaves nothing after the CUDA context"])
        fits, plan, advice = fit_advice(cfg, int(args.gpu_mem * GiB), args.world_size, facts)
    else:
        plan, fits, advice = plan_memory(cfg, args.world_size, facts=facts), None, None
    current = plan_memory(cfg, args.world_size, facts=facts)
    others = [plan_memory(cfg, args.world_size, checkpointing=not current.checkpointing, offload_activations=False,
                          facts=facts)]
    if not current.offload_activations:
        others.append(plan_memory(cfg, args.world_size, checkpointing=True, offload_activations=True, facts=facts))
    if args.json:
        print(json.dumps({"plan": current.to_dict(), "fits": fits, "advice": advice,
                          "suggested": plan.to_dict() if plan is not current else None,
                          "other_modes": [o.to_dict() for o in others]}, indent=1))
    else:
        print(format_plan(current, others))
        if advice:
            print(advice)
    return 0 if fits in (None, True) else 1
