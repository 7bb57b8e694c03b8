"""A model builder whose model sends its own process a signal during a chosen forward (preemption tests)."""

import os
import signal
from typing import Any, Callable


def signalling(build: Callable[..., Any], forward: int, sig: signal.Signals) -> Callable[..., Any]:
    """Wrap `building.build_model`: the model it returns sends `sig` to this process in its `forward`-th
    forward (1-based; micro batch k of step s is forward (s - 1) * accum + k when there is no eval split)."""

    def build_and_hook(*args: Any, **kwargs: Any) -> Any:
        model, fused = build(*args, **kwargs)
        count = []

        def hook(module, inputs, output):
            count.append(1)
            if len(count) == forward:
                os.kill(os.getpid(), sig)

        model.base_model.model.norm.register_forward_hook(hook)
        return model, fused

    return build_and_hook
