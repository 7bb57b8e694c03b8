"""CUDA graphs of decoder layers (lora_dist/graphs.py): the same step as the eager layers, or the eager layers.

A replay runs the kernels the capture recorded, on the same inputs, so graphed and eager steps
agree bit for bit (GPU tests). On the CPU the graph path runs with each graph a `graphs._Rerun`
(its Python run again at each replay, on the same static buffers): the slots, keyword buffers,
gradient buffers, recaptures and autograd wiring are tested there against the eager layers, bit
for bit. Every call a graph cannot replay (other dropout, eval, no grad) runs as the model's own
checkpointing runs it: bit for bit too.
"""

import pytest
import torch

from lora_dist import families, graphs, offload, shapes
from lora_dist.loading import decoder_layers
from lora_dist.model import LoRAConfig, LoRAModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3


def _model(graphed: bool, checkpointing: bool = True, device: str = "cpu", dtype=torch.float32, bits=None,
           dropout: float = 0.0):
    """Tiny Llama + LoRA with non-zero B (every adapter gets a gradient), fused path, graphs or not."""
    base = shapes.build_random_model("tiny", bits=bits, compute_dtype=dtype, device=device, seed=0,
                                     num_layers=LAYERS)
    torch.manual_seed(0)
    model = LoRAModel(base, LoRAConfig(rank=16, alpha=32, dropout=dropout, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            b = layer.lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen).to(b.device) * 0.05)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    families.patch_model_for_speed(model)
    if graphed:
        graphs.enable_layer_graphs(decoder_layers(model), checkpointing)
    model.train()
    return model


def _batch(device="cpu", seq=32):
    return torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(2)).to(device)


def _train(model, batches, steps=3, micro_batches=2):
    """Losses of every micro batch, and the adapters after `steps` AdamW steps (and their last gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        for i in range(micro_batches):
            loss = model(input_ids=batches[(step + i) % len(batches)], labels=batches[(step + i) % len(batches)]).loss
            loss.backward()
            losses.append(loss.detach())
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.stack(losses), grads, [p.detach().clone() for p in params]


def _assert_bitwise(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            assert len(x) == len(y) == LAYERS * 7 * 2
            for u, v in zip(x, y, strict=True):
                assert torch.equal(u, v), (u - v).abs().max()


@pytest.fixture
def rerun(monkeypatch):
    """The graph path on the CPU: each graph a `graphs._Rerun` (its Python run again at each replay, on the
    same static buffers): the slots, keyword buffers, gradient buffers and autograd wiring run for real."""
    monkeypatch.setattr(graphs, "_RERUN_OFF_CUDA", True)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "no-checkpointing"])
def test_the_graph_paths_bookkeeping_trains_as_the_eager_layers_bitwise(rerun, checkpointing):
    batches = [_batch(), _batch().flip(1)]
    graphed = _model(True, checkpointing)
    result = _train(graphed, batches)
    owner = decoder_layers(graphed)[0]._lora_dist_graphs[0]
    assert _captured(graphed) == LAYERS and owner.signatures == 1
    assert all(isinstance(r.fwd, graphs._Rerun) for r in owner.runners)
    # the embedding is frozen: layer 0's backward makes no input gradient (its base GEMMs), the others do
    assert [r.needs_x for r in owner.runners] == [False] + [True] * (LAYERS - 1)
    _assert_bitwise(result, _train(_model(False, checkpointing), batches))


def test_the_graph_path_with_padding_masks_and_two_forwards_before_a_backward_matches_eager(rerun):
    def run(model):
        losses = []
        for pad in ((5, 0), (0, 9), (3, 3)):  # a 4-D mask each micro batch: its values change, its shape not
            ids, mask = _padded_batch("cpu", pad=pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        a, b = _batch(), _batch().flip(1)
        pair = model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss  # a DPO pair
        pair.backward()
        losses.append(pair.detach())
        return torch.stack(losses), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    graphed = _model(True)
    got = run(graphed)
    owner = decoder_layers(graphed)[0]._lora_dist_graphs[0]
    assert owner.signatures == 2  # masked batches, then unmasked ones
    want = run(_model(False))
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))


def test_an_input_that_starts_needing_a_gradient_is_captured_again(rerun):
    # layer 0 was captured without x's gradient (frozen embedding); then the embedding trains
    model, eager = _model(True), _model(False)
    batch = _batch()
    _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    for m in (model, eager):
        m.base_model.model.embed_tokens.weight.requires_grad_(True)
    owner = decoder_layers(model)[0]._lora_dist_graphs[0]

    def embedding_grad(m):
        m.base_model.model.embed_tokens.weight.grad = None
        m(input_ids=batch, labels=batch).loss.backward()
        return m.base_model.model.embed_tokens.weight.grad

    assert torch.equal(embedding_grad(model), embedding_grad(eager))  # eager while stale
    assert torch.equal(embedding_grad(model), embedding_grad(eager))  # captured again, with x's gradient
    assert owner.signatures == 2 and owner.runners[0].needs_x


def test_the_graph_path_captures_again_for_a_new_shape_or_a_replaced_adapter(rerun):
    model, eager = _model(True), _model(False)
    owner = decoder_layers(model)[0]._lora_dist_graphs[0]
    for seq in (32, 48, 32):
        batch = _batch(seq=seq)
        _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    assert owner.signatures == 3
    for m in (model, eager):
        layer = next(iter(m.lora_layers.values()))
        layer.lora_A.weight = torch.nn.Parameter(layer.lora_A.weight.detach().clone() * 2)
    _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    assert owner.signatures == 4
    for m in (model, eager):  # a scaling changed in place: captured again too
        next(iter(m.lora_layers.values())).scaling *= 2
    _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    assert owner.signatures == 5 and owner.off_reason is not None  # past MAX_SIGNATURES: eager from here


def test_off_cuda_the_layers_run_as_the_models_own_checkpointing_bitwise():
    batches = [_batch()]
    _assert_bitwise(_train(_model(True), batches), _train(_model(False), batches))


def test_what_a_graph_cannot_replay_is_refused_with_its_reason():
    layer = decoder_layers(_model(True, dropout=0.1))[0]
    assert graphs._refusal(layer, (), {}) is None  # the adapters' dropout: seeded kernels replay it
    layer.mlp.extra_dropout = torch.nn.Dropout(0.1)  # any other dropout (Phi-3's residual one) is refused
    assert graphs._refusal(layer, (), {}).startswith("dropout outside the LoRA adapters")
    layer.mlp.extra_dropout.p = 0.0
    assert graphs._refusal(layer, (), {}) is None
    x = torch.zeros(1, 4, 64)
    assert graphs._refusal(layer, (x,), {}) == "positional arguments beyond the input"
    assert graphs._refusal(layer, (), {"extra": {"a": 1}}) == "a keyword argument of type dict"
    assert graphs._refusal(layer, (), {"position_embeddings": (x, x), "attention_mask": None, "n": 3}) is None


def test_enabling_over_block_checkpointing_offload_or_twice_is_refused():
    base = shapes.build_random_model("tiny", bits=None, seed=0, num_layers=LAYERS)
    model = LoRAModel(base, LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
    families.patch_model_for_speed(model, block_checkpointing=True)
    with pytest.raises(ValueError, match="block checkpointing and activation offload"):
        graphs.enable_layer_graphs(decoder_layers(model), True)
    base = shapes.build_random_model("tiny", bits=None, seed=0, num_layers=LAYERS)
    model = LoRAModel(base, LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
    offload.enable_activation_offload(model)
    with pytest.raises(ValueError, match="block checkpointing and activation offload"):
        graphs.enable_layer_graphs(decoder_layers(model), True)
    model = _model(True)
    with pytest.raises(ValueError, match="already enabled"):
        graphs.enable_layer_graphs(decoder_layers(model), True)


def test_eval_and_no_grad_forwards_run_the_layers_own_forward():
    graphed, plain = _model(True).eval(), _model(False).eval()
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(graphed(input_ids=batch).logits, plain(input_ids=batch).logits)


def _captured(model) -> int:
    owner = decoder_layers(model)[0]._lora_dist_graphs[0]
    return sum(r.fwd is not None and r.bwd is not None for r in owner.runners)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "no-checkpointing"])
def test_graphed_layers_train_as_the_eager_layers_bitwise(checkpointing):
    # Three AdamW steps of two micro batches each over an NF4 base in bf16: every loss, the last
    # gradients and the trained adapters equal the eager layers' bit for bit (a replay is the
    # capture's kernels on the same inputs; the static buffers carry each micro batch's values).
    batches = [_batch("cuda"), _batch("cuda").flip(1)]
    graphed = _model(True, checkpointing, device="cuda", dtype=torch.bfloat16, bits=4)
    result = _train(graphed, batches)
    assert _captured(graphed) == LAYERS
    assert decoder_layers(graphed)[0]._lora_dist_graphs[0].signatures == 1  # captured once, replayed after
    _assert_bitwise(result, _train(_model(False, checkpointing, device="cuda", dtype=torch.bfloat16, bits=4),
                                   batches))


@pytest.mark.gpu
def test_a_new_shape_or_a_replaced_adapter_captures_again():
    model = _model(True, device="cuda", dtype=torch.bfloat16, bits=4)
    eager = _model(False, device="cuda", dtype=torch.bfloat16, bits=4)
    owner = decoder_layers(model)[0]._lora_dist_graphs[0]
    for seq in (32, 48, 32):
        batch = _batch("cuda", seq)
        _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    assert owner.signatures == 3 and _captured(model) == LAYERS
    for m in (model, eager):  # an adapter replaced (not changed in place): its layer's graphs read it no more
        layer = next(iter(m.lora_layers.values()))
        layer.lora_A.weight = torch.nn.Parameter(layer.lora_A.weight.detach().clone() * 2)
    _assert_bitwise(_train(model, [batch], steps=1), _train(eager, [batch], steps=1))
    assert owner.signatures == 4


@pytest.mark.gpu
def test_graphed_lora_dropout_draws_new_masks_each_replay_and_the_forwards_in_the_recompute():
    # Rank 16 in bf16 on CUDA: the Triton dropout kernels, seeded per layer. From the same generator
    # state, checkpointed graphs (the recompute draws its masks again) train as graphs that keep the
    # forward's activations, bit for bit; two micro batches of one batch see different masks.
    batch = _batch("cuda")
    runs = {}
    for checkpointing in (True, False):
        model = _model(True, checkpointing, device="cuda", dtype=torch.bfloat16, bits=4, dropout=0.1)
        torch.manual_seed(5)
        runs[checkpointing] = _train(model, [batch], steps=2)
        assert _captured(model) == LAYERS
    _assert_bitwise(runs[True], runs[False])
    losses = runs[True][0]
    assert losses[0] != losses[1] and losses[2] != losses[3]
    plain = _train(_model(True, device="cuda", dtype=torch.bfloat16, bits=4), [batch], steps=2)[0]
    assert plain[0] == plain[1] and plain[2] == plain[3]  # without dropout one batch gives one loss


def test_the_job_graphs_the_layers_only_where_asked_and_they_apply():
    from lora_dist import train
    from lora_dist.config import Config, ModelConfig

    def cfg(**model):
        return Config(model=ModelConfig(path="unused", bits=4, fused_kernels="on", **model))

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # devices are only inspected
    assert not cfg().model.cuda_graphs  # opt-in: no faster on a fast host, 2 GiB more (see ModelConfig)
    assert train.graphs_apply(cfg(cuda_graphs=True), cuda, use_deepspeed=False)
    assert not train.graphs_apply(cfg(cuda_graphs=True), cpu, use_deepspeed=False)
    assert not train.graphs_apply(cfg(cuda_graphs=True), cuda, use_deepspeed=True)
    assert not train.graphs_apply(cfg(cuda_graphs=True, activation_offload=True), cuda, use_deepspeed=False)
    assert not train.graphs_apply(cfg(), cuda, use_deepspeed=False)
    for asked in (True, False):
        base = shapes.build_random_model("tiny", bits=None, seed=0, num_layers=LAYERS)
        model = LoRAModel(base, LoRAConfig(rank=4, alpha=8, target_modules=TARGETS))
        assert train._patch_for_speed(cfg(cuda_graphs=asked), model, cuda) is True
        assert all(hasattr(layer, "_lora_dist_graphs") == asked for layer in decoder_layers(model))


def test_keyword_tensors_are_shared_by_layers_given_the_same_one_and_kept_apart_otherwise():
    # Gemma 3 gives local and global layers different rotary tables, Gemma 2 different masks: each
    # layer's backward must recompute from what its own forward read
    shared = graphs._Shared(torch.device("cpu"), ())
    maps = [{} for _ in range(3)]
    local, glob = torch.ones(2, 4), torch.full((2, 4), 10.0)
    tables = {"local": (local, local + 1), "global": (glob, glob + 1)}  # (cos, sin) per layer type
    outs = [shared.static_kwargs(m, {"pe": tables[t], "mask": None, "n": 3}, forward=1)
            for m, t in zip(maps, ("local", "global", "local"))]
    assert outs[0]["pe"][0] is outs[2]["pe"][0] and outs[0]["pe"][0] is not outs[1]["pe"][0]
    assert outs[0]["mask"] is None and outs[0]["n"] == 3 and len(shared.statics) == 4
    assert torch.equal(outs[0]["pe"][0], local) and torch.equal(outs[1]["pe"][0], glob)
    tables = {"local": (local * 2, local * 3), "global": (glob * 2, glob * 3)}  # the next forward's: copied in
    outs = [shared.static_kwargs(m, {"pe": tables[t]}, forward=2) for m, t in zip(maps, ("local", "global", "local"))]
    assert torch.equal(outs[0]["pe"][0], local * 2) and torch.equal(outs[1]["pe"][1], glob * 3)
    assert len(shared.statics) == 4
    # layers that shared a buffer at capture get different tensors in one forward: the second is refused
    assert shared.static_kwargs(maps[0], {"pe": (local, local)}, forward=3) is not None
    assert shared.static_kwargs(maps[2], {"pe": (glob, glob)}, forward=3) is None
    assert torch.equal(outs[0]["pe"][0], local)  # layer 0's buffer still holds what its forward read


def test_a_layers_state_sees_scaling_dropout_and_fp8_changes():
    from lora_dist import kernels

    layer = decoder_layers(_model(True, dropout=0.1))[0]
    state = graphs._state_of(layer)
    assert graphs._state_of(layer) == state
    lora = layer.self_attn.q_proj
    lora.scaling *= 2
    assert graphs._state_of(layer) != state
    lora.scaling /= 2
    lora.lora_dropout.p = 0.2
    assert graphs._state_of(layer) != state
    lora.lora_dropout.p = 0.1
    kernels.set_fp8_base_gemms(True)
    try:
        assert graphs._state_of(layer) != state
    finally:
        kernels.set_fp8_base_gemms(False)
    assert graphs._state_of(layer) == state


def _padded_batch(device="cuda", seq=32, pad=(5, 0)):
    ids = _batch(device, seq)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        if n:
            mask[row, :n] = 0  # left padding
    return ids, mask


@pytest.mark.gpu
def test_graphed_layers_with_padding_masks_and_two_forwards_before_a_backward_match_eager():
    # Written at stop 15, not yet run on a GPU (no device time left). A 4-D mask per micro batch (its
    # values change, its shape does not: one capture); then two forwards before one backward (a DPO
    # pair): the second runs eagerly, both gradients equal the eager model's bit for bit.
    def run(model):
        losses = []
        for pad in ((5, 0), (0, 9), (3, 3)):
            ids, mask = _padded_batch(pad=pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        a, b = _batch("cuda"), _batch("cuda").flip(1)
        pair = model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss
        pair.backward()
        losses.append(pair.detach())
        return torch.stack(losses), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    graphed = _model(True, device="cuda", dtype=torch.bfloat16, bits=4)
    got = run(graphed)
    assert decoder_layers(graphed)[0]._lora_dist_graphs[0].signatures == 2  # masked, then unmasked batches
    want = run(_model(False, device="cuda", dtype=torch.bfloat16, bits=4))
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))
