"""`python -m lora_dist ...` is `lora-dist ...` (the form the deepspeed launcher can run)."""

import sys

from lora_dist.cli import main

sys.exit(main())
