"""Training checkpoints that resume exactly: adapter, optimizer, scheduler, data position, RNG.

Layout of one checkpoint (never the frozen base):

    root/latest                       text: the name of the newest complete step directory
    root/step-00000300/
        adapter_model.safetensors     the adapter, PEFT layout, directly usable (+ adapter_config.json)
        deepspeed/                    DeepSpeed's sharded optimizer + scheduler state (with an engine)
        optimizer.pt, scheduler.pt    torch state dicts (single process, no DeepSpeed)
        rng-rank00000.pt ...          the RNG states of every rank
        trainer_state.json            step, data_state, extra, world size, stage, and the manifest:
                                      size and SHA-256 of every other file; written last

A checkpoint is written into `root/.step-XXXXXXXX.partial/` and renamed into place only when every
rank has finished; `latest` moves after that (temp file + os.replace). Every file and directory is
fsynced before the rename that publishes it, so after a crash or a power loss `latest` names a
folder whose bytes are on the disk. A crash leaves at worst a `.partial` directory, which nothing
reads; a step folder whose files do not have the sizes of its manifest counts as incomplete.

Loading verifies every file against its SHA-256 before anything is read: DeepSpeed reads its files
with torch.load(weights_only=False), which runs whatever pickle it finds, so only bytes this tool
wrote may reach it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_dist.adapters import load_adapter, save_adapter
from lora_dist.model import LoRAModel

LATEST = "latest"
STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed-universal"  # made on demand when resuming at another world size
UNIVERSAL_MANIFEST = f"{UNIVERSAL_TAG}.json"  # its sizes and SHA-256s, checked before it is reused
FORMAT_VERSION = 2  # 2: "files" is the manifest {relative path: {"size", "sha256"}}


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write through a temp file, fsynced before os.replace; then fsync the folder to keep the rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


# ---------------------------------------------------------------------- manifest
def _file_names(folder: Path) -> list[str]:
    """Every file under `folder` but the trainer state and the universal conversion, relative, sorted."""
    skip = (STATE_FILE, UNIVERSAL_MANIFEST, UNIVERSAL_TAG + "/", f".{UNIVERSAL_TAG}.partial/")
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if not n.startswith(skip))


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `folder`, each fsynced on the way, then
    every directory (their entries: the files' names) fsynced too."""
    out = {}
    for name in _file_names(folder):
        with open(folder / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())  # the other ranks' files too: one page cache per machine
            out[name] = {"size": os.fstat(f.fileno()).st_size, "sha256": digest}
    directories = {folder} | {parent for n in out for parent in (folder / n).parents if folder in parent.parents}
    for directory in sorted(directories, reverse=True):  # deepest first, the folder itself last
        _fsync(directory)
    return out


def _size_problem(folder: Path, manifest: Any) -> str | None:
    """Why `folder` does not hold the files of `manifest` at their sizes (cheap: stat only), or None."""
    if not isinstance(manifest, dict):
        return f"its {STATE_FILE} has no manifest of file sizes and hashes (written by an older lora_dist)"
    for name, entry in manifest.items():
        try:
            size = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} has {size} bytes, not the {entry['size']} written (lost in a crash, or changed since)"
    return None


def _changed_file(folder: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    """The first file under `folder` that differs from `manifest` (bytes, or not listed), or None."""
    for name in _file_names(folder):
        if name not in manifest:
            return name
    for name, entry in manifest.items():
        try:
            with open(folder / name, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    return name
        except OSError:
            return name
    return None


def _verify(path: Path, manifest: dict[str, dict[str, Any]], collective: bool) -> None:
    """Raise unless every file of the step folder `path` has the SHA-256 it was written with.

    With `collective` (every rank is here) rank 0 reads the files and tells the others, so all
    raise; otherwise this process reads them.
    """
    rank, world = _rank_world()
    changed = [_changed_file(path, manifest) if rank == 0 or not collective else None]
    if collective and world > 1:
        torch.distributed.broadcast_object_list(changed, src=0)
    if changed[0] is not None:
        raise ValueError(
            f"checkpoint file {path / changed[0]} changed since it was written; "
            f"resume only from checkpoints this tool wrote"
        )


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
        _fsync(root.parent)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()

    if engine is not None:
        from lora_dist import distributed

        with distributed.gathered(engine):
            if rank == 0:
                save_adapter(model, partial)
        engine.save_checkpoint(str(partial), tag=DS_TAG, save_latest=False)
    elif rank == 0:
        save_adapter(model, partial)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    rng_file = partial / f"rng-rank{rank:05d}.pt"
    torch.save(_rng_state(), rng_file)
    _fsync(rng_file)  # on this rank's machine: another node's rank 0 cannot flush its page cache
    _barrier()

    if rank == 0:
        state["files"] = _manifest(partial)  # fsyncs every file and folder
        # trainer_state.json last: a directory without it is incomplete.
        _atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2))
        if final.exists():  # re-saving a step: swap in the new one, then drop the old
            stale = root / f".{_step_name(step)}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
            os.rename(partial, final)
            _fsync(root)
            shutil.rmtree(stale)
        else:
            os.rename(partial, final)
            _fsync(root)
        _atomic_write_text(root / LATEST, final.name + "\n")
    _barrier()
    return final


# ---------------------------------------------------------------------- find / load
def _incomplete_because(path: Path) -> str | None:
    """Why the step folder `path` is not a complete checkpoint, or None when it is."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE}: it was interrupted while being written"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):  # a torn or empty file after a power loss
        return f"{STATE_FILE} is not readable JSON"
    return _size_problem(path, state.get("files") if isinstance(state, dict) else None)


def _is_complete(path: Path) -> bool:
    return _incomplete_because(path) is None


def _complete_steps(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if p.is_dir() and _is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def _pointed(root: Path) -> tuple[Path | None, Path | None]:
    """(the step folder `root/latest` names, or None; that folder if it is complete, else None)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, None
    target = root / pointer.read_text().strip()
    return target, (target if _is_complete(target) else None)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root (where `latest` points, else the highest step), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    named, complete_target = _pointed(root)
    if complete_target is not None:
        return complete_target
    complete = _complete_steps(root)
    return complete[-1] if complete else None


def _resolve(path_or_root: str | Path) -> Path:
    path = Path(path_or_root)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if _is_complete(path):
        return path
    named, complete_target = _pointed(path)
    if complete_target is not None:
        return complete_target
    if named is not None:
        raise ValueError(
            f"{path / LATEST} names {named.name}, which is missing or incomplete; "
            f"resume from a complete one: {[p.name for p in _complete_steps(path)] or 'none found'}"
        )
    if path.name.startswith(("step-", ".step-")):
        others = _complete_steps(path.parent)
        raise ValueError(
            f"checkpoint {path} is incomplete ({_incomplete_because(path)}); "
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

    Rank 0 converts `deepspeed/` (verified by the caller) once into `deepspeed-universal/` beside
    it, written to a temp folder and renamed, so a crash leaves no half conversion; its manifest
    goes to `deepspeed-universal.json`. A conversion that no longer matches its manifest is made
    again. Every rank then loads its new shard.
    """
    from lora_dist import distributed

    rank, _ = _rank_world()
    universal = path / UNIVERSAL_TAG
    manifest_file = path / UNIVERSAL_MANIFEST
    failure = None
    if rank == 0 and universal.is_dir():
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            manifest = None
        if manifest is None or _size_problem(universal, manifest) or _changed_file(universal, manifest):
            shutil.rmtree(universal)
    if rank == 0 and not universal.is_dir():
        partial = path / f".{UNIVERSAL_TAG}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            distributed.to_universal(path / DS_TAG, partial)
            _atomic_write_text(manifest_file, json.dumps(_manifest(partial), indent=2))
            os.rename(partial, universal)
            _fsync(path)
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
    The ZeRO stage must be the one the checkpoint was written with. Before anything is loaded,
    every file is checked against the SHA-256 recorded when it was written.

    Args:
        path_or_root: a step directory, or a root (follows `latest`).
        model: the LoRAModel (built the same way as when saved).
        engine, optimizer, scheduler: as given to `save_checkpoint`.

    Returns:
        {"step": int, "data_state": dict | None, "extra": dict | None}.

    Raises:
        FileNotFoundError: nothing there. ValueError: incomplete, changed since it was written, or not
        resumable this way.
    """
    path = _resolve(path_or_root)
    state = json.loads((path / STATE_FILE).read_text())
    _verify(path, state["files"], collective=engine is not None)
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
