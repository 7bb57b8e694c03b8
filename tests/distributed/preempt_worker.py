"""One rank of `lora-dist train` that may send itself a signal at its n-th model forward.

    python preempt_worker.py SIGNAL_RANK FORWARD SIGNAL [lora-dist train arguments...]

FORWARD 0 sends nothing. Run by test_zero_preemption.py on plain processes with torch.distributed's
environment variables; exits with the CLI's status (75 when preempted), the way `lora-dist` does.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared preempt_hook
from lora_dist import building, cli  # noqa: E402
from preempt_hook import signalling  # noqa: E402


def main() -> int:
    signal_rank, forward, name, *argv = sys.argv[1:]
    if int(forward) > 0 and int(os.environ["RANK"]) == int(signal_rank):
        building.build_model = signalling(building.build_model, int(forward), getattr(signal, name))
    return cli.main(argv)


if __name__ == "__main__":
    cli.exit_with(main())
