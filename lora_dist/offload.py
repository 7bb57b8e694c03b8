"""Activation offload: per-layer checkpointing whose saved layer inputs wait in host memory.

With per-layer activation checkpointing the GPU keeps one (B, T, d) input per decoder layer for
the backward pass to recompute from: 32 layers x 4 x 2048 tokens x 4096 x bf16 is 2 GiB on a
Llama-3-8B. `enable_activation_offload` checkpoints each decoder layer itself and copies its input
to (pinned) host memory on a side CUDA stream while the layer computes; backward copies each
input back one layer ahead (layer i-1's input travels while layer i recomputes and back-props),
so the GPU holds about two layer inputs instead of all of them.

The checkpointing is torch's own non-reentrant `torch.utils.checkpoint` (same recompute, RNG
and autocast handling, same early stop as the model's own checkpointing): the only change is
that the layer input reaches the checkpointed function through an `OffloadedInput` (a plain
object, which checkpoint keeps as is) instead of as a tensor argument (which it would keep on
the GPU). The copies are exact, so loss and gradients equal the model's own checkpointing bit
for bit.

With `save_attention` (fused path; off by default here, on in the job, `model.offload_attention`, and in
`lora-dist bench --activation-offload on`) the attention block of each layer is not checkpointed at
all: `ActivationOffloader.saving` copies every tensor its autograd graph saves (the input, q/k/v, the
attention output) to host memory through saved-tensor hooks, one copy per storage, and backward copies
the block's tensors back one entry ahead, as layer inputs are. Its backward then recomputes nothing (no
q/k/v GEMMs, no attention forward), for about 3.5x the copies of the block's input alone (on Llama-3-8B,
~5 GiB more each way per step).

Stream order (CUDA): the forward copy waits for the compute stream (the input exists) and the
input's memory is not reused before the copy has read it (`record_stream`); a backward copy
lands in memory allocated on the compute stream, after the work queued there (whose tensors
that memory may have held), and the compute stream waits for it before the recompute reads it.
On the CPU the same code copies synchronously, so CPU tests run this module's bookkeeping.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CACHE_KWARGS = ("use_cache", "cache", "past_key_values", "layer_past")


@dataclass
class OffloadStats:
    """Counters of one offloader (read by tests and the bench)."""

    saved: int = 0  # layer inputs copied to the target
    prefetched: int = 0  # copied back ahead of their layer's backward
    fetched_on_demand: int = 0  # copied back when their layer's backward asked (the last layer's)
    resident: int = 0  # copies back on the device now
    max_resident: int = 0


class OffloadedInput:
    """One decoder layer's input: live during the forward, then a host copy, then a device copy."""

    __slots__ = (
        "__weakref__",
        "device",
        "device_copy",
        "host",
        "offloader",
        "previous",
        "ready",
        "requires_grad",
        "source",
    )

    def __init__(self, offloader: ActivationOffloader, x: torch.Tensor, previous: OffloadedInput | None):
        self.offloader = offloader
        self.source: torch.Tensor | None = x  # held only until the layer's forward has run
        self.device = x.device
        self.host: torch.Tensor | None = None
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the device copy has landed
        self.requires_grad = x.requires_grad
        # the layer before this one, prefetched when this one's backward starts; weak, so a graph
        # that is dropped without a backward takes its inputs with it
        self.previous = weakref.ref(previous) if previous is not None else None

    def tensor(self) -> torch.Tensor:
        """The input for the checkpointed function: the live tensor in the forward, the copy back in
        the recompute (detached, with the forward's requires_grad, as checkpoint treats its inputs)."""
        if self.source is not None:
            return self.source
        return self.offloader.load(self)


class SavedGroup:
    """The tensors one block saved for backward (`ActivationOffloader.saving`): one host copy per storage.

    A saved tensor is replaced by (storage, dtype, shape, stride, offset): tensors sharing a storage (a
    reshaped input, q/k/v split from one projection) travel once and share it again when they are back.
    """

    __slots__ = ("__weakref__", "device", "device_storages", "keep", "live", "offloader", "previous", "ready",
                 "storages", "unpacked")

    def __init__(self, offloader: ActivationOffloader, previous: OffloadedInput | SavedGroup | None,
                 keep: frozenset[int] = frozenset()):
        self.offloader = offloader
        self.previous = weakref.ref(previous) if previous is not None else None
        self.keep = keep  # storage addresses that stay (the block's other inputs: alive anyway)
        self.device: torch.device | None = None  # the first offloaded tensor's; tensors elsewhere stay
        self.storages: dict[int, torch.Tensor] = {}  # storage address at save -> its host copy
        # the offloaded tensors and their versions at save, held until the block's forward ends: no address
        # is reused inside the block, and a tensor changed in place after its save is found there
        self.live: list[tuple[torch.Tensor, int]] = []
        self.device_storages: dict[int, torch.Tensor] | None = None  # the host copies back on the device
        self.ready: torch.cuda.Event | None = None
        self.unpacked = False

    def pack(self, t: torch.Tensor) -> torch.Tensor | tuple:
        """Autograd's pack hook: t itself where it stays, else its place in a storage copied to the target."""
        size = t.numel() * t.element_size()
        storage = t.untyped_storage()
        # kept as autograd keeps it: parameters and their views, the block's other inputs, small tensors,
        # and views of a much larger storage (detached: returned as is, an output saved by its own op
        # would hold itself through its grad_fn)
        if (isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or storage.data_ptr() in self.keep
                or size < self.offloader.min_bytes or storage.nbytes() > 4 * size
                or (self.device is not None and t.device != self.device)):
            return t.detach()
        self.device = t.device
        return self.offloader._copy_group_out(self, t)

    def check_unchanged(self) -> None:
        """Raise if a tensor was changed in place after its save (autograd's own check is off under hooks)."""
        for t, version in self.live:
            if t._version != version:
                raise RuntimeError("a tensor saved for backward was changed in place inside an offloaded attention "
                                   "block (its saved tensors are copied to host memory when saved): set "
                                   "model.offload_attention=false (bench: --offload-attention off; "
                                   "ActivationOffloader(save_attention=False)) for this model")

    def unpack(self, packed: torch.Tensor | tuple) -> torch.Tensor:
        """Autograd's unpack hook: the tensor again, on the device (the group's copies back started here if no
        prefetch did, and the entry before this block's starts its own)."""
        if isinstance(packed, torch.Tensor):
            return packed
        offloader = self.offloader
        if self.device_storages is None:
            offloader._copy_group_back(self)
            offloader.stats.fetched_on_demand += 1
        if not self.unpacked:  # its first tensor: handed to autograd, and the entry before starts back
            self.unpacked = True
            offloader.stats.resident -= 1
            if self.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready)
            offloader._prefetch(self.previous)
        key, dtype, shape, stride, offset = packed
        storage = self.device_storages[key].untyped_storage()
        return torch.empty(0, dtype=dtype, device=self.device).set_(storage, offset, shape, stride)

    def waiting(self) -> bool:
        """Copied out, not yet back."""
        return bool(self.storages) and self.device_storages is None


class ActivationOffloader:
    """Copies checkpointed layer inputs to `target` and back, one layer ahead in backward.

    Args:
        target: where inputs wait between forward and backward (default "cpu").
        pin_memory: page-lock the host buffers (needed for copies that overlap compute); default:
            when the inputs are on CUDA and the target is the CPU.
        save_attention: the fused path's attention blocks run without checkpointing and every tensor
            their backward needs waits on the target (`saving`): their backward recomputes nothing
            (no q/k/v GEMMs, no attention forward) for about 3.5x the copies of their input alone.
        min_bytes: a saved tensor smaller than this stays where it is (`saving`).
    """

    def __init__(self, target: str | torch.device = "cpu", pin_memory: bool | None = None,
                 save_attention: bool = False, min_bytes: int = 2**20):
        self.target = torch.device(target)
        self.pin_memory = pin_memory
        self.save_attention = save_attention
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._last: weakref.ReferenceType[OffloadedInput | SavedGroup] | None = None

    # ---------------------------------------------------------------------------- forward side

    @torch.no_grad()  # copies of data, not steps of the graph
    def save(self, x: torch.Tensor) -> OffloadedInput:
        """Start copying `x` to the target; the returned handle holds `x` until `release_source`."""
        saved = OffloadedInput(self, x, self._last() if self._last is not None else None)
        saved.host = self._copy_out(x)
        self._last = weakref.ref(saved)
        self.stats.saved += 1
        return saved

    @staticmethod
    def release_source(saved: OffloadedInput) -> None:
        """The layer's forward has run: drop the device input (its copy is on the way)."""
        saved.source = None

    # ---------------------------------------------------------------------------- backward side

    def load(self, saved: OffloadedInput) -> torch.Tensor:
        """The device copy of `saved` for its recompute; starts the copy back of the layer before."""
        if saved.device_copy is None:
            if saved.host is None:
                raise RuntimeError("an offloaded layer input was read twice: backward through the same graph "
                                   "twice (retain_graph=True) is not supported with activation offload")
            self._copy_back(saved)
            self.stats.fetched_on_demand += 1
        x = saved.device_copy
        if saved.ready is not None:
            torch.cuda.current_stream(x.device).wait_event(saved.ready)
        self._prefetch(saved.previous)  # overlaps with this layer's recompute and backward
        # the recompute is the only reader: checkpoint keeps what it needs as saved tensors
        saved.device_copy, saved.ready = None, None
        self.stats.resident -= 1
        return x.detach().requires_grad_(saved.requires_grad)

    def _prefetch(self, previous: weakref.ReferenceType | None) -> None:
        """Start copying back the entry saved before this one (a layer input or a block's saved tensors)."""
        entry = previous() if previous is not None else None
        if entry is None:
            return
        if isinstance(entry, SavedGroup):
            if entry.waiting():
                self._copy_group_back(entry)
                self.stats.prefetched += 1
        elif entry.host is not None and entry.device_copy is None:
            self._copy_back(entry)
            self.stats.prefetched += 1

    @torch.no_grad()
    def _copy_back(self, saved: OffloadedInput) -> None:
        buf = self._copy_in(saved.host, saved.device)
        saved.ready = self._landed(saved.device)
        # dropping the host buffer now is safe: torch's pinned-memory cache hands it out again only once
        # the copies that use it have finished
        saved.device_copy, saved.host = buf, None
        self._count_resident()

    # ---------------------------------------------------------------------------- saved tensors of a block

    @contextlib.contextmanager
    def saving(self, keep: Sequence[torch.Tensor] = ()) -> Iterator[SavedGroup]:
        """Inside, each tensor autograd saves for backward (from `min_bytes` up, not a parameter or a view of
        one, not sharing storage with `keep`: the block's other inputs, alive anyway) is copied to the
        target and its device memory let go; backward copies the block's tensors back on first need, or
        one entry ahead (the entry before it, as layer inputs are)."""
        keep_storages = frozenset(t.untyped_storage().data_ptr() for t in keep if isinstance(t, torch.Tensor))
        group = SavedGroup(self, self._last() if self._last is not None else None, keep_storages)
        try:
            with torch.autograd.graph.saved_tensors_hooks(group.pack, group.unpack):
                yield group
            group.check_unchanged()
        finally:
            group.live = []  # the device memory goes once its copies have read it (record_stream)
        if group.storages:
            self._last = weakref.ref(group)
            self.stats.saved += 1

    @torch.no_grad()
    def _copy_group_out(self, group: SavedGroup, t: torch.Tensor) -> tuple[int, torch.dtype, torch.Size, tuple, int]:
        """Start the copy of t's storage to the target (once per storage in a group); t's place in it."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in group.storages:
            data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))
            group.storages[key] = self._copy_out(data)
        group.live.append((t, t._version))
        return key, t.dtype, t.shape, t.stride(), t.storage_offset()

    @torch.no_grad()
    def _copy_group_back(self, group: SavedGroup) -> None:
        device = group.device
        back = {key: self._copy_in(host, device) for key, host in group.storages.items()}
        group.ready = self._landed(device)
        group.device_storages, group.storages = back, {}
        self._count_resident()

    # ---------------------------------------------------------------------------- copies

    def _copy_out(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor on the target that x's values are on their way into (CUDA: on the side stream)."""
        pin = self.pin_memory if self.pin_memory is not None else (x.is_cuda and self.target.type == "cpu")
        host = torch.empty_like(x, device=self.target, pin_memory=pin)
        if x.is_cuda:
            side = self._side_stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))  # x has been computed
            with torch.cuda.stream(side):
                host.copy_(x, non_blocking=True)
            x.record_stream(side)  # x's memory is not handed out again before the copy has read it
        else:
            host.copy_(x)
        return host

    def _copy_in(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A new tensor on `device` that host's values are on their way into (CUDA: on the side stream)."""
        # allocated here, on the compute stream, so it is freed (and reused) in that stream's order
        buf = torch.empty_like(host, device=device)
        if device.type == "cuda":
            side = self._side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))  # buf's memory may still be read by queued work
            with torch.cuda.stream(side):
                buf.copy_(host, non_blocking=True)
            buf.record_stream(side)  # freed unread (a backward that stops early): not reused before it lands
        else:
            buf.copy_(host)
        return buf

    def _landed(self, device: torch.device) -> torch.cuda.Event | None:
        """An event after every copy queued so far on `device`'s side stream (None off CUDA)."""
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(self._side_stream(device))
        return event

    def _count_resident(self) -> None:
        self.stats.resident += 1
        self.stats.max_resident = max(self.stats.max_resident, self.stats.resident)

    # ---------------------------------------------------------------------------- plumbing

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def anchor(self, device: torch.device) -> torch.Tensor:
        """A zero-size tensor on `device`: checkpoint's one top-level tensor argument, so it stashes that
        device's RNG state (dropout in the recompute draws the forward's masks) and keeps nothing large."""
        t = self._anchors.get(device)
        if t is None:
            t = self._anchors[device] = torch.empty(0, device=device)
        return t


def offloaded_checkpoint(fn: Callable[..., torch.Tensor], x: torch.Tensor, offloader: ActivationOffloader,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
    """`torch.utils.checkpoint(fn, x, *args, **kwargs)`, non-reentrant, with `x` kept on the offload target.

    Only `x` is offloaded: other tensor arguments (a layer's cos/sin, position ids, masks) are
    kept as checkpoint keeps them.
    """
    saved = offloader.save(x)
    try:
        out = checkpoint(_call_with_input, fn, saved, offloader.anchor(x.device), args, kwargs, use_reentrant=False)
    finally:
        offloader.release_source(saved)
    return out


def _call_with_input(fn, saved: OffloadedInput, _anchor: torch.Tensor, args, kwargs):
    return fn(saved.tensor(), *args, **kwargs)


# ------------------------------------------------------------------------------------ model wiring


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM, wrapped or not (a multimodal one's language model)."""
    from lora_dist.loading import decoder_layers

    layers = decoder_layers(model)
    if layers is not None:
        return layers
    raise TypeError(
        f"activation offload needs a Hugging Face causal LM with decoder layers (get_decoder().layers: the "
        f".model.layers of Llama, Mistral, Qwen2 and the like), got {type(model).__name__}; turn activation "
        f"offload off for this model"
    )


def _offloaded_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    if not (self.training and torch.is_grad_enabled()):
        return self._lora_dist_offload_original(hidden_states, *args, **kwargs)
    # as the model's own checkpointing does: a KV cache is written once, never in a recompute
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    return offloaded_checkpoint(self._lora_dist_offload_original, hidden_states, self._lora_dist_offloader,
                                *args, **kwargs)


def enable_activation_offload(model: nn.Module, target: str | torch.device = "cpu",
                              pin_memory: bool | None = None, save_attention: bool = False) -> ActivationOffloader:
    """Checkpoint every decoder layer of `model` with its input offloaded to `target`, in place.

    Replaces the model's own per-layer checkpointing (leave `gradient_checkpointing_enable` off):
    in training with gradients on, each decoder layer runs under non-reentrant checkpointing and
    its input waits on `target`; in eval or under no_grad the layers run as before. A layer that
    `families.patch_model_for_speed` patches after this (as the job and the bench do), or patched
    before with `block_checkpointing=True`, is checkpointed as two blocks, attention and MLP, each
    with its input offloaded.

    Args:
        model: a LoRAModel or a Hugging Face causal LM with `.model.layers`.
        target: where inputs wait (default "cpu").
        pin_memory, save_attention: see `ActivationOffloader`.

    Returns:
        The offloader (its `stats` count copies).

    Raises:
        TypeError: the model has no decoder layers this knows.
        ValueError: the model's own checkpointing is on, or offload is already enabled.
    """
    layers = _decoder_layers(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError("activation offload checkpoints each decoder layer itself: turn the model's own "
                         "gradient checkpointing off (gradient_checkpointing_disable()) first")
    offloader = ActivationOffloader(target, pin_memory, save_attention)
    for layer in layers:
        if hasattr(layer, "_lora_dist_offloader"):
            raise ValueError("activation offload is already enabled on this model")
        layer._lora_dist_offloader = offloader
        if getattr(layer, "_lora_dist_blocks", False):
            continue  # families' block checkpointing: it offloads each block's input with this offloader
        layer._lora_dist_offload_original = layer.forward
        layer.forward = types.MethodType(_offloaded_layer_forward, layer)
    return offloader

