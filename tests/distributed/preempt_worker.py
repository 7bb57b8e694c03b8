"""One rank of `lora-dist train` that may send itself a signal at its n-th model forward.

    python preempt_worker.py SIGNAL_RANK FORWARD SIGNAL [lora-dist train arguments...]

FORWARD 0 sends nothing. Run by test_preemption_zero2.py on plain processes with torch.distributed's
environment variables; exits with the CLI's status (75 when preempted).
"""

import os
import signal
import sys

from lora_dist import building, cli


def main() -> int:
    signal_rank, forward, name, *argv = sys.argv[1:]
    if int(forward) > 0 and int(os.environ["RANK"]) == int(signal_rank):
        build = building.build_model

        def build_and_hook(*args, **kwargs):
            model, fused = build(*args, **kwargs)
            count = []

            def hook(module, inputs, output):
                count.append(1)
                if len(count) == int(forward):
                    os.kill(os.getpid(), getattr(signal, name))

            model.base_model.model.norm.register_forward_hook(hook)
            return model, fused

        building.build_model = build_and_hook
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
