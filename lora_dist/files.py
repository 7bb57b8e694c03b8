"""Durable, atomic writes: every file and folder the tool publishes goes through here.

A reader (or a crash, or a power loss) sees the old version or the new one, never a half-written
file: content goes to a temporary name in the same folder, is fsynced, then renamed over the
target, and the folder is fsynced so the rename itself survives. Temporaries are named
`.{name}.tmp-*` so `remove_stale_temporaries` can clean up after a crash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, durably: temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with UTF-8 `text`, durably (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def temporary_folder(path: str | Path) -> Path:
    """A new empty folder beside `path` to build its next version in (publish it with `publish_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every directory (their entries: the files' names)."""
    folder = Path(folder)
    for item in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if item.is_file():
            fsync_path(item)
    for directory in [*sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True), folder]:
        fsync_path(directory)


def publish_folder(tmp: str | Path, path: str | Path) -> None:
    """Make the finished folder `tmp` appear as `path`, durably; an existing `path` is replaced.

    The contents are fsynced before the rename and the parent after it. An existing folder is
    moved aside first and removed only once the new one is in place, so a crash leaves one of the
    two complete (the old one under a `.{name}.old-*` name if it struck between the renames).
    """
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    if not path.exists():
        os.replace(tmp, path)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(path.parent)


def remove_stale_temporaries(folder: str | Path, name: str) -> list[Path]:
    """Remove the `.{name}.tmp-*` / `.{name}.old-*` leftovers of crashed writes in `folder`; returns them.

    Call it only where no other process can be writing `name` at the same time (rank 0, before
    the run starts writing).
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        if item.name.startswith((f".{name}{TMP_MARK}", f".{name}.old-")):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed
