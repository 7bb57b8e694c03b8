"""Read back what an offline W&B run logged (tests only: wandb 0.31 ships no reader for its run file).

    <output_dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<run id>/run-<run id>.wandb

The file is a LevelDB-style log: a 7-byte file header (b":W&B", version 2 bytes, ident 1 byte), then
32 KiB blocks of records. Each record has a 7-byte header (crc32 4 bytes, length 2 bytes little-endian,
type 1 byte: 1 full, 2 first, 3 middle, 4 last; a record too long for its block continues in the next),
around a `wandb.proto.wandb_internal_pb2.Record`. A block tail shorter than a header is padding.
History records keep each key in `item.nested_key` (or `item.key`) and its value as JSON in
`item.value_json`; the run record carries `run.run_id`. Every launch of a resumed run writes its own
folder with the same run id; `wandb sync` joins them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

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
