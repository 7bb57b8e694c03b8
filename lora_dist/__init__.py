"""lora_dist: LoRA fine-tuning on quantized base weights, from one GPU to many nodes."""

from lora_dist.layers import LoRALayer
from lora_dist.model import LoRAConfig, LoRAModel
from lora_dist.optim import LoRAOptimizer, apply_lora_to_model
from lora_dist.quant import dequantize_weight, quantize_model

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRALayer",
    "LoRAModel",
    "LoRAOptimizer",
    "apply_lora_to_model",
    "dequantize_weight",
    "quantize_model",
]
