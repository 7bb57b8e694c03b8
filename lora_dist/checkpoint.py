"""Training checkpoints: adapter (PEFT layout), optimizer/scheduler, data position, RNG; atomic.
(Interface first; bodies are being filled in.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_dist.model import LoRAModel


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    model: LoRAModel,
    engine: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    data_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write root/step-XXXXXXXX/ (visible only when complete), then move root/latest to it."""
    raise NotImplementedError


def load_checkpoint(
    path_or_root: str | Path,
    *,
    model: LoRAModel,
    engine: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> dict:
    """Restore a checkpoint; returns {"step", "data_state", "extra"}."""
    raise NotImplementedError


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    raise NotImplementedError
