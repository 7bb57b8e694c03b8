"""Tie a training process to the launcher that started it, so no rank outlives its job.

A launcher killed hard (SIGKILL, or SIGTERM to a plain `deepspeed` runner, which has no handler for it
on one node) leaves its children running: DeepSpeed's per-node `deepspeed.launcher.launch` and the
ranks below it keep training, holding their GPUs, with nobody to report to. `watch_launcher` starts a
thread in the rank that notices this within a second and stops the rank the way a scheduler would:
SIGTERM to itself (the training job's preemption path: finish the step, save, exit), then, if the
rank is still alive `timeout_s` later (stuck in a collective with a peer that is gone), `os._exit`.

What is watched: the links from this process up to the topmost launcher process above it. A link
breaks when a process in the chain has a different parent than at start (Linux hands orphans to
init or a subreaper) or is gone. The launchers recognised, by their command line
(`/proc/PID/cmdline`), are exactly those in `LAUNCHERS`; under any other parent nothing is watched
(a plain `python -m lora_dist train`, mpirun, srun). The topmost launcher's own parent is not
watched, so `nohup deepspeed ... &` survives its terminal. Linux only (it reads /proc); elsewhere
`watch_launcher` does nothing.

Imports only the standard library: the launcher-side modules and the CLI may import it freely.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Exit status of a rank that did not stop within timeout_s of losing its launcher: what a shell
# reports for a process killed by SIGTERM.
EXIT_LAUNCHER_GONE = 128 + signal.SIGTERM

# Supported launchers: python module names (`python -m NAME`) and console scripts (`NAME ...`).
LAUNCHER_MODULES = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run",
                    "torch.distributed.launch", "lora_dist.launch")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
LAUNCHERS = LAUNCHER_MODULES + LAUNCHER_SCRIPTS


@dataclass(frozen=True)
class Link:
    """One process of the chain and the parent it had when the watch started."""

    pid: int
    parent: int
    started: int  # clock ticks after boot (/proc/PID/stat field 22): tells a reused pid apart


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last one.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def is_launcher(pid: int) -> bool:
    """Whether process `pid` runs one of `LAUNCHERS` (by its argv)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] in LAUNCHER_MODULES:
            return True
    # A console script runs as `python /venv/bin/deepspeed ...` (argv[1]) or directly (argv[0]).
    return any(os.path.basename(arg) in LAUNCHER_SCRIPTS for arg in argv[:2])


def launcher_chain(pid: int | None = None) -> list[Link]:
    """The links to watch for process `pid` (default: this one): itself while its parent is a
    launcher, then each launcher whose parent is a launcher too. Empty when not under a launcher."""
    pid = os.getpid() if pid is None else pid
    chain: list[Link] = []
    while True:
        stat = _stat(pid)
        if stat is None or stat[0] <= 1 or not is_launcher(stat[0]):
            return chain
        chain.append(Link(pid, stat[0], stat[1]))
        pid = stat[0]


def broken_link(chain: list[Link]) -> Link | None:
    """The first link of `chain` that no longer holds (its process gone or re-parented), or None."""
    for link in chain:
        stat = _stat(link.pid)
        if stat is None or stat != (link.parent, link.started):
            return link
    return None


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every live process (zombies excluded)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = stat
    return table


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every live process below `pid` (children, their children, ...)."""
    table = process_table()
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def terminate_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess`: the child gets SIGTERM when the thread that started it ends, however
    it ends, SIGKILL included (Linux PR_SET_PDEATHSIG); None where there is no prctl. Resolved here, in
    the parent: the forked child only calls it.

    DeepSpeed's runner under `lora_dist.launch` (over pdsh that SIGTERM is its cue to stop every host's
    ranks); the bench's peer processes (Unsloth), which would otherwise keep a GPU busy under the next
    command after the bench was stopped.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def watch_launcher(timeout_s: float, poll_s: float = 1.0) -> threading.Thread | None:
    """Stop this process when its launcher dies (see the module docstring).

    Call it once at the start of a launched training process, before joining the process group.

    Args:
        timeout_s: the collective timeout; after SIGTERM the rank gets this long to save and exit
            before `os._exit(EXIT_LAUNCHER_GONE)`.
        poll_s: how often the links are checked.

    Returns:
        The watching (daemon) thread, or None where there is nothing to watch.
    """
    chain = launcher_chain() if Path("/proc/self/stat").exists() else []
    if not chain:
        return None

    def watch() -> None:
        while (gone := broken_link(chain)) is None:
            time.sleep(poll_s)
        print(f"lora_dist: the launcher above pid {gone.pid} is gone; stopping this rank "
              f"(SIGTERM now, exit in at most {timeout_s:.0f} s)", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(timeout_s)
        os._exit(EXIT_LAUNCHER_GONE)

    thread = threading.Thread(target=watch, name="lora_dist-launcher-watch", daemon=True)
    thread.start()
    return thread
