"""DeepSpeed and the collectives in one place: processes, ds_config, the engine, gathers, checkpoints.

This is the only module that imports deepspeed, and it does so lazily: a single-process run never
pays for the import. It also holds every collective the training job runs (`barrier`,
`all_reduce_sum`, `any_rank`, `cluster_info`) and the ZeRO-3 gather policy (`adapters_whole`), so the
loop in `train.py` reads the same with and without DeepSpeed.

DeepSpeed is handed a module that owns only the adapter parameters (`_AdapterModule`), while the
frozen, possibly quantized, base is reached through a plain reference it cannot see. So under every
ZeRO stage DeepSpeed partitions, casts, moves and checkpoints the adapters alone; the base stays whole
and untouched on every rank (`shard_report` shows it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_dist.choices import DTYPES as PRECISIONS
from lora_dist.choices import SCHEDULES, ZERO_STAGES
from lora_dist.errors import ConfigError, read_text
from lora_dist.model import LoRAModel
from lora_dist.optim import make_lr_scheduler, param_groups
from lora_dist.optim_state import set_torch_optimizer_state, to_torch_layout, torch_optimizer_state

if TYPE_CHECKING:
    from lora_dist.config import Config

__all__ = [  # make_lr_scheduler lives in optim (both paths use it); it is re-exported here for DeepSpeed users
    "adapters_whole", "all_reduce_min", "all_reduce_sum", "any_rank", "barrier", "cluster_info", "deepspeed_config", "gathered",
    "gathered_adapter_state_dict", "init_distributed", "init_processes", "make_ds_config",
    "make_lr_scheduler", "setup_engine", "shard_report", "warmup_steps", "full_optimizer_state",
    "set_full_optimizer_state",
]

# Our own keys inside a ds_config: the LR schedule, which we build ourselves (DeepSpeed's
# WarmupCosineLR runs its first step at lr 0 and forces >= 2 warmup steps, so a single-process run
# could not match it). `setup_engine` removes this section before DeepSpeed reads the config.
OWN_SECTION = "lora_dist"

# Keys we set only as defaults: a user's DeepSpeed JSON may change them without a conflict.
_SOFT_DEFAULTS: dict[str, Any] = {
    # torch's AdamW instead of DeepSpeed's fused/CPU Adam: no JIT build (~40 s), same math as the
    # single-process path.
    "optimizer": {"params": {"torch_adam": True}},
    "zero_optimization": {
        # Adapters are small (r*(in+out) each, often < DeepSpeed's 1e5 default): without 0 they
        # would all be kept whole ("persistent") and ZeRO-3 would partition nothing.
        "stage3_param_persistence_threshold": 0,
    },
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,  # our logger reports the loss; keep DeepSpeed quiet
    "wall_clock_breakdown": False,
}


def _problems_of(
    zero_stage: Any,
    micro_batch_size: Any,
    grad_accum: Any,
    world_size: Any,
    grad_clip: Any,
    precision: Any,
    lr: Any,
    weight_decay: Any,
    warmup_steps: Any,
    total_steps: Any,
    schedule: Any,
    offload_optimizer: bool,
) -> list[str]:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    problems = []
    if zero_stage not in ZERO_STAGES or not is_int(zero_stage):
        problems.append(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not is_int(value) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        problems.append(f"grad_clip must be a positive number or None (no clipping), got {grad_clip!r}")
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"lr must be positive, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        problems.append(f"weight_decay must be >= 0, got {weight_decay!r}")
    if schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not is_int(warmup_steps) or warmup_steps < 0:
        problems.append(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if total_steps is not None and (not is_int(total_steps) or total_steps < 1):
        problems.append(f"total_steps must be a positive integer or None, got {total_steps!r}")
    if schedule in ("cosine", "linear") and total_steps is None:
        problems.append(f"schedule {schedule!r} decays to total_steps: set total_steps, or use schedule 'constant'")
    elif is_int(total_steps) and is_int(warmup_steps) and warmup_steps > total_steps:
        problems.append(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    if offload_optimizer and zero_stage == 0:
        problems.append("offload_optimizer needs ZeRO stage 1, 2 or 3; raise zero_stage or turn offload off")
    return problems


def make_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float | None,
    precision: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    schedule: str = "cosine",
    offload_optimizer: bool = False,
    user_config: dict | None = None,
) -> dict:
    """The DeepSpeed config implied by our settings, merged with a user's DeepSpeed JSON.

    Every value derived from our settings (batch sizes, accumulation, clipping, precision, ZeRO
    stage, offload, AdamW hyper-parameters) is fixed: a user key that contradicts one is an error,
    never silently taken. Other user keys are merged in (user values win over our soft defaults,
    e.g. `stage3_param_persistence_threshold`). The LR schedule lives under the "lora_dist" key and
    is built by `setup_engine` / `make_lr_scheduler`, identically with and without DeepSpeed.

    Args:
        zero_stage: 0 (plain data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)
            partitioned; only the adapters are ever partitioned.
        micro_batch_size: samples per rank per forward.
        grad_accum: micro batches per optimizer step.
        world_size: data-parallel ranks; train_batch_size = micro * accum * world.
        grad_clip: max global gradient norm, None for no clipping.
        precision: "fp32", "bf16" or "fp16" (adapters train in it; fp32 master weights).
        lr, weight_decay, betas, eps: AdamW hyper-parameters (decay on lora_A / lora_B only).
        warmup_steps, total_steps, schedule: linear warmup, then "cosine" / "linear" decay to 0 at
            total_steps, or "constant".
        offload_optimizer: keep optimizer state (and its step) on the CPU (stages 1-3).
        user_config: a DeepSpeed JSON as a dict, or None.

    Returns:
        A ds_config dict for `setup_engine`.

    Raises:
        ValueError: all bad settings at once, or every conflicting user key with both values.
    """
    problems = _problems_of(
        zero_stage, micro_batch_size, grad_accum, world_size, grad_clip, precision,
        lr, weight_decay, warmup_steps, total_steps, schedule, offload_optimizer,
    )  # fmt: skip
    if problems:
        raise ValueError("bad distributed settings: " + "; ".join(problems))

    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    ours: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip) if grad_clip is not None else 0.0,  # 0 = off in DeepSpeed
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        },
        OWN_SECTION: {"schedule": schedule, "warmup_steps": warmup_steps, "total_steps": total_steps},
    }
    if offload_optimizer:
        ours["zero_force_ds_cpu_optimizer"] = False  # let torch's AdamW step the offloaded state
    user = copy.deepcopy(user_config or {})
    if not isinstance(user, dict):
        raise ValueError(f"user_config must be a dict (a parsed DeepSpeed JSON), got {type(user).__name__}")
    conflicts = _conflicts(ours, user)
    if "scheduler" in user:
        conflicts.append(
            f"scheduler: ours is {ours[OWN_SECTION]} (set schedule/warmup_steps/total_steps), "
            f"yours is {user['scheduler']!r}"
        )
    if OWN_SECTION in user:
        conflicts.append(f"{OWN_SECTION}: reserved for lora_dist's own settings, remove it from the JSON")
    if conflicts:
        raise ValueError(
            "the DeepSpeed JSON contradicts the lora_dist config (change the lora_dist setting or drop the key "
            "from the JSON): " + "; ".join(conflicts)
        )
    config = _merge(copy.deepcopy(_SOFT_DEFAULTS), user)
    return _merge(config, ours)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _conflicts(ours: dict, user: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in ours.items():
        if key not in user or key == OWN_SECTION:
            continue
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(user[key], dict):
            found.extend(_conflicts(value, user[key], dotted + "."))
        elif isinstance(value, dict) or isinstance(user[key], dict) or not _same(value, user[key]):
            found.append(f"{dotted}: ours is {value!r}, yours is {user[key]!r}")
    return found


def _merge(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def deepspeed_config(cfg: Config, world_size: int, total_steps: int) -> dict[str, Any]:
    """The ds_config a run of `cfg` on `world_size` processes hands to `setup_engine` (`make_ds_config`).

    Raises:
        ConfigError: the global batch does not divide over `world_size` processes, or the DeepSpeed
            JSON of `distributed.ds_config` is unreadable or contradicts the config.
    """
    t, d = cfg.train, cfg.distributed
    user = None
    if d.ds_config:
        try:
            user = json.loads(read_text(d.ds_config, "distributed.ds_config", ConfigError))
        except ValueError as err:
            raise ConfigError(f"distributed.ds_config {d.ds_config} is not valid JSON ({err})") from None
    try:
        return make_ds_config(
            zero_stage=d.zero_stage, micro_batch_size=t.micro_batch_size, grad_accum=t.accumulation(world_size),
            world_size=world_size, grad_clip=t.grad_clip, precision=d.precision, lr=t.lr,
            weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps,
            warmup_steps=warmup_steps(cfg, total_steps), total_steps=total_steps, schedule=t.schedule,
            offload_optimizer=d.offload_optimizer, user_config=user,
        )
    except ConfigError:
        raise
    except ValueError as err:  # a DeepSpeed JSON key that contradicts ours: the user's to fix
        raise ConfigError(str(err)) from None


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """`train.warmup_steps`, kept below `total_steps` so a short run still reaches its peak LR."""
    return min(cfg.train.warmup_steps, max(total_steps - 1, 0))


def init_distributed(backend: str | None = None, timeout_s: float = 1800) -> tuple[int, int]:
    """Join the process group a launcher (deepspeed, torchrun, SLURM via launch/) set up.

    Args:
        backend: "nccl", "gloo", ...; None lets DeepSpeed pick for the accelerator.
        timeout_s: collective timeout.

    Returns:
        (rank, world_size); (0, 1) without importing deepspeed when no launcher set WORLD_SIZE.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return 0, 1
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    rank = torch.distributed.get_rank()
    _unlink_shm_buffer(rank)
    return rank, torch.distributed.get_world_size()


SHM_DIR = Path("/dev/shm")


def shm_buffer_name(rank: int | str, addr: str | None = None, port: int | str | None = None) -> str:
    """The /dev/shm name of DeepSpeed's CPU comm buffer for `rank` of a group (deepspeed
    ops/csrc/cpu/comm/shm.cpp: prefix, uid, MASTER_ADDR, MASTER_PORT, rank); address and port default
    to this process's MASTER_ADDR and MASTER_PORT."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's DeepSpeed CPU comm buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's CPU accelerator creates one 66 MiB shared-memory file per rank at init and never
    unlinks it: every CPU run would leave world-size x 66 MiB of RAM in /dev/shm until reboot. After
    the barrier every rank has returned from DeepSpeed's init, which maps all ranks' files; the
    mappings stay valid after the names go.
    """
    from deepspeed import comm as ds_comm

    if getattr(getattr(ds_comm.comm, "cdb", None), "shm_comm_op", None) is None:
        return  # not the CPU accelerator's comm op (on GPUs: NCCL, no files)
    torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / shm_buffer_name(rank)).unlink()


def _flat_name(name: str) -> str:
    return name.replace(".", "__")  # module names may not contain dots


class _AdapterModule(nn.Module):
    """What DeepSpeed wraps: it owns the adapters (lora_A, lora_B, trained biases) and nothing else.

    Its forward runs the whole LoRAModel, held in a list so that nn.Module does not register it:
    DeepSpeed never sees a base parameter, so it cannot partition (ZeRO-3), gather, cast (bf16/fp16)
    or checkpoint one. ZeRO-3's fetch hooks sit on the lora_A / lora_B modules and fire when the
    LoRA layers call them.
    """

    def __init__(self, model: LoRAModel):
        super().__init__()
        self._model = [model]  # a list: not a registered submodule
        self.adapters = nn.ModuleDict()
        for name, layer in model.lora_layers.items():
            self.adapters[_flat_name(name)] = nn.ModuleDict({"lora_A": layer.lora_A, "lora_B": layer.lora_B})
        self.biases = nn.ParameterDict()
        names = {id(p): n for n, p in model.base_model.named_parameters()}
        for p in model.trainable_biases():
            self.biases[_flat_name(names[id(p)])] = p

    @property
    def model(self) -> LoRAModel:
        return self._model[0]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> "_AdapterModule":
        # engine.train()/eval() must reach the base's own dropout and norms too.
        super().train(mode)
        self.model.train(mode)
        return self


def setup_engine(model: LoRAModel, ds_config: dict) -> Any:
    """A DeepSpeed engine that trains only `model`'s adapter parameters.

    DeepSpeed gets the adapters alone (see `_AdapterModule`), as AdamW param groups with weight
    decay on lora_A / lora_B and none on biases; the frozen base is never partitioned, gathered or
    cast, under ZeRO-3 and bf16 included. Call `init_distributed` first; build (and quantize) the
    model before, on this rank's device. `engine(batch)` runs the LoRAModel's forward; per micro
    batch call `engine.backward(loss)` then `engine.step()`: DeepSpeed counts micro batches and
    steps the optimizer (and `engine.lr_scheduler`, see `make_lr_scheduler`) only on every
    grad_accum-th call. `engine.train()` / `engine.eval()` reach the whole model.

    Args:
        model: a LoRAModel, on this rank's device.
        ds_config: from `make_ds_config`.

    Returns:
        The DeepSpeed engine (`engine.module.model` is `model`).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not isinstance(model, LoRAModel):
        raise TypeError(f"setup_engine needs a LoRAModel, got {type(model).__name__}; wrap it with LoRAModel first")
    config = copy.deepcopy(ds_config)
    own = config.pop(OWN_SECTION, None)
    if own is None:
        raise ValueError("ds_config has no 'lora_dist' section: build it with distributed.make_ds_config")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    per_rank = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    made_for = config["train_batch_size"] // per_rank
    if made_for != world:
        raise ValueError(
            f"ds_config was made for world_size={made_for} but {world} ranks are running; "
            f"call make_ds_config with world_size={world} (after init_distributed)"
        )
    device = torch.device(get_accelerator().current_device_name())
    wrong = {str(p.device) for p in model.parameters() if p.device.type != device.type}
    if wrong:
        raise ValueError(f"the model is on {sorted(wrong)} but this rank trains on {device}; move it there first")

    view = _AdapterModule(model)
    engine, _, _, _ = deepspeed.initialize(
        model=view,
        model_parameters=param_groups(model, config["optimizer"]["params"]["weight_decay"]),
        config=config,
        lr_scheduler=lambda optimizer: make_lr_scheduler(optimizer, **own),
    )
    if engine.zero_optimization_partition_weights():
        # Trained biases are used inside base layers, where no ZeRO-3 hook fetches them: gather
        # them for the whole forward instead.
        for bias in view.biases.values():
            deepspeed.zero.register_external_parameter(view, bias)
    return engine


# ============================================================================ processes


def init_processes(cfg: Config) -> tuple[int, int, bool]:
    """(rank, world size, use DeepSpeed) from the launcher's environment and `distributed.engine`.

    Joins the process group when DeepSpeed is used; a plain `python` run with
    `distributed.engine=deepspeed` becomes a process group of one.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    engine = cfg.distributed.engine
    if engine == "none" and launched:
        raise ConfigError(
            f"launched as {os.environ['WORLD_SIZE']} processes but distributed.engine is none; "
            f"set distributed.engine=auto (or run one process)"
        )
    use_deepspeed = engine == "deepspeed" or (engine == "auto" and "WORLD_SIZE" in os.environ)
    if not use_deepspeed:
        return 0, 1, False
    if "WORLD_SIZE" not in os.environ:
        # Port 0: the store of a one-process group binds any free port (nobody else connects to it).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
    if not torch.cuda.is_available():
        check_cpu_comm_op()
    rank, world_size = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    return rank, world_size, True


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator JIT-builds at its first collective
_LOCK_GRACE_S = 60.0  # a lock this young may belong to a build that is just starting


def check_cpu_comm_op() -> None:
    """Refuse to wait forever on a dead build of DeepSpeed's CPU comm op; say when it is built.

    torch's JIT builder holds `<extensions dir>/deepspeed_shm_comm/lock` while it builds; a build
    killed midway leaves the file, and every later run waits on it silently. A lock older than a
    minute with no process working in that folder (ninja and the compiler run there) is stale.

    Raises:
        ConfigError: the lock is stale; the message names the file to delete.
    """
    from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT builder puts the op

    folder = Path(_get_build_directory(SHM_OP, verbose=False))
    lock = folder / "lock"
    built = (folder / f"{SHM_OP}.so").is_file()
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        age = None
    if age is not None and age > _LOCK_GRACE_S and not _someone_works_in(folder):
        raise ConfigError(
            f"a killed build of DeepSpeed's CPU comm op left {lock} behind and DeepSpeed would wait on it "
            f"forever; no build is running: delete that file (or set TORCH_EXTENSIONS_DIR) and run again"
        )
    if not built and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"building DeepSpeed's CPU comm op once (a few minutes) into {folder} ...", file=sys.stderr, flush=True)


def _someone_works_in(folder: Path) -> bool:
    """Whether a live process has `folder` as its working directory (Linux /proc; True where unknown)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    target = folder.resolve()
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")).resolve() == target:
                    return True
    return False


def cluster_info() -> dict[str, Any]:
    """`world_size`, `num_nodes` and `hostnames` of the running job, for the run record.

    A collective when torch.distributed is initialized (every rank must call it). `num_nodes` is the
    launcher's node count (DeepSpeed's CROSS_SIZE, SLURM_NNODES), which differs from the distinct
    host names when "nodes" share a machine.
    """
    host = socket.gethostname()
    hosts = [host]
    if _dist_on():
        hosts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(hosts, host)
    names = list(dict.fromkeys(hosts))
    nodes = os.environ.get("CROSS_SIZE") or os.environ.get("SLURM_NNODES")
    return {"world_size": len(hosts), "num_nodes": int(nodes) if nodes else len(names), "hostnames": names}


# ============================================================================ collectives


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if _dist_on():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a new tensor; `t` itself in one process)."""
    return _all_reduce(t, torch.distributed.ReduceOp.SUM)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The minimum of `t` over all ranks (a new tensor; `t` itself in one process)."""
    return _all_reduce(t, torch.distributed.ReduceOp.MIN)


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    if _dist_on() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t, op=op)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any: one decision all ranks act on together."""
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)) > 0)


def adapters_whole(engine: Any, model: LoRAModel, *, fused: bool, training: bool):
    """Context manager: the ZeRO-3 adapter shards gathered for a forward (and backward) that reads them
    outside their modules; a no-op everywhere else (no DeepSpeed, ZeRO 0-2, layers that call their modules).

    ZeRO-3's hooks fetch a partitioned parameter when its own module is called. The fused kernels
    (`kernels.lora_group`, and `LoRALayer`'s own 4-bit CUDA training path) read `lora_A.weight` and
    `lora_B.weight` directly instead. DeepSpeed 0.19.8 catches such reads inside the engine's forward
    (its parameter getter gathers the one parameter and registers it as external to the running
    module); here all adapters are gathered in one call per micro batch instead, not relying on that
    getter, and partitioned again before the optimizer step. The adapters are ~3% of a 4-bit 8B
    base's bytes (168 MB fp32 against 5.6 GB). Both ways train bit-identically on the CPU.
    """
    partitioned = getattr(engine, "zero_optimization_partition_weights", None)
    if partitioned is None or not partitioned():
        return contextlib.nullcontext()
    from lora_dist.layers import supports_fast_path

    layers = list(model.lora_layers.values())
    if not layers or not all(supports_fast_path(layer) for layer in layers):
        return contextlib.nullcontext()  # every layer calls its lora_A / lora_B modules: ZeRO's hooks fetch
    on_cuda = any(p.is_cuda for p in model.get_trainable_parameters())
    cuda_4bit = training and on_cuda and all(layer.bits == 4 for layer in layers)
    if not (fused or cuda_4bit):
        return contextlib.nullcontext()
    return gathered(engine)


def _model_of(engine_or_model: Any) -> LoRAModel:
    if isinstance(engine_or_model, LoRAModel):
        return engine_or_model
    module = getattr(engine_or_model, "module", None)
    if isinstance(module, _AdapterModule):
        return module.model
    raise TypeError(f"expected a LoRAModel or an engine from setup_engine, got {type(engine_or_model).__name__}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    # Gradients often are views into one flat buffer: count each storage once.
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _grad_tensors(engine: Any, adapters: list[nn.Parameter]) -> list[torch.Tensor]:
    tensors = [p.grad for p in adapters if p.grad is not None]
    zero = engine.optimizer
    # ZeRO-1/2 accumulate this rank's reduced share in all_grad_tensors between micro batches and
    # hand it to the step in averaged_gradients (ZeRO-3 too); both are {group: [tensor]}.
    for attr in ("averaged_gradients", "all_grad_tensors"):
        held = getattr(zero, attr, None)
        if isinstance(held, dict):
            for grads in held.values():
                tensors.extend(grads or [])
    # Where ZeRO-2 (grads_in_partition) and ZeRO-3 (grad_partitions_flat_buffer) accumulate this
    # rank's share between micro batches. Transient communication buckets are not counted.
    for attr in ("grads_in_partition", "grad_partitions_flat_buffer"):
        flat = getattr(zero, attr, None)
        if torch.is_tensor(flat):
            tensors.append(flat)
    return tensors


def _optimizer_tensors(engine: Any, adapters: list[nn.Parameter]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(master weights the optimizer holds besides the model params, its state tensors)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO/bf16 wrappers keep torch's inside
    own = {id(p) for p in adapters}
    # ZeRO-3 puts its fp32 partitions into the torch optimizer's groups only during a step.
    candidates = [p for g in inner.param_groups for p in g["params"]]
    candidates += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    masters = list({id(p): p for p in candidates if id(p) not in own}.values())
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return masters, states


def shard_report(engine: Any) -> dict:
    """Bytes this rank holds, to show what ZeRO partitions and what it leaves alone.

    Call it after `engine.backward` on an accumulation boundary and before `engine.step` to see the
    gradients (DeepSpeed frees them in the step). With world size N, stage 1 divides the optimizer
    bytes by about N, stage 2 also the gradient bytes, stage 3 also the adapter parameter bytes
    (small remainders come from DeepSpeed's alignment padding); `base_bytes` never changes.

    Returns:
        {"adapter_param_bytes", "adapter_grad_bytes", "optimizer_state_bytes" (Adam moments + step),
         "master_param_bytes" (fp32 copies), "base_bytes" (frozen params + buffers),
         "base_partitioned" (True if DeepSpeed touched any base tensor), "base_dtypes"}.
    """
    model = _model_of(engine)
    adapters = model.get_trainable_parameters()
    own = {id(p) for p in adapters}
    param_bytes = sum(_nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _nbytes(p) for p in adapters)
    masters, states = _optimizer_tensors(engine, adapters)
    base = [p for p in model.parameters() if id(p) not in own] + list(model.buffers())
    return {
        "adapter_param_bytes": param_bytes,
        "adapter_grad_bytes": _storage_bytes(_grad_tensors(engine, adapters)),
        "optimizer_state_bytes": sum(_nbytes(t) for t in states),
        "master_param_bytes": sum(_nbytes(t) for t in masters),
        "base_bytes": sum(_nbytes(t) for t in base),
        "base_partitioned": any(hasattr(t, "ds_id") for t in base),
        "base_dtypes": sorted({str(t.dtype) for t in base}),
    }


def gathered(engine_or_model: Any):
    """Context manager: inside it every adapter parameter is whole on every rank (a no-op below ZeRO-3)."""
    import contextlib

    model = _model_of(engine_or_model)
    partitioned = [p for p in model.get_trainable_parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def gathered_adapter_state_dict(engine_or_model: Any) -> dict[str, torch.Tensor]:
    """The full adapter state dict (keys as `LoRAModel.adapter_state_dict`), as CPU copies.

    Under ZeRO-3 this is a collective: every rank must call it. All ranks get the full tensors;
    rank 0 is the one expected to write them.
    """
    model = _model_of(engine_or_model)
    with gathered(engine_or_model):
        return {name: t.detach().to("cpu", copy=True) for name, t in model.adapter_state_dict().items()}


# ---- checkpoint state (owned by checkpoint.py)


def legacy_pickle_classes() -> list[type]:
    """The only globals a first-release (format 2) ZeRO-1/2 optimizer file may name besides tensors:
    DeepSpeed's loss-scaler record, its stage enum and its (numel, start) fragment address."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
# The optimizer state of the adapters, whole and by parameter name, so that a checkpoint is data
# (safetensors + JSON) and loads at any world size. DeepSpeed 0.19.8 gives each rank's share of a
# parameter's fp32 master weight and Adam moments through deepspeed.utils' safe_get_full_* (an
# all-reduce: every rank gets the whole tensor) and takes them back through safe_set_full_*. Supported:
# ZeRO-1/2 (parameters linked to a flat fp32 partition: `_hp_mapping`), ZeRO-3 (`ds_id`), stage 0 in
# bf16/fp16 through FP16_UnfusedOptimizer (an fp32 master per parameter) and stage 0 in fp32 (torch's
# optimizer holds the parameters themselves). Anything else is refused by name.


def _flat_groups(engine: Any) -> list[tuple[int, list[nn.Parameter], torch.Tensor]]:
    """(param group index, its adapter parameters, the flat fp32 partition holding their masters) per flat group."""
    zero = engine.optimizer
    inner = zero.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub groups of the param groups
        return [(zero.sub_group_to_group_id[j], list(zero.fp16_groups[j]), flat)
                for j, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    lp_groups = getattr(zero, "bit16_groups", None) or zero.bf16_groups  # ZeRO-1/2, or bf16 stage 0
    return [(i, list(lp_groups[i]), group["params"][0]) for i, group in enumerate(inner.param_groups)]


def _kind(engine: Any, params: list[nn.Parameter]) -> str:
    if all(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if all(hasattr(p, "_hp_mapping") for p in params):
        return "linked"
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        return "unfused"  # FP16_UnfusedOptimizer (stage 0, bf16/fp16): one fp32 master per parameter
    if isinstance(optimizer, torch.optim.Optimizer) and all(
        any(p is q for g in optimizer.param_groups for q in g["params"]) for p in params
    ):
        return "plain"
    from lora_dist.errors import CheckpointError

    raise CheckpointError(
        f"checkpoints do not support DeepSpeed's {type(optimizer).__name__} (ZeRO stage "
        f"{engine.zero_optimization_stage()}); use ZeRO stage 1-3, or bf16/fp32 at stage 0"
    )


def _hyper_parameters(groups: list[dict]) -> list[dict]:
    out = []
    for group in groups:
        out.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                    if k != "params" and isinstance(v, (int, float, str, bool, tuple, list, type(None)))})
    return out


def _engine_counters(engine: Any) -> dict:
    counters = {k: int(getattr(engine, k)) for k in ("global_steps", "global_samples", "skipped_steps")}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:  # fp16's dynamic loss scale
        counters["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                                   if isinstance(v, (int, float, bool)) and not k.startswith("_")}
    return counters


def full_optimizer_state(engine: Any, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The engine's adapter optimizer state, whole: (tensors, JSON). A collective: every rank calls it.

    Tensors (every rank gets them all): "<name>::fp32" master weight, "<name>::<key>" per optimizer
    state tensor (exp_avg, exp_avg_sq), "group<i>::<key>" per group scalar (Adam's step). JSON: the
    param groups' hyper-parameters and parameter names, the engine's step counters, the loss scale.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state


    params = _model_of(engine).get_trainable_parameters()
    kind = _kind(engine, params)
    if kind in ("plain", "unfused"):
        optimizer, masters = _torch_view(engine, names)
        tensors, meta = torch_optimizer_state(optimizer, masters)
        return tensors, {**meta, "counters": _engine_counters(engine)}
    flat_groups = _flat_groups(engine)
    inner = engine.optimizer.optimizer
    n_groups = len(engine.optimizer.param_groups)
    members: list[list[str]] = [[] for _ in range(n_groups)]
    group_state: list[dict] = [{} for _ in range(n_groups)]
    tensors: dict[str, torch.Tensor] = {}
    for group_id, lp_params, flat in flat_groups:
        members[group_id] += [names[id(p)] for p in lp_params]
        for key, value in inner.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                continue  # per element: gathered per parameter below
            if torch.is_tensor(value):
                tensors[f"group{group_id}::{key}"] = value.detach().cpu().clone()
            group_state[group_id][key] = float(value) if torch.is_tensor(value) else value
    keys = sorted({k for _, _, flat in flat_groups for k, v in inner.state.get(flat, {}).items()
                   if torch.is_tensor(v) and v.shape == flat.shape})
    for p in params:  # the same order on every rank: each call is an all-reduce
        name = names[id(p)]
        tensors[f"{name}::fp32"] = safe_get_full_fp32_param(p).detach().float().cpu()
        for key in keys:
            tensors[f"{name}::{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu()
    groups = _hyper_parameters(engine.optimizer.param_groups)
    for group, member in zip(groups, members):
        group["params"] = member
    return tensors, {"param_groups": groups, "groups": group_state, "scalars": {}, "counters": _engine_counters(engine)}


def set_full_optimizer_state(engine: Any, names: dict[int, str], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put back what `full_optimizer_state` returned (from any world size): masters, moments, adapter
    weights, hyper-parameters, step counters. A collective: every rank calls it with the same data."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from lora_dist.errors import CheckpointError

    model = _model_of(engine)
    params = model.get_trainable_parameters()
    missing = [names[id(p)] for p in params if f"{names[id(p)]}::fp32" not in tensors]
    if missing:
        raise CheckpointError(f"the checkpoint has no optimizer state for {missing[0]} (and {len(missing) - 1} more)")
    kind = _kind(engine, params)
    if kind in ("plain", "unfused"):
        if meta.get("groups") is not None:  # written by a ZeRO optimizer: one step per group
            to_torch_layout(meta, names, tensors)
        optimizer, masters = _torch_view(engine, names)
        set_torch_optimizer_state(optimizer, masters, tensors, meta)
        if kind == "unfused":
            with torch.no_grad():
                for p in params:
                    p.copy_(tensors[f"{names[id(p)]}::fp32"])
    else:
        if meta.get("groups") is None:  # written by a torch optimizer: one step per parameter
            _to_group_layout(meta, tensors)
        inner = engine.optimizer.optimizer
        saved_groups = meta["param_groups"]
        # Per-element state (Adam's moments); 0-dim entries (a torch optimizer's per-parameter step) are per group here.
        keys = sorted({k.split("::", 1)[1] for k, t in tensors.items()
                       if not k.startswith("group") and t.dim() > 0} - {"fp32"})
        for group_id, lp_params, flat in _flat_groups(engine):
            if keys:  # ZeRO-1/2 create Adam's state lazily, at the first step: create it now
                entry = inner.state.setdefault(flat, {})
                for key in keys:
                    entry.setdefault(key, torch.zeros_like(flat))
                for key, value in meta["groups"][group_id].items():
                    held = tensors.get(f"group{group_id}::{key}")
                    entry[key] = held.clone().to(flat.device) if held is not None else value
                for p in lp_params:
                    if getattr(p, "_hp_mapping", None) is not None:
                        p._hp_mapping.set_optim_state_fragment(flat, entry)
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
            engine.optimizer._hp_optimizer_states_linked = True
        for p in params:
            name = names[id(p)]
            safe_set_full_fp32_param(p, tensors[f"{name}::fp32"].to(_device_of(p)))
            for key in keys:
                safe_set_full_optimizer_state(p, tensors[f"{name}::{key}"].to(_device_of(p)), key)
        # The adapter weights the forward uses (bf16 copies, ZeRO-3 partitions) from the masters.
        if kind == "zero3":
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                for p in params:
                    p.copy_(tensors[f"{names[id(p)]}::fp32"])
        else:
            with torch.no_grad():
                for p in params:
                    p.copy_(tensors[f"{names[id(p)]}::fp32"])
        for saved, group in zip(saved_groups, engine.optimizer.param_groups):
            for key, value in saved.items():
                if key != "params" and key in group:
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
    counters = meta.get("counters", {})
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in counters:
            setattr(engine, key, counters[key])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in counters.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)


def _torch_view(engine: Any, names: dict[int, str]) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """(the torch optimizer holding the fp32 masters, {id(master): parameter name})."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "fp32_groups"):
        return optimizer, names
    masters = {id(fp32): names[id(lp)] for lp_group, fp32_group in zip(optimizer.fp16_groups, optimizer.fp32_groups)
               for lp, fp32 in zip(lp_group, fp32_group)}
    return optimizer.optimizer, masters


def _to_group_layout(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Turn torch's layout (a step per parameter) into ZeRO's (one per flat group), in place."""
    meta["groups"] = []
    for i, group in enumerate(meta["param_groups"]):
        first = group["params"][0] if group["params"] else None
        step = tensors.get(f"{first}::step")
        if step is not None:
            tensors[f"group{i}::step"] = step.clone()
        meta["groups"].append({"step": float(step)} if step is not None else {})


def _device_of(p: nn.Parameter) -> torch.device:
    return p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device
