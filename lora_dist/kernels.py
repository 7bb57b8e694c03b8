"""Generic fast paths for LoRA training on a frozen (4-bit or dense) base: no model family in here.

- `lora_group(x, layers)`: one autograd function for several LoRA layers that read the same input
  (q/k/v, gate/up, or a single linear). Forward dequantizes each 4-bit base weight into a
  temporary, runs one GEMM, and folds the rank-r update into that output in place (`addmm_`);
  the adapter inputs of the whole group come from one `x @ cat(A).T`. It saves only `x` (the
  compute-dtype input) and the (M, sum r) adapter activations; backward dequantizes the base again
  and frees it at once. The plain path (and PEFT's) keeps an fp32 copy of `x` per linear and runs
  five to eight elementwise kernels per linear. A layer here is anything with `base_layer`,
  `lora_A`, `lora_B` and `scaling`; which layers may take this path is `layers.supports_fast_path`'s
  call, made by the caller.
- `chunked_causal_lm_loss(hidden, weight, labels)`: the output head and cross-entropy over chunks of
  tokens (with optional logit scaling and tanh soft-capping), the gradient of the hidden states
  computed in the forward, so the (tokens, vocab) logits never exist in full.
- Fused elementwise ops with hand-written backward (torch.compile'd on CUDA): RMSNorm in its two
  conventions (`w * norm(x)` rounded first, or `(offset + w) * norm(x)` in fp32), RoPE (full or
  partial rotary dims), SwiGLU and tanh-GeGLU; and `attention`, causal SDPA or, with soft-capped
  scores, the explicit softmax.

Which model uses which piece is `lora_dist.families`' business; nothing here reads a Hugging Face
module. Nothing here runs unless it is called.

Numerics. The adapter path runs in the compute dtype of the activations (bf16 on GPU) with fp32
accumulation, as under `torch.autocast`; the adapter weights and their gradients stay fp32. The
plain path casts the activations to fp32 first. The bf16 rounding of `x @ A.T` and of the scaled
B (exact when alpha / r is a power of two) each add a relative error of at most 2**-9 to an update
that is itself small next to the base output, whose own bf16 rounding (2**-9) both paths share.
LoRA dropout scales the kept inputs by 1 / (1 - p) in that dtype too (one more 2**-9 rounding of
the adapter input); in fp32 both paths draw the same masks and agree to summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist import quant

IGNORE_INDEX = -100

LOSS_CHUNK_LOGITS = 2**27
"""Logits per chunk of `chunked_causal_lm_loss` (bf16: 256 MiB, and as much again for their gradient):
GEMMs of 1024 tokens x 128k vocabulary still run at full speed, and the loss stays below the
backward's peak on 24 GB recipes."""

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


# base -> {slot: (key, plan)}; slot: a dtype (`_base_weight`) or ("fp8", transpose) (`_fp8_weight`)
_DEQUANTIZE_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan_key(weight: torch.Tensor) -> tuple:
    """What a dequantize plan was made for: the parameter, its data and every object of its state the kernel
    reads (the plan holds them, so no id or address is reused while it lives), and the versions of the data
    and absmax (an FP8 plan keeps scales computed from their values: an in-place rewrite makes a new one)."""
    state = getattr(weight, "quant_state", None)
    state2 = getattr(state, "state2", None)
    absmax = getattr(state, "absmax", None)
    return (id(weight), weight.data_ptr(), weight._version, getattr(absmax, "_version", None), id(state), id(absmax),
            id(getattr(state, "code", None)), id(getattr(state, "offset", None)), id(state2),
            id(getattr(state2, "absmax", None)), id(getattr(state2, "code", None)))


def _kept_plan(base: nn.Module, slot) -> Callable | None:
    """The plan kept for (base, slot) while base's weight is the one it was made for; None otherwise."""
    plans = _DEQUANTIZE_PLANS.get(base)
    if plans is None:
        return None
    key = _plan_key(base.weight)
    hit = plans.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    if any(k != key for k, _ in plans.values()):  # the weight was replaced: no plan keeps the old one alive
        del _DEQUANTIZE_PLANS[base]
    return None


def _keep_plan(base: nn.Module, slot, plan: Callable) -> None:
    _DEQUANTIZE_PLANS.setdefault(base, {})[slot] = (_plan_key(base.weight), plan)


class _Packed4bit(NamedTuple):
    """A 4-bit CUDA base weight that a Triton kernel takes, as `_triton_4bit` found it."""

    ops: Any  # lora_dist.triton_ops
    data: torch.Tensor  # packed uint8
    state: Any  # its bitsandbytes QuantState
    direct: bool  # a kernel writes the asked dtype with bitsandbytes' one rounding (state's dtype, or fp32)
    own: bool  # the data is the weight's own, not a repacked copy: a plan made from it may be kept


def _triton_4bit(base: nn.Module, dtype: torch.dtype, takes: str) -> _Packed4bit | None:
    """This base's 4-bit CUDA weight where `triton_ops.<takes>(data, state)` accepts it; None elsewhere."""
    if not (base.weight.is_cuda and quant.bits_of(base) == 4):
        return None
    data, state = quant.packed_4bit(base)
    ops = _triton_ops()
    if ops is None or not getattr(ops, takes)(data, state):
        return None
    return _Packed4bit(ops, data, state, state.dtype in (dtype, torch.float32), data.data_ptr() == base.weight.data_ptr())


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight a base linear computes with, in `dtype` (a temporary for 4-bit).

    A 4-bit weight on CUDA dequantizes in one Triton kernel (`triton_ops.dequantize_4bit`, bit for bit
    bitsandbytes' three launches for a double-quantized weight), through a plan kept per (base, dtype)
    while the weight's data and state stay the same objects (`triton_ops.DequantizePlan`: the host
    time of a launch, not its result, changes); elsewhere through bitsandbytes.
    """
    plan = _kept_plan(base, dtype)
    if plan is not None:
        return plan()
    if quant.bits_of(base) != 4:
        return base.weight.detach().to(dtype)
    found = _triton_4bit(base, dtype, "dequantizes")
    if found is None:
        return quant.dequantize_weight(base, dtype)
    if not found.direct:  # bitsandbytes rounds to the state's dtype, then casts: the same here
        return found.ops.dequantize_4bit(found.data, found.state, found.state.dtype).to(dtype)
    plan = found.ops.DequantizePlan(found.data, found.state, dtype)
    if found.own:
        _keep_plan(base, dtype, plan)
    return plan()


def _dropout_p(layer: nn.Module) -> float:
    """The adapter-input dropout probability `layer` applies now (0 in eval mode or without dropout)."""
    drop = layer.lora_dropout
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that dropout on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: torch.Tensor):
    """Draw from `state` inside, and leave the generators as they were outside."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


# ------------------------------------------------------------------------------------ rebuildable inputs


@dataclass(frozen=True)
class Rebuild:
    """How a fused op's output is computed again from tensors its own backward keeps anyway.

    Set as `_lora_dist_rebuild` on the outputs of the RMSNorm (from x, weight, rstd) and the gated
    activation (from gate, up). A LoRA group reading such a tensor saves these tensors (the same
    storage its producer saved: no new memory) instead of its own input, and rebuilds the input in
    row chunks when its backward needs it: the normed inputs of q/k/v and gate/up and the MLP's h
    (d + d + I values per token, 352 MiB per Llama-3-8B layer at 8k tokens) are never kept.

    Attributes:
        fn: fn(*tensors, *static) gives the output, elementwise over rows (same values for any rows).
        tensors: its tensor inputs.
        static: its other arguments.
        row_wise: which tensors are sliced along rows (the others, weights, are passed whole).
        chunks: how many row chunks it is made in (1: whole, as wide as the residual stream).
    """

    fn: Callable
    tensors: tuple[torch.Tensor, ...]
    static: tuple
    row_wise: tuple[int, ...]
    chunks: int = 1

    def rows(self, saved: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the output (flattened to 2-D), from `saved` (the unpacked tensors)."""
        args = [t.reshape(-1, t.shape[-1])[start:stop] if i in self.row_wise else t for i, t in enumerate(saved)]
        return _fused(self.fn, *args, *self.static)


REBUILD_CHUNKS = 4
"""Row chunks the MLP's rebuilt h is made in: a quarter of it exists at a time (the down projection's
moment then holds its gradient and a quarter of h, below the gated activation's own moment). A
normed input (d wide, smaller than the gradients beside it) is made whole: each chunk costs a
fused call, a GEMM and an add on the host, which bounds the step on small models."""


def _rebuild_of(x: torch.Tensor) -> Rebuild | None:
    rebuild = getattr(x, "_lora_dist_rebuild", None)
    if rebuild is None or x._version != 0:  # changed in place since: rebuild no more
        return None
    return rebuild


# ------------------------------------------------------------------------------------ adapter copies


class _Copies:
    """Compute-dtype copies of adapter weights, shared by a forward, its recompute and its backward."""

    __slots__ = ("table",)

    def __init__(self) -> None:
        # key -> (source weights, their versions when copied, the copy)
        self.table: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor]] = {}


_COPIES: _Copies | None = None  # a global, not thread-local: autograd runs backward in its own threads


@contextlib.contextmanager
def adapter_copies(fresh: bool = False):
    """Within, each adapter weight is cast to the compute dtype (and B scaled) once, not at each use.

    A LoRA group casts its A weights (concatenated) and each scaled B in forward, again in a
    checkpointed layer's recompute and again in backward: 3 to 6 small kernels per linear per use,
    which on a GPU cost host time, not GPU time (the step of a small model is bound by the host).
    Wrap one forward and its backward (the training job and the bench wrap each micro batch): the
    copies made inside live until the scope ends, one per adapter weight (bf16: half the adapters'
    fp32 bytes). The optimizer steps outside it: a weight changed in place inside (its version moves)
    is copied again, but one rewritten through `.data` (as DeepSpeed does) is not seen.

    With `fresh`, a scope of its own even inside another (a CUDA graph's capture: the copies it
    makes live in the graph's memory and are made again at each replay).
    """
    global _COPIES
    outer = _COPIES
    _COPIES = outer if outer is not None and not fresh else _Copies()  # nested: the outer scope's copies
    try:
        yield
    finally:
        _COPIES = outer


def _copy_of(key: tuple, sources: tuple[torch.Tensor, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
    copies = _COPIES
    if copies is None:
        return make()
    versions = tuple(t._version for t in sources)
    hit = copies.table.get(key)
    # the same weights, not changed in place since (an optimizer step inside a scope makes a new copy)
    if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], sources, strict=True)):
        return hit[2]
    out = make()
    copies.table[key] = (sources, versions, out)
    return out


def _a_cat(a_params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """cat(A_i) in `dtype`: (sum r_i, in)."""
    sources = tuple(a_params)
    return _copy_of(("A", dtype, *map(id, sources)), sources,
                    lambda: torch.cat([a.to(dtype) for a in sources]) if len(sources) > 1 else sources[0].to(dtype))


def _scaled_b(b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """s * B in `dtype`: (out, r)."""
    return _copy_of(("B", dtype, scaling, id(b)), (b,), lambda: b.to(dtype) * scaling)


# ------------------------------------------------------------------------------------ LoRA linear


class _LoRAProject(torch.autograd.Function):
    """xa = x @ cat(A_i).T: the adapter inputs of every layer of a group, from one read of x.

    The only function of a group that saves an activation (x). Its partner `_LoRAOutput` saves
    none, so a checkpointed layer's recompute, which stops once every saved tensor is back
    (torch's non-reentrant early stop), never reruns a base GEMM whose output backward does not
    need: the down projection's, about a quarter of a Llama layer's FLOPs.

    Its backward makes all of x's gradient: the adapter part (g_xa @ A), then the base part
    (g_i @ W_i) from the output gradients `_LoRAOutput.backward` hands over (`_Handoff`), so under
    checkpointing that (M, in) tensor is made after the layer's recompute, never beside it.

    With dropout (p_i > 0 for layer i) each layer reads its own dropped copy of x,
    xa_i = dropout_i(x) @ A_i.T. No mask is stored. On CUDA (one p for the group, equal ranks,
    multiples of 16) Triton kernels draw each element's mask from one seed per call (Philox,
    `triton_ops.dropout_project`) inside the product, forward and backward: x is read once per
    layer and no dropped copy is written. Elsewhere the masks come from torch's generator in layer
    order, as the layers' plain forwards draw theirs, through dropped copies, and backward replays
    the generator state saved in forward. Either way the adapter part of x's gradient goes back
    through the forward's masks (the kernels' seed is kept on ctx; a checkpointed recompute draws
    the same seed and masks again, as checkpointing restores the device's generator first).
    """

    @staticmethod
    def forward(ctx, x2, dropouts, rebuild, layers, handoff, *a_params):
        # x2: (M, in); dropouts: p_i per layer; rebuild: None or x2's Rebuild (no dropout only);
        # layers: the group's LoRA layers; handoff: where _LoRAOutput.backward leaves the output
        # gradients for x's base-weight part; a_params: (r_i, in) each
        if rebuild is None:
            ctx.save_for_backward(x2)
        else:  # its producer's kept tensors instead: x2 is made again, in row chunks, in backward
            ctx.save_for_backward(*rebuild.tensors)
        ctx.rebuild = None if rebuild is None else dataclasses.replace(rebuild, tensors=())  # no references
        ctx.ranks = [a.shape[0] for a in a_params]
        ctx.dtypes = [a.dtype for a in a_params]
        ctx.dropouts = dropouts
        ctx.layers, ctx.handoff = layers, handoff
        ctx.a_params = a_params  # parameters, changed by the optimizer only after backward
        ctx.seed = None
        if not any(dropouts):
            return x2 @ _a_cat(a_params, x2.dtype).t()  # (M, R)
        ops = _dropout_ops(x2, dropouts, ctx.ranks)
        if ops is not None:  # CUDA: masks drawn inside the kernels from one seed, never written
            ctx.seed = _SEEDS.next() if _SEEDS is not None else ops.dropout_seed(x2.device)
            return ops.dropout_project(x2, _a_cat(a_params, x2.dtype), len(a_params), dropouts[0], ctx.seed)
        global TORCH_DROPOUT_CALLS
        TORCH_DROPOUT_CALLS += 1
        ctx.rng_state = _rng_state(x2.device)
        # one (M, in) dropped copy alive at a time; (M, r_i) each
        return torch.cat([_dropped(x2, p) @ _a_cat((a,), x2.dtype).t() for a, p in zip(a_params, dropouts)], dim=1)

    @staticmethod
    def backward(ctx, g_xa):
        needs_a = ctx.needs_input_grad[5:]
        outputs_grads, ctx.handoff.grads = ctx.handoff.grads, None  # (M, out_i) each, or None
        if not any(ctx.dropouts):
            if ctx.rebuild is not None:  # first: its row chunks never meet x's (M, in) gradient
                grad_a_cat = _rebuilt_input_grad(ctx.rebuild, ctx.saved_tensors, g_xa)
            else:
                (x2,) = ctx.saved_tensors
                grad_a_cat = _mm_f32(g_xa.t(), x2)  # (R, in)
            grads = _split_a_grads(grad_a_cat, needs_a, ctx.ranks, ctx.dtypes)
            del grad_a_cat
            grad_x = None
            if ctx.needs_input_grad[0]:
                # (M, in): the adapter part first, the big GEMMs accumulate onto it
                if ctx.handoff.fp8_grad:  # the base parts first: _scaled_mm's output takes the adapter part
                    grad_x = _add_base_grads(None, outputs_grads, ctx.layers, fp8=True)
                    a_cat = _a_cat(ctx.a_params, g_xa.dtype)
                    grad_x = g_xa @ a_cat if grad_x is None else grad_x.addmm_(g_xa, a_cat)
                else:
                    grad_x = g_xa @ _a_cat(ctx.a_params, g_xa.dtype)
                    grad_x = _add_base_grads(grad_x, outputs_grads, ctx.layers)
            return (grad_x, None, None, None, None, *grads)
        (x2,) = ctx.saved_tensors
        if ctx.seed is not None:
            return _dropout_kernels_backward(ctx, x2, g_xa, needs_a, outputs_grads)
        grad_x, grads, start = None, [], 0
        with _replayed_rng(x2.device, ctx.rng_state), torch.enable_grad():
            for a, p, r, dtype, needs in zip(ctx.a_params, ctx.dropouts, ctx.ranks, ctx.dtypes, needs_a, strict=True):
                g = g_xa[:, start : start + r]  # (M, r)
                start += r
                x_in = x2.detach().requires_grad_(ctx.needs_input_grad[0] and p > 0)
                x_drop = _dropped(x_in, p)  # the forward's mask, drawn again in the same order
                grads.append(_mm_f32(g.t(), x_drop.detach()).to(dtype) if needs else None)  # (r, in)
                if ctx.needs_input_grad[0]:
                    g_drop = g @ _a_cat((a,), g.dtype)  # (M, in)
                    g_in = torch.autograd.grad(x_drop, x_in, g_drop)[0] if p > 0 else g_drop
                    grad_x = g_in if grad_x is None else grad_x.add_(g_in)
        if ctx.needs_input_grad[0]:
            grad_x = _add_base_grads(grad_x, outputs_grads, ctx.layers, ctx.handoff.fp8_grad)
        return (grad_x, None, None, None, None, *grads)


class _SeedSource:
    """Dropout seeds read in call order from a (n,) int64 device tensor (see `dropout_seeds`)."""

    __slots__ = ("next_index", "seeds")

    def __init__(self, seeds: torch.Tensor) -> None:
        self.seeds, self.next_index = seeds, 0

    def next(self) -> torch.Tensor:
        if self.next_index >= self.seeds.numel():
            raise RuntimeError(f"more LoRA groups with dropout than the {self.seeds.numel()} seeds given")
        self.next_index += 1
        return self.seeds[self.next_index - 1 : self.next_index]


_SEEDS: _SeedSource | None = None  # global, as _COPIES: a recompute runs in autograd's threads
TORCH_DROPOUT_CALLS = 0
"""Group calls that drew their masks from torch's generator (not the Triton kernels): a CUDA graph
cannot replay those (its recompute would draw other masks)."""


@contextlib.contextmanager
def dropout_seeds(seeds: torch.Tensor):
    """Within, the Triton dropout kernels' k-th group call takes seeds[k] instead of a fresh draw.

    A CUDA-graphed layer (`lora_dist.graphs`) runs its forward and its recompute each inside one
    such scope over the same seeds, refreshed before each replay: the recompute draws the forward's
    masks, and each replay new ones.
    """
    global _SEEDS
    outer = _SEEDS
    _SEEDS = _SeedSource(seeds)
    try:
        yield
    finally:
        _SEEDS = outer


def _split_a_grads(grad_a_cat: torch.Tensor, needs_a, ranks, dtypes) -> list[torch.Tensor | None]:
    """The group's (R, in) A gradient as one (r_i, in) gradient per layer in its parameter's dtype
    (None where that A needs none)."""
    grads, start = [], 0
    for needs, r, dtype in zip(needs_a, ranks, dtypes, strict=True):
        grads.append(grad_a_cat[start : start + r].to(dtype) if needs else None)
        start += r
    return grads


def _dropout_ops(x2: torch.Tensor, dropouts: Sequence[float], ranks: Sequence[int]):
    """triton_ops where its dropout kernels take this group (CUDA, one p for every layer, equal ranks
    that are multiples of 16), else None (the torch path: dropped copies, masks from torch's generator)."""
    if not x2.is_cuda or len(set(dropouts)) != 1:
        return None
    ops = _triton_ops()
    return ops if ops is not None and ops.projects_with_dropout(x2, list(ranks)) else None


def _dropout_kernels_backward(ctx, x2, g_xa, needs_a, outputs_grads):
    """`_LoRAProject.backward` when its forward drew the masks in the Triton kernels (from ctx.seed)."""
    ops, groups, p = _triton_ops(), len(ctx.ranks), ctx.dropouts[0]
    g_xa = g_xa.contiguous()
    grads = [None] * groups
    if any(needs_a):
        grad_a_cat = ops.dropout_a_grad(x2, g_xa, groups, p, ctx.seed)  # (R, in) fp32
        grads = _split_a_grads(grad_a_cat, needs_a, ctx.ranks, ctx.dtypes)
        del grad_a_cat
    grad_x = None
    if ctx.needs_input_grad[0]:
        a_cat = _a_cat(ctx.a_params, g_xa.dtype)
        grad_x = ops.dropout_input_grad(g_xa, a_cat, x2.shape[1], groups, p, ctx.seed)  # (M, in)
        grad_x = _add_base_grads(grad_x, outputs_grads, ctx.layers, ctx.handoff.fp8_grad)
    return (grad_x, None, None, None, None, *grads)


class _Handoff:
    """The output gradients of a group, from `_LoRAOutput.backward` to `_LoRAProject.backward`.

    x's gradient through the base weights (g_i @ W_i, (M, in)) is made in the second, not the first:
    the first saves nothing, so under checkpointing it runs before the layer's recompute, and a
    (tokens, I) gradient made there would sit beside the whole recomputed layer (the step's peak).
    """

    __slots__ = ("fp8", "fp8_grad", "grads")

    def __init__(self) -> None:
        self.grads: list[torch.Tensor | None] | None = None
        self.fp8 = False  # the forward's base GEMMs ran in FP8 (`_fp8_takes`)
        self.fp8_grad = False  # and x's gradient through them does too (unless forward only)


def _add_base_grads(grad_x: torch.Tensor | None, outputs_grads, layers, fp8: bool = False) -> torch.Tensor | None:
    """grad_x + sum_i g_i @ W_i, each 4-bit W_i dequantized again and freed at once (in FP8 with `fp8`:
    `_scaled_mm` makes a new (M, in) tensor, so pass grad_x=None first and add the rest onto its result)."""
    for g, layer in zip(outputs_grads or (), layers):
        if g is None:
            continue
        if fp8:
            part = _fp8_mm(g, _fp8_weight(layer.base_layer, g.dtype, transpose=True), g.dtype)  # (M, in)
            grad_x = part if grad_x is None else grad_x.add_(part)
            continue
        w = _base_weight(layer.base_layer, g.dtype)  # (out, in)
        grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
        del w
    return grad_x


# ------------------------------------------------------------------------------------ FP8 base GEMMs

_FP8_BASE = False
_FP8_GRAD = True
_FP8_FORWARD = True
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def set_fp8_base_gemms(on: bool, backward: bool = True, forward: bool = True) -> None:
    """Run the frozen base GEMMs of the fused path (forward x @ W.T and backward g @ W) in FP8 e4m3.

    Opt-in. Each operand is scaled per row of the product (x and g per token; W per output feature
    forward, per input feature backward), cast to e4m3 (3 mantissa bits: 2^-4 relative rounding per
    element, against bf16's 2^-9) and multiplied in `torch._scaled_mm` with fp32 accumulation. The
    adapters, their gradients and every other product stay in the compute dtype. A group takes it only
    where it can run (`_fp8_takes`: on CUDA bf16 compute, FP8 tensor cores, widths multiples of 16;
    the CPU runs it as a reference); elsewhere the bf16 products, unchanged. A row holding inf or NaN
    gives a NaN output row (bf16 would give inf there): non-finite either way. With `backward=False`
    only the forward products (and a checkpointed recompute's) run in FP8; x's gradient through the
    base weights stays in the compute dtype. With `forward=False` the forward that computes the loss
    keeps the compute dtype and only what runs inside backward takes FP8: a checkpointed recompute's
    products (told apart by autograd running a backward) and, with `backward`, x's gradient. The
    loss is then the bf16 model's; the gradient is taken at activations within FP8 rounding of it
    (under non-reentrant checkpointing, ours, the adapters' B gradients read x @ A.T as the forward
    kept it, not recomputed).
    """
    global _FP8_BASE, _FP8_GRAD, _FP8_FORWARD
    _FP8_BASE, _FP8_GRAD, _FP8_FORWARD = bool(on), bool(backward), bool(forward)


def fp8_switches() -> tuple[bool, bool, bool]:
    """(FP8 base GEMMs on, x's gradient in FP8 too, the loss's forward too): what a CUDA graph's capture
    bakes in."""
    return _FP8_BASE, _FP8_GRAD, _FP8_FORWARD


@functools.cache
def _fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_takes(x2: torch.Tensor, layers) -> bool:
    """Whether this group's base GEMMs run in FP8 (decided once in forward, kept for backward)."""
    if not _FP8_BASE:
        return False
    if any(d % 16 for d in [x2.shape[1], *(layer.base_layer.out_features for layer in layers)]):
        return False
    if x2.is_cuda:  # row-wise scales need bf16 output there
        return x2.dtype == torch.bfloat16 and _fp8_tensor_cores(x2.device)
    return True


def _fp8_factors(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier 448 / amax, scale amax / 448), fp32, of w's rows (dim 1) or columns (dim 0)."""
    amax = w.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-30)
    # Spelled as every device computes it (`triton_ops` too): torch's 448 / amax is amax.reciprocal() * 448
    # (Tensor.__rtruediv__), two roundings; the scale multiplies by fp32(1 / 448), as CUDA's tensor / scalar
    # does anyway (the CPU's would divide). The operands scaled by `mult` are multiplied, never divided.
    return amax.reciprocal() * E4M3_MAX, amax * (1.0 / E4M3_MAX)


def _fp8_rows_fn(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mult, scale = _fp8_factors(t, 1)  # (M, 1)
    return (t.contiguous() * mult).to(torch.float8_e4m3fn), scale


def _fp8_cols_fn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows(w.T) without a transposed copy of w in the compute dtype: ((in, out) e4m3, (in, 1)); eager,
    as `fp8_rows`' fallback (a dense base's weight: a 4-bit one goes through `_Fp8WeightPlan`)."""
    mult, scale = _fp8_factors(w, 0)  # (1, in)
    return (w * mult).t().contiguous().to(torch.float8_e4m3fn), scale.t()


def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): t (M, K) as row-major e4m3 with one fp32 scale per row, t ~ q * scale (each row's
    largest magnitude lands on 448). On CUDA one Triton kernel (`triton_ops.fp8_rows`); elsewhere, and
    for what it does not take, the torch function run eagerly: compiled, inductor's division by amax
    would be Triton's approximate one, a last bit off the kernel's and the weights' (`_Fp8WeightPlan`)."""
    ops = _triton_ops() if _COMPILE_ENABLED and t.is_cuda else None
    out = ops.fp8_rows(t, E4M3_MAX) if ops is not None else None
    return out if out is not None else _fp8_rows_fn(t)


class _Fp8WeightPlan:
    """A frozen 4-bit weight's e4m3 operand, made again on each call from its packed data in one kernel
    (`triton_ops.dequantize_4bit_fp8`) with the multipliers and scales `fp8_rows` / `_fp8_cols_fn` give its
    bf16 dequantize, computed once here (from one bf16 dequantize)."""

    __slots__ = ("data", "mult", "scale", "state", "transpose")

    def __init__(self, base: nn.Module, data: torch.Tensor, state, transpose: bool) -> None:
        self.data, self.state, self.transpose = data, state, transpose
        w = _base_weight(base, torch.bfloat16)
        mult, scale = _fp8_factors(w, 0 if transpose else 1)
        self.mult, self.scale = mult.reshape(-1).contiguous(), scale.reshape(-1, 1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_ops().dequantize_4bit_fp8(self.data, self.state, self.mult, self.transpose), self.scale


def _fp8_weight(base: nn.Module, dtype: torch.dtype, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The base weight as an `_fp8_mm` operand: `fp8_rows(W)` ((out, in), per output feature) or with
    `transpose` `_fp8_cols_fn(W)` ((in, out), per input feature). A 4-bit bf16 weight on CUDA goes from its
    packed data to e4m3 in one kernel (`_Fp8WeightPlan`, kept beside the dequantize plans); elsewhere
    through the `dtype` weight."""
    slot = ("fp8", transpose)
    plan = _kept_plan(base, slot)
    if plan is not None:
        return plan()
    found = _triton_4bit(base, dtype, "dequantizes_to_fp8") if dtype == torch.bfloat16 else None
    if found is not None and found.direct and found.own:  # its scales are computed once: the weight's own data
        plan = _Fp8WeightPlan(base, found.data, found.state, transpose)
        _keep_plan(base, slot, plan)
        return plan()
    w = _base_weight(base, dtype)
    return _fp8_cols_fn(w) if transpose else fp8_rows(w)


def _fp8_mm(a, b_t, dtype: torch.dtype) -> torch.Tensor:
    """a @ b_t.T in FP8, as `dtype`: a (M, K) and b_t (N, K), each a tensor in the compute dtype or
    already (q, scale) (a group's input, quantized once for all its layers; `_fp8_weight`'s)."""
    aq, a_scale = fp8_rows(a) if isinstance(a, torch.Tensor) else a
    bq, b_scale = fp8_rows(b_t) if isinstance(b_t, torch.Tensor) else b_t
    return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=dtype)


def _rebuilt_input_grad(rebuild: Rebuild, saved: Sequence[torch.Tensor], g_xa: torch.Tensor) -> torch.Tensor:
    """g_xa.T @ x2 (fp32, (R, in)) with x2 made again chunk by chunk from its producer's tensors."""
    m = g_xa.shape[0]
    step = -(-m // rebuild.chunks)
    total = None
    for start in range(0, m, step):
        rows = rebuild.rows(saved, start, start + step)  # (chunk, in), freed after its product
        part = _mm_f32(g_xa[start : start + step].t(), rows)
        total = part if total is None else total.add_(part)
    return total


def _dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x) with keep probability 1 - p and scale 1 / (1 - p), as nn.Dropout in training; x if p is 0."""
    return F.dropout(x, p, training=True) if p > 0 else x


class _LoRAOutput(torch.autograd.Function):
    """y_i = x @ W_i.T (+ bias_i) + (x @ A_i.T) @ (s_i B_i).T, given xa = x @ cat(A).T."""

    @staticmethod
    def forward(ctx, x2, xa, layers, handoff, *b_params):
        dtype = x2.dtype
        outs, start = [], 0
        takes = _fp8_takes(x2, layers)
        # a recompute under checkpointing runs inside backward: FP8 there even when the loss's forward is not
        handoff.fp8 = takes and (_FP8_FORWARD or torch._C._current_graph_task_id() != -1)
        handoff.fp8_grad = takes and _FP8_GRAD  # (checkpointing: this first forward's handoff is backward's)
        x_fp8 = fp8_rows(x2) if handoff.fp8 else None  # once for every layer of the group
        for layer, b in zip(layers, b_params):
            r = b.shape[1]
            # The rank-r product first, then the base GEMM accumulates onto it (beta = 1): the
            # compute-bound GEMM reads the update in its epilogue almost for free, where adding
            # it afterwards would be a memory-bound pass over y.
            bias = layer.base_layer.bias
            if handoff.fp8:  # _scaled_mm does not accumulate: the rank-r product goes onto its output
                w8 = _fp8_weight(layer.base_layer, dtype, transpose=False)
                y = _fp8_mm(x_fp8, w8, dtype).addmm_(xa[:, start : start + r], _scaled_b(b, layer.scaling, dtype).t())
                del w8
                if bias is not None:
                    y += bias.to(dtype)
            else:
                y = xa[:, start : start + r] @ _scaled_b(b, layer.scaling, dtype).t()  # (M, out)
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
        ctx.layers, ctx.handoff = layers, handoff
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
                g @ _scaled_b(b, layer.scaling, dtype) if g is not None else xa.new_zeros(m, b.shape[1])
                for g, b, layer in zip(gs, b_params, layers)
            ],
            dim=1,
        )
        if ctx.needs_input_grad[0]:  # x's gradient is made by _LoRAProject.backward, from these
            ctx.handoff.grads = gs
        grad_bs, start = [], 0
        for g, b, layer, needs in zip(gs, b_params, layers, ctx.needs_input_grad[4:]):
            r = b.shape[1]
            if g is None or not needs:
                grad_bs.append(None)
            else:
                grad_bs.append((_mm_f32(g.t(), xa[:, start : start + r]) * layer.scaling).to(b.dtype))
            start += r
        return (None, g_xa, None, None, *grad_bs)


def lora_group(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """Run several LoRALayers that share the input `x` through one fused autograd function.

    Args:
        x: (..., in_features) in the compute dtype (bf16 on GPU).
        layers: LoRA layers with the same in_features, each passing `layers.supports_fast_path`
            (the caller checks: this module does not know the layer class). A layer in training
            mode with `nn.Dropout` on its adapter input draws its own mask, from the generator of
            x's device, in the order of `layers`.

    Returns:
        One (..., out_features_i) tensor per layer, in x's dtype.
    """
    layers = tuple(layers)
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    a_params = [layer.lora_A.weight for layer in layers]
    dropouts = tuple(_dropout_p(layer) for layer in layers)
    rebuild = None if any(dropouts) else _rebuild_of(x)  # with dropout, backward replays the masks on x2
    handoff = _Handoff()
    xa = _LoRAProject.apply(x2, dropouts, rebuild, layers, handoff, *a_params)  # (M, R)
    outs = _LoRAOutput.apply(x2, xa, layers, handoff, *[layer.lora_B.weight for layer in layers])
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)


def lora_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """One LoRALayer's forward through the fused path: (..., in) -> (..., out)."""
    return lora_group(x, (layer,))[0]


# ------------------------------------------------------------------------------------ fused elementwise ops
# Each op is an autograd function whose forward and backward are plain torch functions; on CUDA
# those functions are torch.compile'd (one fused kernel each), on the CPU they run eagerly. Each
# forward rounds where the reference implementations (Hugging Face's modules) round, so both paths
# compute the same function.


def _rmsnorm_fwd(x, weight, eps: float, offset: float, fp32_weight: bool):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return _rmsnorm_apply(x, weight, rstd, offset, fp32_weight), rstd


def _rmsnorm_apply(x, weight, rstd, offset: float, fp32_weight: bool):
    """The norm's output from x and its saved rstd: elementwise, so any rows of it come out the same."""
    xf = x.float()
    if fp32_weight:  # (offset + w) * n in fp32, rounded once at the end
        return ((xf * rstd) * (weight.float() + offset)).to(x.dtype)
    scale = weight + offset if offset else weight
    return scale * (xf * rstd).to(x.dtype)  # n rounded to x's dtype first


def _rmsnorm_bwd(g, x, weight, rstd, offset: float):
    n = x.float() * rstd  # (..., d)
    gn = g.float() * (weight.float() + offset)
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


_GELU_C = math.sqrt(2.0 / math.pi)


def _geglu_fwd(gate, up):
    return F.gelu(gate, approximate="tanh") * up  # as HF's "gelu_pytorch_tanh" MLPs round it


def _geglu_bwd(g, gate, up):
    # gelu_tanh(x) = x/2 (1 + tanh(u)), u = c (x + 0.044715 x^3): d/dx = (1 + t)/2 + x/2 (1 - t^2) du/dx
    gf, upf, gg = gate.float(), up.float(), g.float()
    t = torch.tanh(_GELU_C * (gf + 0.044715 * gf.pow(3)))
    gelu = 0.5 * gf * (1 + t)
    d_gelu = 0.5 * (1 + t) + 0.5 * gf * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * gf * gf)
    return (gg * upf * d_gelu).to(gate.dtype), (gg * gelu).to(up.dtype)


_TRITON_FORWARDS = (_rmsnorm_fwd, _rmsnorm_apply, _swiglu_fwd, _geglu_fwd)
_COMPILED: dict[str, Callable] = {}
_COMPILE_ENABLED = True


def set_compile(enabled: bool) -> None:
    """Turn torch.compile of the fused elementwise ops on or off (on by default, CUDA only)."""
    global _COMPILE_ENABLED
    _COMPILE_ENABLED = enabled


def _triton_forward(fn: Callable, args: tuple):
    """fn(*args) through a hand-written Triton kernel (`triton_ops`: RMSNorm, the gated activations'
    forwards), or None where none takes these arguments."""
    ops = _triton_ops()
    if ops is None:
        return None
    if fn is _rmsnorm_fwd:
        x, weight, eps, offset, fp32_weight = args
        return ops.rmsnorm(x, weight, None, eps, offset, fp32_weight)
    if fn is _rmsnorm_apply:
        x, weight, rstd, offset, fp32_weight = args
        return ops.rmsnorm(x, weight, rstd, 0.0, offset, fp32_weight)
    if fn is _swiglu_fwd or fn is _geglu_fwd:
        return ops.gated_forward(*args, gelu=fn is _geglu_fwd)
    return None


def _fused(fn: Callable, *args):
    if not (_COMPILE_ENABLED and args[0].is_cuda):
        return fn(*args)
    if fn in _TRITON_FORWARDS:
        out = _triton_forward(fn, args)
        if out is not None:
            return out
    compiled = _COMPILED.get(fn.__name__)
    if compiled is None:
        compiled = torch.compile(fn, fullgraph=True)  # dynamic after a second shape
        _COMPILED[fn.__name__] = compiled
    try:
        return compiled(*args)
    except Exception as err:  # noqa: BLE001 -- any compiler failure must not stop training: run eagerly
        warnings.warn(f"torch.compile failed for {fn.__name__} ({type(err).__name__}: {err}); running eagerly")
        _COMPILED[fn.__name__] = fn
        return fn(*args)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, fp32_weight):
        y, rstd = _fused(_rmsnorm_fwd, x, weight, eps, offset, fp32_weight)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        y._lora_dist_rebuild = Rebuild(_rmsnorm_apply, (x, weight, rstd), (offset, fp32_weight), row_wise=(0, 2))
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        return _fused(_rmsnorm_bwd, g.contiguous(), x, weight, rstd, ctx.offset), None, None, None, None


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


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up for a (forward, backward) pair of plain functions: SwiGLU or tanh-GeGLU.

    With `owned` (the caller's gate and up are read by nothing else), backward writes d_gate and
    d_up over the saved gate and up (one Triton kernel on CUDA, `triton_ops`): the MLP's backward then holds no
    (tokens, intermediate) tensor beyond the incoming gradient, two fewer than returning new ones
    (448 MiB per Llama-3-8B layer at 8k tokens). A second backward through the same graph finds
    them changed and raises (autograd's version check), never computing with overwritten values.
    """

    @staticmethod
    def forward(ctx, gate, up, fwd, bwd, owned):
        ctx.save_for_backward(gate, up)
        ctx.bwd = bwd
        ctx.owned = owned
        h = _fused(fwd, gate, up)
        h._lora_dist_rebuild = Rebuild(fwd, (gate, up), (), row_wise=(0, 1), chunks=REBUILD_CHUNKS)
        return h

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        g = g.contiguous()
        if not ctx.owned:
            return (*_fused(ctx.bwd, g, gate, up), None, None, None)
        triton_ops = _triton_ops() if gate.is_cuda and gate.stride(-1) == 1 and up.stride(-1) == 1 else None
        if triton_ops is not None:  # one pass, no temporary by construction
            triton_ops.gated_backward_(g, gate, up, gelu=ctx.bwd is _geglu_bwd)
        else:  # the CPU (and CUDA without Triton): the same values, through two temporaries
            d_gate, d_up = _fused(ctx.bwd, g, gate, up)
            gate.copy_(d_gate)
            up.copy_(d_up)
        return gate, up, None, None, None


def _triton_ops():
    """lora_dist.triton_ops, or None where Triton is not installed (a CUDA build of torch without it)."""
    try:
        from lora_dist import triton_ops
    except ImportError:
        return None
    return triton_ops



def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, fp32_weight: bool = False
) -> torch.Tensor:
    """RMSNorm of x over its last dim; the weight gets no gradient.

    Args:
        x: (..., d) input.
        weight: (d,) scale.
        eps: added to the mean square.
        offset: the scale is `offset + weight` (1.0 for norms stored as `x * (1 + w)`).
        fp32_weight: multiply by the scale in fp32 and round once (Gemma, OLMo 2); False rounds the
            normalized x to x's dtype first and multiplies in the weight's dtype (Llama).
    """
    return _RMSNorm.apply(x, weight, eps, offset, fp32_weight)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q (B, T, H, D) and k (B, T, Hkv, D) with cos/sin (B, T, R), R <= D.

    With R < D (partial rotary) only the first R dims of each head rotate; the rest pass through.
    """
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return _RoPE.apply(q, k, cos, sin)
    q_rot, k_rot = _RoPE.apply(q[..., :rotary], k[..., :rotary], cos, sin)
    return torch.cat((q_rot, q[..., rotary:]), -1), torch.cat((k_rot, k[..., rotary:]), -1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for backward.

    Args:
        owned: the caller hands gate and up over (nothing else reads them after this): backward
            then writes their gradients over them instead of allocating two more tensors.
    """
    return _GatedActivation.apply(gate, up, _swiglu_fwd, _swiglu_bwd, owned)


def geglu_tanh(gate: torch.Tensor, up: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up, saving only gate and up for backward (`owned`: as `swiglu`)."""
    return _GatedActivation.apply(gate, up, _geglu_fwd, _geglu_bwd, owned)


# ------------------------------------------------------------------------------------ attention


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, heads, T, D), each kv head serving heads / Hkv query heads in turn."""
    b, hkv, t, d = x.shape
    if hkv == heads:
        return x
    return x[:, :, None].expand(b, hkv, heads // hkv, t, d).reshape(b, heads, t, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, T, H, D) over k, v (B, T, Hkv, D); returns (B, T, H, D).

    Args:
        scale: factor on q . k (1 / sqrt(D) for most models).
        mask: None for plain causal attention, else a (B | 1, 1, T, T) mask that already holds the
            causal pattern (and sliding windows, padding, packing): bool (True attends) or additive float.
        softcap: scores become `softcap * tanh(scores / softcap)` before the mask; these go through
            FlexAttention on CUDA (compiled), else an explicit softmax (fp32, as the eager
            reference); the rest through SDPA.
    """
    heads = q.shape[2]
    # (B, T, H, D) viewed as (B, H, T, D): the output transposes back without a copy
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap is None:
        if mask is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                 enable_gqa=kh.shape[1] != heads)
        else:  # a mask rules out the kernels that take grouped heads: repeat them
            out = F.scaled_dot_product_attention(qh, _repeat_heads(kh, heads), _repeat_heads(vh, heads),
                                                 attn_mask=mask, scale=scale)
        return out.transpose(1, 2)
    if qh.is_cuda and _COMPILE_ENABLED and _flex_runs(qh, kh, mask, scale, softcap):
        return _softcapped_flex(qh, kh, vh, mask, scale, softcap, compiled=True).transpose(1, 2)
    return _softcapped_explicit(qh, kh, vh, mask, scale, softcap).transpose(1, 2)


def _softcapped_explicit(qh, kh, vh, mask, scale: float, softcap: float) -> torch.Tensor:
    """Soft-capped attention as the eager reference computes it: (B, H, T, T) scores in memory."""
    heads = qh.shape[1]
    scores = (qh @ _repeat_heads(kh, heads).transpose(2, 3)) * scale  # (B, H, T, T)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        t = qh.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=qh.device).tril()
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype)
    return probs @ _repeat_heads(vh, heads)


def _softcapped_flex(qh, kh, vh, mask, scale: float, softcap: float, *, compiled: bool) -> torch.Tensor:
    """Soft-capped attention through FlexAttention: tiles of scores, never the (B, H, T, T) matrix.

    The cap and then the model's mask (additive, or bool: True attends) are applied to each fp32
    score inside the kernel, in the reference's order; the block mask is causal (every mask the
    models build is causal), so tiles above the diagonal are skipped. Scores accumulate in fp32
    where the eager reference rounds them to bf16 first: the same function, rounded less.
    `compiled=False` runs torch's unfused reference implementation (the CPU tests; no backward there).
    """
    from torch.nn.attention.flex_attention import flex_attention

    t = qh.shape[2]
    block_mask = _causal_block_mask(t, qh.device)
    fn = _compiled_flex() if compiled else flex_attention
    if mask is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    else:
        m = mask[:, 0]  # (B | 1, T, T)
        batch = m.shape[0] > 1

        def score_mod(score, b, h, q_idx, kv_idx):
            capped = torch.tanh(score / softcap) * softcap
            keep = m[b if batch else 0, q_idx, kv_idx]
            if m.dtype == torch.bool:
                return torch.where(keep, capped, -float("inf"))
            return capped + keep
    return fn(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
              enable_gqa=kh.shape[1] != qh.shape[1])


_BLOCK_MASKS: dict[tuple[int, str], Any] = {}
_FLEX_TRIED: dict[tuple, bool] = {}


def _causal_block_mask(t: int, device: torch.device):
    key = (t, str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        _BLOCK_MASKS[key] = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, t, t,
                                              device=device)
    return _BLOCK_MASKS[key]


def _compiled_flex():
    compiled = _COMPILED.get("flex_attention")
    if compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = _COMPILED["flex_attention"] = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return compiled


def _flex_runs(qh: torch.Tensor, kh: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float) -> bool:
    """Whether compiled FlexAttention runs forward and backward for these shapes on this GPU.

    Tried once per shape on zeros and the real mask, scale and cap (the compiled kernels are then
    cached for the real call): a head dim or dtype the kernel cannot tile (shared memory, for
    instance) is found here, where it can fall back to the explicit attention with one warning,
    not in the middle of a backward.
    """
    key = (tuple(qh.shape), tuple(kh.shape), qh.dtype, scale, softcap,
           None if mask is None else (tuple(mask.shape), mask.dtype))
    ok = _FLEX_TRIED.get(key)
    if ok is None:
        failure: list[BaseException] = []

        def trial() -> None:
            try:
                with torch.enable_grad():
                    q, k, v = (torch.zeros_like(x, requires_grad=True) for x in (qh, kh, kh))
                    out = _softcapped_flex(q, k, v, mask, scale, softcap, compiled=True)
                    torch.autograd.grad(out.sum(), (q, k, v))
            except Exception as err:  # noqa: BLE001 -- any compiler or kernel failure: the explicit path
                failure.append(err)

        # In a thread of its own: saved-tensor hooks are per thread, so a checkpointed layer calling
        # this never sees the trial's tensors (its recompute, which skips the trial, must save the same).
        runner = threading.Thread(target=trial, name="lora_dist-flex-trial")
        runner.start()
        runner.join()
        if failure:
            err = failure[0]
            warnings.warn(f"FlexAttention failed for soft-capped attention ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using the explicit softmax")
        ok = _FLEX_TRIED[key] = not failure
    return ok


# ------------------------------------------------------------------------------------ chunked LM loss


def _ce_chunk(logits, labels, inv_count, scale: float, softcap: float | None):
    # logits: (C, V) compute dtype; labels: (C,) with IGNORE_INDEX; inv_count: 0-d fp32 tensor.
    # HF upcasts the logits to fp32 before its cross-entropy; so does this, and scales and caps
    # them there (HF does both in the compute dtype: the same function, rounded less).
    lf = logits.float() * scale
    if softcap is not None:
        capped = torch.tanh(lf / softcap)
        lf = capped * softcap
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (C, 1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).unsqueeze(1)  # (C, 1)
    target = lf.gather(1, safe)
    loss_sum = torch.where(valid.unsqueeze(1), lse - target, 0.0).sum()
    cols = torch.arange(lf.shape[1], device=lf.device).unsqueeze(0)  # (1, V)
    grad = torch.exp(lf - lse) - (cols == safe).to(lf.dtype)  # softmax - one_hot
    grad = grad * (valid.unsqueeze(1).to(lf.dtype) * inv_count)
    if softcap is not None:
        grad = grad * (1 - capped * capped)  # d(c tanh(z / c)) / dz
    if scale != 1.0:
        grad = grad * scale
    return loss_sum, grad.to(logits.dtype)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, scale, softcap, num_items):
        # hidden: (N, d), weight: (V, d) frozen, labels: (N,) already shifted; num_items: None or a
        # 0-d tensor, the divisor of the summed loss (HF's num_items_in_batch), else the label count.
        # A micro batch with no labelled token (a prompt cut off before its response) scores 0 with a
        # zero gradient, as HF's loss does given num_items_in_batch: every term of the sum is masked,
        # so dividing by max(count, 1) changes nothing else. Stays on the device: no sync.
        if num_items is None:
            count = (labels != IGNORE_INDEX).sum().float().clamp(min=1.0)
        else:
            count = num_items.to(device=hidden.device, dtype=torch.float32)
        inv_count = 1.0 / count
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            logits = h @ weight.t()  # (C, V), the only logits alive at a time
            loss_sum, grad_logits = _fused(
                _ce_chunk, logits, labels[start : start + chunk_tokens], inv_count, scale, softcap
            )
            del logits
            total += loss_sum
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_tokens])
            # freed before the next chunk's logits exist: one chunk's logits and gradient alive
            # at a time, not this gradient beside the next chunk's logits and gradient (3 chunks)
            del grad_logits
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx, g):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * g.to(grad_hidden.dtype), None, None, None, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits `hidden @ weight.T`, as Hugging Face causal LMs compute it.

    The logits are multiplied by `scale`, then, with `softcap`, capped to `softcap * tanh(z / softcap)`.

    The gradient of `hidden` is computed chunk by chunk in the forward (the head is frozen), so
    only (chunk_tokens, vocab) logits exist at any time.

    Args:
        hidden: (B, T, d) final hidden states.
        weight: (V, d) output head weight (frozen).
        labels: (B, T) token ids; position t is scored against labels[:, t + 1]; -100 is ignored.
        chunk_tokens: tokens per chunk; default: equal chunks of at most about LOSS_CHUNK_LOGITS logits.
        scale: factor on the logits (Granite divides them by `logits_scaling`).
        softcap: tanh soft-capping of the logits (Gemma 2's `final_logit_softcapping`), or None.
        num_items: divide the summed token loss by this instead of this batch's label count
            (Hugging Face's `num_items_in_batch`: the label tokens of the whole accumulated batch).

    Returns:
        Scalar fp32 loss; 0 (with a zero gradient) when no label counts.
    """
    vocab, d = weight.shape
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T)
    n = shifted.numel()
    chunks = -(-n * vocab // LOSS_CHUNK_LOGITS)  # ceil
    chunk = chunk_tokens or -(-n // chunks)  # equal chunks, so one compiled shape
    if num_items is not None:
        num_items = torch.as_tensor(num_items)
    return _ChunkedLMLoss.apply(hidden.reshape(-1, d), weight, shifted.reshape(-1), chunk, float(scale), softcap,
                                num_items)
