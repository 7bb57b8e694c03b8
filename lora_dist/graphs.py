"""CUDA graphs of decoder layers: a layer's forward, and its backward with the recompute, one launch each.

Each decoder layer of the fused QLoRA step queues a few hundred small ops in forward, recompute
and backward; on a slow host that bounds the step (one H200 start: 600 ms of device work, the host
queuing for 690 ms; on a fast one the host took 0.58 s of a 0.68 s step and graphs bought nothing).
A CUDA graph records a layer's kernels once and replays them with one call.

`enable_layer_graphs` gives each decoder layer two graphs per input signature (the input's shape
and dtype, its keyword arguments' tensor shapes and other values):

- F_i runs the layer (under torch's non-reentrant checkpoint when checkpointing is on, early stop
  included) from a static input into its output y_i;
- B_i runs `torch.autograd.grad` of y_i: the recompute and the backward, into x's gradient and
  the adapters' gradients.

Static memory. Layer i's input and checkpoint is slot i, which F_{i-1} writes (layer 0's: the
embedding output copied in), as under the model's own checkpointing, which keeps each layer's
input; the slots live outside the graphs' memory pool. All graphs of a model share that pool and
are captured in the order they replay (F_0 .. F_{L-1} in the first forward, B_{L-1} .. B_0 in its
backward), so a graph's scratch never overlaps what a later replay still reads (without
checkpointing, the activations F_i saves stay allocated until B_i's capture). x's gradient
ping-pongs between two buffers (B_i reads one, writes the other, which B_{i-1} reads) and the
adapters' gradients land in one buffer per parameter layout, copied out once per layer for
autograd to accumulate (so gradient accumulation, `zero_grad(set_to_none=True)` and DeepSpeed's
gradient hooks see ordinary gradients). Keyword tensors (cos/sin, masks) are copied into static
buffers, one per distinct tensor a forward passes (Gemma 3's local and global rotary tables get one
each), so each backward recomputes from what its forward read. A replay allocates nothing: the
pool's memory is reserved at capture (`torch.cuda.max_memory_allocated` does not see it; the bench
and the job add `scratch_bytes`).

Taken only where replaying is the same computation: CUDA, training with gradients on, no dropout
in the layer but the LoRA adapters' own when the Triton dropout kernels draw it (their seeds come
from a per-layer buffer, refreshed before each replay and read by the forward and its recompute
alike: each replay draws new masks, the recompute the forward's), positional input only, the
layer as it was at capture (weights, adapters and 4-bit state where they were, scaling, dropout
settings, the FP8 switches: else all are captured again), and no earlier forward still waiting for
its backward (a second forward before one backward, as a DPO pair runs, goes eagerly: it would
overwrite what the first's backward reads). Everything else runs the layer as before. A model whose input signature keeps changing
(unpadded batches of varying length) is captured again each time; after `MAX_SIGNATURES` the
graphs are turned off for it with one warning.

Outputs alias the static buffers: a layer output is valid until the same layer runs again (the
next micro batch), as with any CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_dist import kernels

MAX_SIGNATURES = 4
"""Input signatures a model may be captured for before its graphs are turned off."""

_CACHE_KWARGS = ("use_cache", "cache", "past_key_values", "layer_past")
_CAPTURES = 0
_RERUN_OFF_CUDA = False  # tests: take the graph path on the CPU too, each "graph" a `_Rerun`


def captures() -> int:
    """Graphs captured in this process so far (a capture allocates the scratch that replays reuse)."""
    return _CAPTURES


class _Static:
    """A static buffer for a keyword tensor, and the tensor it was last copied from."""

    __slots__ = ("buf", "forward", "source", "version")

    def __init__(self, value: torch.Tensor) -> None:
        self.buf = torch.empty_like(value, memory_format=torch.contiguous_format)
        self.source: weakref.ref | None = None
        self.version = -1
        self.forward = -1  # the owner's forward count when it was last refreshed

    def holds(self, value: torch.Tensor) -> bool:
        return self.source is not None and self.source() is value and self.version == value._version

    def refresh(self, value: torch.Tensor, forward: int) -> bool:
        """Copy `value` in unless the buffer holds it already; False where a layer that reads this buffer
        ran with another tensor earlier in the same forward (its backward still needs that one)."""
        if self.holds(value):
            return True
        if self.forward == forward:
            return False
        self.buf.copy_(value)
        self.source, self.version, self.forward = weakref.ref(value), value._version, forward
        return True


class _Shared:
    """What the graphs of one model's layers share for one signature: pool, stream, static kwargs, gradients."""

    def __init__(self, device: torch.device, signature: tuple) -> None:
        self.signature = signature
        cuda = device.type == "cuda"  # (the CPU builds one only in tests of the bookkeeping)
        self.pool = torch.cuda.graph_pool_handle() if cuda else None
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.statics: list[_Static] = []  # keyword tensors' buffers; layers given the same tensor share one
        self.grad_x: list[torch.Tensor] | None = None  # the two ping-pong buffers of x's gradient
        self.grad_params: dict[tuple, torch.Tensor] = {}  # parameter layout -> flat gradient buffer
        self.slots: dict[int, torch.Tensor] = {}  # i -> layer i's input (layer i-1's output)

    def side_stream(self) -> contextlib.AbstractContextManager:
        """The capture stream, entered after the work queued so far (a no-op off CUDA)."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream())
        return _joined(self.stream)

    def capture(self, body: Callable[[], None]) -> Any:
        """A graph of `body` in this pool: its kernels are recorded, not run (replay runs them). Off CUDA
        (tests of this module's bookkeeping) a `_Rerun`: `body` itself, run at each replay."""
        if self.stream is None:
            return _Rerun(body)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            body()
        return graph

    def static_kwargs(self, statics: dict[Any, _Static], kwargs: dict[str, Any], forward: int) -> dict | None:
        """kwargs with every tensor (also inside tuples) replaced by its static buffer in `statics` (a
        layer's own map, filled at its capture), each refreshed; None where one cannot be (see `_Static`).

        Layers given the same tensor (cos/sin, the mask: one object for all layers of a forward) share
        a buffer, copied once per forward; layers given different ones (Gemma 3's local and global
        rotary tables, Gemma 2's sliding and full masks) get one each, so a backward's recompute
        reads what its own forward read.
        """
        ok = True

        def static(path: Any, value: Any) -> Any:
            nonlocal ok
            if isinstance(value, (tuple, list)):
                return type(value)(static((path, i), v) for i, v in enumerate(value))
            if not isinstance(value, torch.Tensor):
                return value
            entry = statics.get(path)
            if entry is None:  # capture: share a buffer that holds this very tensor, else a new one
                entry = next((e for e in self.statics if e.holds(value)), None)
                if entry is None:
                    entry = _Static(value)
                    self.statics.append(entry)
                statics[path] = entry
            ok = entry.refresh(value, forward) and ok
            return entry.buf

        out = {k: static(k, v) for k, v in kwargs.items()}
        return out if ok else None


class _Rerun:
    """A stand-in for a CUDA graph off CUDA: replay runs the captured Python again, on the same static
    buffers, so the CPU tests exercise the slots, buffers and autograd wiring a real graph replays."""

    def __init__(self, body: Callable[[], None]) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


@contextlib.contextmanager
def _joined(stream: torch.cuda.Stream):
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _signature_of(x: torch.Tensor, kwargs: dict[str, Any]) -> tuple:
    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return tuple(sig(u) for u in v)
        return v  # ints, floats, bools, None: hashable and compared by value

    return (tuple(x.shape), x.dtype, x.device, tuple(sorted((k, sig(v)) for k, v in kwargs.items())))


def _state_of(layer: nn.Module) -> tuple:
    """What a layer's graphs bake in at capture: where its tensors are (weights, adapters, the 4-bit
    state the dequantize reads), the adapters' scaling, its dropouts' p and mode, the FP8 switches."""
    ptrs = [t.data_ptr() for t in layer.parameters()] + [t.data_ptr() for t in layer.buffers()]
    values = []
    for module in layer.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            ptrs.append(state.absmax.data_ptr())
            if getattr(state, "state2", None) is not None:
                ptrs.append(state.state2.absmax.data_ptr())
        if hasattr(module, "scaling"):
            values.append(module.scaling)
        if isinstance(module, nn.Dropout):
            values.append((module.p, module.training))
    return tuple(ptrs), tuple(values), kernels.fp8_switches()


class _ModelGraphs:
    """The layers of one model, in order, and the graphs of their current signature."""

    def __init__(self, layers: list[nn.Module], checkpointing: bool) -> None:
        self.layers = [weakref.ref(layer) for layer in layers]
        self.runners: list[_LayerGraphs] = []
        self.checkpointing = checkpointing
        self.shared: _Shared | None = None
        self.signatures = 0
        self.off_reason: str | None = None
        self.forwards = 0  # forwards begun (layer 0 calls), to tell a keyword tensor's forward apart
        self.stale = False  # captured again at the next forward
        self.bypass = False  # this forward runs eagerly: an earlier one waits for its backward

    def reset(self, device: torch.device, signature: tuple) -> None:
        # new runners (below): a pending backward keeps the old ones, and their pool, alive until it has run
        self.runners = []
        self.shared = None
        self.signatures += 1
        if self.signatures > MAX_SIGNATURES:
            self.off_reason = (f"the decoder layers' inputs changed {MAX_SIGNATURES} times (shapes, masks present "
                               f"or not, weights moved): running them without CUDA graphs from here (pad or "
                               f"pack batches to one length to keep them)")
            warnings.warn(f"lora_dist.graphs: {self.off_reason}", stacklevel=3)
            return
        self.shared = _Shared(device, signature)
        self.stale = False
        self.runners = [_LayerGraphs(self, index, ref()) for index, ref in enumerate(self.layers)]

    def current(self) -> bool:
        """Whether every captured layer is as its graphs baked it in (`_state_of`)."""
        return not self.stale and all(r.fwd is None or r.state == _state_of(r.layer_ref()) for r in self.runners)

    def pending(self) -> bool:
        """Whether a replayed forward still waits for its backward (it reads the slots and buffers)."""
        return any(r.pending is not None and r.pending() is not None for r in self.runners)


class _LayerGraphs:
    """Layer `index`'s graphs: static input, output, F and B."""

    def __init__(self, owner: _ModelGraphs, index: int, layer: nn.Module) -> None:
        self.owner, self.index = owner, index
        self.layer_ref = weakref.ref(layer)
        self.shared = owner.shared
        self.fwd: Any = None  # torch.cuda.CUDAGraph (or _Rerun off CUDA)
        self.bwd: Any = None
        self.x_buf: torch.Tensor | None = None  # static input (no grad)
        self.x_leaf: torch.Tensor | None = None  # the same storage, the leaf F was captured from
        self.y: torch.Tensor | None = None  # F's output in its capture (autograd's root for B's capture)
        self.out: torch.Tensor | None = None  # the static output: slot index + 1
        self.params: list[nn.Parameter] = []
        self.seeds: torch.Tensor | None = None  # the LoRA dropout kernels' seeds, new before each replay
        self.eager_reason: str | None = None  # found at warm-up: this layer runs without graphs
        self.statics: dict[Any, _Static] = {}  # keyword path -> the static buffer this layer's graphs read
        self.pending: weakref.ref | None = None  # the autograd node of a replayed forward, until its backward
        self.state: tuple = ()  # what the graphs baked in at capture (`_state_of`)
        self.grads_missing: list[bool] = []
        self.needs_x = True  # x's gradient is made (not for a frozen embedding's output)

    # ---------------------------------------------------------------- forward

    def forward(self, fn: Callable, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        layer = self.layer_ref()
        if self.eager_reason is not None:
            return _eager(self.owner, fn, x, kwargs)
        static_kwargs = self.shared.static_kwargs(self.statics, kwargs, self.owner.forwards)
        if static_kwargs is None:  # layers that shared a keyword tensor at capture get different ones now
            self.owner.stale = True  # captured again from the next forward on
            return _eager(self.owner, fn, x, kwargs)
        if self.fwd is None:
            self._capture_forward(fn, x, static_kwargs, layer)
            if self.eager_reason is not None:
                return _eager(self.owner, fn, x, kwargs)
        if _needs_grad(x) and not self.needs_x:  # captured for an input that needed no gradient
            self.owner.stale = True  # captured again from the next forward on
            return _eager(self.owner, fn, x, kwargs)
        if self.seeds is not None:
            self.seeds.random_(0, 2**62)
        if x.data_ptr() != self.x_buf.data_ptr():
            self.x_buf.copy_(x)
        return _Replay.apply(self, x, *self.params)

    def _capture_forward(self, fn, x, static_kwargs, layer) -> None:
        shared, owner = self.shared, self.owner
        # slot i: layer i's input and checkpoint, which layer i-1's graph writes; outside the graphs' pool,
        # so that pool holds scratch only and is all free between replays (no fragments of kept tensors)
        self.x_buf = shared.slots.get(self.index)
        if self.x_buf is None:
            self.x_buf = shared.slots[self.index] = torch.empty_like(x, memory_format=torch.contiguous_format)
        if x.data_ptr() != self.x_buf.data_ptr():
            self.x_buf.copy_(x)
        self.out = shared.slots[self.index + 1] = torch.empty_like(self.x_buf)
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.state = _state_of(layer)
        if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in layer.modules()):
            self.seeds = torch.zeros(_MAX_GROUPS, dtype=torch.int64, device=x.device)
            fn = functools.partial(_seeded, fn, self.seeds)  # forward and recompute draw the same masks

        self.needs_x = _needs_grad(x)

        def body():
            leaf = _alias(self.x_buf).requires_grad_(self.needs_x)
            with torch.enable_grad(), kernels.adapter_copies(fresh=True):
                if owner.checkpointing:
                    y = checkpoint(fn, leaf, use_reentrant=False, preserve_rng_state=False, **static_kwargs)
                else:
                    y = fn(leaf, **static_kwargs)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"a decoder layer returned {type(y).__name__}, not a tensor")
            return leaf, y

        torch_dropouts = kernels.TORCH_DROPOUT_CALLS
        with shared.side_stream():  # warm up: compile, autotune, cuBLAS handles for this stream
            leaf, y = body()
            if y.shape != x.shape or y.dtype != x.dtype:
                raise TypeError(f"a decoder layer returned {tuple(y.shape)} {y.dtype} for {tuple(x.shape)} {x.dtype}")
            torch.autograd.grad(y, self._wrt(leaf), torch.ones_like(y), allow_unused=True)
            del leaf, y
        if kernels.TORCH_DROPOUT_CALLS != torch_dropouts:
            self.eager_reason = "LoRA dropout outside the Triton kernels (torch's masks: a recompute would differ)"
            return
        global _CAPTURES
        _CAPTURES += 1

        def forward_graph():
            self.x_leaf, self.y = body()
            self.out.copy_(self.y)
            if self.y._base is None and self.y.untyped_storage().nbytes() == self.y.numel() * self.y.element_size():
                # backward needs y's autograd graph, not its values (the last op, a residual add, saves
                # none of its output): its pool memory is free from here on, for the captures to come
                self.y.untyped_storage().resize_(0)

        self.fwd = shared.capture(forward_graph)

    # ---------------------------------------------------------------- backward

    def backward(self, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        shared = self.shared
        if shared.grad_x is None:
            shared.grad_x = [torch.empty_like(self.out) for _ in range(2)]
        g_in, g_out = shared.grad_x[(self.index + 1) % 2], shared.grad_x[self.index % 2]
        if g.data_ptr() != g_in.data_ptr():
            g_in.copy_(g)
        flat = self._param_grads()
        if self.bwd is None:
            self._capture_backward(g_in, g_out, flat)
        self.bwd.replay()
        out = flat.clone()
        grads, start = [], 0
        for p, missing in zip(self.params, self.grads_missing, strict=True):
            n = p.numel()
            grads.append(None if missing else out[start : start + n].view(p.shape).to(p.dtype))
            start += n
        return (g_out.detach() if self.needs_x else None), grads

    def _wrt(self, leaf: torch.Tensor) -> list[torch.Tensor]:
        """What B differentiates: the layer's trainable parameters, and its input where that needs a gradient."""
        return [leaf, *self.params] if self.needs_x else list(self.params)

    def _param_grads(self) -> torch.Tensor:
        shared = self.shared
        layout = tuple((tuple(p.shape), p.dtype) for p in self.params)
        flat = shared.grad_params.get(layout)
        if flat is None:
            flat = shared.grad_params[layout] = torch.empty(sum(p.numel() for p in self.params),
                                                            dtype=torch.float32, device=self.out.device)
        return flat

    def _capture_backward(self, g_in, g_out, flat) -> None:
        shared = self.shared
        global _CAPTURES
        _CAPTURES += 1

        def backward_graph():
            with kernels.adapter_copies(fresh=True):
                grads = torch.autograd.grad(self.y, self._wrt(self.x_leaf), g_in, allow_unused=True)
            if self.needs_x:
                g_out.copy_(grads[0])
                grads = grads[1:]
            start = 0
            self.grads_missing = []
            for p, grad in zip(self.params, grads, strict=True):
                n = p.numel()
                self.grads_missing.append(grad is None)
                if grad is not None:
                    flat[start : start + n].copy_(grad.reshape(-1))
                start += n
            self.y = self.x_leaf = None  # the autograd graph F's capture built was consumed here

        self.bwd = shared.capture(backward_graph)


def _needs_grad(x: torch.Tensor) -> bool:
    """Whether a layer's input gradient goes anywhere: layer 0's input is a frozen embedding's output, a
    leaf (transformers' `enable_input_require_grads` hook only marks it requires_grad, for reentrant
    checkpointing): B then makes no gradient for it (its base-weight GEMMs, ~1% of an 8B step)."""
    return x.requires_grad and x.grad_fn is not None


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor on t's memory with a version counter of its own (a view or detach() shares t's): the
    copies into a static input are not in-place changes of the tensor a graph's autograd saved."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                t.shape, t.stride())


_MAX_GROUPS = 16
"""Seeds per layer: fused LoRA groups with dropout in one decoder layer (4 in a Llama layer)."""


def _seeded(fn: Callable, seeds: torch.Tensor, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with kernels.dropout_seeds(seeds):
        return fn(x, **kwargs)


class _Replay(torch.autograd.Function):
    """One graphed layer for autograd: forward replays F, backward replays B."""

    @staticmethod
    def forward(ctx, runner: _LayerGraphs, x, *params):
        runner.fwd.replay()
        ctx.runner = runner
        runner.pending = weakref.ref(ctx)
        return runner.out.detach()

    @staticmethod
    def backward(ctx, g):
        ctx.runner.pending = None
        grad_x, grads = ctx.runner.backward(g)
        return (None, grad_x, *grads)


def _refusal(layer: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why this training call of `layer` cannot replay a graph, or None."""
    if args:
        return "positional arguments beyond the input"
    adapters = {id(m.lora_dropout) for m in layer.modules() if hasattr(m, "lora_dropout")}
    if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training and id(m) not in adapters for m in layer.modules()):
        return "dropout outside the LoRA adapters (a graph would replay one mask)"
    for value in kwargs.values():
        parts = value if isinstance(value, (tuple, list)) else (value,)
        if not all(v is None or isinstance(v, (torch.Tensor, bool, int, float, str)) for v in parts):
            return f"a keyword argument of type {type(value).__name__}"
    return None


def owner_forward(owner: _ModelGraphs, index: int, fn: Callable, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Layer `index` of `owner` on `x`: through its graphs, captured first where needed."""
    if index == 0:
        owner.forwards += 1
        # two forwards before one backward (a DPO pair): the second must not overwrite what the first's
        # backward reads, so it runs eagerly
        owner.bypass = owner.pending()
    if owner.bypass:
        return _eager(owner, fn, x, kwargs)
    signature = _signature_of(x, kwargs)
    if index == 0 and owner.shared is not None and owner.shared.signature == signature and not owner.current():
        owner.shared = None  # a layer changed since its capture (weights, scaling, dropout): capture all again
    if owner.shared is None or owner.shared.signature != signature:
        if index != 0 or owner.off_reason is not None:
            return _eager(owner, fn, x, kwargs)  # graphs are captured from layer 0 on, in order
        owner.reset(x.device, signature)
        if owner.shared is None:
            return _eager(owner, fn, x, kwargs)
    return owner.runners[index].forward(fn, x, kwargs)


def _eager(owner: _ModelGraphs, fn: Callable, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if owner.checkpointing:
        return checkpoint(fn, x, use_reentrant=False, **kwargs)
    return fn(x, **kwargs)


def _graphed_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    owner, index, fn = self._lora_dist_graphs
    if not (self.training and torch.is_grad_enabled()):
        return fn(hidden_states, *args, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}  # as transformers' checkpointing
    if args:
        return checkpoint(fn, hidden_states, *args, use_reentrant=False, **kwargs) if owner.checkpointing \
            else fn(hidden_states, *args, **kwargs)
    if not (hidden_states.is_cuda or _RERUN_OFF_CUDA) or _refusal(self, args, kwargs) is not None:
        return _eager(owner, fn, hidden_states, kwargs)
    return owner_forward(owner, index, fn, hidden_states, kwargs)


def enable_layer_graphs(layers: nn.ModuleList, checkpointing: bool) -> None:
    """Run each decoder layer of `layers` through CUDA graphs where it can (see the module docstring).

    Replaces the model's own per-layer checkpointing when `checkpointing` (the layers'
    `gradient_checkpointing` flags are turned off: the graphs checkpoint). Call after
    `families.patch_model_for_speed`; layers checkpointed in blocks or offloaded are refused.

    Raises:
        ValueError: a layer is checkpointed in blocks, offloaded, or already graphed.
    """
    for layer in layers:
        if getattr(layer, "_lora_dist_blocks", False) or hasattr(layer, "_lora_dist_offloader"):
            raise ValueError("CUDA graphs replay per-layer checkpointing: turn block checkpointing and "
                             "activation offload off, or the graphs")
        if hasattr(layer, "_lora_dist_graphs"):
            raise ValueError("CUDA graphs are already enabled on these layers")
    owner = _ModelGraphs(list(layers), checkpointing)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = False  # the graphs checkpoint (transformers would wrap them)
        layer._lora_dist_graphs = (owner, index, layer.forward)
        layer.forward = types.MethodType(_graphed_layer_forward, layer)


def scratch_bytes() -> int:
    """Free bytes in CUDA graphs' private memory pools: the scratch replays write into, which
    `torch.cuda.max_memory_allocated` does not count (a replay allocates nothing)."""
    if not torch.cuda.is_available():
        return 0
    return sum(s["total_size"] - s["allocated_size"] for s in torch.cuda.memory_snapshot()
               if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def peak_bytes(device: torch.device | None = None) -> int:
    """The allocator's peak on `device` plus the graphs' scratch: what a step replaying graphs holds at
    most (after a reset taken once the graphs were captured: a capture allocates that scratch itself)."""
    return torch.cuda.max_memory_allocated(device) + scratch_bytes()
