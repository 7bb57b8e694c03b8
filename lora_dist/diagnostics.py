"""Per-rank diagnostics of a training run (`train.diagnostics`): a profile of chosen steps, one JSON per rank.

`Profiler` runs torch.profiler over `train.profile_steps` and sums the time spent in collectives;
`write_diagnostics` writes a rank's record (`RunFolder.rank_diagnostics`) atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_dist.files import atomic_write_text


class Profiler:
    """torch.profiler over the optimizer steps `first..last` (1-based, inclusive) of `steps`.

    Call `before_step(n)` before step n runs and `after_step(n)` after it; the latter returns True
    once the last profiled step is done, and `report()` then gives the numbers.
    """

    def __init__(self, device: torch.device, steps: list[int]):
        self.device = device
        self.first, self.last = steps
        self._profile: Any = None
        self._report: dict[str, Any] | None = None

    def before_step(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profile = profile(activities=activities)
            self._profile.__enter__()

    def after_step(self, step: int) -> bool:
        if self._profile is None or step != self.last:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profile.__exit__(None, None, None)
        self._report = self._summarize(self._profile)
        self._profile = None
        return True

    def report(self) -> dict[str, Any]:
        """Time in collective kernels over the profiled steps: NCCL kernels on the GPU, gloo ops on the CPU.

        On the GPU the sum is of NCCL kernel durations. A kernel also runs while it waits for the slower
        rank, and it may overlap compute on its own stream: the sum bounds the exposed communication
        time (and load imbalance) from above.
        """
        if self._report is None:
            raise RuntimeError("report() before the last profiled step ended")
        return self._report

    def _summarize(self, profiler: Any) -> dict[str, Any]:
        on_gpu = self.device.type == "cuda"
        comm_us = busy_us = 0.0
        kernels: dict[str, float] = {}
        for event in profiler.events():
            name = event.name
            elapsed = event.time_range.elapsed_us()
            if on_gpu:
                # Kernels only: a `nccl:all_reduce` annotation spans its kernel on the GPU timeline too.
                if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                    continue
                if name.startswith("nccl:"):
                    continue
                busy_us += elapsed
                if "nccl" in name.lower():
                    comm_us += elapsed
                    kernels[name[:60]] = kernels.get(name[:60], 0.0) + elapsed
            elif name.startswith("gloo:"):
                comm_us += elapsed
                kernels[name] = kernels.get(name, 0.0) + elapsed
        n = self.last - self.first + 1
        return {
            "steps": [self.first, self.last],
            "collective": "nccl kernels" if on_gpu else "gloo ops",
            "comm_ms_per_step": comm_us / 1e3 / n,
            "device_busy_ms_per_step": busy_us / 1e3 / n if on_gpu else None,
            "by_kernel_ms_per_step": {k: v / 1e3 / n for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]},
        }


def write_diagnostics(path: Path, record: dict[str, Any]) -> Path:
    """Write one rank's record (shard bytes, peak memory, profile) as JSON at `path`; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path
