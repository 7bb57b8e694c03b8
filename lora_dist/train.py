"""The training job: setup -> fit -> evaluate -> save.

One code path serves a laptop CPU, one GPU, and many ranks under the `deepspeed` / `torchrun` launchers:
the loop drives an engine, DeepSpeed's or `engine.PlainEngine` (a torch AdamW with the same methods),
and everything DeepSpeed- or rank-specific (process groups, collectives, ZeRO-3 gathers) lives in
`distributed.py`.

The loss of an optimizer step is the mean over every response token of the global batch (all micro
batches, all ranks): each micro batch's summed token loss is divided by that global token count, so
the gradient does not depend on how the batch is split over micro batches and ranks, and a 2-rank
run follows the single-process one step for step.

On SIGTERM, SIGINT or SIGUSR1 during `fit` the step in progress finishes, a checkpoint is written and
`preemption.Preempted` ends the job (exit status 75; resume with `train.resume=auto`).
"""

from __future__ import annotations

import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from lora_dist import adapters, building, checkpoint, data, distributed, graphs, kernels, loading
from lora_dist.config import BUILTIN_MODEL, Config
from lora_dist.data import IGNORE_INDEX
from lora_dist.diagnostics import Profiler, write_diagnostics
from lora_dist.engine import build_engine, checkpoint_state
from lora_dist.errors import ConfigError
from lora_dist.loader import RANDOM_TOKENS, make_dataloader
from lora_dist.model import LoRAModel
from lora_dist.preemption import Preempted, StopSignals
from lora_dist.supervise import watch_launcher
from lora_dist.tracking import Tracker

WARMUP_STEPS = 2  # steps of each launch left out of the steady-state tokens/s (allocation, autotuning)


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
    use_deepspeed: bool = False
    fused: bool = False  # the forward runs through families.patch_model_for_speed
    engine: Any = None  # DeepSpeed's engine or an engine.PlainEngine: the loop calls the same methods on both
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    last_checkpoint: Path | None = None
    evals: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # this rank's, with train.diagnostics
    step_rates: list[float] = field(default_factory=list)  # tokens/s of each step of this launch
    launch_tokens: int = 0  # tokens of this launch's steps (a resumed run counts only its own)
    started: float = field(default_factory=time.perf_counter)  # when this launch began (train() sets it)
    signals: StopSignals = field(default_factory=StopSignals)  # stop requests while training

    @property
    def scheduler(self) -> Any:
        return self.engine.lr_scheduler


# ============================================================================================ entry


def train(cfg: Config) -> dict[str, Any]:
    """Run a whole training job; returns the summary it printed.

    Raises:
        Preempted: a stop signal ended the job after a complete checkpoint.
    """
    started = time.perf_counter()
    run = setup(cfg)
    run.started = started
    # From the first eval to the final save a stop signal never kills the job: during fit it ends the
    # step in progress and checkpoints it; during the final eval and save the job just finishes them.
    with run.signals:
        if run.step == 0 or not run.evals:
            run.evals.append(evaluate(run))
        fit(run)
        _stop_if_signalled(run)  # one that came after fit's last check: checkpoint before the final eval
        if not run.evals or run.evals[-1]["step"] != run.step:
            run.evals.append(evaluate(run))
        adapter_dir = save(run)
    return finish(run, time.perf_counter() - started, adapter=adapter_dir)


def evaluate_only(cfg: Config, adapter_path: str | None = None) -> dict[str, float]:
    """Eval loss and perplexity of the base model with an adapter (default: `<output_dir>/adapter`)."""
    run = setup(cfg, for_eval=True)
    path = Path(adapter_path) if adapter_path else cfg.folder.adapter
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
    """Processes, model, data, engine, resume state and reporting, in that order."""
    # A rank whose launcher dies (SIGKILL, a lost ssh session) stops instead of holding its GPU forever.
    watch_launcher(cfg.distributed.timeout_s)
    rank, world_size, use_deepspeed = distributed.init_processes(cfg)
    if not for_eval:
        building.refuse_unscaled_fp16(cfg, use_deepspeed)
    device = building.device()  # before any collective: NCCL runs on the current CUDA device, which this sets
    _refuse_fp8_where_it_cannot_run(cfg, device)  # before anything is loaded
    if cfg.train.micro_batch_size == "auto":
        cfg = _auto_micro_batch(cfg, device, rank, world_size)
    cluster = distributed.cluster_info()  # a collective: every rank, right after the process group exists
    building.seed_everything(cfg.train.seed)
    resume_from = None if for_eval else building.prepare_output_dir(cfg, rank)

    model_path = building.materialize_model(cfg, rank)
    # Tokenizer and data before the weights: bad data fails in seconds, not after loading a 70B base.
    tokenizer = None if cfg.model.random_shape() else loading.load_tokenizer(model_path)
    accum = cfg.train.accumulation(world_size)
    data_stats = data.DataStats()
    if cfg.data.path == RANDOM_TOKENS:
        train_ds, eval_ds, pad_id = building.random_tokens(cfg, tokenizer, accum * world_size), None, 0
    else:
        train_ds, eval_ds = data.build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, stats=data_stats)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    if for_eval and eval_ds is None:
        raise ConfigError(["no eval split: set data.eval_fraction or data.eval_path"])
    train_loader = make_dataloader(
        train_ds, cfg.train.micro_batch_size, rank=rank, world_size=world_size, accumulation=accum,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, drop_last=True, pad_token_id=pad_id,
    )
    total_steps = building.total_steps(cfg, len(train_loader), accum)

    model, fused = building.build_model(
        cfg, model_path, device, lambda m: _patch_for_speed(cfg, m, device, use_deepspeed))
    run = Run(
        cfg=cfg, rank=rank, world_size=world_size, device=device, model=model, tokenizer=tokenizer,
        model_path=model_path, train_loader=train_loader, eval_dataset=eval_ds, pad_token_id=pad_id, accum=accum,
        total_steps=total_steps, fused=fused, use_deepspeed=use_deepspeed,
        tracker=Tracker(
            cfg, rank=rank, total_steps=total_steps, job="eval" if for_eval else "train", cluster=cluster,
            resume_step=resume_from[1] if resume_from else None,
            wandb_run_id=resume_from[2] if resume_from else None,
        ),
    )
    if cfg.data.path != RANDOM_TOKENS:
        run.tracker.log_data(data_stats)
    if device.type == "cuda":
        # A random base is allocated dense before it is quantized: keep that peak apart from training's.
        run.diagnostics["setup_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if for_eval:
        run.engine = _eval_engine(run)
        return run
    if cfg.train.resume == "auto" and resume_from is None:
        run.tracker.message(f"resume=auto: no checkpoint under {cfg.folder.checkpoints}, starting fresh")
    run.engine = build_engine(cfg, model, world_size=world_size, total_steps=total_steps, use_deepspeed=use_deepspeed)
    if resume_from is not None:
        _resume(run, resume_from[0])
    _announce(run)
    return run


def _auto_micro_batch(cfg: Config, device: torch.device, rank: int, world_size: int) -> Config:
    """`cfg` with `train.micro_batch_size=auto` resolved by the planner for the smallest card of the job."""
    if device.type != "cuda":
        raise ConfigError(["train.micro_batch_size=auto fits a GPU's memory; on the CPU give a number"])
    from lora_dist import plan

    budget = plan.device_budget_bytes(device)
    if world_size > 1:  # every rank must pick the same split: the smallest card decides
        budget = int(distributed.all_reduce_min(torch.tensor(float(budget), device=device)))
    cfg, line = plan.resolve_auto_micro_batch(cfg, budget, world_size)
    if rank == 0:
        print(line, flush=True)
    return cfg


def _patch_for_speed(cfg: Config, model: LoRAModel, device: torch.device, use_deepspeed: bool = False) -> bool:
    """Apply `families.patch_model_for_speed` when `model.fused_kernels` asks, then the CUDA graphs where
    `model.cuda_graphs` asks and they apply; returns whether the fused path took."""
    from lora_dist import families

    kernels.set_fp8_base_gemms(False)  # a process-wide switch: nothing left from an earlier run in this process
    fp8 = cfg.model.fp8_base
    if not _fused_path_asked(cfg, device):
        return False  # (model.fp8_base was refused for this in setup)
    try:
        families.patch_model_for_speed(model)
    except families.UnsupportedModel as err:
        if cfg.model.fused_kernels == "on":
            raise
        _refuse_fp8_without_fused_path(fp8, f"{err.family}: {err.reason}")
        warnings.warn(f"model.fused_kernels=auto: {err.family}: {err.reason}; training on the model's own forward")
        return False
    if fp8 != "off":
        kernels.set_fp8_base_gemms(True, forward=fp8 == "all")
    if graphs_apply(cfg, device, use_deepspeed):
        graphs.enable_layer_graphs(loading.decoder_layers(model), cfg.model.gradient_checkpointing)
    return True


def _fused_path_asked(cfg: Config, device: torch.device) -> bool:
    """Whether `model.fused_kernels` asks for the fused path here: "on", or "auto" for a 4-bit base on CUDA."""
    mode = cfg.model.fused_kernels
    return mode == "on" or (mode == "auto" and device.type == "cuda" and cfg.model.bits == 4)


def _refuse_fp8_where_it_cannot_run(cfg: Config, device: torch.device) -> None:
    """model.fp8_base needs FP8 tensor cores on CUDA and the fused path: refused before any weight is loaded
    (what the config alone tells is refused when it is read)."""
    fp8 = cfg.model.fp8_base
    if fp8 == "off":
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"model.fp8_base={fp8} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                          f"this GPU is {torch.cuda.get_device_name(device)}: set model.fp8_base=off")
    if cfg.model.fused_kernels == "auto" and not _fused_path_asked(cfg, device):
        _refuse_fp8_without_fused_path(fp8, "model.fused_kernels=auto takes a 4-bit base on CUDA only; on the CPU "
                                            "set model.fused_kernels=on to run FP8 as a reference")


def _refuse_fp8_without_fused_path(fp8: str, why: str) -> None:
    if fp8 != "off":
        raise ConfigError(f"model.fp8_base={fp8} runs in the fused kernels, which do not take this run ({why}): "
                          "set model.fp8_base=off")


def graphs_apply(cfg: Config, device: torch.device, use_deepspeed: bool) -> bool:
    """Whether the fused model's decoder layers replay CUDA graphs (`model.cuda_graphs`): on CUDA in one
    process, without activation offload (its copies run beside the layers). Not under DeepSpeed: ZeRO-3
    gathers the adapters anew each step, and ZeRO-1/2 with graphs has not been run on GPUs yet."""
    return cfg.model.cuda_graphs and device.type == "cuda" and not cfg.model.activation_offload and not use_deepspeed


def _eval_engine(run: Run) -> Any:
    """The engine `lora-dist eval` forwards through: a plain one (no optimizer state to shard), at any world size."""
    return build_engine(run.cfg, run.model, world_size=run.world_size, total_steps=run.total_steps,
                        use_deepspeed=False)


def _resume(run: Run, path: Path) -> None:
    """Load the checkpoint `_prepare_output_dir` chose: weights, optimizer, schedule, data position, RNG."""
    state = checkpoint.load_checkpoint(path, model=run.model, **checkpoint_state(run.engine))
    extra = state.get("extra") or {}
    run.step = int(state["step"])
    run.tokens_seen = int(extra.get("tokens_seen", 0))
    run.skipped_steps = int(extra.get("skipped_steps", 0))
    run.evals = list(extra.get("evals", []))
    if state.get("data_state") is not None:
        run.train_loader.load_state_dict(state["data_state"])
    run.last_checkpoint = Path(path)
    run.tracker.message(f"resumed from {path} at step {run.step}")


def _announce(run: Run) -> None:
    # ZeRO-3 leaves a rank an empty placeholder per adapter; ds_numel is the whole count.
    local, total = run.model.trainable_parameter_count()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in run.model.get_trainable_parameters())
    total += trainable - local
    how = (
        f"DeepSpeed ZeRO-{run.cfg.distributed.zero_stage} on {run.world_size} process(es)"
        if run.use_deepspeed else "single process, no DeepSpeed"
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
    """Optimizer steps until `total_steps`, evaluating and checkpointing at the configured intervals.

    Raises:
        Preempted: a stop signal arrived; the step in progress finished and was checkpointed.
    """
    t = run.cfg.train
    batches = _batch_stream(run)
    run.engine.train()
    profiler = Profiler(run.device, t.profile_steps) if t.profile_steps else None
    with run.signals:
        while run.step < run.total_steps:
            window = [next(batches) for _ in range(run.accum)]
            if profiler is not None:
                profiler.before_step(run.step + 1)
            stats = train_step(run, window)
            run.step += 1
            if profiler is not None and profiler.after_step(run.step):
                run.diagnostics["profile"] = profiler.report()
            if stats["skipped"]:
                run.skipped_steps += 1
                _on_bad_step(run, stats)
            run.tokens_seen += int(stats["tokens"])
            run.launch_tokens += int(stats["tokens"])
            run.step_rates.append(stats["tokens"] / max(stats["step_time"], 1e-9))
            run.tracker.log_step(run.step, _step_metrics(run, stats))
            _stop_if_signalled(run)
            if t.eval_interval and run.step % t.eval_interval == 0 and run.step < run.total_steps:
                run.evals.append(evaluate(run))
                run.engine.train()
            if t.save_interval and run.step % t.save_interval == 0 and run.step < run.total_steps:
                save_checkpoint(run)
    if t.diagnostics:
        write_diagnostics(run.cfg.folder.rank_diagnostics(run.rank), _diagnostics_record(run))


def _stop_if_signalled(run: Run) -> None:
    """If a stop signal reached any rank: checkpoint the finished step, flush the record and W&B, and raise
    Preempted, on every rank together (a collective: every rank calls it at the same point)."""
    if not distributed.any_rank(run.signals.received is not None, run.device):
        return
    received = run.signals.received or "a stop signal on another rank"
    path = save_checkpoint(run)
    run.tracker.message(f"{received}: stopping after step {run.step}; checkpoint {path}")
    run.tracker.finish(_summary(run, time.perf_counter() - run.started) | {"preempted": received})
    distributed.barrier()  # no rank exits (and gets its launcher to kill the others) before rank 0 has flushed
    raise Preempted(received, run.step, str(path))


def _batch_stream(run: Run) -> Iterator[dict[str, torch.Tensor]]:
    """Micro batches forever; the loader moves itself to the next epoch and remembers its place."""
    while True:
        yield from run.train_loader


def train_step(run: Run, window: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over `accum` micro batches: forward/backward each, then the engine clips and steps.

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
    label_tokens, input_tokens = distributed.all_reduce_sum(counts).tolist()
    num_items = torch.tensor(max(label_tokens, 1.0), device=run.device)

    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, batch in enumerate(window):
        # adapter_copies: the fused path casts each adapter weight once per micro batch, not per use
        with distributed.adapters_whole(run.engine, run.model, fused=run.fused, training=True), \
                kernels.adapter_copies():
            # loss = this micro batch's summed token loss / the global batch's token count
            loss = _batch_loss(run, batch, num_items)
            loss_sum += loss.detach().double()
            # Data-parallel gradients are averaged over ranks; scaling by world size makes them a sum.
            run.engine.backward(loss * run.world_size, scale_wrt_gas=False)
        # At the second step's boundary, between backward and step, the gradients exist and so does
        # the optimizer state (torch's AdamW creates it in the first step): what ZeRO partitions.
        boundary = i == len(window) - 1 and run.step + 1 == min(2, run.total_steps)
        if boundary and run.use_deepspeed and run.cfg.train.diagnostics:
            run.diagnostics["shards"] = distributed.shard_report(run.engine)
        # The engine counts micro batches in step(): it must follow every backward, and it clips,
        # updates and advances the schedule only at the accumulation boundary.
        run.engine.step()
    global_loss = float(distributed.all_reduce_sum(loss_sum))

    grad_norm, skipped = _step_outcome(run, math.isfinite(global_loss))
    return {
        "loss": global_loss, "grad_norm": grad_norm, "lr": lr, "tokens": input_tokens,
        "label_tokens": label_tokens, "step_time": time.perf_counter() - started, "skipped": skipped,
    }


def _step_outcome(run: Run, loss_finite: bool) -> tuple[float, bool]:
    """What the window's last engine.step() did: (pre-clip global gradient norm, skipped).

    A finite loss can still come with inf/nan gradients (an overflow in the backward pass only), so the
    norm decides too. The plain engine and DeepSpeed 0.19.8's ZeRO 1-3 optimizers check it themselves: a
    non-finite one skips the update (and the schedule step), `was_step_applied()` is False and the norm
    reads inf. Without ZeRO (stage 0) in fp32 nothing checks: a nan gradient reaches the adapters, and
    the run stops.
    """
    reported = run.engine.get_global_grad_norm()  # None where DeepSpeed computed none (stage 0)
    norm = float(reported) if reported is not None else float("nan")
    applied = run.engine.was_step_applied()
    skipped = not (loss_finite and applied and (reported is None or math.isfinite(norm)))
    if (skipped or reported is None) and _adapters_non_finite(run):
        raise TrainingStopped(
            f"non-finite loss or gradient at step {run.step + 1} reached the adapter weights; "
            f"resume from the last good checkpoint ({run.last_checkpoint or 'none yet'}) with a lower train.lr"
        )
    if not applied:
        # The schedule follows steps taken through the data, skipped or not, on every engine alike.
        with warnings.catch_warnings():  # torch warns when a schedule steps without the optimizer: intended
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            run.scheduler.step()
    return norm, skipped


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
        "tokens_per_s": run.step_rates[-1],
        "tokens_seen": float(run.tokens_seen),
        "step_time_s": stats["step_time"],
        "skipped_steps": float(run.skipped_steps),
        "epoch": _epoch_progress(run.train_loader),
    }
    if run.device.type == "cuda":
        # A step that captured CUDA graphs allocated their scratch as it went: its peak counts it. Later
        # steps replay into that scratch without allocating: their peak adds it (`graphs.peak_bytes`)
        captured = graphs.captures() != run.diagnostics.get("graph_captures", 0)
        metrics["peak_mem_gib"] = (torch.cuda.max_memory_allocated(run.device) if captured
                                   else graphs.peak_bytes(run.device)) / 2**30
        if captured:
            run.diagnostics["graph_captures"] = graphs.captures()
            torch.cuda.reset_peak_memory_stats(run.device)
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
    """This micro batch's summed token loss divided by `num_items`, whichever forward the model runs
    (the model's own loss and the fused path's chunked loss both divide by num_items_in_batch)."""
    return run.engine(**batch, num_items_in_batch=num_items).loss


def _label_tokens(batch: dict[str, torch.Tensor]) -> int:
    # The model predicts token t+1 from position t: the first label never counts.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _adapters_non_finite(run: Run) -> bool:
    with distributed.gathered(run.model):
        return any(not torch.isfinite(p).all() for p in run.model.get_trainable_parameters())


# ============================================================================================ evaluate


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over the eval split (all ranks), logged at `run.step`."""
    if run.eval_dataset is None:
        return {"step": run.step, "loss": float("nan"), "perplexity": float("nan")}
    run.engine.eval()
    # Every rank reads the whole eval split and forwards its share of the batches: no sample is
    # repeated to even out shards, so the eval loss is the same at any world size.
    loader = make_dataloader(
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
            with distributed.adapters_whole(run.engine, run.model, fused=run.fused, training=False):
                # num_items_in_batch=1: the summed, not averaged, token loss.
                loss_sum = _batch_loss(run, batch, one)
            totals[0] += loss_sum.double()
            totals[1] += _label_tokens(batch)
    for _ in range(rounds - len(mine)):  # a rank a batch short runs one more forward and discards it
        with distributed.adapters_whole(run.engine, run.model, fused=run.fused, training=False):
            run.engine(**_to_device(run, spare), num_items_in_batch=one)
    loss_total, tokens = distributed.all_reduce_sum(totals).tolist()
    loss = loss_total / max(tokens, 1.0)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": tokens}
    run.tracker.log_eval(run.step, metrics)
    run.engine.train()
    return {"step": run.step, **metrics}


# ============================================================================================ save


def save_checkpoint(run: Run) -> Path:
    """A resumable checkpoint of the current step (every rank calls this; the checkpointer gates writes)."""
    path = checkpoint.save_checkpoint(
        run.cfg.folder.checkpoints, step=run.step, model=run.model, data_state=run.train_loader.state_dict(),
        extra={
            "tokens_seen": run.tokens_seen, "skipped_steps": run.skipped_steps,
            "evals": run.evals, "wandb_run_id": run.tracker.wandb_run_id,  # a resume continues this W&B run
        },
        **checkpoint_state(run.engine),
    )
    run.last_checkpoint = Path(path)
    return Path(path)


def save(run: Run) -> Path:
    """The final checkpoint, then the adapter in the PEFT layout at `<output_dir>/adapter`."""
    save_checkpoint(run)
    adapter_dir = run.cfg.folder.adapter
    base_name = run.cfg.model.path if run.cfg.model.path != BUILTIN_MODEL else run.model_path
    with distributed.gathered(run.model):
        if run.rank == 0:
            adapters.save_adapter(run.model, adapter_dir, base_model_name_or_path=base_name)
    distributed.barrier()
    run.tracker.log_adapter(adapter_dir)
    return adapter_dir


def finish(run: Run, wall_time: float, *, adapter: Path) -> dict[str, Any]:
    """Print and record the summary: losses, throughput, and where every output went."""
    summary = _summary(run, wall_time)
    summary["adapter"] = str(adapter)
    summary["checkpoint"] = str(run.last_checkpoint)
    summary["metrics"] = str(run.tracker.metrics_path)
    wandb_dir = run.tracker.wandb_run_dir()
    summary["wandb_run"] = str(wandb_dir) if wandb_dir else "off"
    if wandb_dir and run.tracker.wandb_mode == "offline":
        summary["wandb_upload"] = f"wandb sync {wandb_dir}"
    run.tracker.finish(summary)
    distributed.barrier()
    return summary


def _summary(run: Run, wall_time: float | None) -> dict[str, Any]:
    """Steps, losses and this launch's throughput: whole-launch tokens/s (start-up included) and steady state.

    A resumed launch counts only its own steps and wall time. Steady state is the median tokens/s of
    this launch's steps after its first `WARMUP_STEPS` (of all its steps when it ran no more than that).
    """
    summary: dict[str, Any] = {"steps": run.step, "skipped_steps": run.skipped_steps, "tokens_seen": run.tokens_seen}
    if run.eval_dataset is not None and run.evals:  # a run without an eval split has no eval line to report
        first, last = run.evals[0], run.evals[-1]
        summary.update(eval_loss_start=first["loss"], eval_loss_end=last["loss"],
                       eval_perplexity_end=last["perplexity"])
    if wall_time is not None:
        summary["wall_time_s"] = round(wall_time, 1)
        summary["tokens_per_s"] = round(run.launch_tokens / max(wall_time, 1e-9), 1)
    rates = run.step_rates[WARMUP_STEPS:] or run.step_rates
    if rates:
        summary["tokens_per_s_steady"] = round(statistics.median(rates), 1)
    if run.device.type == "cuda":
        summary["peak_mem_gib"] = round(graphs.peak_bytes(run.device) / 2**30, 2)
    return summary


def _diagnostics_record(run: Run) -> dict[str, Any]:
    record: dict[str, Any] = {"rank": run.rank, "world_size": run.world_size, "fused_kernels": run.fused,
                              "zero_stage": run.cfg.distributed.zero_stage if run.use_deepspeed else None,
                              **run.diagnostics}
    if run.device.type == "cuda":
        record["peak_allocated_gib"] = graphs.peak_bytes(run.device) / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(run.device) / 2**30
    return record
