"""`python -m lora_dist ...` is `lora-dist ...` (the form the deepspeed launcher can run)."""

from lora_dist.cli import entry

entry()
