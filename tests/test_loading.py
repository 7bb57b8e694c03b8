"""load_base_model on tiny Llamas saved to a temp folder: quantized as they load, head dense, clear errors."""

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_dist import quantize_model
from lora_dist.loading import load_base_model
from lora_dist.quant import dequantize_weight

VOCAB = 256


def save_tiny_llama(folder, *, tokenizer: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    if tokenizer:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
        tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    return folder, save_tiny_llama(folder)


def test_4bit_load_quantizes_every_block_linear_and_keeps_lm_head_dense(tiny):
    folder, _ = tiny
    model, tokenizer = load_base_model(str(folder), bits=4, compute_dtype=torch.float32)
    block_linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    assert len(block_linears) == 2 * 7 and all(type(m) is Linear4bit for m in block_linears)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    assert tokenizer("w5 w7")["input_ids"][-2:] == [5, 7]


def test_8bit_load_quantizes_every_block_linear_and_keeps_lm_head_dense(tiny):
    folder, _ = tiny
    model, _ = load_base_model(str(folder), bits=8, compute_dtype=torch.float32)
    block_linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    assert len(block_linears) == 2 * 7 and all(type(m) is Linear8bitLt for m in block_linears)
    assert type(model.lm_head) is torch.nn.Linear


def test_4bit_load_holds_the_same_nf4_weights_as_quantize_model(tiny):
    # Two routes to one quantization: transformers' BitsAndBytesConfig at load time and our
    # quantize_model on the dense model. Both quantize the same fp32 tensor with the same settings,
    # so the dequantized weights agree exactly.
    folder, _ = tiny
    loaded, _ = load_base_model(str(folder), bits=4, compute_dtype=torch.float32)
    ours = quantize_model(save_tiny_llama(folder.parent / "copy", tokenizer=False), bits=4,
                          compute_dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.equal(dequantize_weight(loaded.get_submodule(name)), dequantize_weight(ours.get_submodule(name)))


def test_loaded_4bit_weights_survive_an_eval_forward_unchanged(tiny):
    # bitsandbytes would repack weight.data in place on an eval no-grad CPU forward (KNOWN.md);
    # load_base_model switches that off for every 4-bit layer, not only the ones LoRA wraps.
    folder, _ = tiny
    model, _ = load_base_model(str(folder), bits=4, compute_dtype=torch.float32)
    k_proj = model.model.layers[0].self_attn.k_proj
    before = k_proj.weight.data.clone()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(k_proj.weight.data, before)


def test_dense_load_uses_compute_dtype(tiny):
    folder, _ = tiny
    model, _ = load_base_model(str(folder), bits=None, compute_dtype=torch.bfloat16)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_dtype_sets_the_load_dtype_apart_from_the_4bit_compute_dtype(tiny):
    # The merge rebuilds a quantized base from the dtype training loaded it in; the 4-bit matmul's
    # compute dtype is a separate setting.
    folder, dense = tiny
    model, _ = load_base_model(str(folder), bits=4, compute_dtype=torch.float32, dtype=torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.quant_state.dtype == torch.bfloat16 and q_proj.compute_dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    auto, _ = load_base_model(str(folder), bits=None, compute_dtype=torch.bfloat16, dtype="auto")
    assert torch.equal(auto.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(str(tmp_path / "nope"))


def test_folder_without_config_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base_model(str(tmp_path))


def test_path_to_a_file_is_value_error(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="is a file"):
        load_base_model(str(folder / "config.json"))


def test_missing_tokenizer_is_a_clear_error_unless_optional(tmp_path):
    save_tiny_llama(tmp_path, tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no usable tokenizer"):
        load_base_model(str(tmp_path), compute_dtype=torch.float32)
    model, tokenizer = load_base_model(str(tmp_path), compute_dtype=torch.float32, require_tokenizer=False)
    assert tokenizer is None and model is not None


def test_bad_bits_and_quant_type_are_refused(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="bits must be one of 4, 8 or None, got 3"):
        load_base_model(str(folder), bits=3)
    with pytest.raises(ValueError, match="quant_type"):
        load_base_model(str(folder), bits=4, quant_type="int4")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_load_lands_on_the_current_cuda_device(tiny, bits):
    folder, _ = tiny
    model, _ = load_base_model(str(folder), bits=bits)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is (Linear4bit if bits == 4 else Linear8bitLt)
    assert q_proj.weight.device == torch.device("cuda", torch.cuda.current_device())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
