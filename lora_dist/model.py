"""LoRAModel: choose target linears, inject LoRALayers, freeze the rest, toggle merges, save and load adapters.

LoRAConfig (what to target, how to shape it) lives in `lora_dist.lora_config` and is importable from here
too. Adapter files are `lora_dist.adapter_files`' concern and the merged export `lora_dist.export`'s: the
methods below call them, and neither imports this module (the import graph has no cycle).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_dist import adapter_files, export, quant
from lora_dist.errors import ConfigError
from lora_dist.layers import LoRALayer
from lora_dist.lora_config import LoRAConfig

__all__ = ["LoRAConfig", "LoRAModel"]

logger = logging.getLogger(__name__)


class LoRAModel(nn.Module):
    """Any `nn.Module` (a Hugging Face causal LM above all) with LoRA on the configured linears.

    Args:
        base_model: the model to adapt; its targeted linears are replaced in place.
        lora_config: a `LoRAConfig` or a dict with its keys.
        merge_weights: start merged (for inference).
        allow_rank_above_layer_size: log, rather than refuse, a rank above min(in, out) of a layer
            (for adapter files that already have one; PEFT computes them exactly).

    Attributes:
        base_model: the wrapped model (forward passes straight through to it).
        lora_config: the validated `LoRAConfig`.
        lora_layers: {full module name: LoRALayer}.
        carried_weights: names of base tensors replaced from an adapter file (saved with it).
        modules_to_save: PEFT `modules_to_save` keys of such an adapter, else None.

    Adapter files (PEFT layout): `save_adapter(path)`, `load_adapter(path)`, the classmethod
    `from_pretrained(base_model, path)`; a standalone merged model: `merge_and_export(path)`. Each is
    also a function of `lora_dist.adapters` taking the model first; both spellings run the same code.
    """

    def __init__(
        self,
        base_model: nn.Module,
        lora_config: LoRAConfig | dict[str, Any],
        merge_weights: bool = False,
        *,
        allow_rank_above_layer_size: bool = False,
    ):
        super().__init__()
        self.lora_config = LoRAConfig.from_dict(lora_config)
        self.base_model = base_model
        self.lora_layers: dict[str, LoRALayer] = {}
        # Dense base tensors an adapter file carried in full and that this model now holds (PEFT's
        # save_embedding_layers when they differ from the base, every tensor of a modules_to_save
        # module), by name in base_model; saved again with the adapter. Filled by lora_dist.adapter_files.
        self.carried_weights: set[str] = set()
        self.modules_to_save: list[str] | None = None  # PEFT's keys for those modules, if any
        self._inject(allow_rank_above_layer_size)
        self._set_trainable()
        if merge_weights:
            self.merge()

    # ------------------------------------------------------------------ construction
    def _inject(self, allow_rank_above_layer_size: bool) -> None:
        cfg = self.lora_config
        linears = [n for n, m in self.base_model.named_modules() if quant.is_supported_linear(m)]
        matched = [
            (n, m)
            for n, m in self.base_model.named_modules()
            if n and cfg.matches(n) and not isinstance(m, LoRALayer)
        ]
        if not matched:
            raise ConfigError(
                f"target_modules {cfg.target_modules!r} matched no module; "
                f"linear modules available: {_summarize(linears)}"
            )
        unsupported = [(n, type(m).__name__) for n, m in matched if not quant.is_supported_linear(m)]
        if unsupported:
            name, kind = unsupported[0]
            raise ConfigError(
                f"target_modules matched {name!r}, a {kind}, which LoRA cannot wrap (only nn.Linear, "
                f"bitsandbytes Linear8bitLt / Linear4bit); linear modules available: {_summarize(linears)}"
            )
        _check_ranks([(n, m, cfg.rank_for(n)) for n, m in matched], allow_rank_above_layer_size)
        for name, module in matched:
            layer = LoRALayer.from_base(
                module,
                rank=cfg.rank_for(name),
                alpha=cfg.alpha_for(name),
                dropout=cfg.dropout,
                use_rslora=cfg.use_rslora,
                init=cfg.init,
            )
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer)
            self.lora_layers[name] = layer

    def _set_trainable(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for p in self.get_trainable_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ parameters
    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (lora_A, lora_B of every layer) plus biases per `bias`."""
        params: list[nn.Parameter] = []
        for layer in self.lora_layers.values():
            params.extend(layer.adapter_parameters())
        params.extend(self.trainable_biases())
        return params

    def trainable_biases(self) -> list[nn.Parameter]:
        """The biases that train under `lora_config.bias` (no weight decay for these)."""
        mode = self.lora_config.bias
        if mode == "lora_only":
            modules: Iterator[nn.Module] = (layer.base_layer for layer in self.lora_layers.values())
        elif mode == "all":
            modules = self.base_model.modules()
        else:
            return []
        seen: list[nn.Parameter] = []
        for m in modules:
            bias = getattr(m, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.dtype.is_floating_point and not _contains(seen, bias):
                seen.append(bias)
        return seen

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) weights; a packed 4-bit parameter counts the weights it holds."""
        trainable = sum(p.numel() for p in self.get_trainable_parameters())
        total = sum(quant.logical_numel(p) for p in self.parameters())
        return trainable, total

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter tensors (and trained biases), keyed by their names in the base model."""
        wanted = {id(p) for p in self.get_trainable_parameters()}
        return {
            name: p.detach()
            for name, p in self.base_model.named_parameters(remove_duplicate=False)
            if id(p) in wanted
        }

    # ------------------------------------------------------------------ adapter files and export
    def save_adapter(
        self,
        path: str | os.PathLike,
        *,
        base_model_name_or_path: str | None = None,
        overwrite: bool = True,
        training: dict[str, Any] | None = None,
    ) -> Path:
        """Write the adapter to the folder `path` in the PEFT layout, durably; returns the folder.

        Args: as `lora_dist.adapter_files.save_adapter` (base_model_name_or_path defaults to the
        base's own name_or_path; overwrite=False refuses a folder that holds an adapter; training
        is a short summary for the model card).
        """
        return adapter_files.save_adapter(
            self, path, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite, training=training
        )

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Copy an adapter saved by lora_dist or PEFT into this model's LoRA layers, all or nothing."""
        adapter_files.load_adapter(self, path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike) -> LoRAModel:
        """Wrap `base_model` as an adapter folder (ours or PEFT's) describes, and load its weights.

        On any error `base_model` is left as it was (no LoRA layers, same trainable flags).
        """
        return adapter_files.wrap_and_load(cls, base_model, path)

    def merge_and_export(
        self,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.bfloat16,
        tokenizer=None,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write a standalone Hugging Face model folder with every adapter folded in; returns the folder.

        Args: as `lora_dist.export.merge_and_export` (dtype of every floating-point tensor written,
        a tokenizer saved beside it, overwrite an existing folder, bytes per safetensors shard).
        The model itself is not modified.
        """
        return export.merge_and_export(
            self, path, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite, max_shard_size=max_shard_size
        )

    # ------------------------------------------------------------------ merge state
    @property
    def merged(self) -> bool:
        return all(layer.merged for layer in self.lora_layers.values())

    def merge(self, requantize: bool = False) -> None:
        """Fold every adapter into its base (see `LoRALayer.merge_lora_weights`)."""
        for layer in self.lora_layers.values():
            layer.merge_lora_weights(requantize=requantize)

    def unmerge(self) -> None:
        """Restore every base exactly; adapters train again."""
        for layer in self.lora_layers.values():
            layer.unmerge_lora_weights()

    def merge_and_unmerge(self) -> bool:
        """Toggle all layers between merged and unmerged; returns the new state (True = merged)."""
        if self.merged:
            self.unmerge()
        else:
            self.merge()
        return self.merged

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # HF conveniences (config, generate, device, ...) read straight from the base model.
            return getattr(super().__getattr__("base_model"), name)


def _check_ranks(layers: list[tuple[str, nn.Module, int]], allow: bool) -> None:
    """Refuse (or, for an adapter file that already has them, log) ranks above min(in, out).

    B @ A of an (out, in) layer has rank at most min(in, out): a larger r adds parameters, optimizer
    state and adapter bytes but no expressive power, and alpha / r then scales the update down
    for nothing. Clamping silently would change the scaling the user asked for (and the adapter's
    shape against its config), so a new adapter is refused with the limit to use instead.
    """
    over = [(n, r, min(m.in_features, m.out_features)) for n, m, r in layers if r > min(m.in_features, m.out_features)]
    if not over:
        return
    name, rank, limit = over[0]
    others = f" (and {len(over) - 1} more layers)" if len(over) > 1 else ""
    if allow:
        logger.warning(
            "LoRA rank %d of %s exceeds min(in, out) = %d%s: the extra rank adds bytes, not capacity",
            rank, name, limit, others,
        )
        return
    raise ConfigError(
        f"LoRA rank {rank} of {name} exceeds min(in_features, out_features) = {limit}{others}: B @ A cannot "
        f"exceed that rank; set lora.rank <= {limit} (or lower it for that layer with rank_pattern)"
    )


def _contains(params: list[nn.Parameter], p: nn.Parameter) -> bool:
    return any(q is p for q in params)


def _summarize(names: list[str], limit: int = 12) -> str:
    if not names:
        return "(none: the model has no nn.Linear or bitsandbytes linear)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
