"""supervise: which processes count as launchers, the chain a rank watches, and when a link breaks.

Real processes: a stand-in launcher is a small Python script run under one of the console-script names
of `LAUNCHERS` (the rule is by name), with a child below it; the end-to-end kills under the real
launchers are tests/distributed/test_orphans.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lora_dist import supervise

CHILD = "import time; time.sleep(60)"


@contextlib.contextmanager
def process_tree(tmp_path: Path, launcher_name: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """A process named `launcher_name` with one child: (the launcher, the child's pid); both ended after."""
    script = tmp_path / launcher_name
    script.write_text(
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "child.wait()\n"
    )
    launcher = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int((tmp_path / "child.pid").read_text())
    try:
        yield launcher, child
    finally:
        os.kill(child, signal.SIGKILL)
        launcher.wait()


def test_launchers_are_recognised_by_module_or_script_name(tmp_path):
    with process_tree(tmp_path, "torchrun") as (launcher, child):
        assert supervise.is_launcher(launcher.pid)
        assert not supervise.is_launcher(child)  # `python -c ...`
        assert not supervise.is_launcher(os.getpid())  # pytest


def test_a_rank_under_a_launcher_watches_its_link_and_nothing_above(tmp_path):
    with process_tree(tmp_path, "deepspeed") as (launcher, child):
        chain = supervise.launcher_chain(child)
        # the child's link to the launcher; not the launcher's to pytest (not a launcher: a nohup'd
        # launcher may outlive its shell)
        assert [(link.pid, link.parent) for link in chain] == [(child, launcher.pid)]
        assert supervise.broken_link(chain) is None
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while supervise.broken_link(chain) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert supervise.broken_link(chain) == chain[0]  # re-parented: the launcher is gone


def test_a_process_under_no_launcher_watches_nothing(tmp_path):
    with process_tree(tmp_path, "not-a-launcher") as (_, child):
        assert supervise.launcher_chain(child) == []
        assert supervise.launcher_chain() == []  # pytest itself
        assert supervise.watch_launcher(timeout_s=1) is None


def test_descendants_lists_children_and_grandchildren(tmp_path):
    with process_tree(tmp_path, "torchrun") as (launcher, child):
        assert set(supervise.descendants(os.getpid())) >= {launcher.pid, child}
        assert list(supervise.descendants(launcher.pid)) == [child]
