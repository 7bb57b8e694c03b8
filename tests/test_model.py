"""LoRAModel and apply_lora_to_model on a tiny Hugging Face Llama and on plain modules (optimizer tests: test_optim.py)."""

import ast
import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lora_dist.model
from lora_dist import (
    LoRAConfig,
    LoRALayer,
    LoRAModel,
    apply_lora_to_model,
    quantize_model,
)
from lora_dist.errors import ConfigError
from lora_dist.quant import logical_numel

HIDDEN, INTER, VOCAB = 64, 128, 256
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def batch(seed: int = 0, n: int = 4, t: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def test_targets_are_replaced_in_place_and_listed_by_full_name():
    model = LoRAModel(tiny_llama(), {"target_modules": ["q_proj", "v_proj"], "rank": 4})
    assert sorted(model.lora_layers) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    for name, layer in model.lora_layers.items():
        assert model.base_model.get_submodule(name) is layer
    keys = set(model.state_dict())
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys


def test_only_adapter_parameters_train():
    model = LoRAModel(tiny_llama(), LoRAConfig(rank=4, target_modules=ATTN + MLP))
    trainable = {id(p) for p in model.get_trainable_parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name
        assert p.requires_grad == ("lora_A" in name or "lora_B" in name), name
    # r * (in + out) per adapted linear: q,o 64x64; k,v 64->32 (2 kv heads of 16); MLP 64<->128
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    expected = 2 * sum(4 * (i + o) for i, o in shapes.values())
    assert model.trainable_parameter_count()[0] == expected


def test_forward_passes_through_with_labels():
    base = tiny_llama()
    ids = batch()
    with torch.no_grad():
        reference = base(input_ids=ids, labels=ids)
        model = LoRAModel(base, {"target_modules": ATTN})
        out = model(input_ids=ids, labels=ids)
    # B = 0 at init: the adapted model computes the base model exactly
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.loss, reference.loss)
    assert model.config is base.config  # HF attributes read through


def test_regex_targets_and_excludes():
    cfg = {"target_modules": r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
           "exclude_modules": ["layers.1.mlp.down_proj"]}
    model = LoRAModel(tiny_llama(), cfg)
    assert sorted(model.lora_layers) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_rank_and_alpha_patterns_override_per_module():
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"v_proj": 16}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    model = LoRAModel(tiny_llama(), cfg)
    layers = model.lora_layers
    assert layers["model.layers.0.self_attn.v_proj"].rank == 16
    assert layers["model.layers.0.self_attn.q_proj"].rank == 4
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 2 / 4
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 8 / 4


def test_no_match_lists_available_linears():
    with pytest.raises(ValueError, match=r"matched no module; linear modules available: model\.layers\.0\.self_attn\.q_proj"):
        LoRAModel(tiny_llama(), {"target_modules": ["query"]})


def test_unsupported_module_is_named_with_available_linears():
    with pytest.raises(ConfigError, match=r"'model\.embed_tokens', a Embedding, which LoRA cannot wrap.*available: model\.layers"):
        LoRAModel(tiny_llama(), {"target_modules": ["embed_tokens"]})


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": "("}, "target_modules is not a valid regex"),
        ({"bias": "some"}, "bias must be one of"),
        ({"rank_pattern": {"q_proj": 0}}, "rank must be a positive integer"),
        ({"ranks": 4}, r"unknown LoRA config key\(s\) \['ranks'\]"),
        ({"target_modules": [1, None]}, "target_modules must be a non-empty list"),
        ({"exclude_modules": [3]}, "exclude_modules must be a list"),
        ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern key 'q_proj\(' is not a valid regex"),
    ],
)
def test_bad_config_raises_clear_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig.from_dict(cfg)


def test_merge_and_unmerge_toggles_and_reports_state():
    model = LoRAModel(tiny_llama(), {"target_modules": ATTN})
    assert model.merged is False
    assert model.merge_and_unmerge() is True and model.merged
    assert all(layer.merged for layer in model.lora_layers.values())
    assert model.merge_and_unmerge() is False and not model.merged
    started = LoRAModel(tiny_llama(), {"target_modules": ATTN}, merge_weights=True)
    assert started.merged


def test_trainable_parameter_count_counts_4bit_weights_not_bytes():
    dense = LoRAModel(tiny_llama(), {"target_modules": ATTN})
    quantized = LoRAModel(quantize_model(tiny_llama(), bits=4, compute_dtype=torch.float32), {"target_modules": ATTN})
    assert quantized.trainable_parameter_count() == dense.trainable_parameter_count()
    packed = [p for p in quantized.parameters() if isinstance(p, bnb.nn.Params4bit)]
    assert packed and all(logical_numel(p) == 2 * p.numel() for p in packed)


def test_adapter_state_dict_holds_only_adapter_tensors():
    model = LoRAModel(tiny_llama(), {"target_modules": ["q_proj"], "rank": 2})
    sd = model.adapter_state_dict()
    assert sorted(sd) == sorted(
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"
    )


@pytest.mark.parametrize("mode, expected", [("none", 0), ("lora_only", 2), ("all", 3)])
def test_bias_modes_choose_which_biases_train(mode, expected):
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64))
    model = LoRAModel(base, {"target_modules": ["0", "2"], "bias": mode})
    biases = [p for p in model.get_trainable_parameters() if p.ndim == 1]
    assert len(biases) == expected
    assert all(p.requires_grad for p in biases)


def test_merge_and_export_is_a_model_method(tmp_path):
    model = LoRAModel(tiny_llama(), {"target_modules": ATTN})
    out = model.merge_and_export(tmp_path / "merged", dtype=torch.float32)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _runtime_imports() -> dict[str, set[str]]:
    """{lora_dist module: the lora_dist modules it imports}, function-level imports included.

    Imports under `if TYPE_CHECKING:` are left out: they never run (annotations only).
    """
    package = Path(lora_dist.model.__file__).parent
    modules = {".".join(f.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in package.rglob("*.py")}
    graph = {}
    for name, file in modules.items():
        tree = ast.parse(file.read_text())
        typing_only = {id(n) for block in ast.walk(tree)
                       if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
                       for statement in block.body for n in ast.walk(statement)}
        graph[name] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target not in ("", name, "lora_dist"):
                    graph[name].add(target)
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", ["model", "lora_config", "adapter_files", "export", "adapters", "quant", "loading"])
def test_adapter_and_model_modules_are_on_no_import_cycle(module):
    # model -> adapters -> model was a cycle: LoRAModel's adapter methods now call adapter_files and
    # export, which never import model.py (not even inside a function); adapters sits above model.
    graph = _runtime_imports()
    assert f"lora_dist.{module}" not in _reaches(graph, f"lora_dist.{module}")
    below_model = _reaches(graph, "lora_dist.model")
    assert {"lora_dist.adapter_files", "lora_dist.export", "lora_dist.lora_config"} <= below_model
    assert not below_model & {"lora_dist.adapters", "lora_dist.train", "lora_dist.checkpoint", "lora_dist.loading"}


# ------------------------------------------------------------------------------------- patterns
def test_alternation_pattern_key_reaches_every_branch_as_in_peft():
    # PEFT matches (.*\.)?(KEY)$: the group makes `q_proj|v_proj` a suffix alternation.
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=ATTN, rank_pattern={"q_proj|v_proj": 2},
                     alpha_pattern={"q_proj|v_proj": 64})
    assert [cfg.rank_for(f"model.layers.0.self_attn.{p}") for p in ATTN] == [2, 4, 2, 4]
    assert [cfg.alpha_for(f"model.layers.1.self_attn.{p}") for p in ATTN] == [64, 8, 64, 8]
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 4  # a suffix after a dot, not a substring


def test_first_matching_pattern_key_wins_in_dict_order():
    name = "model.layers.0.self_attn.q_proj"
    assert LoRAConfig(rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}).rank_for(name) == 2
    assert LoRAConfig(rank_pattern={r"layers\.0\.self_attn\.q_proj": 6, "q_proj": 2}).rank_for(name) == 6
    assert LoRAConfig(rank_pattern={"layers.1.self_attn.q_proj": 6}).rank_for(name) == 8  # the default rank


# ------------------------------------------------------------------------------------- rank limit
def test_rank_above_a_layers_size_is_refused_naming_the_layer_and_its_limit():
    # k_proj is 64 -> 32 (2 kv heads of 16): B @ A has rank <= 32 there, whatever r is.
    base = tiny_llama()
    with pytest.raises(ConfigError, match=r"LoRA rank 48 of model\.layers\.0\.self_attn\.k_proj exceeds "
                                          r"min\(in_features, out_features\) = 32 \(and 1 more layers\).*rank <= 32"):
        LoRAModel(base, LoRAConfig(rank=48, target_modules=["q_proj", "k_proj"]))
    assert not any(isinstance(m, LoRALayer) for m in base.modules())  # refused before any injection
    model = LoRAModel(base, LoRAConfig(rank=48, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 32}))
    assert model.lora_layers["model.layers.0.self_attn.k_proj"].rank == 32


def test_rank_above_a_layers_size_from_an_adapter_file_is_logged_not_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_dist.model"):
        model = LoRAModel(tiny_llama(), LoRAConfig(rank=48, target_modules=["k_proj"]), allow_rank_above_layer_size=True)
    assert model.lora_layers["model.layers.0.self_attn.k_proj"].rank == 48
    assert [r.getMessage() for r in caplog.records] == [
        ("LoRA rank 48 of model.layers.0.self_attn.k_proj exceeds min(in, out) = 32 (and 1 more layers): "
         "the extra rank adds bytes, not capacity")
    ]


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_training_lowers_loss_and_changes_only_adapter_tensors(bits):
    base = tiny_llama()
    if bits:
        quantize_model(base, bits=bits, compute_dtype=torch.float32)
    model, opt = apply_lora_to_model(base, {"target_modules": ATTN + MLP, "rank": 8, "alpha": 16}, lr=1e-2)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    ids = batch(n=8, t=16)  # one fixed batch: memorizing it must drive the loss down
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # random init: loss starts near ln(256) = 5.55; 30 AdamW steps at lr 1e-2 on one batch drop it by
    # well over 1 nat, far beyond step-to-step noise (no dropout, fixed batch: the run is deterministic)
    assert losses[-1] < losses[0] - 1.0, losses
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert len(changed) == len(adapter_before)


def test_merged_model_matches_unmerged_logits_after_training():
    base = quantize_model(tiny_llama(), bits=4, compute_dtype=torch.float32)
    model, opt = apply_lora_to_model(base, {"target_modules": ATTN + MLP}, lr=1e-2)
    ids = batch()
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge()
        merged = model(input_ids=ids).logits
        model.unmerge()
        again = model(input_ids=ids).logits
    # fp32 through 2 layers of K <= 128 sums: per-layer relative error ~ K * 2^-24 ~ 1e-5 of |logit| scale
    assert (merged - unmerged).abs().max() <= 1e-4
    assert torch.equal(again, unmerged)


def test_merged_model_refuses_training_forward():
    model = LoRAModel(tiny_llama(), {"target_modules": ATTN}, merge_weights=True)
    model.train()
    ids = batch()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(input_ids=ids, labels=ids)


def test_model_without_linears_reports_none_available():
    with pytest.raises(ValueError, match="no nn.Linear or bitsandbytes linear"):
        LoRAModel(nn.Sequential(nn.ReLU()), {"target_modules": ["1"]})
    with pytest.raises(ConfigError, match="'0', a ReLU, which LoRA cannot wrap"):
        LoRAModel(nn.Sequential(nn.ReLU()), {"target_modules": ["0"]})


def test_lora_layer_is_exported_at_top_level():
    import lora_dist

    assert set(lora_dist.__all__) >= {"LoRALayer", "LoRAModel", "LoRAOptimizer", "LoRAConfig", "apply_lora_to_model"}
    assert lora_dist.LoRALayer is LoRALayer


def test_linear_subclasses_a_parent_reads_as_weights_are_refused():
    # MultiheadAttention reads out_proj.weight itself: wrapping it would break at the first forward
    attention = nn.MultiheadAttention(64, 4)
    with pytest.raises(ConfigError, match="'out_proj', a NonDynamicallyQuantizableLinear, which LoRA cannot wrap"):
        LoRAModel(attention, {"target_modules": ["out_proj"]})


def test_int8_layer_that_keeps_fp16_weights_is_refused():
    holder = nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True))
    with pytest.raises(ConfigError, match="Linear8bitLt, which LoRA cannot wrap"):
        LoRAModel(holder, {"target_modules": ["0"]})
