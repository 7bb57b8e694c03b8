"""LoRAConfig and LoRAModel: choose target linears, inject LoRALayers, freeze the rest, toggle merges."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from lora_dist import quant
from lora_dist.layers import LoRALayer, check_hparams

BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoRAConfig:
    """Which linears get an adapter, and how it is shaped.

    Attributes:
        rank: rank r of every adapter unless `rank_pattern` says otherwise.
        alpha: scale numerator (update scaled by alpha / r).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: module-name suffixes (["q_proj", "v_proj"]) or one regex string matched
            against full module names ("model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj").
        exclude_modules: suffixes (or one regex) of modules to leave alone even if targeted.
        rank_pattern: {name suffix or regex: rank} overrides, as in PEFT.
        alpha_pattern: {name suffix or regex: alpha} overrides, as in PEFT.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        init: "kaiming" or "gaussian" init of lora_A (lora_B always starts at zero).
        bias: which biases train: "none", "lora_only" (biases of adapted linears) or "all".
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"

    def __post_init__(self) -> None:
        check_hparams(self.rank, self.alpha, self.dropout, self.init)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        if not self.target_modules or not _is_name_spec(self.target_modules):
            raise ValueError(
                f"target_modules must be a non-empty list of module-name suffixes or a regex string, "
                f"got {self.target_modules!r}"
            )
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        if self.exclude_modules is not None and not _is_name_spec(self.exclude_modules):
            raise ValueError(
                f"exclude_modules must be a list of module-name suffixes or a regex string, "
                f"got {self.exclude_modules!r}"
            )
        if isinstance(self.target_modules, str):
            _compile(self.target_modules, "target_modules")
        if isinstance(self.exclude_modules, str):
            _compile(self.exclude_modules, "exclude_modules")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for key, value in self.rank_pattern.items():
            _compile(key, "rank_pattern key")
            check_hparams(value, self.alpha, self.dropout, self.init)
        for key, value in self.alpha_pattern.items():
            _compile(key, "alpha_pattern key")
            check_hparams(self.rank, value, self.dropout, self.init)

    @classmethod
    def from_dict(cls, values: "LoRAConfig | dict[str, Any]") -> "LoRAConfig":
        """Accept a LoRAConfig or a plain dict with the same keys (unknown keys are an error)."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, dict):
            raise TypeError(f"lora_config must be a LoRAConfig or a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LoRA config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matches(self, name: str) -> bool:
        """Whether the module called `name` is targeted (and not excluded)."""
        if not _name_matches(name, self.target_modules):
            return False
        return self.exclude_modules is None or not _name_matches(name, self.exclude_modules)

    def rank_for(self, name: str) -> int:
        return _pattern_value(name, self.rank_pattern, self.rank)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(name, self.alpha_pattern, self.alpha)


def _is_name_spec(spec: object) -> bool:
    return isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(s, str) and s for s in spec))


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} is not a valid regex ({err}): {pattern!r}") from None


def _name_matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _pattern_value(name: str, patterns: dict, default):
    # PEFT's rule: a key matches a module whose full name ends with it (keys may be regexes).
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


class LoRAModel(nn.Module):
    """Any `nn.Module` (a Hugging Face causal LM above all) with LoRA on the configured linears.

    Args:
        base_model: the model to adapt; its targeted linears are replaced in place.
        lora_config: a `LoRAConfig` or a dict with its keys.
        merge_weights: start merged (for inference).

    Attributes:
        base_model: the wrapped model (forward passes straight through to it).
        lora_config: the validated `LoRAConfig`.
        lora_layers: {full module name: LoRALayer}.
    """

    def __init__(
        self,
        base_model: nn.Module,
        lora_config: LoRAConfig | dict[str, Any],
        merge_weights: bool = False,
    ):
        super().__init__()
        self.lora_config = LoRAConfig.from_dict(lora_config)
        self.base_model = base_model
        self.lora_layers: dict[str, LoRALayer] = {}
        self._inject()
        self._set_trainable()
        if merge_weights:
            self.merge()

    # ------------------------------------------------------------------ construction
    def _inject(self) -> None:
        cfg = self.lora_config
        linears = [n for n, m in self.base_model.named_modules() if quant.is_supported_linear(m)]
        matched = [
            (n, m)
            for n, m in self.base_model.named_modules()
            if n and cfg.matches(n) and not isinstance(m, LoRALayer)
        ]
        if not matched:
            raise ValueError(
                f"target_modules {cfg.target_modules!r} matched no module; "
                f"linear modules available: {_summarize(linears)}"
            )
        unsupported = [(n, type(m).__name__) for n, m in matched if not quant.is_supported_linear(m)]
        if unsupported:
            name, kind = unsupported[0]
            raise TypeError(
                f"target_modules matched {name!r}, a {kind}, which LoRA cannot wrap (only nn.Linear, "
                f"bitsandbytes Linear8bitLt / Linear4bit); linear modules available: {_summarize(linears)}"
            )
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

    # ------------------------------------------------------------------ adapter files
    def save_adapter(self, path, **kwargs):
        """Write the adapter in the PEFT layout; see `lora_dist.adapters.save_adapter`."""
        from lora_dist import adapters  # adapters imports this module

        return adapters.save_adapter(self, path, **kwargs)

    def load_adapter(self, path) -> None:
        """Load an adapter (ours or PEFT's), all or nothing; see `lora_dist.adapters.load_adapter`."""
        from lora_dist import adapters

        adapters.load_adapter(self, path)

    def merge_and_export(self, path, **kwargs):
        """Write a standalone merged Hugging Face model folder; see `lora_dist.adapters.merge_and_export`."""
        from lora_dist import adapters

        return adapters.merge_and_export(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path) -> "LoRAModel":
        """Wrap `base_model` as an adapter folder describes and load it; see `lora_dist.adapters`."""
        from lora_dist import adapters

        return adapters.from_pretrained(base_model, path)

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


def _contains(params: list[nn.Parameter], p: nn.Parameter) -> bool:
    return any(q is p for q in params)


def _summarize(names: list[str], limit: int = 12) -> str:
    if not names:
        return "(none: the model has no nn.Linear or bitsandbytes linear)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
