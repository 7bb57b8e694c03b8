"""The embedded default: a tiny Llama-architecture model and a tokenizer that need no download.

(Interface stub: bodies land shortly.)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATASET: Path = Path(__file__).parent / "resources" / "tiny_instructions.jsonl"


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    seed: int = 0,
) -> Path:
    """Write a random-weight tiny Llama and its tokenizer to out_dir with save_pretrained; returns out_dir."""
    raise NotImplementedError
