"""Activation offload (lora_dist/offload.py): exact against the model's own checkpointing, inputs off the device.

On the CPU the offload target is the CPU itself with unpinned buffers: the copies, the one-layer-
ahead prefetch and the bookkeeping are this module's code either way; only the CUDA stream calls
are skipped (the GPU test below runs them).
"""

import gc
import weakref

import pytest
import torch

from lora_dist import families, kernels, offload, shapes
from lora_dist.model import LoRAConfig, LoRAModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3


def _model(mode: str, dropout: float = 0.0, device: str = "cpu", dtype=torch.float32, bits=None, fused=True,
           rank: int = 4):
    """Tiny Llama + LoRA with non-zero B (so every adapter gets a gradient); `mode` picks checkpointing."""
    base = shapes.build_random_model("tiny", bits=bits, compute_dtype=dtype, device=device, seed=0,
                                     num_layers=LAYERS)
    torch.manual_seed(0)  # lora_A's init
    model = LoRAModel(base, LoRAConfig(rank=rank, alpha=2 * rank, dropout=dropout, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            b = layer.lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    offloader = None
    if mode == "hf":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "offload":
        offloader = offload.enable_activation_offload(model)
    if fused:
        families.patch_model_for_speed(model)
    model.train()
    return model, offloader


def _batch(device="cpu"):
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2)).to(device)


def _loss_and_grads(model, batch, seed=3, micro_batches=1):
    torch.manual_seed(seed)  # the dropout masks
    losses = []
    for _ in range(micro_batches):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads


def _assert_bitwise(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == LAYERS * 7 * 2
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert all(g.abs().sum() > 0 for g in grads_a.values())  # every adapter got a real gradient


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_offload_equals_model_checkpointing_and_no_checkpointing_bitwise(fused):
    # The copies are exact and the recompute is torch's own non-reentrant checkpoint: the same ops
    # on the same values, so nothing may differ, not even in the last bit.
    batch = _batch()
    offloaded = _loss_and_grads(_model("offload", fused=fused)[0], batch)
    _assert_bitwise(offloaded, _loss_and_grads(_model("hf", fused=fused)[0], batch))
    _assert_bitwise(offloaded, _loss_and_grads(_model("none", fused=fused)[0], batch))


def test_offload_enabled_after_block_patching_offloads_both_block_inputs_bitwise():
    # The other order: patch_model_for_speed(block_checkpointing=True) first, then offload, which
    # hands each block-patched layer its offloader instead of wrapping it a second time.
    batch = _batch()
    model, _ = _model("none", fused=False)
    families.patch_model_for_speed(model, block_checkpointing=True)
    offloader = offload.enable_activation_offload(model)
    result = _loss_and_grads(model, batch)
    assert offloader.stats.saved == 2 * LAYERS  # attention and MLP inputs of every layer, once
    _assert_bitwise(result, _loss_and_grads(_model("none")[0], batch))


def test_offload_recompute_draws_the_forward_dropout_masks():
    # LoRA dropout 0.2 in every layer: a recompute with other masks would give other gradients.
    batch = _batch()
    offloaded = _loss_and_grads(_model("offload", dropout=0.2)[0], batch)
    _assert_bitwise(offloaded, _loss_and_grads(_model("hf", dropout=0.2)[0], batch))
    _assert_bitwise(offloaded, _loss_and_grads(_model("none", dropout=0.2)[0], batch))


def test_offload_over_4bit_base_equals_model_checkpointing_bitwise():
    batch = _batch()
    offloaded = _loss_and_grads(_model("offload", bits=4)[0], batch)
    _assert_bitwise(offloaded, _loss_and_grads(_model("hf", bits=4)[0], batch))


def test_gradient_accumulation_over_micro_batches_is_exact():
    batch = _batch()
    _assert_bitwise(_loss_and_grads(_model("offload")[0], batch, micro_batches=2),
                    _loss_and_grads(_model("hf")[0], batch, micro_batches=2))


def test_offloaded_blocks_keep_early_stop_so_no_o_or_down_projection_gemm_is_recomputed(monkeypatch):
    # torch's non-reentrant checkpoint stops its recompute once every saved tensor is back. With
    # offload the fused path checkpoints attention and MLP as blocks: o_proj and down_proj each end
    # a block and save nothing after their input, so their base GEMMs run in forward and backward
    # only (per-layer checkpointing recomputes o_proj, whose output the MLP reads: a third run).
    fetched = []
    original = kernels._base_weight
    monkeypatch.setattr(kernels, "_base_weight", lambda base, dtype: fetched.append(base) or original(base, dtype))
    model, _ = _model("offload")
    _loss_and_grads(model, _batch())
    for name in ("down_proj", "o_proj", "gate_proj"):  # gate_proj: its output is saved, so it is recomputed
        bases = [l.base_layer for n, l in model.lora_layers.items() if n.endswith(name)]
        assert all(sum(f is b for f in fetched) == (3 if name == "gate_proj" else 2) for b in bases), name


@pytest.mark.parametrize("fused, per_layer", [(True, 2), (False, 1)], ids=["blocks", "layers"])
def test_each_input_is_saved_once_and_copied_back_one_ahead(fused, per_layer):
    # fused: two block inputs per layer (attention, MLP); the model's own forward: one per layer
    model, offloader = _model("offload", fused=fused)
    batch = _batch()
    n = LAYERS * per_layer
    for step in (1, 2):
        model(input_ids=batch, labels=batch).loss.backward()
        s = offloader.stats
        # the last input is fetched when its backward asks; every other one is prefetched while the
        # block after it recomputes, so at most 2 copies are back at once
        assert (s.saved, s.fetched_on_demand, s.prefetched) == (n * step, step, (n - 1) * step)
        assert s.max_resident == 2 and s.resident == 0


@pytest.mark.parametrize("mode, kept", [("offload", 0), ("hf", LAYERS)])
def test_between_forward_and_backward_only_model_checkpointing_keeps_layer_inputs(mode, kept):
    # The control ("hf": torch's checkpoint keeps every layer input) shows the check can fail.
    model, _ = _model(mode)
    refs = []
    for layer in offload._decoder_layers(model):
        layer.register_forward_pre_hook(lambda _m, args: refs.append(weakref.ref(args[0])))
    batch = _batch()
    loss = model(input_ids=batch, labels=batch).loss
    gc.collect()
    assert len(refs) == LAYERS
    assert sum(r() is not None for r in refs) == kept
    loss.backward()


def test_eval_and_no_grad_forwards_do_not_offload():
    model, offloader = _model("offload")
    reference, _ = _model("none")
    batch = _batch()
    with torch.no_grad():
        out = model(input_ids=batch, labels=batch).loss
        assert torch.equal(out, reference(input_ids=batch, labels=batch).loss)
    assert offloader.stats.saved == 0


def test_reading_an_offloaded_input_twice_is_refused():
    model, _ = _model("offload")
    batch = _batch()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_enabling_over_model_checkpointing_or_twice_is_refused():
    model, _ = _model("hf", fused=False)
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        offload.enable_activation_offload(model)
    model, _ = _model("offload", fused=False)
    with pytest.raises(ValueError, match="already enabled"):
        offload.enable_activation_offload(model)


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(TypeError, match="model.layers"):
        offload.enable_activation_offload(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.gpu
def test_cuda_offload_to_pinned_host_memory_is_exact_and_keeps_two_inputs():
    # The stream path: side-stream copies to pinned memory and back, in bf16 over an NF4 base.
    batch = _batch("cuda")
    model, offloader = _model("offload", device="cuda", dtype=torch.bfloat16, bits=4)
    offloaded = _loss_and_grads(model, batch)
    _assert_bitwise(offloaded, _loss_and_grads(_model("hf", device="cuda", dtype=torch.bfloat16, bits=4)[0], batch))
    s = offloader.stats  # fused: two block inputs per layer (attention, MLP)
    assert (s.saved, s.fetched_on_demand, s.prefetched, s.max_resident) == (2 * LAYERS, 1, 2 * LAYERS - 1, 2)


@pytest.mark.gpu
def test_cuda_saved_attention_in_pinned_host_memory_is_exact():
    # The stream path of the saved groups: every attention block's saved tensors to pinned memory and back
    # on the side stream, bf16 over an NF4 base, against the model's own checkpointing bit for bit.
    batch = _batch("cuda")
    model, offloader = _model("offload", device="cuda", dtype=torch.bfloat16, bits=4)
    offloader.save_attention, offloader.min_bytes = True, 0
    saved = _loss_and_grads(model, batch)
    _assert_bitwise(saved, _loss_and_grads(_model("hf", device="cuda", dtype=torch.bfloat16, bits=4)[0], batch))
    s = offloader.stats
    assert (s.saved, s.fetched_on_demand, s.prefetched, s.max_resident) == (2 * LAYERS, 1, 2 * LAYERS - 1, 2)


def test_host_copy_is_exact_and_outside_the_graph():
    offloader = offload.ActivationOffloader()
    x = torch.randn(4, 8, requires_grad=True) * 3  # a non-leaf, as a layer input is
    saved = offloader.save(x)
    assert torch.equal(saved.host, x.detach()) and saved.host.data_ptr() != x.data_ptr()
    assert not saved.host.requires_grad and saved.host.grad_fn is None
    offloader.release_source(saved)
    back = offloader.load(saved)
    assert torch.equal(back, x.detach()) and back.requires_grad and back.grad_fn is None


def test_offload_finds_the_language_model_layers_of_a_multimodal_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = shapes.shape("gemma3-12b").hf_config(num_layers=2, hidden_size=64, intermediate_size=128,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                 vocab_size=256).to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision))
    layers = offload._decoder_layers(model)
    assert layers is model.model.language_model.layers and len(layers) == 2


@pytest.mark.gpu
def test_cuda_recompute_draws_the_dropout_kernels_masks_again():
    # Rank 16 in bf16 on CUDA: every group's dropout runs in the Triton kernels, whose masks come from
    # a seed drawn from the CUDA generator; a recompute (model checkpointing or offload) must get the
    # forward's masks again, bit for bit, or the gradients differ from the uncheckpointed run's.
    batch = _batch("cuda")
    runs = [_loss_and_grads(_model(mode, dropout=0.2, device="cuda", dtype=torch.bfloat16, bits=4, rank=16)[0], batch)
            for mode in ("none", "hf", "offload")]
    _assert_bitwise(runs[0], runs[1])
    _assert_bitwise(runs[0], runs[2])


# ------------------------------------------------------------------------------------ saved attention tensors


def _saving_model(**kwargs):
    model, offloader = _model("offload", **kwargs)
    offloader.save_attention = True
    offloader.min_bytes = 0  # a tiny model's tensors too: every saved tensor but the parameters travels
    return model, offloader


def test_saved_attention_equals_model_checkpointing_and_no_checkpointing_bitwise():
    # The attention blocks run without checkpointing, their saved tensors copied to the target and back:
    # exact copies of what autograd would keep, so loss and gradients equal the other modes bit for bit.
    batch = _batch()
    saved = _loss_and_grads(_saving_model()[0], batch)
    _assert_bitwise(saved, _loss_and_grads(_model("hf")[0], batch))
    _assert_bitwise(saved, _loss_and_grads(_model("none")[0], batch))


@pytest.mark.parametrize("kwargs", [{"dropout": 0.2}, {"bits": 4}], ids=["dropout", "nf4"])
def test_saved_attention_with_dropout_and_4bit_base_is_exact(kwargs):
    batch = _batch()
    _assert_bitwise(_loss_and_grads(_saving_model(**kwargs)[0], batch),
                    _loss_and_grads(_model("hf", **kwargs)[0], batch))


def test_saved_attention_recomputes_no_q_k_v_gemm(monkeypatch):
    # q/k/v's base weights are dequantized in forward and for x's gradient only (the recompute of a
    # checkpointed attention block is a third time; layer 0's input, the frozen embedding's output, needs
    # no gradient: once); the MLP block is still checkpointed (gate: 3).
    fetched = []
    original = kernels._base_weight
    monkeypatch.setattr(kernels, "_base_weight", lambda base, dtype: fetched.append(base) or original(base, dtype))
    model, _ = _saving_model()
    _loss_and_grads(model, _batch())
    for name, runs in (("q_proj", 2), ("k_proj", 2), ("v_proj", 2), ("o_proj", 2), ("gate_proj", 3)):
        bases = [l.base_layer for n, l in model.lora_layers.items() if n.endswith(name)]
        first = 1 if name[0] in "qkv" else runs
        assert [sum(f is b for f in fetched) for b in bases] == [first] + [runs] * (LAYERS - 1), name


def test_saved_attention_copies_each_block_once_and_back_one_ahead():
    model, offloader = _saving_model()
    batch = _batch()
    for step in (1, 2):
        model(input_ids=batch, labels=batch).loss.backward()
        s = offloader.stats
        # per layer: the attention block's saved tensors (one group) and the MLP block's input
        n = 2 * LAYERS
        assert (s.saved, s.fetched_on_demand, s.prefetched) == (n * step, step, (n - 1) * step)
        assert s.max_resident == 2 and s.resident == 0


def test_a_group_shares_one_copy_of_a_storage_between_its_views():
    # x and a reshaped view of it saved by two ops: one host copy, and the views share it again after
    offloader = offload.ActivationOffloader(min_bytes=0)
    x = torch.randn(6, 8, requires_grad=True)
    with offloader.saving() as group:
        h = x * 2  # a non-leaf, as a layer's activations are
        y = (h.view(3, 16) * h.view(3, 16)).sum() + (h * h).sum()
    assert len(group.storages) == 1 and group.storages[next(iter(group.storages))].numel() == 6 * 8 * 4
    y.backward()
    assert torch.allclose(x.grad, 2 * 2 * (2 * x.detach()) * 2)


def test_parameters_their_views_kept_inputs_and_small_views_of_large_storages_stay_where_they_are():
    offloader = offload.ActivationOffloader(min_bytes=0)
    big = torch.randn(64, 64)
    w = torch.nn.Parameter(torch.randn(8, 64))
    v = torch.nn.Parameter(torch.randn(2, 64))
    c = torch.randn(2, 64)  # a block input other than x (a rotary table, a mask): alive anyway
    x = torch.randn(2, 64, requires_grad=True)
    with offloader.saving(keep=[c]) as group:
        h = x * 1.5  # saved by the products below: the one tensor that travels
        y = (h @ w.t()).sum() + (h * big[:2]).sum() + (h * c).sum() + (h * v).sum()
    kept = {t.untyped_storage().data_ptr() for t in (w, v, big, c)}
    assert list(group.storages) == [h.untyped_storage().data_ptr()] and not kept & set(group.storages)
    y.backward()
    assert torch.allclose(x.grad, 1.5 * (w.detach().sum(0) + big[:2] + c + v.detach()))


def test_a_tensor_changed_in_place_after_its_save_is_refused():
    # autograd's version check is off under saved-tensor hooks: the group checks at the block's end
    offloader = offload.ActivationOffloader(min_bytes=0)
    x = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="changed in place inside an offloaded attention block.*model.offload_attention=false"):
        with offloader.saving():
            h = x * 2
            y = h * h  # saves h
            h.add_(1)
    del y


def test_a_graph_dropped_without_backward_takes_its_group_with_it():
    # a kept tensor that its own op saved (logsumexp's output) must not hold itself through its grad_fn
    offloader = offload.ActivationOffloader(min_bytes=2**30)  # everything stays
    x = torch.randn(4, 4, requires_grad=True)
    with offloader.saving() as group:
        h = x * 2
        y = torch.logsumexp(h, dim=1).sum() + (h * h).sum()
    ref = weakref.ref(group)
    del group, h, y
    gc.collect()
    assert ref() is None
