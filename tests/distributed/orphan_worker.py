"""A rank that starts like the training job (watch the launcher, join the group) and then all-reduces
until told to stop; test_orphans.py runs it under each launcher and kills something.

    orphan_worker.py OUT_DIR TIMEOUT_S [--local_rank=N]

Writes OUT_DIR/rank-R.pid once in the process group. SIGTERM is handled as the training job handles
preemption: the current collective finishes, then the rank exits 75.
"""

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

from lora_dist.supervise import watch_launcher

EXIT_PREEMPTED = 75
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed puts it first
out, timeout_s = Path(args[0]), float(args[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
watch_launcher(timeout_s)

# after the watch, as in the job (importing torch takes seconds)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
rank = dist.get_rank()
(out / f"rank-{rank}.pid").write_text(str(os.getpid()))
value = torch.ones(1)
while not stop:
    dist.all_reduce(value)
    value.fill_(1.0)
    time.sleep(0.05)
sys.exit(EXIT_PREEMPTED)
