"""Where a run keeps its files: one object every module asks for a path, so no two spell it differently.

    <output_dir>/
        config.yaml, metrics.jsonl         the resolved config and the metric record (training)
        eval-config.yaml, eval-metrics.jsonl   the same for `lora-dist eval`
        adapter/                           the final adapter (PEFT layout)
        checkpoints/latest, step-*/        resumable checkpoints (lora_dist.checkpoint)
        diagnostics/rank-N.json            per-rank shard bytes, memory, profile (train.diagnostics)
        tiny-llama/                        the embedded model, built there for model.path=builtin:tiny-llama
        logs/rank-N.log                    per-rank logs written by the launch/ scripts
        wandb/                             the W&B run folders
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHIPPED_DATASET: Path = Path(__file__).parent / "resources" / "tiny_instructions.jsonl"
"""The instruction dataset inside the package (`data.path: builtin:tiny-instructions`, the tiny tokenizer's corpus)."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run under `root` (`train.output_dir`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics"

    @property
    def tiny_model(self) -> Path:
        return self.root / "tiny-llama"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    def metrics(self, job: str = "train") -> Path:
        """The JSON-lines record of a job: metrics.jsonl for training, `<job>-metrics.jsonl` otherwise."""
        return self.root / ("metrics.jsonl" if job == "train" else f"{job}-metrics.jsonl")

    def config(self, job: str = "train") -> Path:
        """The resolved config of a job: config.yaml for training, `<job>-config.yaml` otherwise."""
        return self.root / ("config.yaml" if job == "train" else f"{job}-config.yaml")

    def rank_diagnostics(self, rank: int) -> Path:
        return self.diagnostics / f"rank-{rank}.json"
