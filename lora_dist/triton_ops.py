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

import math

import torch
import triton
import triton.language as tl

_GELU_C = math.sqrt(2.0 / math.pi)
_BLOCK = 1024


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
