"""Hand-written Triton kernels for what torch.compile does not do as we need it (CUDA only).

Imported by `kernels` only when a CUDA tensor needs one (Triton ships with CUDA builds of torch, not
with the CPU build CI runs); the CPU runs the same math through plain torch functions in `kernels`.

- `gated_backward_(g, gate, up, gelu)`: the backward of act(gate) * up written over gate and up in
  one pass. Each element's d_gate and d_up need both old values; a kernel that loads both before it
  stores either needs no temporary by construction, where a compiled in-place torch function leaves
  that to inductor's scheduling (not isolated: on the H200 the step's peak is elsewhere, at the
  recompute and the down projection's backward, and did not move with this kernel).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

_GELU_C = math.sqrt(2.0 / math.pi)
_BLOCK = 1024
_ROWS = 32  # quantization blocks per program of the 4-bit dequantize (2,048 values at blocksize 64)


@triton.jit
def _gated_backward_kernel(g_ptr, gate_ptr, up_ptr, n_cols, g_stride, gate_stride, up_stride,
                           GELU: tl.constexpr, GELU_C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=keep, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + row * gate_stride + cols, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=keep, other=0.0).to(tl.float32)
    if GELU:  # gelu_tanh(a) = a/2 (1 + tanh(c (a + 0.044715 a^3)))
        t = 2.0 * tl.sigmoid(2.0 * GELU_C * (a + 0.044715 * a * a * a)) - 1.0  # tanh
        act = 0.5 * a * (1.0 + t)
        d_act = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * a * a)
    else:  # silu(a) = a sigmoid(a)
        s = tl.sigmoid(a)
        act = a * s
        d_act = s * (1.0 + a * (1.0 - s))
    tl.store(gate_ptr + row * gate_stride + cols, (g * u * d_act).to(gate_ptr.dtype.element_ty), mask=keep)
    tl.store(up_ptr + row * up_stride + cols, (g * act).to(up_ptr.dtype.element_ty), mask=keep)


def gated_backward_(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> None:
    """Overwrite gate with d(act(gate) * up)/d gate * g and up with act(gate) * g (fp32 math, one pass).

    Args:
        g: (..., I) gradient of the output, contiguous.
        gate, up: (..., I) the forward's inputs; rows may be strided (Phi-3's halves of gate_up),
            elements within a row contiguous.
        gelu: tanh-GELU gate (Gemma) instead of SiLU.
    """
    n = gate.shape[-1]
    g2, gate2, up2 = (t.view(-1, n) for t in (g, gate, up))  # views: raises rather than copying
    grid = (g2.shape[0], triton.cdiv(n, _BLOCK))
    _gated_backward_kernel[grid](g2, gate2, up2, n, g2.stride(0), gate2.stride(0), up2.stride(0),
                                 GELU=gelu, GELU_C=_GELU_C, BLOCK=_BLOCK)


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            ROWS: tl.constexpr):
    # ROWS quantization blocks per program, one row each: a block's scale is loaded once, each byte
    # once, and its two values written side by side (the even element from the high 4 bits).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    first = rows[:, None] * BLOCKSIZE + 2 * tl.arange(0, BLOCKSIZE // 2)[None, :]  # each byte's even element
    byte = tl.load(packed_ptr + first // 2, mask=first < n, other=0).to(tl.int32)
    values = tl.join(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))  # (ROWS, BLOCKSIZE/2, 2)
    in_rows = rows * BLOCKSIZE < n
    if NESTED:  # bitsandbytes' double quant: absmax = code2[q] * absmax2[block of 256] + offset, in fp32
        q = tl.load(absmax_ptr + rows, mask=in_rows, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + rows // BLOCKSIZE2, mask=in_rows, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + rows, mask=in_rows, other=0.0)
    idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out = tl.reshape(values, (ROWS, BLOCKSIZE)) * scale[:, None]
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=idx < n)  # rtne (default)


def dequantizes(packed: torch.Tensor, state) -> bool:
    """Whether `dequantize_4bit` takes this weight: uint8-packed NF4/FP4 with every part of its state,
    an fp32 code table included, on the weight's own device (bitsandbytes itself reads built-in tables)."""
    if packed.dtype != torch.uint8 or state.quant_type not in ("nf4", "fp4") or math.prod(state.shape) >= 2**31:
        return False  # (the kernel indexes in int32)
    parts = [state.absmax, state.code]
    if state.nested:
        parts += [state.offset, state.state2.absmax, state.state2.code]
    return (all(isinstance(t, torch.Tensor) and t.device == packed.device for t in parts)
            and state.code.dtype == torch.float32 and (not state.nested or state.state2.code.dtype == torch.float32))


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (NF4 or FP4, with or without double quant) in `dtype`, in one kernel.

    bitsandbytes runs three for a double-quantized weight (the absmax's own dequantize, + offset,
    the 4-bit dequantize): on a step bound by the host, launches count. The arithmetic is theirs,
    op for op in fp32 (code2[q] * absmax2, then + offset, then code[nibble] * absmax; no fused
    multiply-add), so in the state's dtype (or in any dtype from an fp32 state) the result is
    bitsandbytes' bit for bit (`tests/test_kernels.py` checks). CUDA tensors only (`dequantizes`).

    Args:
        packed: the packed uint8 data (two values per byte, the first in the high 4 bits).
        state: its bitsandbytes QuantState (absmax, code, blocksize, shape; state2 and offset if nested).
        dtype: the output dtype.
    """
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n = out.numel()
    nested = bool(state.nested)
    absmax2 = state.state2.absmax if nested else state.absmax  # (unused pointers where not nested)
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.absmax
    grid = (triton.cdiv(triton.cdiv(n, state.blocksize), _ROWS),)
    other = packed.is_cuda and packed.device.index != torch.cuda.current_device()
    with torch.cuda.device(packed.device) if other else contextlib.nullcontext():  # Triton launches on the current one
        _dequantize_4bit_kernel[grid](packed, state.absmax, state.code, absmax2, code2, offset, out, n,
                                      BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.state2.blocksize if nested else 1,
                                      NESTED=nested, ROWS=_ROWS, enable_fp_fusion=False)
    return out
