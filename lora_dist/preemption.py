"""Stop on a scheduler's signal without losing a finished step: finish the step, checkpoint, exit 75.

SLURM (`--signal`), Kubernetes and every cloud scheduler preempt a job with SIGTERM (or SIGUSR1) and a
grace period; Ctrl-C sends SIGINT. While `fit` runs, `StopSignals` turns each of them into a request
instead of an abrupt end. The loop ends the optimizer step in progress, all ranks agree to stop
(`distributed.any_rank`: a rank may have got the signal a moment later, or not at all), a complete
checkpoint is written, metrics and W&B are flushed, and `Preempted` ends the process with exit status
75 (EX_TEMPFAIL: "try again"), which `launch/slurm.sbatch` answers by requeueing the job with
`train.resume=auto`. A second Ctrl-C stops at once, without the checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A stop signal ended training after a complete checkpoint; resume with train.resume=auto."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"preempted by {signal_name} after step {step}; checkpoint {checkpoint} is complete: "
            f"resume with train.resume=auto"
        )


class StopSignals:
    """Context manager: SIGTERM, SIGINT and SIGUSR1 set `received` instead of ending the process.

    Outside the main thread (where Python cannot install handlers) it does nothing. It may be entered
    again while active (`train` around `fit`, which also enters it); the previous handlers come back
    when the outermost `with` ends.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._depth = 0

    def __enter__(self) -> StopSignals:
        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now
        if self.received is None:
            self.received = signal.Signals(signum).name
