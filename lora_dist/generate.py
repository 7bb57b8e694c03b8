"""`lora-dist generate`: talk to a trained adapter on its base model.

    lora-dist generate --base runs/tiny-cpu/tiny-llama --adapter runs/tiny-cpu/adapter \\
        --prompt "Sort the digits from smallest to largest." --input "6 7 6 9 2"
    lora-dist generate --base meta-llama/Meta-Llama-3-8B --adapter runs/llama3-8b-qlora/adapter --chat

The base loads quantized the way the adapter was trained (its safetensors metadata records bits,
quant type, double quant and compute dtype; `--bits` overrides), the adapter goes on unmerged (or
folded in with `--merge`), and tokens stream to the terminal as they come. Greedy by default;
`--temperature` > 0 samples (with `--top-p`, `--seed`).

Prompt template (`--template`, default auto): the one the adapter was trained with. "auto" reads
`data.format` from the training run's `config.yaml` beside the adapter folder (the job writes it to
`<output_dir>/config.yaml`, the adapter to `<output_dir>/adapter`): instruction -> the data pipeline's
"### Instruction:" template, chat -> the tokenizer's chat template (or the pipeline's "### Role:"
blocks when it has none), text -> the prompt as is. Without that file: the tokenizer's chat
template when it has one, else the instruction template.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lora_dist import data
from lora_dist.errors import AdapterError, ConfigError

TEMPLATES = ("auto", "chat", "instruction", "none")
BITS = ("auto", "4", "8", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ prompts


def format_prompt(tokenizer: Any, prompt: str, template: str = "auto", *, input_text: str | None = None,
                  history: list[dict[str, str]] | None = None) -> str:
    """The text the model continues: `prompt` (and an optional `input_text`) in `template`.

    Args:
        tokenizer: the base's tokenizer (its chat template and BOS are used).
        prompt: the user's message or instruction.
        template: "chat", "instruction", "none", or "auto" (chat when the tokenizer has a chat
            template, else instruction).
        input_text: the instruction format's "Input" field (chat: appended to the message).
        history: earlier turns [{"role", "content"}] (chat only).

    Returns:
        The prompt text, special tokens written out (encode it without adding more).
    """
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "instruction"
    bos = data._bos_text(tokenizer)
    if template == "none":
        return bos + prompt
    if template == "instruction":
        form = data.INSTRUCTION_TEMPLATE if input_text else data.INSTRUCTION_TEMPLATE_NO_INPUT
        return bos + form.format(instruction=prompt, input=input_text or "")
    if template != "chat":
        raise ConfigError([f"template must be one of {', '.join(TEMPLATES)}, got {template!r}"])
    message = prompt if not input_text else f"{prompt}\n\n{input_text}"
    messages = [*(history or []), {"role": "user", "content": message}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # data.py's chat format for tokenizers without a template: "### Role:\n" blocks.
    blocks = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return bos + blocks + "### Assistant:\n"


def trained_template(adapter: str | Path) -> str | None:
    """The template matching the data format of the run that wrote `adapter`, or None if unrecorded."""
    import yaml

    run_config = Path(adapter).resolve().parent / "config.yaml"
    if not run_config.is_file():
        return None
    try:
        fmt = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("data", {}).get("format")
    except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
        return None
    return {"instruction": "instruction", "chat": "chat", "text": "none"}.get(fmt)


# ------------------------------------------------------------------------------------ generation


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, *, template: str = "auto", input_text: str | None = None,
             history: list[dict[str, str]] | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stream: bool = False) -> str:
    """Generate a reply to `prompt` with `model` (a LoRAModel or any HF causal LM).

    Args:
        model: the model to run (its device is used).
        tokenizer: its tokenizer.
        prompt: the message or instruction; see `format_prompt` for `template`, `input_text`, `history`.
        max_new_tokens: tokens to generate at most (generation stops at EOS before that).
        temperature: 0 decodes greedily; > 0 samples from the softmax at this temperature.
        top_p: nucleus sampling mass (sampling only).
        seed: seeds the sampler (torch's global generator).
        stream: print tokens to stdout as they are generated.

    Returns:
        The generated text, special tokens removed, the prompt not included.
    """
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise ConfigError([f"max_new_tokens must be >= 1, got {max_new_tokens}"])
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError([f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}"])
    text = format_prompt(tokenizer, prompt, template, input_text=input_text, history=history)
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=True,
                             streamer=streamer, **sampling)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------ loading


def recorded_quantization(adapter: str | Path) -> dict[str, Any]:
    """How the adapter's base was quantized in training ({} for dense or unrecorded), from its metadata."""
    from lora_dist.adapter_files import read_adapter

    _, _, _, metadata = read_adapter(adapter)  # AdapterError names a missing or damaged folder
    return json.loads(metadata.get("lora_dist_base_quantization", "null")) or {}


def load_for_generation(base: str, adapter: str | None, *, bits: str = "auto", merge: bool = False,
                        device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): `base` quantized as `bits` says, with `adapter` applied (merged with `merge`).

    Args:
        base: base model folder or hub id.
        adapter: adapter folder (ours or PEFT's), or None for the base alone.
        bits: "auto" (as the adapter was trained; dense when unrecorded), "4" (NF4), "8" or "none".
        merge: fold the adapter into the base (one matmul per linear) instead of running it beside it.
        device: "cuda", "cpu", ...; default cuda when available.

    Raises:
        AdapterError: a missing or damaged adapter folder, or one that does not fit the base.
        ConfigError: a missing base folder or a bad option.
    """
    from lora_dist import adapters
    from lora_dist.loading import load_base_model

    if bits not in BITS:
        raise ConfigError([f"--bits must be one of {', '.join(BITS)}, got {bits!r}"])
    recorded = recorded_quantization(adapter) if adapter else {}
    if bits == "auto":
        quantization = recorded
    else:
        quantization = {} if bits == "none" else {**recorded, "bits": int(bits)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(quantization.get("compute_dtype", ""), torch.bfloat16 if device.startswith("cuda")
                       else torch.float32)
    try:
        model, tokenizer = load_base_model(
            base, bits=quantization.get("bits"), quant_type=quantization.get("quant_type", "nf4"),
            double_quant=quantization.get("double_quant", True), compute_dtype=dtype,
            device_map={"": device} if device.startswith("cuda") else None,
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError([f"--base {base}: {' '.join(str(err).split())}"]) from None
    if not device.startswith("cuda") and quantization.get("bits") is None:
        model.to(device)
    if adapter:
        folder = Path(adapter)  # recorded_quantization has read and checked it
        if (folder / "tokenizer_config.json").is_file():  # an adapter that added tokens ships its tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            model = adapters.from_pretrained(model, folder)
        except (ValueError, TypeError) as err:
            raise AdapterError(f"adapter {adapter} does not fit base {base}: {' '.join(str(err).split())}") from None
        for layer in model.lora_layers.values():  # the adapters follow the base onto its device
            layer.lora_A.to(layer.base_layer.weight.device)
            layer.lora_B.to(layer.base_layer.weight.device)
        if merge:
            model.merge()
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `lora-dist generate`'s options to `parser`."""
    p = parser
    p.add_argument("--base", required=True, help="base model folder or hub id")
    p.add_argument("--adapter", default=None, help="adapter folder (omit to run the base alone)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one message or instruction")
    what.add_argument("--chat", action="store_true", help="a conversation on stdin (empty line or EOF ends it)")
    p.add_argument("--input", default=None, help="the instruction format's Input field")
    p.add_argument("--template", choices=TEMPLATES, default="auto", help="prompt template (see the module help)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base first")
    p.add_argument("--bits", choices=BITS, default="auto", help="base quantization (auto: as trained)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")


def main(args: argparse.Namespace) -> int:
    """Run `lora-dist generate`; returns the exit code."""
    template = args.template
    if template == "auto" and args.adapter:
        template = trained_template(args.adapter) or "auto"
    model, tokenizer = load_for_generation(args.base, args.adapter, bits=args.bits, merge=args.merge,
                                           device=args.device)
    options = {"template": template, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "seed": args.seed, "stream": True}
    if not args.chat:
        generate(model, tokenizer, args.prompt, input_text=args.input, **options)
        return 0
    history: list[dict[str, str]] = []
    keeps_history = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    print("chat: an empty line or EOF ends it" + ("" if keeps_history else " (instruction template: one turn at a "
                                                   "time, no history)"), file=sys.stderr)
    for line in sys.stdin:
        message = line.rstrip("\n")
        if not message.strip():
            break
        reply = generate(model, tokenizer, message, history=history if keeps_history else None, **options)
        if keeps_history:
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
    return 0
