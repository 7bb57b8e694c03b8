"""The parts of a training run, built from its config: processes' device, output folder, model, random data.

`train.setup` calls these in order; each builds one thing and refuses bad settings with a one-line
`ConfigError` (fp16 without loss scaling, a fresh run over another run's checkpoints, target modules
that match nothing).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lora_dist import checkpoint, distributed, files, loading, shapes
from lora_dist.choices import torch_dtype
from lora_dist.config import BUILTIN_MODEL, Config
from lora_dist.errors import ConfigError
from lora_dist.loader import RandomTokens
from lora_dist.model import LoRAModel


def refuse_unscaled_fp16(cfg: Config, use_deepspeed: bool) -> None:
    """fp16 gradients underflow without loss scaling, which only DeepSpeed's fp16 mode provides here."""
    if cfg.model.compute_dtype != "fp16" or (use_deepspeed and cfg.distributed.precision == "fp16"):
        return
    raise ConfigError([
        "model.compute_dtype fp16 trains without loss scaling here (its small gradients underflow to 0); "
        "use model.compute_dtype=bf16, or DeepSpeed's fp16 (distributed.engine=deepspeed distributed.precision=fp16)"
    ])


def prepare_output_dir(cfg: Config, rank: int) -> tuple[Path, int, str | None] | None:
    """Refuse a fresh run over another run's checkpoints (or delete them when asked); find the one to resume.

    Returns:
        (checkpoint, its step, its W&B run id or None), or None for a fresh start.
    """
    root = cfg.folder.checkpoints
    t = cfg.train
    if rank == 0:  # before anything is written: what crashed saves left behind
        checkpoint.remove_stale_temporaries(root)
        files.remove_stale_temporaries(cfg.output_dir, "adapter")
    if t.resume is None:
        if _holds_checkpoints(root):
            if not t.overwrite_output_dir:
                raise ConfigError([
                    f"train.output_dir {cfg.output_dir} already holds checkpoints of another run; resume it with "
                    f"train.resume=auto, or start over with train.overwrite_output_dir=true (deletes them)"
                ])
            distributed.barrier()  # every rank has looked before rank 0 deletes
            if rank == 0:
                shutil.rmtree(root)
            distributed.barrier()
        return None
    path = checkpoint.find_latest(root) if t.resume == "auto" else Path(t.resume)
    if path is None:
        return None
    # A root given as train.resume: load_checkpoint follows its `latest`; read that step's state here.
    step_dir = path if (path / checkpoint.STATE_FILE).is_file() else (checkpoint.find_latest(path) or path)
    try:
        state = json.loads((step_dir / checkpoint.STATE_FILE).read_text())
    except (OSError, ValueError):
        return path, 0, None  # load_checkpoint reports what is wrong with it
    extra = state.get("extra") or {}
    return path, int(state.get("step", 0)), extra.get("wandb_run_id")


def _holds_checkpoints(root: Path) -> bool:
    return root.is_dir() and any(p.name == checkpoint.LATEST or p.name.startswith("step-") for p in root.iterdir())


def device() -> torch.device:
    """This rank's device: its CUDA device (made current), else the CPU with the cores split among local ranks."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    env = os.environ
    local_procs = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("WORLD_SIZE", "1"))
    if local_procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine: split the cores, or every rank's thread pool spins on all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (numpy is seeded where it is used: the data order)."""
    random.seed(seed)
    torch.manual_seed(seed)


def materialize_model(cfg: Config, rank: int) -> str:
    """The folder to load: `model.path`, or the embedded tiny Llama written under the output dir."""
    if cfg.model.path != BUILTIN_MODEL:
        return cfg.model.path
    from lora_dist import tiny

    target = cfg.folder.tiny_model
    if rank == 0 and not (target / "config.json").is_file():
        tiny.build_tiny_model(target, seed=cfg.train.seed)
    distributed.barrier()  # the other ranks read what rank 0 wrote
    return str(target)


def random_tokens(cfg: Config, tokenizer: Any, sequences_per_step: int) -> RandomTokens:
    """Random-token rows for exactly `train.max_steps` optimizer steps (each row is seen once)."""
    shape = cfg.model.random_shape()
    vocab = shapes.shape(shape).vocab_size if shape else len(tokenizer)
    rows = cfg.train.max_steps * cfg.train.micro_batch_size * sequences_per_step
    return RandomTokens(rows, cfg.data.max_seq_len, vocab, seed=cfg.train.seed)


def build_model(
    cfg: Config, model_path: str, device: torch.device, patch: Callable[[LoRAModel], bool]
) -> tuple[LoRAModel, bool]:
    """The base (loaded, or random for `random:<shape>`) wrapped with adapters, on `device`; and whether
    `patch` (the fused forward, `train._patch_for_speed`) took."""
    m = cfg.model
    if m.random_shape():
        base = shapes.build_random_model(
            m.random_shape(), bits=m.bits, quant_type=m.quant_type, double_quant=m.double_quant,
            compute_dtype=torch_dtype(m.compute_dtype), device=device, seed=cfg.train.seed,
            attn_implementation=m.attn_implementation,
        )
    else:
        base, _ = loading.load_base_model(
            model_path, bits=m.bits, quant_type=m.quant_type, double_quant=m.double_quant,
            compute_dtype=torch_dtype(m.compute_dtype), device_map={"": device} if device.type == "cuda" else None,
            attn_implementation=m.attn_implementation, require_tokenizer=False,
        )
        loading.disable_kv_cache(base)
    torch.manual_seed(cfg.train.seed)  # the same adapter init on every rank and in every launch mode
    try:
        model = LoRAModel(base, cfg.lora)
    except (ValueError, TypeError) as err:  # target_modules matching nothing, or a layer LoRA cannot wrap
        raise ConfigError(f"lora.target_modules: {err}") from None
    if m.gradient_checkpointing and m.activation_offload:
        from lora_dist.offload import enable_activation_offload  # checkpoints each decoder layer itself

        try:
            enable_activation_offload(model, save_attention=m.offload_attention)
        except TypeError as err:  # a model without `.model.layers`
            raise ConfigError(f"model.activation_offload: {err}") from None
    elif m.gradient_checkpointing:
        loading.enable_activation_checkpointing(base)
    fused = patch(model)
    if any(layer.bits is not None for layer in model.lora_layers.values()):
        for layer in model.lora_layers.values():  # the quantized base is already where it was loaded
            layer.lora_A.to(device)
            layer.lora_B.to(device)
    else:
        model.to(device)
    return model, fused


def total_steps(cfg: Config, batches_per_epoch: int, accum: int) -> int:
    """Optimizer steps of the run: `train.max_steps`, or `train.epochs` passes of `accum` micro batches each."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * batches_per_epoch / accum))
