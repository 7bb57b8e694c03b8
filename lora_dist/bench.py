"""`lora-dist bench`: tokens/s, step time, peak memory and MFU of our LoRA training step, and of peers'.

    lora-dist bench --shape llama3-8b --vs peft --gradient-checkpointing both
    lora-dist bench --vs unsloth --vs peft --gradient-checkpointing both --activation-offload both
    python -m lora_dist.bench --shape tiny --vs peft --json -

Peers: PEFT (and PEFT + liger-kernel) run in this process; Unsloth runs in its own process
(`lora_dist.bench_unsloth`), because it must be imported before transformers and patches it. Its
model is the same random dense model, saved once as safetensors (`--unsloth-model-dir`, reused
while it matches) and loaded with `load_in_4bit` (NF4 + double quant, as ours quantizes the same
weights); its adapters get our init where PEFT's layer names allow (every one of them here).
With checkpointing Unsloth runs its offloaded mode (`use_gradient_checkpointing="unsloth"`); ours
can offload too (`--activation-offload`, lora_dist/offload.py).

Each side builds the same random-weight model (same seed, so the same base bytes), quantizes the
same seven linears per layer (NF4 + double quant by default), puts LoRA on them with the same
adapter init, and runs N warm-up plus N timed AdamW steps on the same batch (labels = inputs,
no padding, no packing; no adapter dropout unless `--lora-dropout P`, as the shipped recipes train
with 0.05: each side then draws its own masks, so their losses part by more than rounding). Ours
is `LoRAModel` + `families.patch_model_for_speed`; PEFT's is `get_peft_model` over the Hugging Face
model as PEFT users run it. Peak memory is measured over
the training steps only (after the model is built).

FLOPs. N counts the weights of every matmul linear (the seven per layer and the output head; not
the embedding, not attention scores). A LoRA step on a frozen base does 2N (forward) + 2N
(activation gradients) FLOPs per token, plus 2N when checkpointing recomputes the forward:
`hfu` uses that count. `mfu` is the usual 6N per token, the convention of the issue, whatever the
step does. Both against `--peak-tflops` (989: dense bf16 of an H100/H200 SXM datasheet).
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_dist.errors import EXIT_USAGE, OneLineParser
from lora_dist.shapes import SHAPES
from lora_dist.supervise import terminate_with_parent

SIDES = ("ours", "unsloth", "peft", "peft+liger")


def targets(model: nn.Module) -> list[str] | str:
    """The linears LoRA goes on, on both sides: every linear of each layer, as the model's family names them."""
    return _family_targets(model.config.model_type)


def _family_targets(model_type: str) -> list[str] | str:
    from lora_dist import families

    found = families.lora_targets(model_type)
    return found if isinstance(found, str) else list(found)


# ------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `lora-dist bench`'s options to `parser`."""
    p = parser
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="model shape (random weights)")
    p.add_argument("--model", default=None, help="a real causal LM (path or hub name) instead of --shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: the shape's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 64 for tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 4; 2 for tiny)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default 2 * rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                   help="dropout on every adapter's input, every side (default 0; the shipped recipes use 0.05; "
                        "Unsloth leaves its fast LoRA path for any other value than 0)")
    p.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="timed steps (the median is reported)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", choices=("on", "off", "both"), default="on")
    p.add_argument("--activation-offload", choices=("on", "off", "both"), default="off",
                   help="ours with checkpointing keeps layer inputs in pinned host memory (both: with and without)")
    p.add_argument("--offload-attention", choices=("on", "off"), default=None,
                   help="with --activation-offload (default on there, as the job's model.offload_attention): the "
                        "attention blocks run without checkpointing and all their saved tensors wait in pinned "
                        "host memory (ActivationOffloader.save_attention); off: only block inputs are offloaded")
    p.add_argument("--vs", action="append", default=[], choices=SIDES[1:],
                   help="also run the peer (repeatable); unsloth runs in its own process")
    p.add_argument("--unsloth-site", default=None, metavar="DIR",
                   help="a folder holding unsloth and its dependencies, put first on the Unsloth process's path")
    p.add_argument("--unsloth-model-dir", default=None, metavar="DIR",
                   help="where the random dense model is saved for Unsloth to load (default: under the temp dir; "
                        "reused while it matches)")
    p.add_argument("--peer-timeout", type=float, default=600.0, metavar="S",
                   help="seconds one Unsloth process may run (import, load, compile, steps)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new row after S seconds; the rows not run are listed as such")
    p.add_argument("--plain", action="store_true", help="our side without families.patch_model_for_speed")
    p.add_argument("--block-checkpointing", action="store_true",
                   help="our side checkpoints attention and MLP blocks separately (more memory, less recompute)")
    p.add_argument("--no-compile", action="store_true", help="fused ops without torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="our side's decoder layers replay CUDA graphs (rows without offload; graphs.enable_layer_graphs)")
    p.add_argument("--fp8-base", action="store_true",
                   help="our side's frozen base GEMMs in FP8 e4m3, row-wise scales (kernels.set_fp8_base_gemms)")
    p.add_argument("--fp8-forward-only", action="store_true",
                   help="with --fp8-base: x's gradient through the base weights stays in bf16")
    p.add_argument("--fp8-backward-only", action="store_true",
                   help="with --fp8-base: the forward that computes the loss stays in bf16; the checkpointed "
                        "recompute and x's gradient run in FP8")
    p.add_argument("--profile", action="store_true", help="profile one step of our side and print where time goes")
    p.add_argument("--fit-memory", type=float, default=None, metavar="GIB",
                   help="emulate a card of GIB (memory fraction) and search the largest micro batch per seq length")
    p.add_argument("--fit-seqs", default="2048,4096,8192", help="seq lengths the --fit-memory search tries")
    p.add_argument("--extrapolate-layers", default=None, metavar="A,B",
                   help="measure peak memory at A and B layers and compute the full depth's peak linearly")
    p.add_argument("--skip-throughput", action="store_true",
                   help="run only the memory studies (--fit-memory, --extrapolate-layers)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (dense bf16)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write results as JSON to PATH ('-' or no value: stdout, instead of the table)")


# ------------------------------------------------------------------------------------ model building


@dataclass
class Setup:
    """What one benchmark run builds and trains (shared by every side)."""

    shape: str
    model_path: str | None
    layers: int
    seq: int
    micro_batch: int
    rank: int
    alpha: float
    quant: str
    double_quant: bool
    lr: float
    seed: int
    device: str
    dtype: torch.dtype = field(repr=False, default=torch.bfloat16)
    dropout: float = 0.0  # on each adapter's input (lora.dropout)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d

    @classmethod
    def from_summary(cls, d: dict[str, Any]) -> Setup:
        """The inverse of `summary` (how the Unsloth process gets the run's setup)."""
        return cls(**{**d, "dtype": getattr(torch, d["dtype"])})


def build_base(setup: Setup) -> nn.Module:
    """The random-weight (or loaded) causal LM of `setup`, its seven linears per layer quantized."""
    from lora_dist import quant

    torch.manual_seed(setup.seed)
    if setup.model_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=setup.dtype, attn_implementation="sdpa")
        model.to(setup.device)
    else:
        from lora_dist.shapes import build_random_model

        model = build_random_model(setup.shape, bits=None, compute_dtype=setup.dtype, device=setup.device,
                                   seed=setup.seed, num_layers=setup.layers)
    model.config.use_cache = False
    if setup.quant != "none":
        quant.quantize_model(model, 4, setup.quant, setup.double_quant, setup.dtype, skip_modules=("lm_head",))
        model.is_loaded_in_4bit = True  # what PEFT and HF read for a bitsandbytes 4-bit model
    _free()
    return model


def _init_adapters(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], seed: int) -> None:
    """Same adapter init on every side: A uniform(+-1/sqrt(in)) from a per-name generator, B = 0."""
    with torch.no_grad():
        for name, a, b in pairs:
            key = name[name.find("layers."):] if "layers." in name else name
            gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key))
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
            b.zero_()


def _matmul_weights(model: nn.Module) -> int:
    """N: weights of every linear the step multiplies by (the output head included, adapters not)."""
    from lora_dist.layers import LoRALayer

    adapters = {id(m) for l in model.modules() if isinstance(l, LoRALayer) for m in (l.lora_A, l.lora_B)}
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and id(m) not in adapters)


def _count_n(setup: Setup, model: nn.Module) -> int:
    if setup.model_path:
        return _matmul_weights(model)
    from lora_dist import families

    return families.matmul_weights(SHAPES[setup.shape].hf_config(), setup.layers)


@dataclass
class Side:
    """A built model ready to train, and its optimizer."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


def build_ours(setup: Setup, checkpointing: bool, fast: bool = True, block: bool = False,
               offload: bool = False, graphs: bool = False, offload_attention: bool = False) -> Side:
    """Our side: LoRAModel over the quantized base, with `families.patch_model_for_speed` when `fast`.

    Checkpointing is per decoder layer (the model's own switch), per block with `block`, or per
    layer with each layer input in pinned host memory with `offload` (`offload.enable_activation_offload`;
    with `offload_attention` the attention blocks' saved tensors instead, nothing of them recomputed).
    With `graphs` (fused path, per-layer or no checkpointing) each decoder layer replays CUDA graphs
    (`graphs.enable_layer_graphs`).
    """
    from lora_dist import families
    from lora_dist.model import LoRAConfig, LoRAModel
    from lora_dist.offload import enable_activation_offload

    base = build_base(setup)
    config = LoRAConfig(rank=setup.rank, alpha=setup.alpha, dropout=setup.dropout, target_modules=targets(base))
    model = LoRAModel(base, config)
    _init_adapters([(n, l.lora_A.weight, l.lora_B.weight) for n, l in model.lora_layers.items()], setup.seed)
    block = block and fast and checkpointing and not offload
    offload = offload and checkpointing
    if offload:
        enable_activation_offload(model, save_attention=offload_attention)
    elif checkpointing and not block:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fast:
        families.patch_model_for_speed(model, block_checkpointing=block)
    if graphs and fast and not block and not offload:
        from lora_dist.graphs import enable_layer_graphs
        from lora_dist.loading import decoder_layers

        enable_layer_graphs(decoder_layers(model), checkpointing)
    model.train()
    params = model.get_trainable_parameters()
    fused = setup.device.startswith("cuda")
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0, fused=fused)
    return Side("ours" if fast else "ours-plain", model, optimizer, params)


def peft_adapter_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, lora_A weight, lora_B weight) of every PEFT LoRA layer (PEFT's and Unsloth's models)."""
    pairs = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and module.lora_A:
            pairs.append((name, module.lora_A["default"].weight, module.lora_B["default"].weight))
    return pairs


def build_peft(setup: Setup, checkpointing: bool, liger: bool = False) -> Side:
    from peft import LoraConfig, get_peft_model

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # patches transformers' Llama classes for models built from now on
    base = build_base(setup)
    if checkpointing:  # as PEFT's docs and the measured peer run it
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    config = LoraConfig(r=setup.rank, lora_alpha=setup.alpha, lora_dropout=setup.dropout, target_modules=targets(base))
    model = get_peft_model(base, config)
    _init_adapters(peft_adapter_pairs(model), setup.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    return Side("peft+liger" if liger else "peft", model, optimizer, params)


def build_side(name: str, setup: Setup, checkpointing: bool, fast: bool = True, block: bool = False,
               offload: bool = False, graphs: bool = False, offload_attention: bool = False) -> Side:
    if name == "ours":
        return build_ours(setup, checkpointing, fast, block, offload, graphs, offload_attention)
    if name in ("peft", "peft+liger"):
        return build_peft(setup, checkpointing, liger=name == "peft+liger")
    raise ValueError(f"{name} is not built in this process")


# ------------------------------------------------------------------------------------ running


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(setup: Setup, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(setup.seed + 1)
    return torch.randint(0, vocab, (setup.micro_batch, setup.seq), generator=gen).to(setup.device)


def train_step(side: Side, batch: torch.Tensor) -> float:
    """One optimizer step on `batch` (labels = inputs); returns the loss."""
    from lora_dist import kernels

    with kernels.adapter_copies():  # as the training job runs each micro batch
        loss = side.model(input_ids=batch, labels=batch).loss
        loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(side: Side, batch: torch.Tensor, setup: Setup, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up then timed steps; step time is the median of the timed ones."""
    cuda = setup.device.startswith("cuda")
    losses, times, issue = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if cuda and i == warmup and warmup:
            torch.cuda.reset_peak_memory_stats()  # the timed steps' peak (CUDA graphs capture in warm-up)
        _sync(setup.device)
        t0 = time.perf_counter()
        loss = train_step(side, batch)
        t1 = time.perf_counter()  # the host has queued the whole step (nothing in it synchronizes)
        _sync(setup.device)
        losses.append(float(loss))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            issue.append(t1 - t0)
    out: dict[str, Any] = {
        "step_s": statistics.median(times),
        "host_issue_s": statistics.median(issue),  # close to step_s: the step is bound by the host
        "losses": losses,
    }
    if cuda:
        from lora_dist import graphs  # CUDA graphs' scratch counts too: a replay writes it, allocating nothing

        out["peak_allocated_gib"] = graphs.peak_bytes() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        out["graph_scratch_gib"] = graphs.scratch_bytes() / 2**30
    return out


def _attention_offloaded(args: argparse.Namespace) -> bool:
    """Whether our offloaded rows keep the attention blocks' saved tensors on the host: --offload-attention,
    on unless turned off, where --activation-offload is on or both."""
    return args.activation_offload != "off" and args.offload_attention != "off"


def run_side(name: str, setup: Setup, checkpointing: bool, args: argparse.Namespace,
             offload: bool = False) -> dict[str, Any]:
    side = build_side(name, setup, checkpointing, fast=not args.plain, block=args.block_checkpointing,
                      offload=offload, graphs=args.cuda_graphs, offload_attention=_attention_offloaded(args))
    batch = make_batch(setup, side.model.config.vocab_size)
    res = time_steps(side, batch, setup, args.warmup, args.steps)
    result = result_row(side, setup, checkpointing, res, args.peak_tflops, offload=offload)
    if args.profile and name == "ours":
        result["profile"] = profile_step(side, batch, setup)
    del side
    _free()
    return result


def result_row(side: Side, setup: Setup, checkpointing: bool, res: dict[str, Any], peak_tflops: float,
               offload: bool = False) -> dict[str, Any]:
    """One side's row of the report, from `time_steps`' measurements (also built in the Unsloth process)."""
    n = _count_n(setup, side.model)
    tokens = setup.micro_batch * setup.seq
    tok_s = tokens / res["step_s"]
    hw_per_token = (6 if checkpointing else 4) * n
    return {
        "side": side.name,
        "gradient_checkpointing": checkpointing,
        "checkpointing": _label(checkpointing, offload),
        "tokens_per_s": tok_s,
        "step_s": res["step_s"],
        "host_issue_s": res["host_issue_s"],
        "peak_allocated_gib": res.get("peak_allocated_gib"),
        "peak_reserved_gib": res.get("peak_reserved_gib"),
        "graph_scratch_gib": res.get("graph_scratch_gib"),
        "mfu": tok_s * 6 * n / (peak_tflops * 1e12),
        "hfu": tok_s * hw_per_token / (peak_tflops * 1e12),
        "n_matmul_weights": n,
        "trainable": sum(p.numel() for p in side.params),
        "losses": res["losses"],
    }


# ------------------------------------------------------------------------------------ Unsloth (own process)

UNSLOTH_ENV = {
    # no network, no usage statistics, compiled caches out of the work tree; the caller's values win
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_DISABLE_CPU_FALLBACK": "1",  # without a GPU: fail, never train quietly on the CPU
    "UNSLOTH_COMPILE_LOCATION": os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"),
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
_MODEL_SPEC = "lora_dist_bench_model.json"


def unsloth_importable(site: str | None) -> bool:
    """Whether `import unsloth` would find it, with `site` first on the path (nothing is imported)."""
    path = ([site] if site else []) + sys.path
    return importlib.machinery.PathFinder.find_spec("unsloth", path) is not None


def _unsloth_model(setup: Setup, args: argparse.Namespace) -> Path:
    """The folder Unsloth loads: --model's, or the saved random dense model of `setup` (saved once)."""
    if setup.model_path:
        return Path(setup.model_path)
    folder = Path(args.unsloth_model_dir or Path(tempfile.gettempdir()) /
                  f"lora-dist-bench-{setup.shape}-{setup.layers}l-seed{setup.seed}")
    wrote = save_dense_model(setup, folder)
    _progress(args, f"  unsloth: {'saved' if wrote else 'reusing'} the dense model in {folder}")
    return folder


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` ids and bos, eos and pad tokens (pad != eos).

    Unsloth loads a tokenizer from the model folder and checks it: with one id per embedding row
    it never resizes the embeddings, and a distinct pad is left alone. The bench feeds token ids
    and never tokenizes text. Special ids: Llama-3's where the vocabulary has them (the setting
    Unsloth was measured with), else the last three.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = (128000, 128001, 128004) if vocab_size >= 128256 else range(vocab_size - 3, vocab_size)
    names = {bos: "<|begin_of_text|>", eos: "<|end_of_text|>", pad: "<|finetune_right_pad_id|>"}
    vocab = {names.get(i, f"<t{i}>"): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"<t{vocab_size - 4}>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(names.values()))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=names[bos], eos_token=names[eos],
                                   pad_token=names[pad], unk_token=f"<t{vocab_size - 4}>")


def save_dense_model(setup: Setup, folder: Path) -> bool:
    """Save the random dense model of `setup` (our base before quantization) with a tokenizer to `folder`.

    Reuses `folder` when its spec file says it holds this model. Returns whether it wrote.
    """
    from lora_dist import files
    from lora_dist.shapes import build_random_model

    spec = {"shape": setup.shape, "layers": setup.layers, "seed": setup.seed, "dtype": "bfloat16", "format": 1}
    try:
        if json.loads((folder / _MODEL_SPEC).read_text()) == spec:
            return False
    except (OSError, ValueError):
        pass
    files.remove_stale_temporaries(folder.parent, folder.name)
    model = build_random_model(setup.shape, bits=None, compute_dtype=torch.bfloat16, device=setup.device,
                               seed=setup.seed, num_layers=setup.layers)
    tokenizer = build_tokenizer(model.config.vocab_size)
    # the tokenizer's ids in the config; the pad id stays unset, as in ours: a padding_idx would let
    # Unsloth zero that embedding row, and the random batch may hold that id
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    tmp = files.temporary_folder(folder)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    _free()
    if not any(tmp.glob("*.safetensors")) or any(tmp.glob("*.bin")):
        raise RuntimeError(f"save_pretrained wrote no safetensors weights to {tmp}; this bench loads no pickles")
    tokenizer.save_pretrained(tmp)
    (tmp / _MODEL_SPEC).write_text(json.dumps(spec) + "\n")
    files.publish_folder(tmp, folder)
    return True


def run_peer_process(command: list[str], spec: dict[str, Any], timeout: float,
                     env: dict[str, str] | None = None, stdout: Any = None) -> dict[str, Any]:
    """Run `command SPEC.json RESULT.json` and return the row it wrote, or a row with an "error".

    The peer reads its spec, trains, and writes one JSON object (its report row, or one with an
    "error" field) to RESULT.json; anything else (no file, bad JSON, a timeout) becomes an error row.
    """
    base = {"side": spec.get("side", "peer"), "gradient_checkpointing": spec.get("checkpointing"),
            "checkpointing": "offload" if spec.get("checkpointing") else "off"}
    with tempfile.TemporaryDirectory(prefix="lora-dist-peer-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        try:
            # stopped with the bench, however the bench stops (a `timeout` or Ctrl-C must not leave it on the GPU)
            rc = subprocess.run([*command, str(spec_path), str(result_path)], check=False, env=env, timeout=timeout,
                                stdout=stdout, preexec_fn=terminate_with_parent()).returncode  # noqa: PLW1509
        except subprocess.TimeoutExpired:
            return {**base, "error": f"ran past --peer-timeout {timeout:g} s and was stopped"}
        try:
            row = json.loads(result_path.read_text())
        except FileNotFoundError:
            return {**base, "error": f"exited with code {rc} without writing a result"}
        except ValueError as err:
            return {**base, "error": f"wrote an unreadable result ({err})"}
    if not isinstance(row, dict):
        return {**base, "error": f"wrote {type(row).__name__}, not a result row"}
    if rc != 0 and "error" not in row:
        row["error"] = f"exited with code {rc}"
    return {**base, **row}


def run_unsloth(setup: Setup, checkpointing: bool, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Unsloth's row: `lora_dist.bench_unsloth` in its own process, over the model saved in `model_dir`."""
    spec = {"side": "unsloth", "setup": setup.summary(), "model_dir": str(model_dir),
            "checkpointing": checkpointing, "warmup": args.warmup, "steps": args.steps,
            "peak_tflops": args.peak_tflops, "targets": _family_targets(SHAPES[setup.shape].model_type)}
    env = dict(os.environ)
    for key, value in UNSLOTH_ENV.items():
        env.setdefault(key, value)
    root = str(Path(__file__).resolve().parent.parent)  # this lora_dist, whatever the caller's path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.unsloth_site, root, env.get("PYTHONPATH")) if p)
    # with --json - the report owns stdout: the peer's log goes to stderr
    stdout = sys.stderr if args.json == "-" else None
    return run_peer_process([sys.executable, "-m", "lora_dist.bench_unsloth"], spec, args.peer_timeout, env, stdout)


# ------------------------------------------------------------------------------------ profile

_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("dequantize 4-bit", ("dequantize", "kdequant")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas", "matmul")),
    ("fused (triton)", ("triton",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copies (host<->device)", ("memcpy dtoh", "memcpy htod", "memcpy d2h", "memcpy h2d")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "convert", "cat")),
)


def _category(kernel: str) -> str:
    k = kernel.lower()
    for cat, keys in _CATEGORIES:
        if any(key in k for key in keys):
            return cat
    return "other elementwise"


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: device time with at least one kernel or copy running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_step(side: Side, batch: torch.Tensor, setup: Setup) -> dict[str, Any]:
    """Device time per kernel category over one training step (torch profiler), and the device's idle time.

    Category times are summed per kernel, so overlapped work (side-stream copies) counts in full;
    `device_busy_ms` is the union of all device intervals and `device_idle_ms` the rest of the wall.
    """
    from torch.profiler import ProfilerActivity, profile

    _sync(setup.device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(side, batch)
        _sync(setup.device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    cuda = torch.autograd.DeviceType.CUDA
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev and evt.device_type == cuda:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + dev / 1e3  # ms
    intervals = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda]
    busy_ms = busy_time(intervals) / 1e3
    cats: dict[str, float] = {}
    for k, ms in kernels.items():
        cats[_category(k)] = cats.get(_category(k), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {
        "wall_ms_profiled": wall_ms,
        "device_busy_ms": busy_ms,
        "device_idle_ms": max(wall_ms - busy_ms, 0.0),
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": {k[:90]: round(v, 2) for k, v in top},
    }


# ------------------------------------------------------------------------------------ memory studies


def fit_memory(setup: Setup, names: list[str], gib: float, seqs: list[int], checkpointing: bool) -> list[dict]:
    """Largest power-of-two micro batch per sequence length that trains within `gib` GiB, per side."""
    total = torch.cuda.get_device_properties(0).total_memory
    results = []
    for name in names:
        side = build_side(name, setup, checkpointing)
        vocab = side.model.config.vocab_size
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
        fits: dict[int, int] = {}
        try:
            for seq in seqs:
                best, mb = 0, 1
                while mb <= 64:
                    trial = Setup(**{**setup.__dict__, "seq": seq, "micro_batch": mb})
                    ok = _try_step(side, make_batch(trial, vocab))
                    print(f"  fit {gib:g} GiB {side.name}: seq {seq} x {mb}: {'fits' if ok else 'OOM'}", flush=True)
                    if not ok:
                        break
                    best, mb = mb, mb * 2
                fits[seq] = best
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        results.append({
            "side": side.name,
            "memory_gib": gib,
            "gradient_checkpointing": checkpointing,
            "largest_micro_batch_per_seq": fits,
            "largest_tokens_per_step": max((s * b for s, b in fits.items()), default=0),
        })
        del side
        _free()
    return results


def _try_step(side: Side, batch: torch.Tensor) -> bool:
    oom = False
    try:
        train_step(side, batch)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block so the traceback's frames (and their tensors) are gone
        side.optimizer.zero_grad(set_to_none=True)
        for p in side.params:
            p.grad = None
        _free()
    return not oom


def extrapolate_peak(setup: Setup, names: list[str], layer_pair: tuple[int, int], checkpointing: bool,
                     args: argparse.Namespace) -> list[dict]:
    """Peak allocated memory measured at two depths, and the full depth's computed linearly from them."""
    full = SHAPES[setup.shape].num_layers
    a, b = layer_pair
    out = []
    for name in names:
        peaks = {}
        for layers in (a, b):
            s = Setup(**{**setup.__dict__, "layers": layers})
            side = build_side(name, s, checkpointing)
            batch = make_batch(s, side.model.config.vocab_size)
            res = time_steps(side, batch, s, warmup=1, steps=1)
            peaks[layers] = res["peak_allocated_gib"]
            print(f"  {name} {setup.shape} at {layers} layers: peak {peaks[layers]:.2f} GiB", flush=True)
            del side
            _free()
        slope = (peaks[b] - peaks[a]) / (b - a)
        out.append({
            "side": name,
            "gradient_checkpointing": checkpointing,
            "measured_peak_gib": peaks,
            "per_layer_gib": slope,
            "full_layers": full,
            "computed_full_peak_gib": peaks[a] + slope * (full - a),
            "note": f"measured at {a} and {b} layers; the {full}-layer peak is computed, not measured",
        })
    return out


# ------------------------------------------------------------------------------------ reporting


def _ratios(results: list[dict]) -> list[dict]:
    """Ours against each peer row with checkpointing on/off alike (ours' ckpt and ckpt+offload both face
    Unsloth's offloaded mode); failed rows have no ratio."""
    rows = []
    ok = [r for r in results if "error" not in r]
    for r in ok:
        if r["side"] == "ours":
            continue
        for ours in ok:
            if ours["side"] != "ours" or ours["gradient_checkpointing"] != r["gradient_checkpointing"]:
                continue
            row = {
                "vs": r["side"],
                "gradient_checkpointing": r["gradient_checkpointing"],
                "ours_checkpointing": ours.get("checkpointing", "on" if ours["gradient_checkpointing"] else "off"),
                "vs_checkpointing": r.get("checkpointing", "on" if r["gradient_checkpointing"] else "off"),
                "speedup": ours["tokens_per_s"] / r["tokens_per_s"],
                "final_loss_diff": ours["losses"][-1] - r["losses"][-1],
                "first_loss_diff": ours["losses"][0] - r["losses"][0],
            }
            if ours.get("peak_allocated_gib") and r.get("peak_allocated_gib"):
                row["memory_ratio"] = ours["peak_allocated_gib"] / r["peak_allocated_gib"]
            rows.append(row)
    return rows


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"lora-dist bench: {json.dumps(report['setup'])}"]
    if report.get("fp8_base"):
        if not report.get("fp8_backward"):
            which = "forward"
        elif not report.get("fp8_forward", True):
            which = "checkpointed recompute and backward; the loss's forward in bf16"
        else:
            which = "forward and backward"
        lines.append(f"ours: frozen base GEMMs ({which}) in FP8 e4m3 (row-wise scales); MFU counts them at the bf16 peak")
    if report.get("offload_attention"):
        lines.append("ours offload: the attention blocks not checkpointed, their saved tensors in host memory")
    if report["results"]:
        lines.append(f"{'side':<12}{'ckpt':<9}{'tokens/s':>11}{'step s':>9}{'peak GiB':>10}{'resv GiB':>10}"
                     f"{'MFU':>7}{'HFU':>7}{'loss0':>9}{'lossN':>9}")
        for r in report["results"]:
            if "error" in r:
                lines.append(f"{r['side']:<12}{_ckpt(r):<9}FAILED: {r['error']}")
                continue
            lines.append(
                f"{r['side']:<12}{_ckpt(r):<9}"
                f"{r['tokens_per_s']:>11,.0f}{r['step_s']:>9.3f}{_fmt(r['peak_allocated_gib']):>10}"
                f"{_fmt(r['peak_reserved_gib']):>10}{r['mfu']:>7.1%}{r['hfu']:>7.1%}"
                f"{r['losses'][0]:>9.4f}{r['losses'][-1]:>9.4f}"
            )
    for row in report.get("ratios", []):
        mem = f", memory x{row['memory_ratio']:.2f}" if "memory_ratio" in row else ""
        lines.append(
            f"ours (ckpt {row['ours_checkpointing']}) vs {row['vs']} (ckpt {row['vs_checkpointing']}): "
            f"speed x{row['speedup']:.2f}{mem}, loss diff first {row['first_loss_diff']:+.2e} "
            f"last {row['final_loss_diff']:+.2e}"
        )
    for r in report["results"]:
        prof = r.get("profile")
        if prof:
            lines.append(f"profile of ours (ckpt {_ckpt(r)}): wall {prof['wall_ms_profiled']:.1f} ms, device busy "
                         f"{prof['device_busy_ms']:.1f} ms, idle {prof.get('device_idle_ms', 0.0):.1f} ms")
            for cat, ms in prof["categories_ms"].items():
                lines.append(f"  {cat:<20}{ms:>9.1f} ms {ms / max(prof['device_busy_ms'], 1e-9):>6.1%}")
            for k, ms in prof["top_kernels_ms"].items():
                lines.append(f"    {ms:>8.2f} ms  {k}")
    for f in report.get("fit_memory", []):
        lines.append(f"fits in {f['memory_gib']:g} GiB ({f['side']}, ckpt "
                     f"{'on' if f['gradient_checkpointing'] else 'off'}): micro batch per seq "
                     f"{f['largest_micro_batch_per_seq']}, largest {f['largest_tokens_per_step']} tokens/step")
    for e in report.get("extrapolated_peak", []):
        lines.append(f"{e['side']} peak: measured {e['measured_peak_gib']}, {e['per_layer_gib']:.3f} GiB/layer, "
                     f"computed {e['full_layers']}-layer peak {e['computed_full_peak_gib']:.1f} GiB ({e['note']})")
    return "\n".join(lines)


def _label(checkpointing: bool, offload: bool) -> str:
    return ("offload" if offload else "on") if checkpointing else "off"


def _ckpt(row: dict[str, Any]) -> str:
    """A row's checkpointing: on, off, or offload (layer inputs in host memory)."""
    return row.get("checkpointing") or ("on" if row["gradient_checkpointing"] else "off")


def _write_json(report: dict[str, Any], path: str) -> None:
    from lora_dist import files

    text = json.dumps(report, indent=2, default=str)
    if path == "-":
        print(text)
        return
    files.atomic_write_text(path, text + "\n")


# ------------------------------------------------------------------------------------ entry point


def _setup_from_args(args: argparse.Namespace) -> Setup:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.shape == "tiny"
    default_layers = 4 if args.shape == "llama3-70b" else SHAPES[args.shape].num_layers
    return Setup(
        shape=args.shape,
        model_path=args.model,
        layers=args.layers or default_layers,
        seq=args.seq or (64 if tiny else 2048),
        micro_batch=args.micro_batch or (2 if tiny else 4),
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        quant=args.quant,
        double_quant=not args.no_double_quant,
        lr=args.lr,
        seed=args.seed,
        device=device,
        # bitsandbytes' CPU kernels and CPU bf16 matmuls are slow: CPU runs train in fp32
        dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
        dropout=args.lora_dropout,
    )


def _check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    for name in ("layers", "seq", "micro_batch"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.steps < 1 or args.warmup < 0:
        problems.append("--steps must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.lora_dropout < 1.0:  # also NaN
        problems.append(f"--lora-dropout is a probability in [0, 1), got {args.lora_dropout}")
    if "peft+liger" in args.vs:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            problems.append("--vs peft+liger needs liger-kernel: pip install liger-kernel (or drop it)")
    if any(v.startswith("peft") for v in args.vs):
        try:
            import peft  # noqa: F401
        except ImportError:
            problems.append("--vs peft needs peft: pip install peft")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if "unsloth" in args.vs:
        problems += _unsloth_problems(args, cuda)
    if args.activation_offload != "off" and args.gradient_checkpointing == "off":
        problems.append("--activation-offload offloads checkpointed layer inputs: use --gradient-checkpointing on "
                        "or both, or drop --activation-offload")
    if args.offload_attention is not None and args.activation_offload == "off":
        problems.append("--offload-attention changes what --activation-offload keeps on the host: add "
                        "--activation-offload on, or drop --offload-attention")
    if args.activation_offload != "off" and (args.block_checkpointing or args.plain):
        problems.append("--activation-offload checkpoints whole layers of our fused model: drop "
                        "--block-checkpointing and --plain")
    if args.cuda_graphs and (args.plain or args.block_checkpointing or not cuda):
        problems.append("--cuda-graphs replays our fused layers on CUDA: drop --plain and --block-checkpointing, "
                        "run it on a CUDA device")
    for flag in ("forward", "backward"):
        if getattr(args, f"fp8_{flag}_only") and not args.fp8_base:
            problems.append(f"--fp8-{flag}-only narrows --fp8-base: add --fp8-base")
    if args.fp8_forward_only and args.fp8_backward_only:
        problems.append("--fp8-forward-only and --fp8-backward-only exclude each other: keep one")
    if args.fp8_base and args.plain:
        problems.append("--fp8-base runs in our fused kernels: drop --plain")
    if args.fp8_base and cuda and torch.cuda.get_device_capability(args.device or None) < (8, 9):
        problems.append("--fp8-base needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper): drop it")
    if (args.fit_memory is not None or args.extrapolate_layers) and not cuda:
        problems.append("--fit-memory and --extrapolate-layers measure GPU memory: run them on a CUDA device")
    if args.extrapolate_layers:
        try:
            a, b = (int(v) for v in args.extrapolate_layers.split(","))
            assert 0 < a < b
        except (ValueError, AssertionError):
            problems.append(f"--extrapolate-layers takes two depths A<B like 2,4; got {args.extrapolate_layers!r}")
    return problems


def _unsloth_problems(args: argparse.Namespace, cuda: bool) -> list[str]:
    problems = []
    if not cuda:
        problems.append("--vs unsloth needs a CUDA GPU (Unsloth trains on CUDA only): run it on one, or drop --vs unsloth")
    if not unsloth_importable(args.unsloth_site):
        where = f"in {args.unsloth_site} or " if args.unsloth_site else ""
        problems.append(f"--vs unsloth: unsloth is not importable {where}in this Python: pip install unsloth, "
                        f"or point --unsloth-site at a folder holding it, or drop --vs unsloth")
    if args.quant != "nf4" or args.no_double_quant:
        problems.append("--vs unsloth compares NF4 + double quant (Unsloth's load_in_4bit): drop --quant and "
                        "--no-double-quant")
    if args.model and not Path(args.model).is_dir():
        problems.append(f"--vs unsloth loads --model from a local folder; {args.model!r} is not one")
    return problems


def _settings(args: argparse.Namespace) -> dict[str, list[tuple[bool, bool]]]:
    """(checkpointing, offload) runs per side, in the order they run."""
    ckpt = {"on": [True], "off": [False], "both": [True, False]}[args.gradient_checkpointing]
    offload = {"off": [False], "on": [True], "both": [False, True]}[args.activation_offload]
    ours = [(c, o) for c in ckpt for o in (offload if c else [False])]
    peer = [(c, False) for c in ckpt]
    # liger patches transformers for the whole process: it goes last
    names = ["ours"] + [v for v in SIDES[1:] if v in args.vs]
    return {name: ours if name == "ours" else peer for name in names}


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (from `add_arguments`); returns the exit code."""
    problems = _check_args(args)
    if problems:
        for p in problems:
            print(f"lora-dist bench: {p}", file=sys.stderr)
        return EXIT_USAGE
    from lora_dist import kernels

    kernels.set_compile(not args.no_compile)
    # only our fused path reads it: the peers are untouched
    kernels.set_fp8_base_gemms(args.fp8_base, backward=not args.fp8_forward_only, forward=not args.fp8_backward_only)
    try:
        return _run(args)
    finally:
        kernels.set_fp8_base_gemms(False)


def _run(args: argparse.Namespace) -> int:
    setup = _setup_from_args(args)
    plan = _settings(args)
    names = list(plan)
    report: dict[str, Any] = {"setup": setup.summary(), "torch": torch.__version__, "fp8_base": args.fp8_base,
                              "fp8_backward": args.fp8_base and not args.fp8_forward_only,
                              "fp8_forward": args.fp8_base and not args.fp8_backward_only,
                              "offload_attention": _attention_offloaded(args),
                              "results": []}
    if setup.device.startswith("cuda"):
        report["device"] = torch.cuda.get_device_name()
    started = time.monotonic()
    unsloth_model: Path | None = None
    for name in names if not args.skip_throughput else []:
        for checkpointing, offload in plan[name]:
            if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                row = {"side": name, "gradient_checkpointing": checkpointing,
                       "checkpointing": _label(checkpointing, offload),
                       "error": f"not run: --time-budget {args.time_budget:g} s spent"}
            elif name == "unsloth":
                unsloth_model = unsloth_model or _unsloth_model(setup, args)
                row = run_unsloth(setup, checkpointing, args, unsloth_model)
            else:
                row = run_side(name, setup, checkpointing, args, offload=offload)
            report["results"].append(row)
            status = (f"FAILED: {row['error']}" if "error" in row else
                      f"{row['tokens_per_s']:,.0f} tok/s, peak {_fmt(row['peak_allocated_gib'])} GiB")
            _progress(args, f"  {row['side']} ckpt={_ckpt(row)}: {status}")
            if args.json not in (None, "-"):
                _write_json(report, args.json)  # a run stopped later still leaves the rows so far
    report["ratios"] = _ratios(report["results"])
    if args.fit_memory is not None:
        seqs = [int(s) for s in args.fit_seqs.split(",")]
        report["fit_memory"] = fit_memory(setup, [n for n in names if n != "unsloth"], args.fit_memory, seqs,
                                          plan["ours"][0][0])
    if args.extrapolate_layers:
        a, b = (int(v) for v in args.extrapolate_layers.split(","))
        report["extrapolated_peak"] = extrapolate_peak(setup, [n for n in names if n != "unsloth"], (a, b),
                                                       plan["ours"][0][0], args)
    if args.json is not None:
        _write_json(report, args.json)
    if args.json != "-":
        print(format_report(report))
    return 1 if any("error" in r for r in report["results"]) else 0


def _progress(args: argparse.Namespace, line: str) -> None:
    if args.json != "-":
        print(line, flush=True)


if __name__ == "__main__":
    parser = OneLineParser(prog="lora-dist bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
