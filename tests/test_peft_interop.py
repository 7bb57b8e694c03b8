"""Adapters mean the same thing here and in PEFT 0.21, checked against PEFT in the same process.

Both directions (our file into PEFT, PEFT's file into ours) on a tiny Llama (hidden 64, MLP 128,
k/v 32 wide, 2 layers, vocab 256) saved to disk and loaded dense, 4-bit (NF4) or 8-bit (LLM.int8)
with real bitsandbytes on the CPU, computing in fp32.

Tolerances. Two models that hold the same base layers and the same fp32 adapter tensors compute
base(x) + s * B(A(x)) with the same kernels; what may differ is the order of a few fp32 additions
inside PEFT's layer, so logits (|logits| < 1 here) agree to a few fp32 ulps: PEFT_TOL = 1e-5.
A merge is W + s * (B @ A) in fp32 on both sides with the same operations, so merged weights are
compared bitwise, and a bf16 export against PEFT's fp32 merge rounded once to bf16, bitwise too.
"""

import json
import logging
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.integrations import dequantize_bnb_weight
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_dist import LoRAConfig, LoRAModel
from lora_dist.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CARD,
    from_pretrained,
    run_merge,
    save_adapter,
)
from lora_dist.errors import AdapterError
from lora_dist.loading import load_base_model
from test_loading import VOCAB, save_tiny_llama

PEFT_TOL = 1e-5
BITS = {"dense": None, "4bit": 4, "8bit": 8}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    save_tiny_llama(folder, tokenizer=False)
    return folder


def load_base(base_dir, kind="dense"):
    model, _ = load_base_model(str(base_dir), bits=BITS[kind], compute_dtype=torch.float32, require_tokenizer=False)
    return model.eval()


def randomize_b(model: LoRAModel, seed: int = 1) -> LoRAModel:
    """B random too: a fresh adapter (B = 0) computes its base exactly, so comparisons would be vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    return model.eval()


@torch.no_grad()
def logits(model):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(ids).logits


def peft_layers(peft_model):
    """{HF module name: PEFT LoRA layer} of a PeftModel."""
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules() if hasattr(m, "lora_A")
            and "default" in getattr(m, "lora_A", {})}


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------- patterns
PATTERNS = {"rank_pattern": {"q_proj|v_proj": 2, "down_proj": 6}, "alpha_pattern": {"q_proj|v_proj": 64}}


@pytest.mark.parametrize("kind", ["dense", "4bit", "8bit"])
def test_alternation_pattern_keys_from_our_file_mean_the_same_in_peft(base_dir, tmp_path, kind):
    ours = randomize_b(LoRAModel(load_base(base_dir, kind), LoRAConfig(rank=4, alpha=8, target_modules=ALL, **PATTERNS)))
    ours.save_adapter(tmp_path / "a")  # the method spelling (tests elsewhere use the function)
    peft_model = PeftModel.from_pretrained(load_base(base_dir, kind), tmp_path / "a").eval()
    theirs = peft_layers(peft_model)
    assert sorted(theirs) == sorted(ours.lora_layers)
    for name, layer in ours.lora_layers.items():
        assert (theirs[name].r["default"], theirs[name].scaling["default"]) == (layer.rank, layer.scaling), name
    assert ours.lora_layers["model.layers.1.self_attn.v_proj"].scaling == 32.0  # the second branch: 64 / 2
    diff = max_diff(logits(peft_model), logits(ours))
    print(f"patterns ours->PEFT {kind}: max |logit diff| {diff:.3g}")
    assert diff <= PEFT_TOL


@pytest.mark.parametrize("kind", ["dense", "4bit", "8bit"])
def test_alternation_pattern_keys_from_peft_file_mean_the_same_here(base_dir, tmp_path, kind):
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, **PATTERNS)
    peft_model = get_peft_model(load_base(base_dir, kind), config).eval()
    peft_model.save_pretrained(tmp_path / "p")
    ours = LoRAModel.from_pretrained(load_base(base_dir, kind), tmp_path / "p").eval()
    theirs = peft_layers(peft_model)
    for name, layer in ours.lora_layers.items():
        assert (layer.rank, layer.scaling) == (theirs[name].r["default"], theirs[name].scaling["default"]), name
    diff = max_diff(logits(ours), logits(peft_model))
    print(f"patterns PEFT->ours {kind}: max |logit diff| {diff:.3g}")
    assert diff <= PEFT_TOL


def test_overlapping_pattern_keys_keep_their_priority_in_our_file(base_dir, tmp_path):
    # The first matching key wins (dict order). PEFT writes its config with sort_keys=True, which can
    # reorder such keys (here r"layers\.0..." < "q_proj"); we keep the order the adapter was built with.
    patterns = {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}
    ours = randomize_b(LoRAModel(load_base(base_dir), LoRAConfig(rank=4, target_modules=["q_proj"], rank_pattern=patterns)))
    assert {layer.rank for layer in ours.lora_layers.values()} == {2}
    save_adapter(ours, tmp_path / "a")
    assert list(json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["rank_pattern"]) == list(patterns)
    peft_model = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a").eval()
    assert max_diff(logits(peft_model), logits(ours)) <= PEFT_TOL


def test_peft_file_with_rank_above_a_layers_size_loads_with_a_logged_line(base_dir, tmp_path, caplog):
    # k_proj is 64 -> 32: r = 48 wastes bytes but is a valid PEFT adapter, computed exactly.
    config = PeftLoraConfig(r=48, lora_alpha=8, target_modules=["k_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_base(base_dir), config).eval()
    peft_model.save_pretrained(tmp_path / "p")
    with caplog.at_level(logging.WARNING, logger="lora_dist.model"):
        ours = from_pretrained(load_base(base_dir), tmp_path / "p").eval()
    assert len(caplog.records) == 1 and "exceeds min(in, out) = 32" in caplog.records[0].getMessage()
    assert max_diff(logits(ours), logits(peft_model)) <= PEFT_TOL


# ------------------------------------------------------------------------------------- embeddings and heads
@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_peft_lm_head_adapter_with_the_base_head_stored_loads_and_ignores_it(base_dir, tmp_path, kind, caplog):
    # PEFT's save_embedding_layers="auto" stores lm_head.base_layer.weight when lm_head is targeted.
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(load_base(base_dir, kind), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        peft_model.save_pretrained(tmp_path / "p")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "p" / ADAPTER_WEIGHTS)
    with caplog.at_level(logging.INFO, logger="lora_dist.adapter_files"):
        ours = from_pretrained(load_base(base_dir, kind), tmp_path / "p").eval()
    assert [r.getMessage() for r in caplog.records] == [
        "adapter stores lm_head.base_layer.weight identical to the base's: ignored"]
    assert ours.carried_weights == set()
    assert max_diff(logits(ours), logits(peft_model)) <= PEFT_TOL
    save_adapter(ours, tmp_path / "a")  # and back: PEFT loads ours (no base head stored) the same
    again = PeftModel.from_pretrained(load_base(base_dir, kind), tmp_path / "a").eval()
    assert max_diff(logits(again), logits(peft_model)) <= PEFT_TOL


def test_peft_adapter_with_a_trained_head_uses_it_and_saves_it_again(base_dir, tmp_path):
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(load_base(base_dir), config).eval()
    with torch.no_grad():  # a head changed in training: PEFT stores and loads it
        peft_model.base_model.model.lm_head.base_layer.weight.add_(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "p")
    ours = from_pretrained(load_base(base_dir), tmp_path / "p").eval()
    assert ours.carried_weights == {"lm_head.base_layer.weight"}
    diff = max_diff(logits(ours), logits(peft_model))
    print(f"trained lm_head PEFT->ours: max |logit diff| {diff:.3g}")
    assert diff <= PEFT_TOL
    save_adapter(ours, tmp_path / "a")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    again = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a").eval()
    assert max_diff(logits(again), logits(peft_model)) <= PEFT_TOL


def test_peft_adapter_with_changed_embeddings_saved_in_full_loads_here(base_dir, tmp_path):
    # save_embedding_layers=True with untargeted embeddings (PEFT's choice after a vocabulary resize)
    # stores model.embed_tokens.weight and lm_head.weight whole.
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_base(base_dir), config).eval()
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    ours = from_pretrained(load_base(base_dir), tmp_path / "p").eval()
    assert ours.carried_weights == {"model.embed_tokens.weight"}  # lm_head.weight equals the base's
    assert max_diff(logits(ours), logits(peft_model)) <= PEFT_TOL


def test_embeddings_of_a_resized_vocabulary_name_the_fix(base_dir, tmp_path):
    folder = tmp_path / "resized"
    save_tiny_llama(folder, tokenizer=False)
    bigger = AutoModelForCausalLM.from_pretrained(folder)
    bigger.resize_token_embeddings(VOCAB + 64)
    peft_model = get_peft_model(bigger, PeftLoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    base = load_base(base_dir)
    with pytest.raises(AdapterError, match=r"shape \(320, 64\) but the base's is \(256, 64\).*resize the base first"):
        from_pretrained(base, tmp_path / "p")
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # left plain


def test_modules_to_save_adapter_loads_and_saves_as_peft_does(base_dir, tmp_path):
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                            init_lora_weights=False)
    peft_model = get_peft_model(load_base(base_dir), config).eval()
    with torch.no_grad():  # the trained copy PEFT keeps beside the original head
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    peft_model.save_pretrained(tmp_path / "p")
    ours = from_pretrained(load_base(base_dir), tmp_path / "p").eval()
    assert ours.modules_to_save == ["lm_head"] and ours.carried_weights == {"lm_head.weight"}
    diff = max_diff(logits(ours), logits(peft_model))
    print(f"modules_to_save PEFT->ours: max |logit diff| {diff:.3g}")
    assert diff <= PEFT_TOL
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["lm_head"]
    again = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a").eval()
    assert max_diff(logits(again), logits(peft_model)) <= PEFT_TOL


def test_lora_on_an_embedding_is_refused_in_one_line_and_the_base_left_plain(base_dir, tmp_path):
    config = PeftLoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(load_base(base_dir), config).save_pretrained(tmp_path / "p")
    base = load_base(base_dir)
    with pytest.raises(AdapterError, match=r"'model\.embed_tokens', a Embedding, which LoRA cannot wrap") as err:
        from_pretrained(base, tmp_path / "p")
    assert "\n" not in str(err.value)
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# ------------------------------------------------------------------------------------- config and card
def test_config_has_every_field_peft_writes_and_loads_in_peft_without_a_warning(base_dir, tmp_path):
    ours = LoRAModel(load_base(base_dir), LoRAConfig(rank=4, alpha=16.0, target_modules=["q_proj"],
                                                     alpha_pattern={"q_proj": 32.0}))
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="org/tiny")
    written = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    peft_model = get_peft_model(load_base(base_dir), PeftLoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "p")
    peft_written = json.loads((tmp_path / "p" / ADAPTER_CONFIG).read_text())
    assert set(written) == set(peft_written)
    assert written["lora_alpha"] == 16 and type(written["lora_alpha"]) is int
    assert written["alpha_pattern"] == {"q_proj": 32} and type(written["alpha_pattern"]["q_proj"]) is int
    assert written["peft_version"] == peft_written["peft_version"]  # the release we mirror and test against
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a")
    assert not [w for w in caught if "nexpected" in str(w.message) or "missing" in str(w.message).lower()]


def test_model_card_names_the_base_settings_and_training(base_dir, tmp_path):
    ours = LoRAModel(load_base(base_dir, "4bit"), LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="org/tiny", training={"steps": 30, "eval_loss": 1.63})
    card = (tmp_path / "a" / MODEL_CARD).read_text()
    assert card.startswith("---\nbase_model: \"org/tiny\"\nlibrary_name: peft\n")
    assert "r=4, lora_alpha=8" in card and "q_proj, v_proj" in card and "4-bit nf4, double quant" in card
    assert "- Training: steps 30, eval_loss 1.63" in card
    save_adapter(ours, tmp_path / "a", training={"steps": 60})  # our own card is refreshed
    assert "- Training: steps 60" in (tmp_path / "a" / MODEL_CARD).read_text()


def test_saving_an_adapter_other_clients_compute_differently_logs_one_line(base_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_dist.adapter_files"):
        save_adapter(LoRAModel(load_base(base_dir), LoRAConfig(rank=4, target_modules=["q_proj"])), tmp_path / "plain")
        assert caplog.records == []
        cfg = LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], use_rslora=True, alpha_pattern={"v_proj": 4})
        save_adapter(LoRAModel(load_base(base_dir), cfg), tmp_path / "special")
        special = LoRAModel(load_base(base_dir), cfg)
        save_adapter(special, tmp_path / "again")
        save_adapter(special, tmp_path / "again")  # a run saving every checkpoint says it once
    assert len(caplog.records) == 2
    assert "rsLoRA scaling" in caplog.records[0].getMessage()
    assert "per-module alpha_pattern" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------------- merge
def peft_merged_weights(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's merge of every adapted linear, in fp32: dequantize (bnb) + get_delta_weight, before any requantization.

    This is exactly the w_data PEFT's bnb merge computes (and then quantizes back into int8/4-bit
    when merging in place); for a dense base it is what merge_and_unload writes into the weight.
    """
    out = {}
    for name, layer in peft_layers(peft_model).items():
        base = layer.get_base_layer()
        weight = base.weight
        if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
            w = dequantize_bnb_weight(weight, state=getattr(base, "state", None)).float()
        else:
            w = weight.detach().float()
        out[name + ".weight"] = w + layer.get_delta_weight("default")
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "4bit", "8bit"])
def test_merge_equals_peft_merge_over_the_same_base_rounded_once(base_dir, tmp_path, kind, dtype):
    ours = randomize_b(LoRAModel(load_base(base_dir, kind), LoRAConfig(rank=4, alpha=8, target_modules=ALL)))
    save_adapter(ours, tmp_path / "a", base_model_name_or_path=str(base_dir))
    run_merge(str(base_dir), str(tmp_path / "a"), str(tmp_path / "out"), dtype=dtype)
    exported = load_file(tmp_path / "out" / "model.safetensors")

    peft_model = PeftModel.from_pretrained(load_base(base_dir, kind), tmp_path / "a").eval()
    reference = peft_merged_weights(peft_model)
    export_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    worst = max(max_diff(exported[name], w.to(export_dtype)) for name, w in reference.items())
    print(f"merge {kind} -> {dtype}: max |weight - PEFT fp32 merge rounded to {dtype}| {worst:.3g}")
    for name, w in reference.items():
        assert exported[name].dtype == export_dtype
        assert torch.equal(exported[name], w.to(export_dtype)), name  # one rounding, of the same fp32 sum

    if dtype == "fp32":  # logits: the exported model against a dense model holding PEFT's merged weights
        dense = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        dense.load_state_dict({**dense.state_dict(), **reference})
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        diff = max_diff(logits(model), logits(dense))
        print(f"merge {kind}: max |logit diff| vs PEFT's merged weights {diff:.3g}")
        assert diff == 0.0


def test_8bit_adapter_records_what_its_merge_needs(base_dir, tmp_path):
    ours = LoRAModel(load_base(base_dir, "8bit"), LoRAConfig(rank=4, target_modules=["q_proj"]))
    save_adapter(ours, tmp_path / "a")
    with safe_open(tmp_path / "a" / ADAPTER_WEIGHTS, framework="pt") as f:
        recorded = json.loads(f.metadata()["lora_dist_base_quantization"])
    assert recorded == {"bits": 8, "compute_dtype": "float32", "dtype": "float32", "threshold": 6.0}
    ours = LoRAModel(load_base(base_dir, "4bit"), LoRAConfig(rank=4, target_modules=["q_proj"]))
    save_adapter(ours, tmp_path / "b")
    with safe_open(tmp_path / "b" / ADAPTER_WEIGHTS, framework="pt") as f:
        recorded = json.loads(f.metadata()["lora_dist_base_quantization"])
    assert recorded == {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64,
                        "compute_dtype": "float32", "dtype": "float32"}


def test_modules_to_save_over_a_tied_head_is_refused_in_one_line(tmp_path):
    # PEFT trains a separate copy of lm_head; writing it into a head tied to the embeddings would
    # change the embeddings too, so that base is refused with the fix.
    def tied():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()

    config = PeftLoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tied(), config).save_pretrained(tmp_path / "p")
    base = tied()
    with pytest.raises(AdapterError, match=r"'lm_head\.weight' is tied to 'model\.embed_tokens\.weight'.*tie_word_embeddings=False"):
        from_pretrained(base, tmp_path / "p")
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.gpu
def test_cuda_bf16_4bit_adapter_means_the_same_in_peft_both_ways(base_dir, tmp_path):
    # The real QLoRA setting: NF4 on the GPU computing in bf16, patterns included. Both sides run the
    # same bnb kernel for the base and an fp32 adapter branch cast to bf16 once, so logits agree up to
    # the order of a few bf16 additions: 1e-2 on |logits| < 1 is a few bf16 ulps (2^-8) of margin.
    def cuda_base():
        model, _ = load_base_model(str(base_dir), bits=4, compute_dtype=torch.bfloat16, require_tokenizer=False)
        return model.eval()

    ours = randomize_b(LoRAModel(cuda_base(), LoRAConfig(rank=4, alpha=8, target_modules=ALL, **PATTERNS)))
    ours.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(cuda_base(), tmp_path / "a").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        diff = max_diff(peft_model(ids).logits, ours(ids).logits)
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, **PATTERNS)
    theirs = get_peft_model(cuda_base(), config).eval()
    theirs.save_pretrained(tmp_path / "p")
    back = LoRAModel.from_pretrained(cuda_base(), tmp_path / "p").eval()
    with torch.no_grad():
        back_diff = max_diff(back(ids).logits, theirs(ids).logits)
    print(f"cuda bf16 4-bit: ours->PEFT {diff:.3g}, PEFT->ours {back_diff:.3g}")
    assert diff <= 1e-2 and back_diff <= 1e-2
