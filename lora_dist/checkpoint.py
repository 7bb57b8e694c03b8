"""Training checkpoints that resume exactly, hold only data (never a pickle), and load at any world size.

Layout of one checkpoint (never the frozen base):

    root/latest                       text: the name of the newest complete step folder ("step-00000300")
    root/step-00000300/
        adapter_model.safetensors     the adapter, PEFT layout, directly usable (+ adapter_config.json)
        optimizer.safetensors         per trainable parameter, whole (unsharded): "<name>::fp32" (the fp32
                                      master weight) and "<name>::<key>" for each optimizer state tensor
                                      (AdamW: exp_avg, exp_avg_sq, step); "group<i>::<key>" for per-group
                                      scalars (DeepSpeed keeps one Adam step per flat group)
        rng-rank00000.safetensors     one per rank: torch (and CUDA) RNG states as uint8 tensors; the
                                      Python and NumPy states as JSON in its metadata
        trainer_state.json            step, data position, extra, world size, ZeRO stage, LoRA settings,
                                      optimizer hyper-parameters, LR schedule, DeepSpeed's step counters
        manifest.json                 size and SHA-256 of every other file (trainer_state.json included) and
                                      the SHA-256 of its own file list; written last: no manifest, no checkpoint

Nothing in a checkpoint is code: tensors are safetensors, the rest is JSON. DeepSpeed's own checkpoint
files (pickles it reads with torch.load(weights_only=False)) are never written or read: the optimizer
state is gathered whole through deepspeed.utils' safe_get_full_* and put back through safe_set_full_*,
so a checkpoint written on N ranks under ZeRO-1/2/3 resumes on M ranks as it is.

A checkpoint is built in `root/.step-XXXXXXXX.tmp-partial/`, fsynced, and renamed into place only when
every rank has written its part; `latest` moves after that (lora_dist.files). A save that fails (disk
full, read-only folder) removes its temporary folder, leaves `latest` on the previous checkpoint, and
raises CheckpointError on every rank.

Loading checks every file against the manifest before reading any of it. `latest` must name a step
folder directly inside the root. A newest checkpoint that is damaged in any way (truncated, changed,
missing or extra file, edited state) is skipped with one logged line for the newest intact one.

Format 2 (lora_dist up to b3d763d: torch and DeepSpeed pickles) still resumes, read only through
torch.load(weights_only=True) with an explicit allowlist of three DeepSpeed data classes: single-process
checkpoints and ZeRO-1/2 ones (at any world size); others are refused with a one-line CheckpointError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_dist import files
from lora_dist.adapters import load_adapter, save_adapter
from lora_dist.errors import CheckpointError
from lora_dist.model import LoRAModel
from lora_dist.optim_state import set_torch_optimizer_state, to_torch_layout, torch_optimizer_state, trainable_names

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 3  # 3: data only (safetensors + JSON), manifest.json over every file
LEGACY_FORMAT = 2  # torch / DeepSpeed pickles, manifest inside trainer_state.json
STEP_NAME = re.compile(r"step-\d{8}")
# The LoRA settings that shape or scale the adapters: a resume with other values cannot be exact.
LORA_KEYS = ("rank", "alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
             "use_rslora", "bias")
# Errors of a write that cannot complete: a full disk or quota (ENOSPC, EDQUOT), a file size limit
# (EFBIG), a read-only or forbidden folder (EROFS, EACCES). safetensors reports its own.
WRITE_ERRORS = (OSError, SafetensorError)

log = logging.getLogger(__name__)


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _first_error(error: str | None) -> str | None:
    """Every rank's error, agreed: the first one any rank had (a collective when distributed)."""
    _, world = _rank_world()
    if world == 1:
        return error
    everyone: list[str | None] = [None] * world
    torch.distributed.all_gather_object(everyone, error)  # in memory, never from a file
    return next((e for e in everyone if e), None)


# ---------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every file under `folder`, relative, sorted (symbolic links count as files: they are refused)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _files_digest(entries: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _write_manifest(folder: Path) -> None:
    entries = {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _listing(folder) if name != MANIFEST
    }  # fmt: skip
    manifest = {"format_version": FORMAT_VERSION, "files": entries, "files_sha256": _files_digest(entries)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _damage(path: Path) -> str | None:
    """Why the step folder `path` is not an intact checkpoint (any format), or None. Reads every byte."""
    if path.is_symlink() or not path.is_dir():
        return "it is not a folder" if not path.is_symlink() else "it is a symbolic link"
    manifest_file = path / MANIFEST
    if manifest_file.is_file() and not manifest_file.is_symlink():
        try:
            manifest = json.loads(manifest_file.read_bytes().decode("utf-8"))
            entries = manifest["files"]
            if manifest.get("format_version") != FORMAT_VERSION or _files_digest(entries) != manifest["files_sha256"]:
                return f"{MANIFEST} was changed or damaged"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is not readable"
        listed = set(entries) | {MANIFEST}
    else:
        entries = _legacy_entries(path)
        if isinstance(entries, str):
            return entries
        listed = set(entries) | {STATE_FILE}
    for name in _listing(path):
        if name not in listed:
            return f"{name} is not in its manifest"
    for name, entry in entries.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, not the {entry['size']} written (cut short, or changed since)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} changed since it was written"
    return None


def _legacy_entries(path: Path) -> dict[str, dict[str, Any]] | str:
    """The manifest of a format-2 checkpoint (inside its trainer_state.json, which it does not cover)."""
    if not (path / STATE_FILE).is_file():
        return f"no {MANIFEST}: it was interrupted while being written"
    try:
        state = json.loads((path / STATE_FILE).read_bytes().decode("utf-8"))
        entries = state["files"]
        ok = state.get("format_version") == LEGACY_FORMAT and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in entries.values()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no {MANIFEST} and no readable format-{LEGACY_FORMAT} {STATE_FILE}"
    return entries if ok else f"no {MANIFEST} and no readable format-{LEGACY_FORMAT} {STATE_FILE}"


# ---------------------------------------------------------------------- find
def _read_latest(root: Path) -> Path | None:
    """The step folder `root/latest` names, or None when there is no `latest`; refuses a bad pointer."""
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    fix = f"it must hold the name of a step folder inside {root} (e.g. step-00000300); fix or delete it"
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a plain file: {fix}")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not UTF-8 text: {fix}") from None
    except OSError as err:
        raise CheckpointError(f"{pointer} cannot be read ({err.strerror}): check its permissions") from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name[:80]!r}, not a step folder directly inside {root}: {fix}")
    return root / name


def _step_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if STEP_NAME.fullmatch(p.name)), key=lambda p: p.name, reverse=True)


def find_latest(root: str | Path) -> Path | None:
    """The newest intact checkpoint under `root`, or None when it holds none.

    Starts at the step `root/latest` names (a `latest` that is not the name of a step folder directly
    inside `root` is refused), else at the highest step; a damaged one is skipped, with one logged
    line, for the next lower intact one. Reads every file once (SHA-256 against the manifest).

    Raises:
        CheckpointError: `latest` is not a plain UTF-8 file naming a step folder inside `root`.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    named = _read_latest(root)
    candidates = _step_folders(root)
    if named is not None:
        candidates = [named] + [p for p in candidates if p.name < named.name]
    for path in candidates:
        why = _damage(path)
        if why is None:
            return path
        rank, _ = _rank_world()
        if rank == 0:
            log.warning("checkpoint %s is damaged (%s): skipped for an earlier one", path, why)
    return None


def _resolve(path_or_root: str | Path) -> Path:
    """The intact step folder to load: `path_or_root` itself, or the newest intact one under a root."""
    path = Path(path_or_root)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if STEP_NAME.fullmatch(path.name) and path.is_dir():
        why = _damage(path)
        if why is not None:
            latest = find_latest(path.parent)
            instead = f"resume from {latest} instead" if latest else "no intact checkpoint is left beside it"
            raise CheckpointError(f"checkpoint {path} is damaged ({why}); {instead}")
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder: give a step-XXXXXXXX folder or the folder holding them")
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"no intact checkpoint in {path}: expected step-XXXXXXXX folders (and a 'latest' file)")
    return found


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove what crashed saves left in the checkpoint folder `root`; returns what was removed.

    `.step-XXXXXXXX.tmp-*` / `.latest.tmp-*` (and `.step-XXXXXXXX.partial` / `.stale` of format 2).
    Call it on rank 0 before the run writes anything: a live save's temporary folder looks the same.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    names = {LATEST} | {item.name[1:].split(files.TMP_MARK)[0].split(".old-")[0] for item in root.iterdir()
                        if item.name.startswith(".step-") and (files.TMP_MARK in item.name or ".old-" in item.name)}
    removed = [p for name in sorted(names) for p in files.remove_stale_temporaries(root, name)]
    for item in root.glob(".step-*"):
        if item.name.endswith((".partial", ".stale")) and item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    return removed


# ---------------------------------------------------------------------- RNG
def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states: (uint8 tensors, JSON metadata) for one safetensors file."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), gauss])}
    try:
        import numpy as np
    except ImportError:  # numpy is optional for us
        return tensors, meta
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype("<u4").view("uint8").copy())
    meta["numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    return tensors, meta


def _set_rng(file: Path) -> None:
    tensors, meta = _read_tensors(file)
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    if "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        keys = tensors["numpy_keys"].numpy().view("<u4").astype("uint32")
        np.random.set_state((kind, keys, pos, has_gauss, cached))


# ---------------------------------------------------------------------- optimizer state as data
def _scheduler_state(scheduler: Any) -> dict | None:
    if scheduler is None:
        return None
    state = scheduler.state_dict()
    if any(v is not None for v in state.get("lr_lambdas", [])):
        raise CheckpointError("the LR scheduler keeps callable state; use distributed.make_lr_scheduler")
    json.dumps(state)
    return state


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

    With a DeepSpeed engine every rank must call this (it is a collective): the adapter and the
    whole optimizer state are gathered (rank 0 writes them), every rank writes its RNG state.

    Args:
        root: the run's checkpoint directory (shared by all ranks).
        step: optimizer steps done; names the directory.
        model: the LoRAModel being trained.
        engine: the engine from `distributed.setup_engine`, or None.
        optimizer: torch optimizer (single process; ignored with an engine).
        scheduler: LR scheduler (the engine's own with an engine).
        data_state: where the data loader stands (JSON-serializable), e.g. {"epoch": 0, "batch": 300}.
        extra: anything else JSON-serializable to keep (config, metrics).

    Returns:
        The step directory.

    Raises:
        CheckpointError: on every rank, when the checkpoint could not be written (disk full, read-only
            folder); the previous checkpoint stays `latest` and nothing half-written is left.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    from lora_dist import distributed

    rank, world = _rank_world()
    root = Path(root)
    final = root / _step_name(step)
    partial = root / f".{_step_name(step)}{files.TMP_MARK}partial"
    names = trainable_names(model)
    if engine is not None:
        tensors, opt_meta = distributed.full_optimizer_state(engine, names)  # collective
        scheduler = engine.lr_scheduler
    elif optimizer is not None:
        tensors, opt_meta = torch_optimizer_state(getattr(optimizer, "optimizer", optimizer), names)
    else:
        tensors, opt_meta = {}, None
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "data_state": data_state,
        "extra": extra,
        "world_size": world,
        "deepspeed": engine is not None,
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "lora": {k: model.lora_config.to_dict()[k] for k in LORA_KEYS},
        "optimizer": opt_meta,
        "scheduler": _scheduler_state(scheduler),
    }
    state_text = json.dumps(state, indent=1)  # fail before writing anything if data_state / extra are not JSON

    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        except WRITE_ERRORS as err:
            error = _describe(err)
    error = _first_error(error)
    with distributed.gathered(engine) if engine is not None else contextlib.nullcontext():
        if rank == 0 and error is None:
            try:
                save_adapter(model, partial)
                if tensors:
                    # Copies: safetensors refuses tensors that share memory (an optimizer may share a table).
                    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(partial / OPTIMIZER_FILE))
            except WRITE_ERRORS as err:
                error = _describe(err)
    if error is None:
        try:
            rng, meta = _rng_tensors()
            save_file(rng, str(partial / f"rng-rank{rank:05d}.safetensors"), metadata=meta)
            files.fsync_path(partial / f"rng-rank{rank:05d}.safetensors")  # another node's page cache
        except WRITE_ERRORS as err:
            error = _describe(err)
    error = _first_error(error)
    if rank == 0 and error is None:
        try:
            (partial / STATE_FILE).write_text(state_text)
            _write_manifest(partial)  # last: a folder without it is no checkpoint
            files.publish_folder(partial, final)  # fsyncs every file and folder, then renames
            files.atomic_write_text(root / LATEST, final.name + "\n")
        except WRITE_ERRORS as err:
            error = _describe(err)
    error = _first_error(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = find_latest(root) if root.is_dir() else None
        raise CheckpointError(
            f"could not write checkpoint {final} ({error}); {previous or 'no earlier checkpoint'} stays the latest: "
            f"free disk space or make {root} writable, then resume with train.resume=auto"
        )
    return final


def _describe(err: BaseException) -> str:
    """The OS's reason for a failed write ("No space left on device: <file>"), from OSError or safetensors."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    found = re.search(r"os error (\d+)", str(err))  # safetensors wraps Rust's io::Error
    return os.strerror(int(found.group(1))) if found else f"{type(err).__name__}: {str(err).splitlines()[0]}"


def _read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file this checkpoint lists; anything else is refused."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{file} is not a safetensors file ({str(err).splitlines()[0][:120]}); resume from a checkpoint this tool wrote"
        ) from None


def _load_adapter(model: LoRAModel, path: Path) -> None:
    try:
        load_adapter(model, path)
    except ValueError as err:  # adapters reports a damaged or mismatched adapter as ValueError
        raise CheckpointError(f"checkpoint {path}: {err}") from None


# ---------------------------------------------------------------------- load
def _verified_on_all_ranks(path_or_root: str | Path, collective: bool) -> Path:
    """Rank 0 picks and verifies the checkpoint; every rank gets the same answer (or the same error)."""
    rank, world = _rank_world()
    if not collective or world == 1:
        return _resolve(path_or_root)
    answer: list[Any] = [None]
    if rank == 0:
        try:
            answer[0] = ("ok", str(_resolve(path_or_root)))
        except CheckpointError as err:
            answer[0] = ("error", str(err))
    torch.distributed.broadcast_object_list(answer, src=0)  # in memory, never from a file
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value)


def _check_lora(path: Path, saved: dict, mine: dict) -> None:
    changed = [f"lora.{k} {saved[k]!r} -> {mine[k]!r}" for k in LORA_KEYS if k in saved and saved[k] != mine[k]]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with other LoRA settings ({', '.join(changed)}): resume with the "
            f"checkpoint's settings, or start a new run in another train.output_dir"
        )


def load_checkpoint(
    path_or_root: str | Path,
    *,
    model: LoRAModel,
    engine: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> dict:
    """Restore a checkpoint written by `save_checkpoint`, RNG states included, at any world size.

    With an engine every rank must call this. The optimizer state was saved whole, so any ZeRO stage
    and world size can read it. Before anything is read, every file is checked against the manifest;
    a root resolves to its newest intact checkpoint (see `find_latest`).

    Args:
        path_or_root: a step directory, or a root (follows `latest`).
        model: the LoRAModel (built with the LoRA settings the checkpoint was written with).
        engine, optimizer, scheduler: as given to `save_checkpoint`.

    Returns:
        {"step": int, "data_state": dict | None, "extra": dict | None}.

    Raises:
        CheckpointError: nothing intact there, a bad `latest`, other LoRA settings, or a format-2
            checkpoint this version cannot read safely.
    """
    path = _verified_on_all_ranks(path_or_root, collective=engine is not None)
    state = _read_state(path)
    if state.get("format_version") == LEGACY_FORMAT:
        return _load_legacy(path, state, model=model, engine=engine, optimizer=optimizer, scheduler=scheduler)
    _check_lora(path, state["lora"], model.lora_config.to_dict())
    rank, _ = _rank_world()
    names = trainable_names(model)
    tensors = _read_tensors(path / OPTIMIZER_FILE)[0] if (path / OPTIMIZER_FILE).is_file() else {}
    if engine is not None or optimizer is not None:
        _check_tensors(path, model, names, tensors)
    own_scheduler = engine.lr_scheduler if engine is not None else scheduler
    if own_scheduler is not None and state["scheduler"] is not None and (
        set(state["scheduler"]) != set(own_scheduler.state_dict())
    ):
        raise CheckpointError(f"{path / STATE_FILE} holds another kind of LR schedule; resume with the same settings")
    if engine is not None:
        from lora_dist import distributed

        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state; start DeepSpeed from its adapter only")
        state["optimizer"].setdefault("counters", {  # written without DeepSpeed
            "global_steps": state["step"], "global_samples": state["step"] * engine.train_batch_size()})
        distributed.set_full_optimizer_state(engine, names, tensors, state["optimizer"])
        scheduler = engine.lr_scheduler
    elif optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state; load its adapter only (optimizer=None)")
        if state["deepspeed"] and state["optimizer"].get("groups") is not None:
            to_torch_layout(state["optimizer"], names, tensors)
        set_torch_optimizer_state(getattr(optimizer, "optimizer", optimizer), names, tensors, state["optimizer"])
    else:
        _load_adapter(model, path)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-rank{rank:05d}.safetensors"
    if rng_file.is_file():  # a rank beyond the saved world size keeps its own seed
        try:
            _set_rng(rng_file)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{rng_file} holds no valid RNG state ({type(err).__name__}: {err})") from None
    return {"step": state["step"], "data_state": state["data_state"], "extra": state["extra"]}


STATE_TYPES = {"format_version": int, "step": int, "world_size": int, "deepspeed": bool, "lora": dict,
               "optimizer": (dict, type(None)), "scheduler": (dict, type(None)), "data_state": (dict, type(None)),
               "extra": (dict, type(None))}


def _read_state(path: Path) -> dict:
    """trainer_state.json of a verified checkpoint, its keys and types checked (format 2: as written then)."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a lora_dist trainer state")
    if state.get("format_version") == LEGACY_FORMAT:
        return state
    for key, kind in STATE_TYPES.items():
        if not isinstance(state.get(key), kind) or (key == "step" and state[key] < 0):
            raise CheckpointError(f"{file} has no valid {key!r}: it is not a checkpoint this version of lora_dist wrote")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{file} is format {state['format_version']}; this lora_dist reads {FORMAT_VERSION} and 2")
    return state


def _check_tensors(path: Path, model: LoRAModel, names: dict[int, str], tensors: dict[str, torch.Tensor]) -> None:
    """Every trainable parameter has its fp32 value, and every per-element state has its shape."""
    for p in model.get_trainable_parameters():
        name, shape = names[id(p)], tuple(getattr(p, "ds_shape", p.shape))
        if f"{name}::fp32" not in tensors:
            raise CheckpointError(f"{path / OPTIMIZER_FILE} holds no state for {name}; resume with the model it was written for")
        for key, tensor in tensors.items():
            if key.startswith(name + "::") and tensor.dim() > 0 and tuple(tensor.shape) != shape:
                raise CheckpointError(f"{path / OPTIMIZER_FILE}: {key} has shape {tuple(tensor.shape)}, the model {shape}")


# ---------------------------------------------------------------------- format 2, read only
# DeepSpeed's ZeRO-1/2 optimizer files pickle three of its own data classes besides tensors; these
# are the only globals a format-2 file may name (each builds a plain record: a loss scale, an enum,
# a (numel, start) pair). Anything else stops torch.load before it is called.
LEGACY_DS_DIR = "deepspeed"


def _torch_load_data(file: Path, allowed: list[type] = ()) -> Any:
    """torch.load(weights_only=True) with `allowed` globals; anything else is refused, never run."""
    import pickle

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                   type(err).__name__)
        raise CheckpointError(
            f"{file} holds more than tensors and plain data ({why[:160]}); it was refused unread: resume from "
            f"a checkpoint this tool wrote, or start a new run"
        ) from None


def _check_legacy_lora(path: Path, model: LoRAModel) -> None:
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    mine = model.lora_config.to_dict()
    saved = {"rank": config.get("r"), "alpha": config.get("lora_alpha"), "target_modules": config.get("target_modules")}
    mine = {"rank": mine["rank"], "alpha": mine["alpha"], "target_modules": mine["target_modules"]}
    for values in (saved, mine):  # PEFT writes alpha as a float and may reorder the targets
        values["alpha"] = float(values["alpha"]) if values["alpha"] is not None else None
        if isinstance(values["target_modules"], list):
            values["target_modules"] = sorted(values["target_modules"])
    _check_lora(path, saved, mine)


def _load_legacy(path: Path, state: dict, *, model: LoRAModel, engine: Any, optimizer: Any, scheduler: Any) -> dict:
    """Resume a format-2 checkpoint: single process, or DeepSpeed ZeRO-1/2 at any world size."""
    _check_legacy_lora(path, model)
    rank, _ = _rank_world()
    if engine is None:
        if state["deepspeed"] and (optimizer is not None or scheduler is not None):
            raise CheckpointError(f"{path} holds DeepSpeed optimizer state; resume it with DeepSpeed (or load its adapter only)")
        _load_adapter(model, path)
        if optimizer is not None:
            getattr(optimizer, "optimizer", optimizer).load_state_dict(_torch_load_data(path / "optimizer.pt"))
        if scheduler is not None:
            scheduler.load_state_dict(_torch_load_data(path / "scheduler.pt"))
    else:
        if not state["deepspeed"]:
            raise CheckpointError(f"{path} was written without DeepSpeed; resume it in single-process mode")
        stage = state["zero_stage"]
        if stage not in (1, 2):
            raise CheckpointError(
                f"{path} is a format-{LEGACY_FORMAT} ZeRO-{stage} checkpoint (DeepSpeed pickles), which this version "
                f"does not read; finish the run with lora_dist b3d763d, or start a new one from its adapter"
            )
        from lora_dist import distributed

        tensors, meta, schedule = _legacy_zero_state(path, engine)
        distributed.set_full_optimizer_state(engine, trainable_names(model), tensors, meta)
        engine.lr_scheduler.load_state_dict(schedule)
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.is_file():
        _set_legacy_rng(_torch_load_data(rng_file))
    return {"step": state["step"], "data_state": state["data_state"], "extra": state["extra"]}


def _legacy_zero_state(path: Path, engine: Any) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Whole per-parameter state from DeepSpeed's ZeRO-1/2 files: (tensors, meta, LR schedule state).

    Each rank's file holds its slice of every param group's flat fp32 buffer (and Adam moments);
    concatenated in rank order they are the flat buffer, parameters in `param_shapes` order, padding last.
    """
    folder = path / LEGACY_DS_DIR
    model_state = _torch_load_data(folder / "mp_rank_00_model_states.pt")
    shards = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda f: int(f.name.split("_")[3]))
    if not shards:
        raise CheckpointError(f"{folder} holds no ZeRO optimizer files; resume it with lora_dist b3d763d")
    from lora_dist import distributed

    parts = [_torch_load_data(f, distributed.legacy_pickle_classes())["optimizer_state_dict"] for f in shards]
    if any(any(any(pad) for pad in p.get("param_alignment_paddings", [])) for p in parts):
        raise CheckpointError(f"{folder} uses padded (round-robin) partitions, which this version does not read")
    ours = {ds_name: id(p) for ds_name, p in engine.module.named_parameters()}
    names = trainable_names(_model_of_engine(engine))
    tensors: dict[str, torch.Tensor] = {}
    groups, group_state = [], []
    for g, shapes in enumerate(model_state["param_shapes"]):
        flat = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])
        offset, members = 0, []
        for ds_name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            name = names[ours[ds_name]]
            for key, buffer in flat.items():
                tensors[f"{name}::{key}"] = buffer[offset:offset + numel].view(shape).clone()
            offset += numel
            members.append(name)
        step = parts[0]["base_optimizer_state"]["state"][g]["step"]
        tensors[f"group{g}::step"] = step.clone()
        group_state.append({"step": float(step)})
        hyper = dict(parts[0]["base_optimizer_state"]["param_groups"][g])
        hyper.pop("params")
        groups.append({**{k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}, "params": members})
    counters = {k: int(model_state[k]) for k in ("global_steps", "global_samples", "skipped_steps") if k in model_state}
    meta = {"param_groups": groups, "groups": group_state, "scalars": {}, "counters": counters}
    return tensors, meta, model_state["lr_scheduler"]


def _model_of_engine(engine: Any) -> LoRAModel:
    return engine.module.model


def _set_legacy_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
