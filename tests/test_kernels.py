"""The fast paths compute the same function as the plain paths: outputs and gradients.

References are computed another way: float64 math on the dequantized weights, Hugging Face's own
modules and cross-entropy, or the unpatched model. Error measure: ||out - ref|| / ||ref||.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_dist import bench, families, kernels, quant
from lora_dist.layers import LoRALayer, supports_fast_path
from lora_dist.model import LoRAConfig, LoRAModel

# fp32 against fp64 over dot products of at most 256 terms: rounding grows like sqrt(K) * 2**-24,
# about 1e-6; 1e-5 leaves room for the different summation orders of the GEMMs.
FP32_RTOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _lora_layers(in_features: int, outs: list[int], bits: int | None, seed: int = 0) -> list[LoRALayer]:
    torch.manual_seed(seed)
    layers = []
    for out in outs:
        holder = nn.Sequential(nn.Linear(in_features, out, bias=False))
        if bits:
            quant.quantize_model(holder, bits=bits, compute_dtype=torch.float32, skip_modules=())
        layer = LoRALayer.from_base(holder[0], rank=8, alpha=16)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.05)  # nonzero, so A gets a gradient
        layers.append(layer)
    return layers


def _reference(x: torch.Tensor, layers: list[LoRALayer]):
    """float64 outputs and gradients of sum_i <y_i, c_i> on the dequantized weights."""
    xd = x.detach().double().requires_grad_()
    params = []
    outs = []
    for layer in layers:
        w = quant.dequantize_weight(layer.base_layer, torch.float64)
        a = layer.lora_A.weight.detach().double().requires_grad_()
        b = layer.lora_B.weight.detach().double().requires_grad_()
        params += [a, b]
        outs.append(xd @ w.t() + layer.scaling * (xd @ a.t()) @ b.t())
    return xd, params, outs


def _cotangents(outs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]


def test_lora_group_on_4bit_bases_matches_float64_reference_outputs_and_grads():
    layers = _lora_layers(128, [128, 64, 64], bits=4)
    x = torch.randn(3, 5, 128, requires_grad=True)
    outs = kernels.lora_group(x, layers)
    xd, ref_params, ref_outs = _reference(x, layers)
    cots = _cotangents(ref_outs)
    sum((o.double() * c).sum() for o, c in zip(outs, cots)).backward()
    sum((o * c).sum() for o, c in zip(ref_outs, cots)).backward()
    for o, r in zip(outs, ref_outs):
        assert rel_err(o, r) < FP32_RTOL
    assert rel_err(x.grad, xd.grad) < FP32_RTOL
    ours = [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for g, r in zip(ours, ref_params):
        assert rel_err(g, r.grad) < FP32_RTOL


def test_lora_group_on_dense_base_with_bias_matches_plain_layer():
    torch.manual_seed(0)
    layer = LoRALayer(128, 64, rank=4, alpha=8, bias=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
    x = torch.randn(6, 128)
    plain = layer(x)  # CPU input: the layer's own (unfused) path
    (fast,) = kernels.lora_group(x, [layer])
    assert rel_err(fast, plain) < FP32_RTOL


def test_fast_path_in_bf16_is_no_less_accurate_than_plain_path():
    # The plain path casts x to fp32 for the adapter; the fast one keeps bf16 operands with fp32
    # accumulation. Both round the base output to bf16 (2**-9 relative), which dominates: the fast
    # path's error against float64 must stay within 1.5x the plain path's (and bf16's 1e-2 ceiling).
    layers = _lora_layers(256, [128], bits=None)
    layer = layers[0]
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    _, _, (ref,) = _reference(x, layers)
    plain = layer(x)
    fast = kernels.lora_linear(x, layer)
    assert rel_err(fast, ref) < 1.5 * rel_err(plain, ref) + 1e-4
    assert rel_err(fast, ref) < 1e-2


def test_chunked_loss_matches_hf_cross_entropy_with_uneven_chunks_and_ignored_labels():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    weight = torch.randn(100, 64) * 0.1
    labels = torch.randint(0, 100, (2, 9))
    labels[0, 3] = labels[1, 7] = kernels.IGNORE_INDEX
    loss = kernels.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5)
    loss.backward()
    hd = hidden.detach().double().requires_grad_()
    logits = hd @ weight.double().t()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) < FP32_RTOL * ref.item()
    assert rel_err(hidden.grad, hd.grad) < FP32_RTOL


def test_chunked_loss_keeps_one_chunk_of_logits_and_gradient_alive_at_a_time():
    # The planner counts one chunk's logits and its gradient (2 x chunk x vocab). Holding a chunk's
    # gradient while the next chunk's logits are computed made it 3 chunks: measured on the H200 as
    # +0.5 GiB (-16% error) on the 1B shape, whose loss runs in 4 chunks. Counted here on the CPU:
    # when each chunk's logits GEMM runs, no other (chunk, vocab) tensor may be alive.
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    chunk, vocab = 5, 100

    class LiveChunks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: weakref.WeakSet = weakref.WeakSet()
            self.alive_at_logits: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (chunk, vocab):
                if func is torch.ops.aten.mm.default:
                    self.alive_at_logits.append(len(self.live))
                self.live.add(out)
            return out

    torch.manual_seed(0)
    hidden = torch.randn(4, 5, 64, requires_grad=True)  # 20 tokens: 4 chunks of 5
    weight = torch.randn(vocab, 64) * 0.1
    labels = torch.randint(0, vocab, (4, 5))
    with LiveChunks() as mode:
        kernels.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)
    assert mode.alive_at_logits == [0, 0, 0, 0]


def test_chunked_loss_divides_by_num_items_as_hf_does_with_num_items_in_batch():
    # Given num_items (the label tokens of the whole accumulated batch), the summed token loss is divided
    # by it, not by this batch's count: HF's loss with num_items_in_batch, computed here in float64.
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    weight = torch.randn(100, 64) * 0.1
    labels = torch.randint(0, 100, (2, 9))
    labels[0, 3] = kernels.IGNORE_INDEX
    loss = kernels.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5, num_items=torch.tensor(37))
    loss.backward()
    hd = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy((hd @ weight.double().t())[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1),
                          ignore_index=kernels.IGNORE_INDEX, reduction="sum") / 37
    ref.backward()
    assert abs(loss.item() - ref.item()) < FP32_RTOL * ref.item()
    assert rel_err(hidden.grad, hd.grad) < FP32_RTOL


def test_chunked_loss_of_a_batch_without_label_tokens_is_zero_with_zero_gradient():
    # A micro batch whose responses were all cut off: HF's loss with num_items_in_batch gives
    # sum / num_items = 0 there; a mean over no token would be 0/0 = nan and poison the whole step.
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    weight = torch.randn(100, 64) * 0.1
    labels = torch.full((2, 9), kernels.IGNORE_INDEX)
    labels[:, 0] = 5  # the first label is never a target (nothing predicts it): still no token counts
    loss = kernels.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    ref = F.cross_entropy(hidden.detach()[:, :-1].reshape(-1, 64) @ weight.t(), labels[:, 1:].reshape(-1),
                          ignore_index=kernels.IGNORE_INDEX, reduction="sum") / 16  # num_items_in_batch=16
    assert ref.item() == 0.0


def test_fused_rmsnorm_rope_swiglu_match_hf_llama_modules():
    from transformers.models.llama import modeling_llama as hf

    torch.manual_seed(0)
    x = torch.randn(2, 7, 64, requires_grad=True)
    norm = hf.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)
    g = torch.randn(2, 7, 64)
    ours = kernels.rms_norm(x, norm.weight, 1e-5)
    (gx,) = torch.autograd.grad((ours * g).sum(), x)
    ref = norm(x)
    (rgx,) = torch.autograd.grad((ref * g).sum(), x)
    assert rel_err(ours, ref) < FP32_RTOL and rel_err(gx, rgx) < FP32_RTOL

    q = torch.randn(2, 7, 4, 32, requires_grad=True)  # (B, T, H, D)
    k = torch.randn(2, 7, 2, 32, requires_grad=True)
    ang = torch.randn(1, 7, 16)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    oq, ok = kernels.rope(q, k, cos, sin)
    rq, rk = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    ours_g = torch.autograd.grad((oq * gq).sum() + (ok * gk).sum(), (q, k))
    ref_g = torch.autograd.grad((rq.transpose(1, 2) * gq).sum() + (rk.transpose(1, 2) * gk).sum(), (q, k))
    assert rel_err(oq, rq.transpose(1, 2)) < FP32_RTOL and rel_err(ok, rk.transpose(1, 2)) < FP32_RTOL
    assert all(rel_err(a, b) < FP32_RTOL for a, b in zip(ours_g, ref_g))

    gate = torch.randn(3, 256, requires_grad=True)
    up = torch.randn(3, 256, requires_grad=True)
    out = kernels.swiglu(gate, up)
    gout = torch.randn_like(out)
    ours_g = torch.autograd.grad((out * gout).sum(), (gate, up))
    ref = F.silu(gate) * up
    ref_g = torch.autograd.grad((ref * gout).sum(), (gate, up))
    assert rel_err(out, ref) < FP32_RTOL
    assert all(rel_err(a, b) < FP32_RTOL for a, b in zip(ours_g, ref_g))


def _tiny_lora_model(checkpointing: bool, quant_kind: str = "none") -> LoRAModel:
    setup = bench.Setup(shape="tiny", model_path=None, layers=2, seq=16, micro_batch=2, rank=8, alpha=16.0,
                        quant=quant_kind, double_quant=True, lr=1e-3, seed=0, device="cpu", dtype=torch.float32)
    base = bench.build_base(setup)
    model = LoRAModel(base, LoRAConfig(rank=8, alpha=16, target_modules=bench.targets(base)))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.weight.normal_(0, 0.02)
    if checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loss_and_grads(model: LoRAModel, batch: torch.Tensor):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.get_trainable_parameters()]


def test_patched_checkpointed_model_matches_plain_model_loss_and_grads():
    # Dense fp32 tiny Llama: the only differences are summation orders (GEMM splits, fused
    # reductions) over <= 512-term sums: ~1e-6 relative per op, well under 1e-4 after 2 layers.
    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    plain_loss, plain_grads = _loss_and_grads(_tiny_lora_model(True), batch)
    patched = families.patch_model_for_speed(_tiny_lora_model(True))
    loss, grads = _loss_and_grads(patched, batch)
    assert abs(loss - plain_loss) < 1e-5 * plain_loss
    for g, r in zip(grads, plain_grads):
        assert rel_err(g, r) < 1e-4


def test_checkpointed_recompute_skips_the_base_gemms_whose_outputs_backward_never_reads(monkeypatch):
    fetched = []
    original = kernels._base_weight

    def counting(base, dtype):
        fetched.append(base)
        return original(base, dtype)

    monkeypatch.setattr(kernels, "_base_weight", counting)
    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model = families.patch_model_for_speed(_tiny_lora_model(checkpointing=True))
    down = [l.base_layer for n, l in model.lora_layers.items() if n.endswith("down_proj")]
    o_proj = [l.base_layer for n, l in model.lora_layers.items() if n.endswith("o_proj")]
    _loss_and_grads(model, batch)
    # o_proj: forward, recompute (its output feeds the next RMSNorm, whose input backward needs), backward;
    # down_proj: forward and backward only: its output just joins the residual, so the recompute,
    # which stops once every saved tensor is back, ends before its GEMM
    assert all(sum(f is b for f in fetched) == 3 for b in o_proj)
    assert all(sum(f is b for f in fetched) == 2 for b in down)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_routes_4bit_training_forward_through_fast_path_on_cuda():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(256, 512, bias=False)).cuda()
    quant.quantize_model(holder, bits=4, compute_dtype=torch.bfloat16, skip_modules=())
    layer = LoRALayer.from_base(holder[0], rank=16, alpha=32)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, ref_params, (ref,) = _reference(x, [layer])
    out = layer(x)
    node = out.grad_fn  # a view of the fused node's output
    assert type(node.next_functions[0][0]).__name__ == "_LoRAOutputBackward"  # not bitsandbytes' MatMul4Bit
    # bf16 operands with fp32 accumulation: METHOD.md's 1e-3..1e-2 band
    assert rel_err(out, ref) < 1e-2
    out.float().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert rel_err(layer.lora_A.weight.grad, ref_params[0].grad) < 2e-2
    assert rel_err(layer.lora_B.weight.grad, ref_params[1].grad) < 2e-2


# ------------------------------------------------------------------------------------ the generic pieces the families use


def test_kernels_import_neither_the_layer_class_nor_transformers():
    # kernels sits below layers (layers -> kernels, never back: no import cycle) and knows no model
    # family. Read from its source: lora_dist/__init__ imports layers anyway, so sys.modules can't tell.
    import ast
    from pathlib import Path

    tree = ast.parse(Path(kernels.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert imported, "no imports found: the check reads nothing"
    assert not {name for name in imported if name.startswith(("lora_dist.layers", "lora_dist.model", "transformers"))}
    assert "lora_dist.quant" in imported  # what it does import: the 4-bit dequantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_offset_and_fp32_weight_rmsnorms_match_gemma_and_olmo2_modules(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(0)
    x = torch.randn(2, 7, 64).to(dtype).requires_grad_()
    g = torch.randn(2, 7, 64).to(dtype)
    gemma, olmo2 = GemmaRMSNorm(64, eps=1e-6), Olmo2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        gemma.weight.normal_(0, 0.3)  # stored as w in x * (1 + w)
        olmo2.weight.uniform_(0.5, 1.5)
    for norm, offset in ((gemma, 1.0), (olmo2, 0.0)):
        norm.to(dtype).weight.requires_grad_(False)
        ours = kernels.rms_norm(x, norm.weight, 1e-6, offset=offset, fp32_weight=True)
        ref = norm(x)
        (gx,) = torch.autograd.grad((ours * g).sum(), x)
        (rgx,) = torch.autograd.grad((ref * g).sum(), x)
        # the forward rounds exactly where the module does: equal bits; the gradient is fp32 math
        # rounded once against autograd's op-by-op rounding: 2**-8 relative in bf16
        assert torch.equal(ours, ref)
        assert rel_err(gx, rgx) < (FP32_RTOL if dtype == torch.float32 else 2**-8)


def test_geglu_tanh_matches_gelu_tanh_times_up_against_float64():
    torch.manual_seed(0)
    gate = (torch.randn(3, 256) * 3).requires_grad_()  # into the tails, where tanh saturates
    up = torch.randn(3, 256, requires_grad=True)
    out = kernels.geglu_tanh(gate, up)
    gout = torch.randn_like(out)
    ours = torch.autograd.grad((out * gout).sum(), (gate, up))
    gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = F.gelu(gd, approximate="tanh") * ud
    refs = torch.autograd.grad((ref * gout.double()).sum(), (gd, ud))
    assert rel_err(out, ref) < FP32_RTOL
    assert all(rel_err(a, b) < FP32_RTOL for a, b in zip(ours, refs))  # the hand-written derivative


@pytest.mark.parametrize("act", ["swiglu", "geglu_tanh"])
def test_owned_gated_activation_writes_its_gradients_over_gate_and_up(act):
    # The decoder MLP hands gate and up over (owned=True): their gradients reuse that memory. Same
    # values as the allocating backward; a second backward through the graph raises, never reads them.
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, 2 * 96) * 0.2
    fn = getattr(kernels, act)
    gout = torch.randn(4, 96)
    grads = {}
    for owned in (False, True):
        gate, up = (x @ w).chunk(2, dim=-1)  # views of one tensor, as Phi-3's fused gate_up
        out = fn(gate, up, owned=owned)
        grads[owned] = torch.autograd.grad((out * gout).sum(), (gate, up, x), retain_graph=True)
        assert (grads[owned][0].data_ptr() == gate.data_ptr()) == owned
        if owned:
            with pytest.raises(RuntimeError, match="inplace"):
                torch.autograd.grad((out * gout).sum(), x)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["swiglu", "geglu_tanh"])
def test_triton_in_place_gated_backward_matches_the_torch_backward_in_bf16(act):
    # The CUDA path of the owned backward (triton_ops) against the plain torch backward on the same
    # bf16 inputs, including Phi-3's strided halves: both compute in fp32 and round once to bf16,
    # so they differ by at most one bf16 ulp (2**-7 relative) where the fp32 math differs in its last bits.
    torch.manual_seed(0)
    fn = getattr(kernels, act)
    gate_up = (torch.randn(3, 100, 2 * 1500, device="cuda") * 2).to(torch.bfloat16)
    g = torch.randn(3, 100, 1500, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for owned in (False, True, True):  # the second owned run through the kernel's cached runner
        gu = gate_up.clone().requires_grad_()
        gate, up = gu.chunk(2, dim=-1)
        out = fn(gate, up, owned=owned)
        grad = torch.autograd.grad(out, gu, g)[0].float()
        assert owned not in grads or torch.equal(grad, grads[owned])
        grads[owned] = grad
    assert rel_err(grads[True], grads[False]) < 2**-8
    assert ((grads[True] - grads[False]).abs() <= 2**-7 * grads[False].abs() + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_weight, offset", [(False, 0.0), (False, 1.0), (True, 1.0)],
                         ids=["llama", "offset-in-weight-dtype", "gemma-fp32"])
@pytest.mark.parametrize("shape", [(4, 512, 4096), (3, 7, 96), (2, 5, 5120)])
def test_triton_rmsnorm_matches_the_torch_function_in_bf16(shape, fp32_weight, offset):
    # triton_ops.rmsnorm against kernels._rmsnorm_fwd / _rmsnorm_apply run eagerly on the same bf16 inputs.
    # rstd is fp32 over another reduction tree: each tree is within log2(d) <= 13 ulps of the exact sum
    # of squares, so the two differ by < 2**-19 relative, halved by the square root (2**-18 allowed).
    # The output then rounds to bf16 where the torch function does: a rounding that flips (rarely) moves
    # an element by one bf16 ulp (2**-7 relative), one more at the product's rounding (2**-6 allowed).
    from lora_dist import triton_ops

    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 3).to(torch.bfloat16)
    w = (torch.randn(shape[-1], device="cuda") * 0.1 + 1).to(torch.bfloat16)
    for _ in range(2):  # the second call through the cached runner
        y, rstd = triton_ops.rmsnorm(x, w, None, 1e-6, offset, fp32_weight)
    ref_y, ref_rstd = kernels._rmsnorm_fwd(x, w, 1e-6, offset, fp32_weight)
    assert y.dtype == ref_y.dtype and y.shape == ref_y.shape and rstd.shape == ref_rstd.shape
    assert ((rstd - ref_rstd).abs() <= 2**-18 * ref_rstd).all()
    close = (y.float() - ref_y.float()).abs() <= 2**-6 * ref_y.float().abs() + 1e-30
    assert close.all() and (y != ref_y).float().mean() < 1e-3
    rows = x.reshape(-1, shape[-1])[1:4]  # a backward's rebuilt rows, from the kept rstd
    applied = triton_ops.rmsnorm(rows, w, rstd.reshape(-1, 1)[1:4], 0.0, offset, fp32_weight)
    assert torch.equal(applied, kernels._rmsnorm_apply(rows, w, rstd.reshape(-1, 1)[1:4], offset, fp32_weight))
    assert any(triton_ops._RMSNORM.table.values())  # a direct runner was kept (Triton >= 3.3)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["swiglu", "geglu_tanh"])
def test_triton_gated_forward_matches_the_torch_function_in_bf16(act):
    # act(gate) rounded to bf16, then times up rounded, as the torch function (and HF) do; the fp32
    # activation may differ in its last bits (sigmoid, tanh implementations), so an element of h
    # differs by at most one bf16 ulp per rounding (2**-7 relative), and rarely. Phi-3's strided halves.
    from lora_dist import triton_ops

    torch.manual_seed(0)
    ref_fn = kernels._geglu_fwd if act == "geglu_tanh" else kernels._swiglu_fwd
    gate_up = (torch.randn(3, 100, 2 * 1500, device="cuda") * 2).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    for _ in range(2):
        h = triton_ops.gated_forward(gate, up, gelu=act == "geglu_tanh")
    ref = ref_fn(gate, up)
    assert h.shape == ref.shape and h.dtype == ref.dtype and h.is_contiguous()
    assert ((h.float() - ref.float()).abs() <= 2**-6 * ref.float().abs() + 1e-30).all()
    assert (h != ref).float().mean() < 1e-2
    # through kernels' fused ops (what the layers call): the Triton kernel, not torch.compile
    assert torch.equal(getattr(kernels, act)(gate, up), h)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("shape", "blocksize"), [((1536, 4160), 64), ((33, 31), 64), ((512, 1024), 128),
                                               ((256, 1024), 256)])
def test_triton_dequantize_is_bitsandbytes_bit_for_bit(quant_type, nested, state_dtype, shape, blocksize):
    # One kernel (triton_ops.dequantize_4bit) for bitsandbytes' one to three: the same fp32 operations
    # in the same order (no fused multiply-add), rounded once: equal bit patterns, not close (torch.equal
    # would take -0.0 for +0.0: FP4's code 8, which tiny negative weights get, is -0.0 in bitsandbytes).
    # 6.4M values span many blocks of 256 absmax; 33 x 31 is odd (a last half byte and a partial block).
    import bitsandbytes.functional as bnbF

    from lora_dist import triton_ops

    def bits(t):
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    torch.manual_seed(0)
    w = torch.randn(*shape, device="cuda") * 0.02
    w[0, : min(16, shape[1])] = -1e-9  # tiny negatives: FP4's code 8
    w = w.to(state_dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    assert state.dtype == state_dtype and triton_ops.dequantizes(packed, state)
    ref = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(bits(triton_ops.dequantize_4bit(packed, state, state_dtype)), bits(ref))
    if state_dtype == torch.float32:  # one rounding from fp32 to any dtype: bitsandbytes' result cast
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(bits(triton_ops.dequantize_4bit(packed, state, dtype)), bits(ref.to(dtype)))


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_fused_path_dequantizes_a_4bit_linear_through_the_kernel_as_bitsandbytes_does(compute_dtype, monkeypatch):
    from lora_dist import triton_ops

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(768, 512, bias=False)).cuda()
    quant.quantize_model(holder, bits=4, compute_dtype=compute_dtype, skip_modules=())  # NF4, double quant
    calls = []
    launch = triton_ops._dequantize_4bit_launch
    monkeypatch.setattr(triton_ops, "_dequantize_4bit_launch", lambda *a: calls.append(a[2]) or launch(*a))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # other dtypes than the state's: cast after
        for _ in range(3):  # the first through Triton's JIT, then (in the state's dtype) its direct launcher
            assert torch.equal(kernels._base_weight(holder[0], dtype), quant.dequantize_weight(holder[0], dtype))
    # the kernel ran each time (not bitsandbytes on both sides), in the state's dtype: through the JIT once
    # for the plan of that dtype (then its direct launcher), three times for each of the two cast after
    assert calls == [compute_dtype] * 7
    plans = kernels._DEQUANTIZE_PLANS[holder[0]]
    assert list(plans) == [compute_dtype] and plans[compute_dtype][1].fast
    assert plans[compute_dtype][1].args[6] is None  # no dequantized weight kept alive by the plan


@pytest.mark.gpu
def test_a_dequantize_plan_follows_a_replaced_weight():
    # merge/unmerge and requantize_ replace the weight's data and state: the plan kept for the old ones
    # must not dequantize them again
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(256, 128, bias=False)).cuda()
    quant.quantize_model(holder, bits=4, compute_dtype=torch.bfloat16, skip_modules=())
    layer = holder[0]
    first = kernels._base_weight(layer, torch.bfloat16)
    assert torch.equal(kernels._base_weight(layer, torch.bfloat16), first)
    snapshot = quant.requantize_(layer, torch.randn(128, 256, device="cuda") * 0.05)
    second = kernels._base_weight(layer, torch.bfloat16)
    assert torch.equal(second, quant.dequantize_weight(layer, torch.bfloat16)) and not torch.equal(second, first)
    assert len(kernels._DEQUANTIZE_PLANS[layer]) == 1  # the old weight's plan went with it
    quant.restore_(layer, snapshot)
    assert torch.equal(kernels._base_weight(layer, torch.bfloat16), first)


def test_partial_rope_matches_phi3_rotating_only_the_first_dims():
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 64, requires_grad=True)  # (B, T, H, D), rotary over 32 of 64 dims
    k = torch.randn(2, 7, 2, 64, requires_grad=True)
    ang = torch.randn(1, 7, 16)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    oq, ok = kernels.rope(q, k, cos, sin)
    rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert rel_err(oq, rq.transpose(1, 2)) < FP32_RTOL and rel_err(ok, rk.transpose(1, 2)) < FP32_RTOL
    assert torch.equal(oq[..., 32:], q[..., 32:])
    g = torch.randn_like(oq), torch.randn_like(ok)
    ours = torch.autograd.grad((oq * g[0]).sum() + (ok * g[1]).sum(), (q, k))
    refs = torch.autograd.grad((rq.transpose(1, 2) * g[0]).sum() + (rk.transpose(1, 2) * g[1]).sum(), (q, k))
    assert all(rel_err(a, b) < FP32_RTOL for a, b in zip(ours, refs))


@pytest.mark.parametrize("softcap", [None, 0.7])
def test_attention_with_a_sliding_mask_and_grouped_heads_matches_eager_attention(softcap):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 12, 4, 2, 32
    q, k, v = torch.randn(b, t, h, d), torch.randn(b, t, hkv, d), torch.randn(b, t, hkv, d)
    i = torch.arange(t)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 5)  # causal, window 5
    additive = torch.zeros(t, t).masked_fill(~band, torch.finfo(torch.float32).min)[None, None]
    module = nn.Module()
    module.num_key_value_groups, module.training = h // hkv, False
    ref, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive,
                                     scaling=0.2, softcap=softcap)  # returns (B, T, H, D)
    for mask in (band[None, None], additive):  # bool (sdpa's masks) or additive float (eager's)
        out = kernels.attention(q, k, v, scale=0.2, mask=mask, softcap=softcap)
        assert rel_err(out, ref) < FP32_RTOL
    causal = (i[None, :] <= i[:, None])[None, None]
    ref_causal = kernels.attention(q, k, v, scale=0.2, mask=causal, softcap=softcap)
    assert rel_err(kernels.attention(q, k, v, scale=0.2, softcap=softcap), ref_causal) < FP32_RTOL


def test_flex_softcapped_attention_matches_the_explicit_softmax_for_every_mask_kind():
    # The CUDA path (compiled FlexAttention) computes the same function as the explicit one: checked
    # here through torch's unfused FlexAttention (forward only: it has no CPU backward), on the
    # masks the models build. The gradients are checked on the GPU (test_families' bf16 gemma tests).
    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 12, 4, 2, 32
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    i = torch.arange(t)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 5)  # causal, window 5
    padded = band[None].repeat(b, 1, 1)
    padded[1, :, :3] = False  # the second row's first 3 tokens are padding
    padded[1, :3, :3] = torch.eye(3, dtype=torch.bool)  # (a padded query still attends to itself)
    masks = [None, band[None, None], padded[:, None],
             torch.zeros(t, t).masked_fill(~band, torch.finfo(torch.float32).min)[None, None]]
    for mask in masks:
        ref = kernels._softcapped_explicit(q, k, v, mask, 0.2, 0.7)
        out = kernels._softcapped_flex(q, k, v, mask, 0.2, 0.7, compiled=False)
        assert rel_err(out, ref) < FP32_RTOL, mask
    # and the cap is applied: without it the outputs differ far beyond the tolerance
    assert rel_err(kernels._softcapped_flex(q, k, v, None, 0.2, 70.0, compiled=False),
                   kernels._softcapped_explicit(q, k, v, None, 0.2, 0.7)) > 100 * FP32_RTOL


def test_chunked_loss_with_logit_scaling_and_softcap_matches_capped_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 64, requires_grad=True)
    weight = torch.randn(100, 64) * 0.3
    labels = torch.randint(0, 100, (2, 9))
    loss = kernels.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5, scale=0.125, softcap=0.9)
    loss.backward()
    hd = hidden.detach().double().requires_grad_()
    logits = (hd @ weight.double().t()) / 8.0  # Granite's logits / logits_scaling, then Gemma 2's cap
    logits = torch.tanh(logits / 0.9) * 0.9
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    ref.backward()
    assert abs(loss.item() - ref.item()) < FP32_RTOL * ref.item()
    assert rel_err(hidden.grad, hd.grad) < FP32_RTOL


def test_fast_path_takes_only_layers_it_computes_exactly():
    torch.manual_seed(0)
    plain = LoRALayer(64, 64, rank=4, bias=False)
    trained_bias = LoRALayer(64, 64, rank=4, bias=True)
    frozen_bias = LoRALayer(64, 64, rank=4, bias=True)
    trained_bias.base_layer.bias.requires_grad_(True)  # lora.bias=lora_only/all: the fused GEMM has no bias gradient
    dropout = LoRALayer(64, 64, rank=4, dropout=0.1)  # nn.Dropout: the fused path redraws its mask
    other_dropout = LoRALayer(64, 64, rank=4)
    other_dropout.lora_dropout = nn.AlphaDropout(0.1)  # a dropout the fused path does not know
    holder = nn.Sequential(nn.Linear(64, 64, bias=False))
    quant.quantize_model(holder, bits=8, compute_dtype=torch.float32, skip_modules=())
    int8 = LoRALayer.from_base(holder[0], rank=4)
    merged = LoRALayer(64, 64, rank=4, merge_weights=True)
    assert supports_fast_path(plain) and supports_fast_path(frozen_bias) and supports_fast_path(dropout)
    assert not any(supports_fast_path(m) for m in (trained_bias, other_dropout, int8, merged, nn.Linear(64, 64)))
