"""Training checkpoints that resume exactly: adapter, optimizer, scheduler, data position, RNG.

Layout of one checkpoint (never the frozen base):

    root/latest                       text: the name of the newest complete step directory
    root/step-00000300/
        adapter_model.safetensors     the adapter, PEFT layout, directly usable (+ adapter_config.json)
        deepspeed/                    DeepSpeed's sharded optimizer + scheduler state (with an engine)
        optimizer.pt, scheduler.pt    torch state dicts (single process, no DeepSpeed)
        rng-rank00000.pt ...          the RNG states of every rank
        trainer_state.json            step, data_state, extra, world size, stage; written last

A checkpoint is written into `root/.step-XXXXXXXX.partial/` and renamed into place only when every
rank has finished; `latest` moves after that (temp file + os.replace). A crash leaves at worst a
`.partial` directory, which nothing reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_dist.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from lora_dist.model import LoRAModel

LATEST = "latest"
STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed-universal"  # made on demand when resuming at another world size
FORMAT_VERSION = 1


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for us
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # As tensors and numbers so torch.load(weights_only=True) can read it back without pickles.
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ---------------------------------------------------------------------- save
def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    model: LoRAModel,
    engine: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    data_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write root/step-XXXXXXXX/ (visible only when complete), then move root/latest to it.

    With a DeepSpeed engine every rank must call this (it is a collective): the adapter is gathered
    to rank 0 and written in PEFT layout, DeepSpeed writes its sharded optimizer and scheduler state
    (adapters only: its module holds nothing else), every rank writes its RNG state. Without an
    engine (single process) `optimizer` and `scheduler` state dicts are saved with torch.

    Args:
        root: the run's checkpoint directory (shared by all ranks).
        step: optimizer steps done; names the directory.
        model: the LoRAModel being trained.
        engine: the engine from `distributed.setup_engine`, or None.
        optimizer: torch optimizer or LoRAOptimizer (ignored with an engine).
        scheduler: LR scheduler (ignored with an engine: the engine saves its own).
        data_state: where the data loader stands (JSON-serializable), e.g. {"epoch": 0, "batch": 300}.
        extra: anything else JSON-serializable to keep (config, metrics).

    Returns:
        The step directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    rank, world = _rank_world()
    root = Path(root)
    final = root / _step_name(step)
    partial = root / f".{_step_name(step)}.partial"
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data_state": data_state,
        "extra": extra,
        "world_size": world,
        "deepspeed": engine is not None,
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
    }
    json.dumps(state)  # fail before writing anything if data_state / extra are not JSON
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()

    files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG] + [f"rng-rank{r:05d}.pt" for r in range(world)]
    if engine is not None:
        from lora_dist import distributed

        with distributed.gathered(engine):
            if rank == 0:
                save_adapter(model, partial)
        engine.save_checkpoint(str(partial), tag=DS_TAG, save_latest=False)
        files.append(DS_TAG)
    elif rank == 0:
        save_adapter(model, partial)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            files.append("optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            files.append("scheduler.pt")
    torch.save(_rng_state(), partial / f"rng-rank{rank:05d}.pt")
    _barrier()

    if rank == 0:
        state["files"] = files
        # trainer_state.json last: a directory without it is incomplete.
        _atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2))
        if final.exists():  # re-saving a step: swap in the new one, then drop the old
            stale = root / f".{_step_name(step)}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(partial, final)
            shutil.rmtree(stale)
        else:
            os.rename(partial, final)
        _atomic_write_text(root / LATEST, final.name + "\n")
    _barrier()
    return final


# ---------------------------------------------------------------------- find / load
def _is_complete(path: Path) -> bool:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        files = json.loads(state_file.read_text()).get("files", [])
    except json.JSONDecodeError:
        return False
    return all((path / f).exists() for f in files)


def _complete_steps(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if p.is_dir() and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root (where `latest` points, else the highest step), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _is_complete(target):
            return target
    complete = _complete_steps(root)
    return complete[-1] if complete else None


def _resolve(path_or_root: str | Path) -> Path:
    path = Path(path_or_root)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if _is_complete(path):
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if _is_complete(target):
            return target
        raise ValueError(
            f"{pointer} names {target.name}, which is missing or incomplete; "
            f"resume from a complete one: {[p.name for p in _complete_steps(path)] or 'none found'}"
        )
    if path.name.startswith(("step-", ".step-")):
        missing = STATE_FILE if not (path / STATE_FILE).is_file() else "files listed in " + STATE_FILE
        others = _complete_steps(path.parent)
        raise ValueError(
            f"checkpoint {path} is incomplete (no {missing}): it was interrupted while being written; "
            f"resume from {others[-1] if others else 'an earlier complete checkpoint'} instead"
        )
    complete = _complete_steps(path)
    if complete:
        return complete[-1]
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected a step-XXXXXXXX directory or a root holding one (and a 'latest' file)"
    )


def _load_resharded(path: Path, engine: Any, saved_world: int, world: int, stage: int) -> None:
    """Resume optimizer state sharded for `saved_world` ranks on `world` ranks, via a universal checkpoint.

    Rank 0 converts `deepspeed/` once into `deepspeed-universal/` beside it (written to a temp
    folder and renamed, so a crash leaves no half conversion); every rank then loads its new shard.
    """
    from lora_dist import distributed

    rank, _ = _rank_world()
    universal = path / UNIVERSAL_TAG
    failure = None
    if rank == 0 and not universal.is_dir():
        partial = path / f".{UNIVERSAL_TAG}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            distributed.to_universal(path / DS_TAG, partial)
            os.rename(partial, universal)
        except Exception as err:  # reported below, on every rank
            failure = f"{type(err).__name__}: {err}"
            shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    if not universal.is_dir():
        raise ValueError(
            f"{path} holds ZeRO-{stage} optimizer state sharded over {saved_world} ranks and this run has {world}; "
            f"converting it to a DeepSpeed universal checkpoint failed ({failure or 'see rank 0'}): "
            f"resume with {saved_world} ranks"
        )
    distributed.load_universal(engine, universal)


def load_checkpoint(
    path_or_root: str | Path,
    *,
    model: LoRAModel,
    engine: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> dict:
    """Restore a checkpoint written by `save_checkpoint`, RNG states included.

    With an engine every rank must call this; DeepSpeed reloads the adapters, optimizer and
    scheduler state. Optimizer state sharded for another world size (ZeRO-1/2/3, and bf16 at stage
    0) is first converted to a DeepSpeed universal checkpoint (`deepspeed-universal/` in the step
    directory, made once) and re-sharded; if that fails the error says which world size to use.
    The ZeRO stage must be the one the checkpoint was written with.

    Args:
        path_or_root: a step directory, or a root (follows `latest`).
        model: the LoRAModel (built the same way as when saved).
        engine, optimizer, scheduler: as given to `save_checkpoint`.

    Returns:
        {"step": int, "data_state": dict | None, "extra": dict | None}.

    Raises:
        FileNotFoundError: nothing there. ValueError: incomplete, or not resumable this way.
    """
    path = _resolve(path_or_root)
    state = json.loads((path / STATE_FILE).read_text())
    rank, world = _rank_world()
    saved_world, saved_stage = state["world_size"], state["zero_stage"]
    if engine is not None:
        if not state["deepspeed"]:
            raise ValueError(
                f"{path} was written without DeepSpeed; resume it in single-process mode "
                f"(optimizer=, scheduler=) or start DeepSpeed from its adapter only"
            )
        stage = engine.zero_optimization_stage()
        if stage != saved_stage:
            raise ValueError(f"{path} was written under ZeRO stage {saved_stage}; resume with zero_stage={saved_stage}")
        sharded = any((path / DS_TAG).glob("*zero_pp_rank_*optim_states.pt"))
        if world != saved_world and sharded:
            _load_resharded(path, engine, saved_world, world, stage)
        else:
            loaded, _ = engine.load_checkpoint(
                str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if loaded is None:
                raise ValueError(f"DeepSpeed could not load {path / DS_TAG}; see its log above")
    else:
        if state["deepspeed"] and (optimizer is not None or scheduler is not None):
            raise ValueError(
                f"{path} holds DeepSpeed optimizer state; resume it with engine= (pass neither optimizer nor "
                f"scheduler to load the adapter alone)"
            )
        load_adapter(model, path)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.is_file():  # a rank beyond the saved world size starts from its own seed
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return {"step": state["step"], "data_state": state["data_state"], "extra": state["extra"]}
