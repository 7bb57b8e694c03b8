"""Hand-written Triton kernels for what torch.compile does not do as we need it (CUDA only).

Imported by `kernels` only when a CUDA tensor needs one (Triton ships with CUDA builds of torch, not
with the CPU build CI runs); the CPU runs the same math through plain torch functions in `kernels`.

- `gated_backward_(g, gate, up, gelu)`: the backward of act(gate) * up written over gate and up in
  one pass. Each element's d_gate and d_up need both old values; a kernel that loads both before it
  stores either needs no temporary by construction, where a compiled in-place torch function leaves
  that to inductor's scheduling (not isolated: on the H200 the step's peak is elsewhere, at the
  recompute and the down projection's backward, and did not move with this kernel).
- `dequantize_4bit` / `DequantizePlan`: a bitsandbytes NF4/FP4 weight in one kernel, the plan launching
  it again without Triton's JIT binding.
- `rmsnorm`, `gated_forward`: the forwards `kernels` ran through torch.compile, whose per-call host
  cost bound small steps; launched through cached runners (`_Runners`).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

_GELU_C = math.sqrt(2.0 / math.pi)
_BLOCK = 1024
_ROWS = 32  # quantization blocks per program of the 4-bit dequantize (2,048 values at blocksize 64)


class _Runners:
    """Launches of one JIT kernel: the first per key through Triton's JIT, later ones straight through the
    compiled kernel's runner (Triton >= 3.3: `CompiledKernel[grid]`, every argument, constexprs included).

    The caller's key must hold what Triton specializes on (integer arguments, pointer alignment, dtypes)
    and the grid; the current device is added (a runner's kernel is loaded on the device current at its
    first launch, and launches there), so a runner only sees arguments its kernel was compiled and loaded for.
    """

    __slots__ = ("kernel", "table")

    def __init__(self, kernel) -> None:
        self.kernel, self.table = kernel, {}

    def launch(self, key: tuple, grid: tuple[int, int, int], args: tuple, constexprs: dict, **options) -> None:
        """kernel[grid](*args, **constexprs, **options), constexprs in the kernel's order after args."""
        key = (torch.cuda.current_device(), *key)
        runner = self.table.get(key)
        if runner:
            runner(*args, *constexprs.values())
            return
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if runner is None:
            try:
                self.table[key] = compiled[grid]
            except Exception:  # noqa: BLE001 -- another Triton's internals: the JIT path stays
                self.table[key] = False


def _on(device: torch.device):
    """Launch on `device`: Triton launches on the current device (a no-op where it already is)."""
    return contextlib.nullcontext() if device.index == torch.cuda.current_device() else torch.cuda.device(device)


def _aligned(*tensors: torch.Tensor) -> tuple[bool, ...]:
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def _rows_2d(t: torch.Tensor) -> torch.Tensor | None:
    """t as a (rows, cols) view with contiguous rows walked by one stride, or None (a copy would be needed)."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


@triton.jit
def _activation(a, GELU: tl.constexpr, GELU_C: tl.constexpr):
    """(act(a), act'(a)) in fp32: tanh-GELU or SiLU (a forward leaves the slope unused: compiled away)."""
    if GELU:  # gelu_tanh(a) = a/2 (1 + tanh(c (a + 0.044715 a^3)))
        t = 2.0 * tl.sigmoid(2.0 * GELU_C * (a + 0.044715 * a * a * a)) - 1.0  # tanh
        act = 0.5 * a * (1.0 + t)
        d_act = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * a * a)
    else:  # silu(a) = a sigmoid(a)
        s = tl.sigmoid(a)
        act = a * s
        d_act = s * (1.0 + a * (1.0 - s))
    return act, d_act


@triton.jit
def _gated_kernel(g_ptr, gate_ptr, up_ptr, h_ptr, n_cols, g_stride, gate_stride, up_stride,
                  BACKWARD: tl.constexpr, GELU: tl.constexpr, GELU_C: tl.constexpr, BLOCK: tl.constexpr):
    # forward: h = act(gate) * up (h contiguous; g unused); backward: d_gate, d_up over gate, up
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n_cols
    a = tl.load(gate_ptr + row * gate_stride + cols, mask=keep, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=keep, other=0.0).to(tl.float32)
    act, d_act = _activation(a, GELU, GELU_C)
    if BACKWARD:  # both old values are loaded before either is overwritten
        g = tl.load(g_ptr + row * g_stride + cols, mask=keep, other=0.0).to(tl.float32)
        tl.store(gate_ptr + row * gate_stride + cols, (g * u * d_act).to(gate_ptr.dtype.element_ty), mask=keep)
        tl.store(up_ptr + row * up_stride + cols, (g * act).to(up_ptr.dtype.element_ty), mask=keep)
    else:
        act = act.to(h_ptr.dtype.element_ty).to(tl.float32)  # as HF rounds act(gate) before the product
        tl.store(h_ptr + row * n_cols + cols, (act * u).to(h_ptr.dtype.element_ty), mask=keep)

_GATED = _Runners(_gated_kernel)


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
    m = g2.shape[0]
    if m and n:
        grid = (m, triton.cdiv(n, _BLOCK), 1)
        key = (True, m, n, g2.stride(0), gate2.stride(0), up2.stride(0), g.dtype, gate.dtype, up.dtype, gelu,
               *_aligned(g2, gate2, up2))
        with _on(gate.device):
            _GATED.launch(key, grid, (g2, gate2, up2, gate2, n, g2.stride(0), gate2.stride(0), up2.stride(0)),
                          {"BACKWARD": True, "GELU": bool(gelu), "GELU_C": _GELU_C, "BLOCK": _BLOCK})


@triton.jit
def _code_value(code_ptr, nibble, FP4: tl.constexpr):
    """A 4-bit code's value. bitsandbytes computes FP4's sign apart (a nibble's top bit): its code 8 is -0.0,
    the table holds +0.0. The sign bit is set bitwise: on the GPU a literal -0.0 and -x (0 - x) give +0.0."""
    value = tl.load(code_ptr + nibble)
    if FP4:
        value = (value.to(tl.int32, bitcast=True) | (((nibble >> 3) & 1) << 31)).to(tl.float32, bitcast=True)
    return value


@triton.jit
def _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, inside, NESTED: tl.constexpr,
                  BLOCKSIZE2: tl.constexpr):
    """Quantization block `block`'s absmax. bitsandbytes' double quant: code2[q] * absmax2[block of 256] +
    offset, in fp32 (the kernels launch without fused multiply-add, as bitsandbytes computes it)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return scale


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            FP4: tl.constexpr, ROWS: tl.constexpr):
    # ROWS quantization blocks per program, one row each: a block's scale is loaded once, each byte
    # once, and its two values written side by side (the even element from the high 4 bits). Byte
    # indices are written as row * (BLOCKSIZE / 2) + pair, which Triton sees contiguous (through
    # `element // 2` it loads byte by byte: the FP8 weight kernel's bisection on the H200).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + pairs, mask=pairs < (n + 1) // 2, other=0).to(tl.int32)  # n odd: a last half byte
    values = tl.join(_code_value(code_ptr, byte >> 4, FP4), _code_value(code_ptr, byte & 15, FP4))  # (ROWS, B/2, 2)
    scale = _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, rows * BLOCKSIZE < n, NESTED,
                          BLOCKSIZE2)
    idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out = tl.reshape(values, (ROWS, BLOCKSIZE)) * scale[:, None]
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=idx < n)  # rtne (default)


def dequantizes(packed: torch.Tensor, state) -> bool:
    """Whether `dequantize_4bit` takes this weight: uint8-packed NF4/FP4 with every part of its state,
    an fp32 code table included, on the weight's own device (bitsandbytes itself reads built-in tables)."""
    if packed.dtype != torch.uint8 or state.quant_type not in ("nf4", "fp4"):
        return False
    if math.prod(state.shape) + _ROWS * state.blocksize > 2**31:
        return False  # the kernel indexes in int32 (the FP8 kernel's padding rows may wrap: masked, never touched)
    parts = [state.absmax, state.code]
    if state.nested:
        parts += [state.offset, state.state2.absmax, state.state2.code]
    return (all(isinstance(t, torch.Tensor) and t.device == packed.device for t in parts)
            and state.code.dtype == torch.float32 and (not state.nested or state.state2.code.dtype == torch.float32))


class DequantizePlan:
    """`dequantize_4bit(packed, state, dtype)` made ready once for a weight that is dequantized again and again.

    The first call launches through Triton's JIT (which compiles, or finds, the kernel specialized for
    these tensors); later calls launch that compiled kernel directly with the same arguments and a new
    output, skipping the JIT's per-launch argument binding and specialization (tens of microseconds of
    host time, paid ~600 times per Llama-3-8B step). Falls back to `dequantize_4bit` where Triton's
    compiled kernel has no direct launcher (`fast` stays False). The caller keeps one plan per
    (weight, dtype) and makes a new one when the weight's data or state object changes.
    """

    __slots__ = ("args", "device", "dtype", "fast", "packed", "runner", "shape", "state")

    def __init__(self, packed: torch.Tensor, state, dtype: torch.dtype) -> None:
        self.packed, self.state, self.dtype = packed, state, dtype
        self.shape, self.device = tuple(state.shape), packed.device
        self.runner, self.args, self.fast = None, None, False

    def __call__(self) -> torch.Tensor:
        here = self.device.index == torch.cuda.current_device()  # the runner launches on the current device
        if self.runner and here:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            packed, absmax, code, absmax2, code2, offset, _, *rest = self.args
            self.runner(packed, absmax, code, absmax2, code2, offset, out, *rest)
            return out
        out, compiled, args, grid = _dequantize_4bit_launch(self.packed, self.state, self.dtype)
        if self.runner is None and here:
            try:  # Triton (>= 3.3)'s CompiledKernel[grid] runner takes every argument, constexprs included
                # (not this call's output: a plan must not keep a dequantized weight alive)
                self.runner, self.args = compiled[grid], (*args[:6], None, *args[7:])
                self.fast = True
            except Exception:  # noqa: BLE001 -- another Triton's internals: the JIT path stays
                self.runner = False
        return out


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
    return _dequantize_4bit_launch(packed, state, dtype)[0]


def _nested_state(state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(absmax2, code2, offset, blocksize2) of a double-quantized state; unused pointers (and 1) where not."""
    if state.nested:
        return state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize
    return state.absmax, state.code, state.absmax, 1


def _dequantize_4bit_launch(packed: torch.Tensor, state, dtype: torch.dtype):
    """dequantize_4bit through Triton's JIT: (output, compiled kernel, its arguments in order, grid)."""
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n = out.numel()
    nested = bool(state.nested)
    absmax2, code2, offset, blocksize2 = _nested_state(state)
    grid = (triton.cdiv(triton.cdiv(n, state.blocksize), _ROWS), 1, 1)
    args = (packed, state.absmax, state.code, absmax2, code2, offset, out, n,
            state.blocksize, blocksize2, nested, state.quant_type == "fp4", _ROWS)
    with _on(packed.device):
        compiled = _dequantize_4bit_kernel[grid](*args[:8], BLOCKSIZE=args[8], BLOCKSIZE2=args[9], NESTED=nested,
                                                 FP4=args[11], ROWS=_ROWS, enable_fp_fusion=False)
    return out, compiled, args, grid


# ------------------------------------------------------------------ LoRA dropout inside the A projection
#
# Layer g of a group reads dropout_g(x) = x * keep_g / (1 - p), keep_g = uniforms > p drawn by Philox from
# (seed + g, element position) (`_keep_mask`): the same mask is drawn again wherever it is needed, so no
# dropped copy of x and no mask is ever written. x @ A_g.T, A_g's gradient and x's adapter
# gradient each read x once per layer. A dropped element is rounded to x's dtype before the product, as
# torch's dropout output is.


@triton.jit
def _keep_mask(seed_ptr, g, rows, col0, n_cols, p, BK: tl.constexpr):
    """Layer g's keep mask on rows x [col0, col0 + BK) (col0 a multiple of 4): one Philox call draws four
    uniforms for four neighbouring elements (element 4q + j of a row takes lane j of counter q)."""
    quads = rows[:, None] * tl.cdiv(n_cols, 4) + col0 // 4 + tl.arange(0, BK // 4)[None, :]
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr) + g, quads)
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # (BM, BK/4, 2, 2): [.., q, i, j] is lane 2 i + j of q
    return tl.reshape(u, (rows.shape[0], BK)) > p  # [.., 4 q + 2 i + j]


@triton.jit
def _dropped_tile(x_ptr, x_stride, rows, cols, m, k, seed_ptr, g, col0, p, scale, BK: tl.constexpr):
    """Layer g's dropout of x on rows x cols ([col0, col0 + BK)), rounded to x's dtype as torch's
    dropout output is; 0 outside x."""
    inside = (rows[:, None] < m) & (cols[None, :] < k)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=0.0)
    keep = _keep_mask(seed_ptr, g, rows, col0, k, p, BK)
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)


@triton.jit
def _dropout_project_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, m, k, x_stride, a_stride, out_stride, p, scale,
                            R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    ranks = g * R + tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for k0 in range(0, k, BK):
        cols = k0 + tl.arange(0, BK)
        dropped = _dropped_tile(x_ptr, x_stride, rows, cols, m, k, seed_ptr, g, k0, p, scale, BK)
        a = tl.load(a_ptr + ranks[:, None] * a_stride + cols[None, :], mask=cols[None, :] < k, other=0.0)
        acc += tl.dot(dropped, tl.trans(a), input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None] * out_stride + ranks[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < m)


@triton.jit
def _dropout_a_grad_kernel(x_ptr, g_ptr, out_ptr, seed_ptr, m, k, x_stride, g_stride, rows_per_split, p, scale,
                           R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # program (column block, layer g, split s): rows [s * rows_per_split, (s + 1) * rows_per_split) into
    # its own partial sum, out[s] (summed after: deterministic, no atomics)
    col0 = tl.program_id(0) * BK
    cols = col0 + tl.arange(0, BK)
    g = tl.program_id(1)
    split = tl.program_id(2)
    ranks = g * R + tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    first = split * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, m), BM):
        rows = m0 + tl.arange(0, BM)
        dropped = _dropped_tile(x_ptr, x_stride, rows, cols, m, k, seed_ptr, g, col0, p, scale, BK)
        grad = tl.load(g_ptr + rows[:, None] * g_stride + ranks[None, :], mask=rows[:, None] < m, other=0.0)
        acc += tl.dot(tl.trans(grad), dropped, input_precision=PRECISION)
    out = out_ptr + split * tl.num_programs(1) * R * k
    tl.store(out + ranks[:, None] * k + cols[None, :], acc, mask=cols[None, :] < k)


@triton.jit
def _dropout_input_grad_kernel(g_ptr, a_ptr, out_ptr, seed_ptr, m, k, groups, g_stride, a_stride, p, scale,
                               R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for g in range(groups):
        ranks = g * R + tl.arange(0, R)
        grad = tl.load(g_ptr + rows[:, None] * g_stride + ranks[None, :], mask=rows[:, None] < m, other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * a_stride + cols[None, :], mask=cols[None, :] < k, other=0.0)
        keep = _keep_mask(seed_ptr, g, rows, tl.program_id(1) * BK, k, p, BK)
        acc += tl.where(keep, tl.dot(grad, a, input_precision=PRECISION) * scale, 0.0)
    tl.store(out_ptr + rows[:, None] * k + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < m) & (cols[None, :] < k))


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, g, m, k, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = _keep_mask(seed_ptr, g, rows, tl.program_id(1) * BK, k, p, BK)
    tl.store(out_ptr + rows[:, None] * k + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < m) & (cols[None, :] < k))


_DROP_BM, _DROP_BK = 64, 64


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: IEEE for fp32 (as torch's fp32 matmul, no TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def projects_with_dropout(x2: torch.Tensor, ranks: list[int]) -> bool:
    """Whether the dropout kernels take this group: rows of x with contiguous elements, their index
    within int32; equal ranks, each a multiple of 16 (the smallest tensor-core product) up to 128 (the
    A gradient's accumulator stays in registers); and all three kernels fit this GPU's shared memory
    for this dtype and rank (`_dropout_kernels_fit`: fp32 at r = 16 does not on a 100 KiB card)."""
    m, k = x2.shape
    r = ranks[0]
    return (len(set(ranks)) == 1 and r % 16 == 0 and r <= 128 and m > 0 and x2.stride(-1) == 1
            and (m - 1) * x2.stride(0) + k < 2**31 and x2.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and _dropout_kernels_fit(x2.device, x2.dtype, r))


@functools.cache
def _dropout_kernels_fit(device: torch.device, dtype: torch.dtype, r: int) -> bool:
    """Launch each dropout kernel once on a tiny input: False where one runs out of resources (shared
    memory), decided before a forward draws masks that only these kernels can draw again."""
    from triton.runtime.errors import OutOfResources

    x = torch.zeros(_DROP_BM, 2 * _DROP_BK, dtype=dtype, device=device)
    a = torch.zeros(r, 2 * _DROP_BK, dtype=dtype, device=device)
    g = torch.zeros(_DROP_BM, r, dtype=dtype, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    try:
        dropout_project(x, a, 1, 0.5, seed)
        dropout_a_grad(x, g, 1, 0.5, seed)
        dropout_input_grad(g, a, x.shape[1], 1, 0.5, seed)
    except OutOfResources:
        return False
    return True


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A seed for the masks of one group call, drawn from `device`'s generator (no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def dropout_project(x2: torch.Tensor, a_cat: torch.Tensor, groups: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """[dropout_g(x) @ A_g.T for each layer g]: (M, groups * r) in x's dtype.

    Args:
        x2: (M, K) the group's input, rows contiguous.
        a_cat: (groups * r, K) the layers' A weights in x's dtype, stacked in layer order.
        groups: how many layers (each r = a_cat.shape[0] / groups rows of a_cat).
        p: the dropout probability (0 < p < 1), the same for every layer.
        seed: the (1,) int64 seed of this call's masks (`dropout_seed`).
    """
    m, k = x2.shape
    r = a_cat.shape[0] // groups
    out = torch.empty(m, a_cat.shape[0], dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, _DROP_BM), groups)
    with _on(x2.device):
        _dropout_project_kernel[grid](x2, a_cat, out, seed, m, k, x2.stride(0), a_cat.stride(0), out.stride(0), p,
                                      1.0 / (1.0 - p), R=r, BM=_DROP_BM, BK=_DROP_BK, PRECISION=_precision(x2.dtype))
    return out


def dropout_a_grad(x2: torch.Tensor, g_xa: torch.Tensor, groups: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """[g_g.T @ dropout_g(x)]: the A weights' gradients, (groups * r, K) in fp32 (masks from `seed`).

    The sum over M rows runs in up to 8 row splits (enough programs to fill the GPU for a narrow
    group), each into its own partial, then summed."""
    m, k = x2.shape
    r = g_xa.shape[1] // groups
    col_blocks = triton.cdiv(k, 2 * _DROP_BK)
    splits = max(1, min(8, triton.cdiv(m, _DROP_BM), triton.cdiv(1024, col_blocks * groups)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), _DROP_BM) * _DROP_BM
    splits = triton.cdiv(m, rows_per_split)
    partial = torch.empty(splits, g_xa.shape[1], k, dtype=torch.float32, device=x2.device)
    with _on(x2.device):
        _dropout_a_grad_kernel[(col_blocks, groups, splits)](x2, g_xa, partial, seed, m, k, x2.stride(0),
                                                             g_xa.stride(0), rows_per_split, p, 1.0 / (1.0 - p), R=r,
                                                             BM=_DROP_BM, BK=2 * _DROP_BK,
                                                             PRECISION=_precision(x2.dtype))
    return partial[0] if splits == 1 else partial.sum(0)


def dropout_input_grad(g_xa: torch.Tensor, a_cat: torch.Tensor, k: int, groups: int, p: float,
                       seed: torch.Tensor) -> torch.Tensor:
    """sum_g dropout_g'(g_g @ A_g): x's gradient through the adapters, (M, K) in g's dtype (fp32 sums)."""
    m = g_xa.shape[0]
    r = a_cat.shape[0] // groups
    out = torch.empty(m, k, dtype=g_xa.dtype, device=g_xa.device)
    grid = (triton.cdiv(m, _DROP_BM), triton.cdiv(k, _DROP_BK))
    with _on(g_xa.device):
        _dropout_input_grad_kernel[grid](g_xa, a_cat, out, seed, m, k, groups, g_xa.stride(0), a_cat.stride(0), p,
                                         1.0 / (1.0 - p), R=r, BM=_DROP_BM, BK=_DROP_BK,
                                         PRECISION=_precision(g_xa.dtype))
    return out


def dropout_mask(m: int, k: int, g: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Layer g's keep mask (M, K) as int8 (1 kept): what the kernels above draw, for tests."""
    out = torch.empty(m, k, dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(m, _DROP_BM), triton.cdiv(k, _DROP_BK))
    with _on(seed.device):
        _dropout_mask_kernel[grid](out, seed, g, m, k, p, BM=_DROP_BM, BK=_DROP_BK)
    return out


# ------------------------------------------------------------------ RMSNorm and gated activations, forward
#
# The forwards the fused path runs ~400 times per Llama-3-8B step (the norms, their rebuilt rows in
# backward, SwiGLU and its four rebuilt chunks): as torch.compile'd functions each call costs ~200 us
# of host time in dynamo's guards and AOT autograd's wrappers, here one launch through a cached
# runner. Same arithmetic as `kernels._rmsnorm_fwd`, `_rmsnorm_apply`, `_swiglu_fwd`, `_geglu_fwd`
# (fp32 math, rounded where those round); the sum of squares is reduced in another order than
# torch's, so rstd may differ in its last bit.


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, x_stride, y_stride, eps, offset,
                    GIVEN_RSTD: tl.constexpr, FP32_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
    if GIVEN_RSTD:
        rstd = tl.load(rstd_ptr + row)
    else:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=keep, other=0.0)
    if FP32_WEIGHT:  # (offset + w) * n in fp32, rounded once
        y = (x * rstd) * (w.to(tl.float32) + offset)
    else:  # n rounded to x's dtype, the scale (w + offset) in w's dtype, their product rounded to y's
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = (w.to(tl.float32) + offset).to(w_ptr.dtype.element_ty).to(tl.float32)
        y = scale * n
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=keep)


_RMSNORM = _Runners(_rmsnorm_kernel)
_MAX_NORM_WIDTH = 16384  # one row per program, held in registers


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor | None, eps: float, offset: float,
            fp32_weight: bool):
    """`kernels._rmsnorm_fwd` (rstd None: returns (y, rstd)) or `_rmsnorm_apply` (returns y); None where
    this kernel does not take the arguments (the caller runs the torch function)."""
    d = x.shape[-1]
    x2 = _rows_2d(x)
    if (x2 is None or d > _MAX_NORM_WIDTH or weight.dim() != 1 or weight.shape[0] != d or not weight.is_contiguous()
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or weight.device != x.device
            or x.device.index != torch.cuda.current_device()):
        return None
    if rstd is not None and (rstd.numel() != x2.shape[0] or not rstd.is_contiguous() or rstd.dtype != torch.float32):
        return None
    out_dtype = x.dtype if fp32_weight else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    given = rstd is not None
    if not given:
        rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    m = x2.shape[0]
    if m:
        block = triton.next_power_of_2(d)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        key = (m, d, x2.stride(0), x.dtype, weight.dtype, out_dtype, given, fp32_weight, float(eps), float(offset),
               *_aligned(x2, weight, y, rstd))
        _RMSNORM.launch(key, (m, 1, 1), (x2, weight, y, rstd, d, x2.stride(0), d, float(eps), float(offset)),
                        {"GIVEN_RSTD": given, "FP32_WEIGHT": bool(fp32_weight), "BLOCK": block}, num_warps=warps)
    return y if given else (y, rstd)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor | None:
    """act(gate) * up (`kernels._swiglu_fwd` / `_geglu_fwd`) as a new contiguous tensor; None where this
    kernel does not take the arguments."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        return None
    gate2, up2 = _rows_2d(gate), _rows_2d(up)
    if (gate2 is None or up2 is None or gate.device.index != torch.cuda.current_device()
            or gate.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return None
    n = gate.shape[-1]
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    m = gate2.shape[0]
    if m and n:
        grid = (m, triton.cdiv(n, _BLOCK), 1)
        key = (False, m, n, gate2.stride(0), up2.stride(0), gate.dtype, gelu, *_aligned(gate2, up2, h))
        _GATED.launch(key, grid, (gate2, gate2, up2, h, n, 0, gate2.stride(0), up2.stride(0)),
                      {"BACKWARD": False, "GELU": bool(gelu), "GELU_C": _GELU_C, "BLOCK": _BLOCK})
    return h


# ------------------------------------------------------------------ FP8 e4m3 operands of the base GEMMs
#
# `kernels`' FP8 path quantizes every operand of a frozen base GEMM: x and g per row (token), a 4-bit
# weight per output feature (forward) or per input feature (backward, stored transposed). As
# torch.compile'd functions each of the ~1,000 calls of a Llama-3-8B step cost ~240 us of host time
# and a weight took three passes (dequantize to bf16, its amax, the scaled cast); here one launch
# each, and a weight goes from its packed 4-bit form to e4m3 in one pass with multipliers made once
# per weight (it is frozen). Same arithmetic as `kernels._fp8_rows_fn` / `_fp8_cols_fn` (fp32
# multiplier 448 * (1 / amax), the reciprocal correctly rounded; scale amax * fp32(1 / 448); the scaled
# value cast to e4m3): bit for bit their results (`tests/test_fp8.py` checks on the GPU).


@triton.jit
def _fp8_rows_kernel(t_ptr, q_ptr, scale_ptr, n_cols, t_stride, E4M3_MAX: tl.constexpr, INV_E4M3_MAX: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    nans = tl.zeros((BLOCK,), dtype=tl.int32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        v = tl.load(t_ptr + row * t_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        nans += (v != v).to(tl.int32)  # the hardware max drops a NaN; torch's amax keeps it
    amax = tl.maximum(tl.max(amax, axis=0), 1e-30)
    amax = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), amax)
    mult = tl.math.div_rn(1.0, amax) * E4M3_MAX  # as torch: 448 / amax is amax.reciprocal() * 448
    tl.store(scale_ptr + row, amax * INV_E4M3_MAX)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        v = tl.load(t_ptr + row * t_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * n_cols + cols, (v * mult).to(q_ptr.dtype.element_ty), mask=cols < n_cols)


_FP8_ROWS = _Runners(_fp8_rows_kernel)
_FP8_BLOCK = 2048


def fp8_rows(t: torch.Tensor, e4m3_max: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`kernels._fp8_rows_fn(t)` for a 2-D t with contiguous rows: ((M, K) e4m3, (M, 1) fp32 scales); None
    where this kernel does not take t (the caller runs the torch function)."""
    if (t.dim() != 2 or t.stride(-1) != 1 or t.dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or t.device.index != torch.cuda.current_device()):
        return None
    m, k = t.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=t.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=t.device)
    if m and k:
        key = (m, k, t.stride(0), t.dtype, *_aligned(t, q, scale))
        _FP8_ROWS.launch(key, (m, 1, 1), (t, q, scale, k, t.stride(0)),
                         {"E4M3_MAX": float(e4m3_max), "INV_E4M3_MAX": 1.0 / e4m3_max, "BLOCK": _FP8_BLOCK},
                         num_warps=8)
    return q, scale


@triton.jit
def _dequantize_fp8_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, mult_ptr, out_ptr,
                           n_rows, n_cols, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           FP4: tl.constexpr, TRANSPOSE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           SPAN: tl.constexpr):
    # A (BN, BK) tile of the (n_rows, n_cols) weight: bitsandbytes' dequantize (as `_dequantize_4bit_kernel`,
    # rounded to bf16), times its row's (or, transposed, its column's) multiplier, rounded to e4m3. Read as
    # (BN, BK / 2) bytes, each row's contiguous (n_cols is even). BK divides n_cols and SPAN = min(BK,
    # BLOCKSIZE), both powers of two: a tile's row is BK / SPAN whole spans, each inside one quantization
    # block, so a scale is looked up per span, not per element (the lookups were half the kernel's time).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    half = n_cols // 2
    pairs = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
    byte = tl.load(packed_ptr + rows[:, None] * half + pairs[None, :], mask=rows[:, None] < n_rows,
                   other=0).to(tl.int32)
    first = rows[:, None] * n_cols + tl.program_id(1) * BK + SPAN * tl.arange(0, BK // SPAN)[None, :]
    scale = _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, first // BLOCKSIZE, rows[:, None] < n_rows,
                          NESTED, BLOCKSIZE2)[:, :, None]  # (BN, BK / SPAN, 1)
    hi = tl.reshape(tl.reshape(_code_value(code_ptr, byte >> 4, FP4), (BN, BK // SPAN, SPAN // 2)) * scale,
                    (BN, BK // 2))
    lo = tl.reshape(tl.reshape(_code_value(code_ptr, byte & 15, FP4), (BN, BK // SPAN, SPAN // 2)) * scale,
                    (BN, BK // 2))
    value = tl.reshape(tl.join(hi, lo), (BN, BK)).to(tl.bfloat16).to(tl.float32)  # the even element from the high 4 bits
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    if TRANSPOSE:  # out is (n_cols, n_rows): column k's multiplier, stored through a transposed tile
        mult = tl.load(mult_ptr + cols)
        q8 = tl.trans((value * mult[None, :]).to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + cols[:, None] * n_rows + rows[None, :], q8, mask=rows[None, :] < n_rows)
    else:
        mult = tl.load(mult_ptr + rows, mask=rows < n_rows, other=0.0)
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], (value * mult[:, None]).to(out_ptr.dtype.element_ty),
                 mask=rows[:, None] < n_rows)


_DEQUANTIZE_FP8 = _Runners(_dequantize_fp8_kernel)
_FP8_BN, _FP8_BK = 64, 128


def dequantizes_to_fp8(packed: torch.Tensor, state) -> bool:
    """Whether `dequantize_4bit_fp8` takes this weight: `dequantizes` does, it is 2-D (a linear's), its rows
    are whole multiples of 16 values (as FP8 GEMMs need anyway), its blocksize a power of two, and its row
    splits into fewer tiles than a grid dimension holds."""
    if not (dequantizes(packed, state) and len(state.shape) == 2):
        return False
    n_cols, blocksize = state.shape[1], state.blocksize
    return (n_cols % 16 == 0 and blocksize >= 2 and blocksize & (blocksize - 1) == 0
            and n_cols // math.gcd(n_cols, _FP8_BK) < 65536)  # the grid's second dimension: CUDA's limit


def dequantize_4bit_fp8(packed: torch.Tensor, state, mult: torch.Tensor, transpose: bool) -> torch.Tensor:
    """A 4-bit (out, in) weight W straight to e4m3: bf16(W) * mult rounded to e4m3, (out, in) with `mult`
    (out,) per row, or with `transpose` (in, out) = (bf16(W) * mult).T with `mult` (in,) per column.

    What `kernels._fp8_rows_fn` / `_fp8_cols_fn` give from bitsandbytes' bf16 dequantize, given their
    multipliers (448 / amax, fp32, contiguous), without the bf16 weight ever being written."""
    n_rows, n_cols = state.shape
    out = torch.empty((n_cols, n_rows) if transpose else (n_rows, n_cols), dtype=torch.float8_e4m3fn,
                      device=packed.device)
    nested = bool(state.nested)
    absmax2, code2, offset, blocksize2 = _nested_state(state)
    bk = math.gcd(n_cols, _FP8_BK)  # a power of two, 16 or more (`dequantizes_to_fp8`)
    grid = (triton.cdiv(n_rows, _FP8_BN), n_cols // bk, 1)
    key = (n_rows, n_cols, state.blocksize, blocksize2, nested,
           state.quant_type == "fp4", bool(transpose), state.absmax.dtype, absmax2.dtype, code2.dtype, offset.dtype,
           mult.dtype, *_aligned(packed, state.absmax, state.code, absmax2, code2, offset, mult, out))
    with _on(packed.device):
        _DEQUANTIZE_FP8.launch(key, grid, (packed, state.absmax, state.code, absmax2, code2, offset, mult, out,
                                           n_rows, n_cols),
                               {"BLOCKSIZE": state.blocksize, "BLOCKSIZE2": blocksize2,
                                "NESTED": nested, "FP4": state.quant_type == "fp4", "TRANSPOSE": bool(transpose),
                                "BN": _FP8_BN, "BK": bk, "SPAN": min(bk, state.blocksize)},
                               num_warps=8, enable_fp_fusion=False)
    return out
