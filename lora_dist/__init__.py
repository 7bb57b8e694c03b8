"""lora_dist: LoRA fine-tuning on quantized base weights, from one GPU to many nodes.

The public names load on first use (PEP 562): `import lora_dist` and `lora-dist --help` import no
torch or bitsandbytes; `from lora_dist import LoRAModel` imports what that name needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "LoRAConfig": "lora_dist.model",
    "LoRALayer": "lora_dist.layers",
    "LoRAModel": "lora_dist.model",
    "LoRAOptimizer": "lora_dist.optim",
    "apply_lora_to_model": "lora_dist.optim",
    "dequantize_weight": "lora_dist.quant",
    "quantize_model": "lora_dist.quant",
}

__all__ = [
    "LoRAConfig",
    "LoRALayer",
    "LoRAModel",
    "LoRAOptimizer",
    "apply_lora_to_model",
    "dequantize_weight",
    "quantize_model",
]
assert sorted(__all__) == sorted(_HOMES)  # one list for readers, one map for the loader

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below loads them
    from lora_dist.layers import LoRALayer
    from lora_dist.model import LoRAConfig, LoRAModel
    from lora_dist.optim import LoRAOptimizer, apply_lora_to_model
    from lora_dist.quant import dequantize_weight, quantize_model


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lora_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
