"""The training job: setup -> fit -> evaluate -> save.

One code path serves a laptop CPU, one GPU, and many ranks under the `deepspeed` / `torchrun` launchers:
with DeepSpeed the engine owns the optimizer step, without it a plain torch AdamW does, and the rest
(batches, loss normalization, evaluation, checkpoints, reporting) is shared.

The loss of an optimizer step is the mean over every response token of the global batch (all micro
batches, all ranks): each micro batch's summed token loss is divided by that global token count, so
the gradient does not depend on how the batch is split over micro batches and ranks, and a 2-rank
run follows the single-process one step for step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from lora_dist import adapters, checkpoint, data, distributed, files, loading
from lora_dist import shapes
from lora_dist.config import BUILTIN_MODEL, Config, ConfigError
from lora_dist.data import IGNORE_INDEX, RANDOM_TOKENS
from lora_dist.launch import cluster_info, free_port
from lora_dist.model import LoRAModel
from lora_dist.optim import LoRAOptimizer
from lora_dist.tracking import Tracker

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss under nan_policy "stop", too many skipped steps)."""


@dataclass
class Run:
    """Everything `setup` builds and `fit` / `evaluate` / `save` use."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    model: LoRAModel
    tokenizer: Any
    model_path: str
    train_loader: Any
    eval_dataset: Any | None
    pad_token_id: int
    accum: int
    total_steps: int
    tracker: Tracker
    fused: bool = False  # the forward runs through families.patch_model_for_speed
    engine: Any = None  # DeepSpeed engine, or None on the plain path
    optimizer: Any = None  # torch optimizer on the plain path
    scheduler: Any = None
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    last_checkpoint: Path | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # this rank's, with train.diagnostics

    @property
    def forward_module(self) -> Any:
        return self.engine if self.engine is not None else self.model


# ============================================================================================ entry


def train(cfg: Config) -> dict[str, Any]:
    """Run a whole training job; returns the summary it printed."""
    started = time.perf_counter()
    run = setup(cfg)
    if run.step == 0 or not run.evals:
        run.evals.append(evaluate(run))
    fit(run)
    if not run.evals or run.evals[-1]["step"] != run.step:
        run.evals.append(evaluate(run))
    adapter_dir = save(run)
    return finish(run, adapter_dir, time.perf_counter() - started)


def evaluate_only(cfg: Config, adapter_path: str | None = None) -> dict[str, float]:
    """Eval loss and perplexity of the base model with an adapter (default: `<output_dir>/adapter`)."""
    run = setup(cfg, for_eval=True)
    path = Path(adapter_path) if adapter_path else cfg.output_dir / "adapter"
    if path.exists():
        try:
            adapters.load_adapter(run.model, path)
        except ValueError as err:  # a folder that is no adapter, or one for other LoRA settings
            raise ConfigError([f"adapter {path}: {err}"]) from None
        run.tracker.message(f"adapter: {path}")
    elif adapter_path:
        raise ConfigError([f"no adapter folder at {adapter_path}"])
    else:
        run.tracker.message(f"no adapter at {path}: evaluating the base model with fresh (zero) adapters")
    metrics = evaluate(run)
    run.tracker.finish({"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"]})
    return metrics


# ============================================================================================ setup


def setup(cfg: Config, *, for_eval: bool = False) -> Run:
    """Processes, model, data, optimizer, resume state and reporting, in that order."""
    rank, world_size, use_deepspeed = _init_processes(cfg)
    if not for_eval:
        _refuse_unscaled_fp16(cfg, use_deepspeed)
    device = _device()  # before any collective: NCCL runs on the current CUDA device, which this sets
    cluster = cluster_info()  # a collective: every rank, right after the process group exists
    _seed_everything(cfg.train.seed)
    resume_from = None if for_eval else _prepare_output_dir(cfg, rank)

    model_path = _materialize_model(cfg, rank)
    # Tokenizer and data before the weights: bad data fails in seconds, not after loading a 70B base.
    tokenizer = None if cfg.model.random_shape() else _load_tokenizer(model_path)
    accum = cfg.train.accumulation(world_size)
    if cfg.data.path == RANDOM_TOKENS:
        train_ds, eval_ds, pad_id = _random_tokens(cfg, tokenizer, accum * world_size), None, 0
    else:
        train_ds, eval_ds = data.build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    if for_eval and eval_ds is None:
        raise ConfigError(["no eval split: set data.eval_fraction or data.eval_path"])
    micro = cfg.train.micro_batch_size
    train_loader = data.make_dataloader(
        train_ds, micro, rank=rank, world_size=world_size, seed=cfg.train.seed,
        shuffle=cfg.data.shuffle, drop_last=True, pad_token_id=pad_id,
    )
    total_steps = _total_steps(cfg, len(train_loader), accum)

    if cfg.model.random_shape():
        base = shapes.build_random_model(
            cfg.model.random_shape(), bits=cfg.model.bits, quant_type=cfg.model.quant_type,
            double_quant=cfg.model.double_quant, compute_dtype=TORCH_DTYPES[cfg.model.compute_dtype],
            device=device, seed=cfg.train.seed, attn_implementation=cfg.model.attn_implementation,
        )
    else:
        base = _load_base(cfg, model_path, device)
    torch.manual_seed(cfg.train.seed)  # the same adapter init on every rank and in every launch mode
    model = LoRAModel(base, cfg.lora)
    if cfg.model.gradient_checkpointing:
        _enable_activation_checkpointing(base)
    fused = _patch_for_speed(cfg, model, device)
    if _is_quantized(model):
        _move_adapters(model, device)  # the quantized base is already where load_base_model put it
    else:
        model.to(device)

    run = Run(
        cfg=cfg, rank=rank, world_size=world_size, device=device, model=model, tokenizer=tokenizer,
        model_path=model_path, train_loader=train_loader, eval_dataset=eval_ds, pad_token_id=pad_id, accum=accum,
        total_steps=total_steps, fused=fused,
        tracker=Tracker(
            cfg, rank=rank, total_steps=total_steps, job="eval" if for_eval else "train", cluster=cluster,
            resume_step=resume_from[1] if resume_from else None,
            wandb_run_id=resume_from[2] if resume_from else None,
        ),
    )
    if device.type == "cuda":
        # A random base is allocated dense before it is quantized: keep that peak apart from training's.
        run.diagnostics["setup_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if for_eval:
        return run
    if cfg.train.resume == "auto" and resume_from is None:
        run.tracker.message(f"resume=auto: no checkpoint under {_checkpoint_root(run)}, starting fresh")
    _build_optimizer(run, use_deepspeed)
    if resume_from is not None:
        _resume(run, resume_from[0])
    _announce(run, use_deepspeed)
    return run


def _init_processes(cfg: Config) -> tuple[int, int, bool]:
    """(rank, world size, use DeepSpeed) from the launcher's environment and distributed.engine."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    engine = cfg.distributed.engine
    if engine == "none" and launched:
        raise ConfigError([
            f"launched as {os.environ['WORLD_SIZE']} processes but distributed.engine is none; "
            f"set distributed.engine=auto (or run one process)"
        ])
    use_deepspeed = engine == "deepspeed" or (engine == "auto" and "WORLD_SIZE" in os.environ)
    if not use_deepspeed:
        return 0, 1, False
    if "WORLD_SIZE" not in os.environ:
        # DeepSpeed asked for in a plain `python` run: a process group of one.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = distributed.init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    return rank, world_size, True


def _refuse_unscaled_fp16(cfg: Config, use_deepspeed: bool) -> None:
    """fp16 gradients underflow without loss scaling, which only DeepSpeed's fp16 mode provides here."""
    if cfg.model.compute_dtype != "fp16" or (use_deepspeed and cfg.distributed.precision == "fp16"):
        return
    raise ConfigError([
        "model.compute_dtype fp16 trains without loss scaling here (its small gradients underflow to 0); "
        "use model.compute_dtype=bf16, or DeepSpeed's fp16 (distributed.engine=deepspeed distributed.precision=fp16)"
    ])


def _prepare_output_dir(cfg: Config, rank: int) -> tuple[Path, int, str | None] | None:
    """Refuse a fresh run over another run's checkpoints (or delete them when asked); find the one to resume.

    Returns:
        (checkpoint, its step, its W&B run id or None), or None for a fresh start.
    """
    root = cfg.output_dir / "checkpoints"
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
            _barrier()  # every rank has looked before rank 0 deletes
            if rank == 0:
                shutil.rmtree(root)
            _barrier()
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


def _device() -> torch.device:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _materialize_model(cfg: Config, rank: int) -> str:
    """The folder to load: `model.path`, or the embedded tiny Llama written under the output dir."""
    if cfg.model.path != BUILTIN_MODEL:
        return cfg.model.path
    from lora_dist import tiny

    target = cfg.output_dir / "tiny-llama"
    if rank == 0 and not (target / "config.json").is_file():
        tiny.build_tiny_model(target, seed=cfg.train.seed)
    _barrier()  # the other ranks read what rank 0 wrote
    return str(target)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    loading.check_local_path(path)  # "folder does not exist" beats a hub-id syntax error
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"model.path {path!r}: no tokenizer could be loaded ({first})") from None


def _random_tokens(cfg: Config, tokenizer: Any, sequences_per_step: int) -> data.RandomTokens:
    """Random-token rows for exactly `train.max_steps` optimizer steps (each row is seen once)."""
    shape = cfg.model.random_shape()
    vocab = shapes.shape(shape).vocab_size if shape else len(tokenizer)
    rows = cfg.train.max_steps * cfg.train.micro_batch_size * sequences_per_step
    return data.RandomTokens(rows, cfg.data.max_seq_len, vocab, seed=cfg.train.seed)


def _patch_for_speed(cfg: Config, model: LoRAModel, device: torch.device) -> bool:
    """Apply `families.patch_model_for_speed` when `model.fused_kernels` asks; returns whether it did."""
    from lora_dist import families

    mode = cfg.model.fused_kernels
    if mode == "off" or (mode == "auto" and not (device.type == "cuda" and cfg.model.bits == 4)):
        return False
    try:
        families.patch_model_for_speed(model)
    except families.UnsupportedModel as err:
        if mode == "on":
            raise
        warnings.warn(f"model.fused_kernels=auto: {err.family}: {err.reason}; training on the model's own forward")
        return False
    return True


def _load_base(cfg: Config, path: str, device: torch.device) -> torch.nn.Module:
    from lora_dist.loading import load_base_model

    m = cfg.model
    device_map = {"": device} if device.type == "cuda" else None
    base, _ = load_base_model(
        path, bits=m.bits, quant_type=m.quant_type, double_quant=m.double_quant,
        compute_dtype=TORCH_DTYPES[m.compute_dtype], device_map=device_map,
        attn_implementation=m.attn_implementation, require_tokenizer=False,
    )
    if getattr(base.config, "use_cache", False):
        base.config.use_cache = False  # a KV cache is useless in training and clashes with checkpointing
    return base


def _enable_activation_checkpointing(base: torch.nn.Module) -> None:
    # Non-reentrant checkpointing works with a frozen embedding (no input that requires grad).
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError([
            f"model.gradient_checkpointing: {type(base).__name__} does not support it; set it to false"
        ])


def _is_quantized(model: LoRAModel) -> bool:
    return any(layer.bits is not None for layer in model.lora_layers.values())


def _move_adapters(model: LoRAModel, device: torch.device) -> None:
    for layer in model.lora_layers.values():
        layer.lora_A.to(device)
        layer.lora_B.to(device)


def _total_steps(cfg: Config, batches_per_epoch: int, accum: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * batches_per_epoch / accum))


def deepspeed_config(cfg: Config, world_size: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config a run of `cfg` on `world_size` processes hands to `distributed.setup_engine`.

    Raises:
        ConfigError: the global batch does not divide over `world_size` processes.
    """
    t = cfg.train
    user = json.loads(Path(cfg.distributed.ds_config).read_text()) if cfg.distributed.ds_config else None
    return distributed.make_ds_config(
        zero_stage=cfg.distributed.zero_stage, micro_batch_size=t.micro_batch_size,
        grad_accum=t.accumulation(world_size), world_size=world_size, grad_clip=t.grad_clip,
        precision=cfg.distributed.precision, lr=t.lr, weight_decay=t.weight_decay,
        betas=tuple(t.betas), eps=t.eps, warmup_steps=_warmup_steps(cfg, total_steps), total_steps=total_steps,
        schedule=t.schedule, offload_optimizer=cfg.distributed.offload_optimizer, user_config=user,
    )


def _warmup_steps(cfg: Config, total_steps: int) -> int:
    return min(cfg.train.warmup_steps, max(total_steps - 1, 0))


def _build_optimizer(run: Run, use_deepspeed: bool) -> None:
    t = run.cfg.train
    if use_deepspeed:
        run.engine = distributed.setup_engine(run.model, deepspeed_config(run.cfg, run.world_size, run.total_steps))
        run.scheduler = run.engine.lr_scheduler
        return
    run.optimizer = LoRAOptimizer(
        run.model, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps
    ).optimizer
    run.scheduler = distributed.make_lr_scheduler(
        run.optimizer, schedule=t.schedule, warmup_steps=_warmup_steps(run.cfg, run.total_steps),
        total_steps=run.total_steps,
    )


def _checkpoint_root(run: Run) -> Path:
    return run.cfg.output_dir / "checkpoints"


def _resume(run: Run, path: Path) -> None:
    """Load the checkpoint `_prepare_output_dir` chose: weights, optimizer, schedule, data position, RNG."""
    state = checkpoint.load_checkpoint(
        path, model=run.model, engine=run.engine, optimizer=run.optimizer, scheduler=run.scheduler
    )
    extra = state.get("extra") or {}
    run.step = int(state["step"])
    run.tokens_seen = int(extra.get("tokens_seen", 0))
    run.skipped_steps = int(extra.get("skipped_steps", 0))
    run.evals = list(extra.get("evals", []))
    if state.get("data_state") is not None:
        run.train_loader.load_state_dict(state["data_state"])
    run.last_checkpoint = Path(path)
    run.tracker.message(f"resumed from {path} at step {run.step}")


def _announce(run: Run, use_deepspeed: bool) -> None:
    # ZeRO-3 leaves a rank an empty placeholder per adapter; ds_numel is the whole count.
    local, total = run.model.trainable_parameter_count()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in run.model.get_trainable_parameters())
    total += trainable - local
    how = (
        f"DeepSpeed ZeRO-{run.cfg.distributed.zero_stage} on {run.world_size} process(es)"
        if use_deepspeed else "single process, no DeepSpeed"
    )
    bits = f"{run.cfg.model.bits}-bit" if run.cfg.model.bits else "dense"
    run.tracker.message(
        f"model {run.model_path} ({bits}, {total:,} weights, {trainable:,} trainable = "
        f"{100 * trainable / max(total, 1):.2f}%) on {run.device}; {how}\n"
        f"data: {len(run.train_loader)} micro batches per epoch per process, "
        f"global batch {run.cfg.train.micro_batch_size * run.accum * run.world_size} sequences, "
        f"{run.total_steps} optimizer steps; W&B: {run.tracker.wandb_mode}"
    )


# ============================================================================================ fit


def fit(run: Run) -> None:
    """Optimizer steps until `total_steps`, evaluating and checkpointing at the configured intervals."""
    t = run.cfg.train
    batches = _batch_stream(run)
    _train_mode(run, True)
    profiler = None
    while run.step < run.total_steps:
        window = [next(batches) for _ in range(run.accum)]
        if t.profile_steps and run.step + 1 == t.profile_steps[0]:
            profiler = _start_profiler(run)
        stats = train_step(run, window)
        run.step += 1
        if profiler is not None and run.step == t.profile_steps[1]:
            run.diagnostics["profile"] = _stop_profiler(run, profiler, t.profile_steps)
            profiler = None
        if stats["skipped"]:
            run.skipped_steps += 1
            _on_bad_step(run, stats)
        run.tokens_seen += int(stats["tokens"])
        run.tracker.log_step(run.step, _step_metrics(run, stats))
        if t.eval_interval and run.step % t.eval_interval == 0 and run.step < run.total_steps:
            run.evals.append(evaluate(run))
            _train_mode(run, True)
        if t.save_interval and run.step % t.save_interval == 0 and run.step < run.total_steps:
            save_checkpoint(run)
    if t.diagnostics:
        _write_diagnostics(run)


def _batch_stream(run: Run) -> Iterator[dict[str, torch.Tensor]]:
    """Micro batches forever; the loader moves itself to the next epoch and remembers its place."""
    while True:
        yield from run.train_loader


def train_step(run: Run, window: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over `accum` micro batches: forward/backward each, then clip and step.

    Returns:
        {"loss": mean token loss over the global batch, "grad_norm", "lr", "tokens" (global input
         tokens), "label_tokens", "step_time", "skipped" (True when the loss or the gradient norm was not
         finite: no update was made)}.
    """
    started = time.perf_counter()
    lr = _current_lr(run)
    window = [_to_device(run, b) for b in window]
    counts = torch.tensor(
        [sum(_label_tokens(b) for b in window), sum(_input_tokens(b) for b in window)],
        dtype=torch.float64, device=run.device,
    )
    label_tokens, input_tokens = _all_reduce_sum(counts).tolist()
    num_items = torch.tensor(max(label_tokens, 1.0), device=run.device)

    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, batch in enumerate(window):
        with _whole_adapters(run, training=True):
            # loss = this micro batch's summed token loss / the global batch's token count
            loss = _batch_loss(run, batch, num_items)
            loss_sum += loss.detach().double()
            # Data-parallel gradients are averaged over ranks; scaling by world size makes them a sum.
            scaled = loss * run.world_size
            if run.engine is not None:
                run.engine.backward(scaled, scale_wrt_gas=False)
            else:
                scaled.backward()
        if run.engine is not None:
            if run.cfg.train.diagnostics and run.step + 1 == min(2, run.total_steps) and i == len(window) - 1:
                # At the second step's boundary, between backward and step, the gradients exist and
                # so does the optimizer state (torch's AdamW creates it in the first step).
                run.diagnostics["shards"] = distributed.shard_report(run.engine)
            # DeepSpeed counts micro batches in step(): it must follow every backward, and it
            # clips, updates and advances the schedule only at the accumulation boundary.
            run.engine.step()
    global_loss = float(_all_reduce_sum(loss_sum))

    grad_norm, skipped = _optimizer_step(run, math.isfinite(global_loss))
    return {
        "loss": global_loss, "grad_norm": grad_norm, "lr": lr, "tokens": input_tokens,
        "label_tokens": label_tokens, "step_time": time.perf_counter() - started, "skipped": skipped,
    }


def _optimizer_step(run: Run, loss_finite: bool) -> tuple[float, bool]:
    """Clip and step, or skip a step whose loss or gradient norm is not finite.

    A finite loss can still come with inf/nan gradients (an overflow in the backward pass only), so
    the pre-clip norm decides too. Returns (pre-clip global gradient norm, skipped).
    """
    if run.engine is not None:
        return _engine_step_result(run, loss_finite)
    params = run.model.get_trainable_parameters()
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=run.device)
    if not (loss_finite and math.isfinite(float(norm))):
        run.optimizer.zero_grad(set_to_none=True)
        _advance_schedule_without_update(run)
        return float(norm), True
    clip = run.cfg.train.grad_clip
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return float(norm), False


def _engine_step_result(run: Run, loss_finite: bool) -> tuple[float, bool]:
    """What the last engine.step() of the window (in train_step) did: it clipped, updated, stepped the schedule.

    DeepSpeed 0.19.8's ZeRO 1-3 optimizers check the gradient norm themselves: a non-finite one skips
    the update (and the schedule step), `was_step_applied()` is False and the norm reads inf. Without
    ZeRO (stage 0) in fp32 nothing checks: a nan gradient reaches the adapters, and the run stops.
    """
    reported = run.engine.get_global_grad_norm()  # None where DeepSpeed computed none (stage 0)
    norm = float(reported) if reported is not None else float("nan")
    applied = run.engine.was_step_applied()
    skipped = not (loss_finite and applied and (reported is None or math.isfinite(norm)))
    if (skipped or reported is None) and _adapters_non_finite(run):
        raise TrainingStopped(
            f"non-finite loss or gradient at step {run.step + 1} reached the adapter weights under DeepSpeed; "
            f"resume from the last good checkpoint ({run.last_checkpoint or 'none yet'}) with a lower train.lr"
        )
    if not applied:
        _advance_schedule_without_update(run)
    return norm, skipped


def _advance_schedule_without_update(run: Run) -> None:
    # The schedule follows steps taken through the data, skipped or not, on both paths alike.
    with warnings.catch_warnings():  # torch warns when a schedule steps without the optimizer: intended
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()


def _on_bad_step(run: Run, stats: dict[str, Any]) -> None:
    t = run.cfg.train
    last = run.last_checkpoint or "none yet"
    what = _what_was_not_finite(stats)
    if t.nan_policy == "stop":
        raise TrainingStopped(
            f"{what} at step {run.step}; stopped with nan_policy=stop. Last good checkpoint: {last}"
        )
    run.tracker.message(f"step {run.step}: {what}, update skipped ({run.skipped_steps} so far)")
    if run.skipped_steps > t.max_skipped_steps:
        raise TrainingStopped(
            f"{run.skipped_steps} steps skipped for a non-finite loss or gradient "
            f"(train.max_skipped_steps={t.max_skipped_steps}); lower train.lr or check the data. "
            f"Last good checkpoint: {last}"
        )


def _what_was_not_finite(stats: dict[str, Any]) -> str:
    if not math.isfinite(stats["loss"]):
        return f"non-finite loss ({stats['loss']})"
    return f"non-finite gradient norm ({stats['grad_norm']})"


def _step_metrics(run: Run, stats: dict[str, Any]) -> dict[str, float]:
    metrics = {
        "loss": stats["loss"],
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        "tokens_per_s": stats["tokens"] / max(stats["step_time"], 1e-9),
        "tokens_seen": float(run.tokens_seen),
        "step_time_s": stats["step_time"],
        "skipped_steps": float(run.skipped_steps),
        "epoch": _epoch_progress(run.train_loader),
    }
    if run.device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    return metrics


def _epoch_progress(loader: Any) -> float:
    position = loader.state_dict()
    return position["epoch"] + position["batch"] / max(len(loader), 1)


def _current_lr(run: Run) -> float:
    return float(run.scheduler.get_last_lr()[0])


def _to_device(run: Run, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = {k: v.to(run.device) for k, v in batch.items()}
    mask = batch.get("attention_mask")
    if run.fused and mask is not None and bool(mask.all()):
        # An all-ones mask says nothing the causal mask does not; without it the fused attention
        # runs SDPA's causal kernel instead of falling back to the model's own masked path.
        del batch["attention_mask"]
    return batch


def _batch_loss(run: Run, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
    """This micro batch's summed token loss divided by `num_items`, whichever forward the model runs."""
    loss = run.forward_module(**batch, num_items_in_batch=num_items).loss
    if run.fused:
        # The chunked loss of the fused forward averages over this batch's own label tokens and
        # ignores num_items_in_batch: rescale its mean to the sum over num_items.
        loss = loss * (_label_tokens(batch) / num_items)
    return loss


def _whole_adapters(run: Run, training: bool):
    """Gather the ZeRO-3 adapter shards for a forward (and backward) that reads them outside their modules.

    ZeRO-3's hooks fetch a partitioned parameter when its own module is called. The fused kernels
    (`kernels.lora_group`, and `LoRALayer`'s own 4-bit CUDA training path) read `lora_A.weight` and
    `lora_B.weight` directly instead. DeepSpeed 0.19.8 catches such reads inside the engine's forward
    (its parameter getter gathers the one parameter and registers it as external to the running
    module); here all adapters are gathered in one call per micro batch instead, not relying on that
    getter, and partitioned again before the optimizer step. The adapters are ~3% of a 4-bit 8B
    base's bytes (168 MB fp32 against 5.6 GB). Both ways train bit-identically on the CPU.
    """
    if run.engine is None or not run.engine.zero_optimization_partition_weights():
        return contextlib.nullcontext()
    from lora_dist.layers import supports_fast_path

    layers = list(run.model.lora_layers.values())
    if not layers or not all(supports_fast_path(layer) for layer in layers):
        return contextlib.nullcontext()  # every layer calls its lora_A / lora_B modules: ZeRO's hooks fetch
    cuda_4bit = training and run.device.type == "cuda" and all(layer.bits == 4 for layer in layers)
    if not (run.fused or cuda_4bit):
        return contextlib.nullcontext()
    return distributed.gathered(run.engine)


def _label_tokens(batch: dict[str, torch.Tensor]) -> int:
    # The model predicts token t+1 from position t: the first label never counts.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _adapters_non_finite(run: Run) -> bool:
    with distributed.gathered(run.engine) if run.engine is not None else contextlib.nullcontext():
        return any(not torch.isfinite(p).all() for p in run.model.get_trainable_parameters())


def _train_mode(run: Run, mode: bool) -> None:
    (run.engine or run.model).train(mode)


# ============================================================================================ evaluate


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the eval split (all ranks), logged at `run.step`."""
    if run.eval_dataset is None:
        return {"step": run.step, "loss": float("nan"), "perplexity": float("nan")}
    _train_mode(run, False)
    # Every rank reads the whole eval split and forwards its share of the batches: no sample is
    # repeated to even out shards, so the eval loss is the same at any world size.
    loader = data.make_dataloader(
        run.eval_dataset, run.cfg.train.micro_batch_size, shuffle=False, drop_last=False,
        pad_token_id=run.pad_token_id,
    )
    limit = run.cfg.train.eval_batches
    n_batches = len(loader) if limit is None else min(limit, len(loader))
    mine = range(run.rank, n_batches, run.world_size)  # rank r forwards batches r, r + world, ...
    # ZeRO-3 gathers adapter shards inside every forward: all ranks must run as many forwards.
    rounds = math.ceil(n_batches / run.world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # (summed token loss, tokens)
    one = torch.tensor(1.0, device=run.device)
    spare = None
    for i, batch in zip(range(n_batches), loader):
        spare = batch if spare is None else spare
        if i in mine:
            batch = _to_device(run, batch)
            with _whole_adapters(run, training=False):
                # num_items_in_batch=1: the summed, not averaged, token loss.
                loss_sum = _batch_loss(run, batch, one)
            totals[0] += loss_sum.double()
            totals[1] += _label_tokens(batch)
    for _ in range(rounds - len(mine)):  # a rank a batch short runs one more forward and discards it
        with _whole_adapters(run, training=False):
            run.forward_module(**_to_device(run, spare), num_items_in_batch=one)
    loss_total, tokens = _all_reduce_sum(totals).tolist()
    loss = loss_total / max(tokens, 1.0)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": tokens}
    run.tracker.log_eval(run.step, metrics)
    _train_mode(run, True)
    return {"step": run.step, **metrics}


# ============================================================================================ save


def save_checkpoint(run: Run) -> Path:
    """A resumable checkpoint of the current step (every rank calls this; the checkpointer gates writes)."""
    path = checkpoint.save_checkpoint(
        _checkpoint_root(run), step=run.step, model=run.model, engine=run.engine, optimizer=run.optimizer,
        scheduler=run.scheduler, data_state=run.train_loader.state_dict(),
        extra={
            "tokens_seen": run.tokens_seen, "skipped_steps": run.skipped_steps,
            "evals": run.evals, "wandb_run_id": run.tracker.wandb_run_id,  # a resume continues this W&B run
        },
    )
    run.last_checkpoint = Path(path)
    return Path(path)


def save(run: Run) -> Path:
    """The final checkpoint, then the adapter in the PEFT layout at `<output_dir>/adapter`."""
    save_checkpoint(run)
    adapter_dir = run.cfg.output_dir / "adapter"
    base_name = run.cfg.model.path if run.cfg.model.path != BUILTIN_MODEL else run.model_path
    with distributed.gathered(run.engine) if run.engine is not None else contextlib.nullcontext():
        if run.rank == 0:
            adapters.save_adapter(run.model, adapter_dir, base_model_name_or_path=base_name)
    _barrier()
    run.tracker.log_adapter(adapter_dir)
    return adapter_dir


def finish(run: Run, adapter_dir: Path, wall_time: float) -> dict[str, Any]:
    """Print and record the summary: losses, throughput, and where every output went."""
    summary: dict[str, Any] = {
        "steps": run.step,
        "skipped_steps": run.skipped_steps,
        "tokens_seen": run.tokens_seen,
    }
    if run.eval_dataset is not None:  # a run without an eval split has no eval line to report
        first, last = run.evals[0], run.evals[-1]
        summary.update(eval_loss_start=first["loss"], eval_loss_end=last["loss"],
                       eval_perplexity_end=last["perplexity"])
    summary |= {
        "wall_time_s": round(wall_time, 1),
        "tokens_per_s": round(run.tokens_seen / max(wall_time, 1e-9), 1),
    }
    if run.device.type == "cuda":
        summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    summary["adapter"] = str(adapter_dir)
    summary["checkpoint"] = str(run.last_checkpoint)
    summary["metrics"] = str(run.tracker.metrics_path)
    wandb_dir = run.tracker.wandb_run_dir()
    summary["wandb_run"] = str(wandb_dir) if wandb_dir else "off"
    if wandb_dir and run.tracker.wandb_mode == "offline":
        summary["wandb_upload"] = f"wandb sync {wandb_dir}"
    run.tracker.finish(summary)
    if run.engine is not None and run.world_size > 1:
        torch.distributed.barrier()
    return summary


# ============================================================================================ diagnostics


def _start_profiler(run: Run) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def _stop_profiler(run: Run, profiler: Any, steps: list[int]) -> dict[str, Any]:
    """Time in collective kernels over the profiled steps: NCCL kernels on the GPU, gloo ops on the CPU.

    On the GPU the sum is of NCCL kernel durations. A kernel also runs while it waits for the slower
    rank, and it may overlap compute on its own stream: the sum bounds the exposed communication
    time (and load imbalance) from above.
    """
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    profiler.__exit__(None, None, None)
    on_gpu = run.device.type == "cuda"
    comm_us = busy_us = 0.0
    kernels: dict[str, float] = {}
    for event in profiler.events():
        name = event.name
        elapsed = event.time_range.elapsed_us()
        if on_gpu:
            # Kernels only: a `nccl:all_reduce` annotation spans its kernel on the GPU timeline too.
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            if name.startswith("nccl:"):
                continue
            busy_us += elapsed
            if "nccl" in name.lower():
                comm_us += elapsed
                kernels[name[:60]] = kernels.get(name[:60], 0.0) + elapsed
        elif name.startswith("gloo:"):
            comm_us += elapsed
            kernels[name] = kernels.get(name, 0.0) + elapsed
    n = steps[1] - steps[0] + 1
    return {
        "steps": list(steps),
        "collective": "nccl kernels" if on_gpu else "gloo ops",
        "comm_ms_per_step": comm_us / 1e3 / n,
        "device_busy_ms_per_step": busy_us / 1e3 / n if on_gpu else None,
        "by_kernel_ms_per_step": {k: v / 1e3 / n for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]},
    }


def _write_diagnostics(run: Run) -> Path:
    """This rank's `<output_dir>/diagnostics/rank-N.json`: shard bytes, peak memory, profile."""
    record: dict[str, Any] = {"rank": run.rank, "world_size": run.world_size, "fused_kernels": run.fused,
                              "zero_stage": run.cfg.distributed.zero_stage if run.engine is not None else None,
                              **run.diagnostics}
    if run.device.type == "cuda":
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(run.device) / 2**30
    folder = run.cfg.output_dir / "diagnostics"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{run.rank}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


# ============================================================================================ collectives


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _dist_on():
        torch.distributed.barrier()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_on() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _dist_on() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t
