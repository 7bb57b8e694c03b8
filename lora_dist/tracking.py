"""Metric reporting: console progress, metrics.jsonl and Weights & Biases, all on rank 0 only.

The training loop calls `Tracker` methods on every rank; the rank check lives here, so call sites stay
plain (STYLE rule 8). wandb is imported only when reporting is on (`wandb.mode` not "disabled"), and it
runs offline when no WANDB_API_KEY is set. A resumed run continues its W&B run (same id, `resume="allow"`)
and its metrics.jsonl (records past the resumed step, written after the checkpoint, are dropped first).

Offline runs, read back by `read_wandb_history` / `read_wandb_config` / `read_wandb_artifacts` so tests
and users without a network can see what was logged (`wandb sync <run folder>` uploads one later):

    <output_dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<run id>/run-<run id>.wandb

wandb 0.31 ships no reader for that file. It is a LevelDB-style log: a 7-byte file header (b":W&B",
version 2 bytes, ident 1 byte), then 32 KiB blocks of records. Each record has a 7-byte header (crc32
4 bytes, length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last; a record too
long for its block continues in the next), around a `wandb.proto.wandb_internal_pb2.Record`. A block
tail shorter than a header is padding. History records keep each key in `item.nested_key` (or
`item.key`) and its value as JSON in `item.value_json`; the run record carries `run.run_id`. Every
launch of a resumed run writes its own folder with the same run id; `wandb sync` joins them.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from lora_dist.config import Config, dump_config


class Tracker:
    """Reports one run. On ranks other than 0 every method does nothing.

    Args:
        config: the resolved run configuration (recorded in full on W&B and in `<output_dir>/config.yaml`,
            `<job>-config.yaml` for other jobs).
        rank: this process's rank.
        total_steps: optimizer steps the run will take (for the progress line).
        job: "train" or "eval": the W&B job type, and the local record `<output_dir>/<job>-metrics.jsonl`
            ("metrics.jsonl" for training).
        stream: where console progress goes (stdout by default).
        cluster: `world_size`, `num_nodes` and `hostnames` (`launch.cluster_info()`), recorded under
            `cluster` in the W&B config and as the first line of the metrics record.
        resume_step: the step of the checkpoint this run resumes (None: a fresh run). The metrics record
            is kept up to that step and appended to; records of later steps (a crash after the checkpoint)
            are dropped, since the resumed run logs those steps again.
        wandb_run_id: the W&B run to continue (saved in the resumed checkpoint), or None for a new one.
    """

    def __init__(
        self,
        config: Config,
        *,
        rank: int,
        total_steps: int,
        job: str = "train",
        stream: TextIO | None = None,
        cluster: dict[str, Any] | None = None,
        resume_step: int | None = None,
        wandb_run_id: str | None = None,
    ):
        self.active = rank == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.log_interval = config.train.log_interval
        self.output_dir = config.output_dir
        self.wandb_mode = config.wandb.resolved_mode()
        self.run = None
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self._start = time.perf_counter()
        self._interactive = self.stream.isatty()
        self._metrics_file: TextIO | None = None
        self._metrics_mode = "w" if resume_step is None else "a"  # a new run starts the file afresh
        self.metrics_path = self.output_dir / ("metrics.jsonl" if job == "train" else f"{job}-metrics.jsonl")
        self.config_path = self.output_dir / ("config.yaml" if job == "train" else f"{job}-config.yaml")
        self.cluster = cluster
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config_path, dump_config(config))
        if resume_step is not None:
            _truncate_metrics(self.metrics_path, resume_step)
        if self.wandb_mode != "disabled":
            self.run = _start_wandb(config, self.wandb_mode, job, cluster, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (keep it in checkpoints, so a resume continues the run), or None."""
        return None if self.run is None else self.run.id

    # -------------------------------------------------------------------------------- per step
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step's metrics (`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...)."""
        if not self.active:
            return
        self.history.append({"step": step, **metrics})
        self._write({"kind": "train", "step": step, **metrics})
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if step % self.log_interval == 0 or step == self.total_steps:
            self._progress(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record an evaluation (`loss`, `perplexity`, ...) taken after `step` optimizer steps."""
        if not self.active:
            return
        self.evals.append({"step": step, **metrics})
        self._write({"kind": "eval", "step": step, **metrics})
        if self.run is not None:
            self.run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self._clear_progress()
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        print(f"eval @ step {step}: {shown}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line on the console (rank 0)."""
        if self.active:
            self._clear_progress()
            print(text, file=self.stream, flush=True)

    # -------------------------------------------------------------------------------- the end
    def log_adapter(self, path: Path, name: str = "adapter") -> None:
        """Attach the saved adapter folder to the W&B run as a model artifact."""
        if not self.active or self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=_artifact_name(self.run, name), type="model")
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def finish(self, summary: dict[str, Any]) -> None:
        """Print the final summary table, record it on W&B, and close the run."""
        if not self.active:
            return
        self._clear_progress()
        if self.run is not None:
            import wandb

            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()
            # wandb 0.31 returns from finish() before its service has written the run file;
            # teardown waits for it, so the file is complete when we say where it is.
            wandb.teardown()
        self._write({"kind": "summary", **{k: v for k, v in summary.items() if _plain(v)}})
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        print(format_summary(summary), file=self.stream, flush=True)

    def wandb_run_dir(self) -> Path | None:
        """The local folder of the W&B run (offline runs: `wandb/offline-run-*`), if there is one."""
        return None if self.run is None else Path(self.run.dir).parent

    # -------------------------------------------------------------------------------- internals
    def _write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, self._metrics_mode, buffering=1)  # line-buffered
            if self.cluster is not None:  # first line of every launch's record: where it ran
                self._metrics_file.write(json.dumps({"kind": "cluster", **self.cluster}) + "\n")
        self._metrics_file.write(json.dumps(record) + "\n")

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        frac = step / max(self.total_steps, 1)
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = time.perf_counter() - self._start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (
            f"step {step}/{self.total_steps} [{bar}] loss {_fmt(metrics.get('loss'))} "
            f"lr {metrics.get('lr', 0.0):.2e} tok/s {metrics.get('tokens_per_s', 0.0):,.0f} "
            f"elapsed {_clock(elapsed)} eta {_clock(eta)}"
        )
        if self._interactive:  # redraw one line on a terminal; plain lines in logs
            print("\r" + line, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def _clear_progress(self) -> None:
        if self._interactive:
            print("\r\033[K", end="", file=self.stream, flush=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Cut the record at its first train/eval line past `step` (those steps are about to be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the crash
            break
        if record.get("kind") in ("train", "eval") and record.get("step", 0) > step:
            break
        kept.append(line + "\n")
    _atomic_write_text(path, "".join(kept))


def _start_wandb(
    config: Config, mode: str, job: str, cluster: dict[str, Any] | None = None, run_id: str | None = None
):
    import wandb  # only here: a run with reporting off never loads it

    cfg = config.wandb
    settings = wandb.Settings(
        console="off",  # our own progress lines are the console record
        quiet=True,
        x_save_requirements=False,
    )
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        tags=cfg.tags or None,
        job_type=job,
        config={**config.to_dict(), **({"cluster": cluster} if cluster is not None else {})},
        dir=str(config.output_dir),
        mode=mode,
        settings=settings,
        # resume="allow": continue the run with this id, or start it when W&B has never seen it (offline)
        **({"id": run_id, "resume": "allow"} if run_id else {}),
    )


def _artifact_name(run: Any, name: str) -> str:
    # Artifact names are per project; the run id keeps two runs' adapters apart.
    return f"{name}-{run.id}"


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the run's final numbers and where its outputs went."""
    rows = [(str(k), _fmt(v)) for k, v in summary.items()]
    width = max((len(k) for k, _ in rows), default=0)
    rule = "-" * (width + 2 + max((len(v) for _, v in rows), default=0))
    lines = ["", "run summary", rule]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ offline run reader

_BLOCK = 32 * 1024
_FILE_HEADER = 7  # b":W&B" magic, version (2 bytes), ident (1 byte)
_RECORD_HEADER = 7  # crc32 (4), length (2, little-endian), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_wandb_run_file(root: str | Path) -> Path:
    """The `run-*.wandb` file of the newest W&B run under `root` (an output dir or a run folder).

    Raises:
        FileNotFoundError: there is none.
    """
    files = sorted(Path(root).rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no W&B run file (run-*.wandb) under {root}")
    return files[-1]


def _wandb_records(path: Path):
    """Yield the protobuf payloads of a W&B transaction log, reassembling records split across blocks."""
    data = path.read_bytes()
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _RECORD_HEADER:  # a block tail too short for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        start = pos + _RECORD_HEADER
        chunk = data[start : start + length]
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_wandb_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (`run.log` calls) of an offline W&B run, in order, as {key: value} dicts.

    Args:
        path: a `run-*.wandb` file, or a folder containing one (the newest is read).
    """
    from wandb.proto import wandb_internal_pb2  # wandb's own schema for the records

    path = Path(path)
    if path.is_dir():
        path = find_wandb_run_file(path)
    rows = []
    for payload in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_wandb_artifacts(path: str | Path) -> list[dict[str, Any]]:
    """(name, type, file paths) of the artifacts logged by an offline W&B run."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        path = find_wandb_run_file(path)
    out = []
    for payload in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "artifact":
            art = record.artifact
            out.append({"name": art.name, "type": art.type, "files": [e.path for e in art.manifest.contents]})
    return out


def read_wandb_config(path: str | Path) -> dict[str, Any]:
    """The run config an offline W&B run recorded (`wandb.init(config=...)`), as {key: value}."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        path = find_wandb_run_file(path)
    config: dict[str, Any] = {}
    for payload in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            items = record.run.config.update
        elif record.WhichOneof("record_type") == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            config[key] = json.loads(item.value_json)
    return config


def read_metrics(output_dir: str | Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of `<output_dir>/metrics.jsonl` (train, eval and summary lines)."""
    path = Path(output_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = [
    "Tracker",
    "find_wandb_run_file",
    "format_summary",
    "read_metrics",
    "read_wandb_artifacts",
    "read_wandb_config",
    "read_wandb_history",
]

