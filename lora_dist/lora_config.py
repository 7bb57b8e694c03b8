"""LoRAConfig: which linears of a model get an adapter, and how each adapter is shaped and scaled.

Pure configuration (validated when built, name matching by PEFT's rules): LoRAModel builds from it,
and adapter files translate it to and from PEFT's LoraConfig.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from lora_dist.layers import check_hparams

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
        rank_pattern: {key: rank} overrides with PEFT's rule: the first key (in dict order) for
            which `(.*\\.)?(KEY)$` matches the full module name wins; a key is a name suffix or a
            regex ("q_proj", "layers\\.0\\.self_attn\\.q_proj", "q_proj|v_proj").
        alpha_pattern: {key: alpha} overrides, matched like `rank_pattern`.
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
            _check_pattern_key(key, "rank_pattern")
            check_hparams(value, self.alpha, self.dropout, self.init)
        for key, value in self.alpha_pattern.items():
            _check_pattern_key(key, "alpha_pattern")
            check_hparams(self.rank, value, self.dropout, self.init)

    @classmethod
    def from_dict(cls, values: LoRAConfig | dict[str, Any]) -> LoRAConfig:
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


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _check_pattern_key(key: object, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} keys must be non-empty module-name suffixes or regexes, got {key!r}")
    try:
        re.compile(_pattern_regex(key))
    except re.error as err:
        raise ValueError(f"{what} key {key!r} is not a valid regex ({err})") from None


def _pattern_value(name: str, patterns: dict, default):
    r"""The value of the first key of `patterns` that names module `name`, else `default`.

    PEFT's rule (`peft.utils.other.get_pattern_key`, 0.21), kept to the letter so an adapter means
    the same thing in both: keys are tried in the dict's order (a saved adapter_config.json keeps
    it) and a key matches when `re.match(r"(.*\.)?(KEY)$", name)` does. The group around KEY makes
    an alternation (`q_proj|v_proj`) bind to the whole name suffix, not only its first branch.
    """
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), name):
            return value
    return patterns.get(name, default)  # PEFT looks the name itself up when no key matched
