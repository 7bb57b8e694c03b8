"""The run configuration: typed dataclasses per section, loaded from YAML, dotted overrides, whole validation.

A YAML file mirrors the dataclasses one to one:

    model:        {path, bits, quant_type, double_quant, compute_dtype, gradient_checkpointing, activation_offload,
                   offload_attention, attn_implementation, cuda_graphs, fused_kernels, fp8_base}
    lora:         LoRAConfig (lora_dist.model)
    data:         DataConfig (lora_dist.data)
    train:        TrainConfig
    distributed:  DistributedConfig
    wandb:        WandbConfig

`load_config(path, overrides)` reads it with `yaml.safe_load`, applies `section.key=value` overrides
(values are YAML: `lora.target_modules=[q_proj,v_proj]`, `model.bits=null`), checks every key and type,
builds the sections and raises one `ConfigError` listing every problem at once. A closed choice is a
`Literal` type from `lora_dist.choices`, checked here once, when its section is built.

The coercion below is ours, not pydantic's (installed as a DeepSpeed dependency): pydantic's lax mode
turns "1" into 1 and 1.0 into 1, its strict mode refuses YAML's "2e-4" (a string to PyYAML), and its
multi-line errors would still need this module's one-line, every-problem, did-you-mean rendering.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_dist.choices import Bits, Dtype, Engine, Fp8Base, FusedKernels, NanPolicy, QuantType, Schedule, WandbMode, ZeroStage
from lora_dist.data import DataConfig
from lora_dist.errors import ConfigError, read_text
from lora_dist.layout import SHIPPED_DATASET, RunFolder
from lora_dist.loader import RANDOM_TOKENS
from lora_dist.model import LoRAConfig

# Names of things shipped inside the package, usable where a path is expected.
BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATASET = "builtin:tiny-instructions"
# `model.path: random:<shape>`: a Llama of that shape with random weights, built on the run's device.
RANDOM_MODEL_PREFIX = "random:"


@dataclass
class ModelConfig:
    """The base model and how it is quantized."""

    path: str = ""
    """Local folder or hub id of a causal LM; `builtin:tiny-llama` builds the embedded tiny Llama into
    `<train.output_dir>/tiny-llama` and loads it back from there."""
    bits: Bits | None = 4
    """4 (QLoRA NF4/FP4), 8 (LLM.int8) or none (null) for a dense base."""
    quant_type: QuantType = "nf4"
    """"nf4" or "fp4" (4-bit only)."""
    double_quant: bool = True
    """Quantize the 4-bit absmax statistics too (QLoRA's double quantization)."""
    compute_dtype: Dtype = "bf16"
    """Dtype the quantized matmuls and the dense parts of the model run in: fp32, bf16 or fp16."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: far less memory for about a third more compute."""
    activation_offload: bool = False
    """With gradient_checkpointing: each decoder layer's saved input waits in pinned host memory, copied
    back one layer ahead in backward (`lora_dist.offload`): about 2 layer inputs on the GPU instead of all."""
    offload_attention: bool = True
    """With activation_offload on the fused path: the attention blocks are not checkpointed; every tensor
    they save for backward waits in pinned host memory instead, and backward recomputes none of them (no
    q/k/v GEMM, no attention forward). Llama-3-8B on an H200: 13,334 vs 12,723 tokens/s, 7.24 vs 7.08 GiB
    peak; false: only the block inputs are offloaded, both blocks recomputed."""
    attn_implementation: str | None = None
    """"sdpa", "eager", "flash_attention_2", ... (null: transformers' default)."""
    cuda_graphs: bool = False
    """With the fused kernels on CUDA, each decoder layer's forward and backward replay as CUDA graphs
    (`lora_dist.graphs`: the host queues 2 launches per layer, not hundreds of ops), with per-layer
    checkpointing or none, in one process; not with activation offload or under DeepSpeed (they run
    without). Pays where the host bounds the step (small models, slow hosts); costs memory (Llama-3-8B on
    an H200: the same 11,959 vs 11,992 tokens/s as without, at 11.17 vs 9.03 GiB). Batches of one shape
    replay; a shape that keeps changing (unpacked data of varying length) is captured again, and after 4
    shapes the graphs are turned off with a warning."""
    fused_kernels: FusedKernels = "auto"
    """Route the forward through `families.patch_model_for_speed` (grouped LoRA GEMMs, chunked loss, fused
    norms/RoPE/activations), for the families it lists: "on" (others refused), "off", or "auto" (on for a
    4-bit base on CUDA where the family is listed; other families run their own forward)."""
    fp8_base: Fp8Base = "off"
    """The fused path's frozen base GEMMs in FP8 e4m3 (`kernels.set_fp8_base_gemms`: x and g scaled per
    token, the weight per feature, fp32 accumulation), on GPUs with FP8 tensor cores (Ada, Hopper) in bf16
    compute (the CPU runs it as a reference). "backward": the checkpointed recompute and x's gradient
    through the base weights in FP8, the forward that computes the loss in bf16 (the loss is the bf16
    model's; the adapters' gradients are taken through FP8-rounded products); "all": the forward too.
    Opt-in: it changes the gradients (see the README's FP8 table for what it costs the loss: "backward"
    moved 200-step real-data runs by about 0.025 nats either way; "all" slowed a memorization bench's
    fall by a fifth, its rounding larger than LoRA's small updates, so it is not a recommendation)."""

    def problems(self) -> list[str]:
        out = []
        if self.fp8_base != "off" and self.compute_dtype != "bf16":
            out.append(f"model.fp8_base={self.fp8_base} runs in bf16 compute: set model.compute_dtype=bf16, or "
                       "model.fp8_base=off")
        if self.fp8_base != "off" and self.fused_kernels == "off":
            out.append(f"model.fp8_base={self.fp8_base} runs in the fused kernels: set model.fused_kernels=on, or "
                       "model.fp8_base=off")
        if self.activation_offload and not self.gradient_checkpointing:
            out.append("model.activation_offload offloads checkpointed layer inputs: set "
                       "model.gradient_checkpointing=true, or model.activation_offload=false")
        if not self.path:
            out.append(f"model.path is empty; give a local folder, a hub id or {BUILTIN_MODEL}")
        elif self.path.startswith(RANDOM_MODEL_PREFIX) and self.random_shape() not in random_shapes():
            out.append(
                f"model.path {self.path!r}: unknown random shape; use one of "
                f"{', '.join(RANDOM_MODEL_PREFIX + s for s in sorted(random_shapes()))}"
            )
        return out

    def random_shape(self) -> str | None:
        """The shape name of a `random:<shape>` path, else None."""
        return self.path[len(RANDOM_MODEL_PREFIX):] if self.path.startswith(RANDOM_MODEL_PREFIX) else None


def random_shapes() -> dict[str, Any]:
    """The shapes `random:NAME` accepts (`lora_dist.shapes.SHAPES`)."""
    from lora_dist.shapes import SHAPES

    return SHAPES


@dataclass
class TrainConfig:
    """The optimization: steps, batch, learning rate schedule, evaluation, checkpoints."""

    seed: int = 0
    """Seeds LoRA init, dropout and the data order."""
    max_steps: int | None = None
    """Optimizer steps to run; null: `epochs` passes over the training set."""
    epochs: float = 1.0
    """Passes over the training set when `max_steps` is null."""
    micro_batch_size: int | Literal["auto"] = 1
    """Sequences per forward pass on each process; "auto" (CUDA, with global_batch_size): the largest
    that `lora-dist plan` predicts to fit the card, accumulation keeping the global batch."""
    grad_accum: int | None = None
    """Micro batches accumulated per optimizer step on each process; null: derived from global_batch_size."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all processes (= micro_batch_size * grad_accum * world size)."""
    lr: float = 2e-4
    """Peak learning rate (reached after warmup)."""
    schedule: Schedule = "cosine"
    """Decay after warmup to 0 at the last step: cosine, linear or constant."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on lora_A / lora_B."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    eval_interval: int = 0
    """Evaluate every this many optimizer steps (0: only at the start and the end)."""
    eval_batches: int | None = None
    """Micro batches per evaluation on each process (null: the whole eval split)."""
    save_interval: int = 0
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    log_interval: int = 1
    """Console progress every this many steps (W&B gets every step)."""
    output_dir: str = "runs/lora"
    """Where the adapter, checkpoints, metrics.jsonl and the W&B run go."""
    resume: str | None = None
    """"auto" (the latest checkpoint under output_dir, if any), a checkpoint folder, or null."""
    overwrite_output_dir: bool = False
    """Let a fresh run (resume null) start in an output_dir that holds checkpoints: they are deleted first.
    Without it such a run is refused, so a forgotten `train.resume` cannot mix two runs' checkpoints."""
    nan_policy: NanPolicy = "skip"
    """On a non-finite loss or gradient norm: "skip" the optimizer step and count it, or "stop" (last good
    checkpoint kept)."""
    max_skipped_steps: int = 10
    """With nan_policy "skip": stop after this many skipped steps."""
    diagnostics: bool = False
    """Each rank writes `<output_dir>/diagnostics/rank-N.json`: its shard bytes (`distributed.shard_report`)
    at the second optimizer step, its peak accelerator memory, and the profile of `profile_steps`."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: optimizer steps (1-based, inclusive) run under torch.profiler on every rank, to time
    collective kernels (NCCL / gloo) against the step (needs diagnostics); []: no profiling."""

    def problems(self) -> list[str]:
        out = []
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"train.max_steps must be >= 1 (or null to use epochs), got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            out.append(f"train.epochs must be > 0 when train.max_steps is null, got {self.epochs}")
        if self.micro_batch_size == "auto":
            if self.global_batch_size is None:
                out.append("train.micro_batch_size=auto keeps the global batch: set train.global_batch_size too")
        elif self.micro_batch_size < 1:
            out.append(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.grad_accum is not None and self.grad_accum < 1:
            out.append(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.global_batch_size is not None:
            if self.grad_accum is not None:
                out.append("set one of train.grad_accum and train.global_batch_size, not both")
            elif self.global_batch_size < 1 or (
                self.micro_batch_size != "auto" and self.global_batch_size % max(self.micro_batch_size, 1)
            ):
                out.append(
                    f"train.global_batch_size ({self.global_batch_size}) must be a positive multiple of "
                    f"train.micro_batch_size ({self.micro_batch_size})"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            out.append(f"train.lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            out.append(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        elif self.max_steps is not None and self.warmup_steps >= self.max_steps > 1:
            out.append(f"train.warmup_steps ({self.warmup_steps}) must be below train.max_steps ({self.max_steps})")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            out.append(f"train.eps must be > 0, got {self.eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            out.append(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        for name in ("eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                out.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_interval < 1:
            out.append(f"train.log_interval must be >= 1, got {self.log_interval}")
        if self.eval_batches is not None and self.eval_batches < 1:
            out.append(f"train.eval_batches must be >= 1 or null, got {self.eval_batches}")
        if not self.output_dir:
            out.append("train.output_dir is empty; give a folder for the adapter and checkpoints")
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            out.append(f"train.resume: no checkpoint folder at {self.resume!r}; give a folder, auto or null")
        if self.overwrite_output_dir and self.resume is not None:
            out.append("train.overwrite_output_dir=true deletes the checkpoints train.resume would continue; "
                       "set one of them")
        if self.max_skipped_steps < 0:
            out.append(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.profile_steps:
            first_last = self.profile_steps
            if len(first_last) != 2 or not 1 <= first_last[0] <= first_last[1]:
                out.append(f"train.profile_steps must be [first, last] with 1 <= first <= last, got {first_last}")
            elif self.max_steps is not None and first_last[1] > self.max_steps:
                out.append(f"train.profile_steps {first_last} ends after train.max_steps ({self.max_steps})")
            if not self.diagnostics:
                out.append("train.profile_steps needs train.diagnostics=true (the profile is written there)")
        return out

    def accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step on each process, for `world_size` processes.

        Raises:
            ConfigError: global_batch_size is not a multiple of micro_batch_size * world_size.
        """
        if self.global_batch_size is None:
            return self.grad_accum or 1
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError([
                f"train.global_batch_size ({self.global_batch_size}) is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x {world_size} processes; pick a multiple of {per_step}"
            ])
        return self.global_batch_size // per_step


@dataclass
class DistributedConfig:
    """DeepSpeed ZeRO settings; ignored when a run is a single process without DeepSpeed."""

    engine: Engine = "auto"
    """"auto": DeepSpeed when a launcher (deepspeed, torchrun) started this process; "deepspeed": always;
    "none": never (a launched run then fails)."""
    zero_stage: ZeroStage = 2
    """ZeRO stage 0-3 over the adapter parameters, gradients and optimizer state."""
    offload_optimizer: bool = False
    """Keep the optimizer state on the CPU (ZeRO 1-3)."""
    precision: Dtype = "fp32"
    """Adapter / optimizer precision under DeepSpeed: fp32, bf16 or fp16."""
    ds_config: str | None = None
    """A DeepSpeed JSON merged over ours; a key that contradicts this config is an error."""
    backend: str | None = None
    """torch.distributed backend (null: nccl on GPUs, gloo on the CPU)."""
    timeout_s: float = 1800
    """Collective timeout in seconds."""

    def problems(self) -> list[str]:
        out = []
        if self.offload_optimizer and self.zero_stage == 0:
            out.append("distributed.offload_optimizer needs zero_stage 1, 2 or 3; set zero_stage or turn offload off")
        if self.ds_config is not None and not Path(self.ds_config).is_file():
            out.append(f"distributed.ds_config: no file at {self.ds_config!r}")
        if not self.timeout_s > 0:
            out.append(f"distributed.timeout_s must be > 0, got {self.timeout_s}")
        return out


@dataclass
class WandbConfig:
    """Weights & Biases reporting (rank 0 only)."""

    mode: WandbMode | None = None
    """online, offline or disabled; null: online when WANDB_API_KEY is set, else offline."""
    project: str = "lora-dist"
    """W&B project."""
    entity: str | None = None
    """W&B team or user (null: the key's default)."""
    name: str | None = None
    """Run name (null: W&B picks one)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    log_adapter: bool = True
    """Upload the final adapter as a W&B artifact."""

    def problems(self) -> list[str]:
        out = []
        if not self.project:
            out.append("wandb.project is empty")
        return out

    def resolved_mode(self) -> str:
        """The mode W&B runs in: the configured one, else online with a key and offline without."""
        if self.mode is not None:
            return self.mode
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoRAConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "distributed": DistributedConfig,
    "wandb": WandbConfig,
}


@dataclass
class Config:
    """A whole run: one field per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved configuration as plain YAML-able data (what W&B records)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def folder(self) -> RunFolder:
        """The run's paths (adapter, checkpoints, metrics, ...) under `train.output_dir`."""
        return RunFolder(self.output_dir)


# ---------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None), apply overrides, validate.

    Args:
        path: a YAML file whose top-level keys are the sections above.
        overrides: `section.key=value` strings; the value is parsed as YAML.

    Raises:
        ConfigError: every problem found (unreadable file, unknown key, wrong type, bad value).
    """
    source = str(path) if path is not None else None
    raw: Any = {}
    if path is not None:
        text = read_text(path, "config file", ConfigError)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"not valid YAML{where}: {getattr(err, 'problem', err)}"], source) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    problems: list[str] = []
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        problems.extend(_apply_override(raw, item))
    config = config_from_dict(raw, problems, source)
    return config


def config_from_dict(raw: dict[str, Any], problems: list[str] | None = None, source: str | None = None) -> Config:
    """Build and validate a Config from nested plain data; raises ConfigError with every problem."""
    problems = list(problems or [])
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"unknown section {key!r}{_did_you_mean(key, SECTIONS)}")
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"section {name!r} must be a mapping of keys, got {type(values).__name__}")
            values = {}
        if name == "data" and values.get("path") == BUILTIN_DATASET:
            values = {**values, "path": str(SHIPPED_DATASET)}  # resolved here: every later check sees a real file
        section, section_problems = _build_section(name, cls, values)
        problems.extend(section_problems)
        sections[name] = section
    if not problems:
        problems.extend(_cross_section_problems(sections))
    if problems:
        raise ConfigError(problems, source)
    return Config(**sections)


def _cross_section_problems(s: dict[str, Any]) -> list[str]:
    out = []
    model, dist = s["model"], s["distributed"]
    if model.bits is not None and dist.precision == "fp16" and model.compute_dtype == "bf16":
        out.append("distributed.precision fp16 with model.compute_dtype bf16 mixes two half types; use bf16 for both")
    random_data = s["data"].path == RANDOM_TOKENS
    if model.random_shape() is not None and not random_data:
        out.append(f"model.path {model.path} has no tokenizer; train it on data.path={RANDOM_TOKENS}")
    if random_data and s["train"].max_steps is None:
        out.append(f"data.path {RANDOM_TOKENS} has no epochs; set train.max_steps")
    if model.cuda_graphs and s["train"].micro_batch_size == "auto":
        out.append("train.micro_batch_size=auto plans without CUDA graphs, which take ~2 GiB more on an 8B model: "
                   "give a micro batch size, or set model.cuda_graphs=false")
    return out


def _build_section(name: str, cls: type, values: dict[str, Any]) -> tuple[Any, list[str]]:
    """(instance or None, problems) for one section: unknown keys, types, then the section's own checks."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"unknown key {name}.{key}{_did_you_mean(key, fields)}")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            shown = f"{_show(value)} ({type(value).__name__})" if coerced is value else repr(coerced)
            problems.append(f"{name}.{key} must be {_type_name(hints[key])}, got {shown}")
            continue
        kwargs[key] = coerced
    try:  # with the well-typed keys only, so the value checks below still run
        section = cls(**kwargs)
    except (ValueError, TypeError) as err:  # LoRAConfig checks itself in __post_init__
        return None, problems + [f"{name}: {err}"]
    check = getattr(section, "problems", None)
    if check is not None:
        own = check()
        # DataConfig's lines may not carry the section name; add it so the user finds the key.
        problems.extend(p if p.startswith(f"{name}.") or p.startswith(f"{name}:") else f"{name}: {p}" for p in own)
    return section, problems


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) with YAML's near misses fixed: `2e-4` (a string to PyYAML) is a float, ints widen."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return type(None) in args, None
        # Try the exact-type members first so "auto" stays a str in `str | None`.
        for arg in sorted(args, key=lambda a: a is not str):
            if arg is type(None):
                continue
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        if type(None) in args and isinstance(value, str) and value.lower() == "none":
            return True, None  # `model.bits=none` as users write it
        return False, value
    if tp is Any:
        return True, value
    if origin is Literal:  # exact members only: True is not 1, "4" is not 4
        members = typing.get_args(tp)
        if isinstance(value, bool) and any(isinstance(c, str) for c in members):
            word = "on" if value else "off"  # YAML 1.1 reads a file's bare on/off (yes/no) as booleans
            return word in members, word
        return any(type(value) is type(c) and value == c for c in members), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp) for v in value]
        if not all(ok for ok, _ in items):
            return False, value
        return True, [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        pairs = [(_coerce(k, key_tp), _coerce(v, val_tp)) for k, v in value.items()]
        if not all(k[0] and v[0] for k, v in pairs):
            return False, value
        return True, {k[1]: v[1] for k, v in pairs}
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp)]
        return " or ".join(names)
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"a {origin.__name__}[{args}]" if origin in (list, dict) else str(tp)
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Names users bring from other trainers (HF Trainer, PEFT, axolotl), mapped to ours.
_SYNONYMS = {
    "learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "max_grad_norm": "grad_clip", "warmup": "warmup_steps", "seq_len": "max_seq_len",
    "max_length": "max_seq_len", "sequence_len": "max_seq_len", "lr_scheduler_type": "schedule",
    "load_in_4bit": "bits", "bnb_4bit_quant_type": "quant_type", "stage": "zero_stage",
}


def _did_you_mean(key: str, choices: Any) -> str:
    if _SYNONYMS.get(key) in choices:
        return f" (did you mean {_SYNONYMS[key]!r}?)"
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid: {', '.join(sorted(choices))}"


def _apply_override(raw: dict[str, Any], item: str) -> list[str]:
    """Set `section.key=value` in the raw mapping; returns problems (empty when applied)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key or not key.split(".")[0] or not key.split(".")[-1]:
        return [f"override {item!r} must read section.key=value, e.g. train.lr=2e-4"]
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return [f"override {item!r}: value is not valid YAML (quote it, or write lists as [a,b])"]
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        value = text.strip()  # YAML 1.1 reads off/no/yes/on as booleans; a user typing them means the word
    section, *path, leaf = key.split(".")
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        return [f"override {item!r}: section {section!r} is not a mapping"]
    for part in path:  # a nested dict field such as lora.rank_pattern.q_proj=4
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return [f"override {item!r}: {part!r} is not a mapping"]
    node[leaf] = value
    return []


def dump_config(config: Config) -> str:
    """The resolved configuration as YAML (written next to every run)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
