"""Every closed set of choices the tool accepts, written once: the config types, the checks, the dtypes.

`config.py` validates each `Literal` below once, when a section is built; library functions that take
the same choice as an argument check it with `check_choice`, against the same tuple. Imports no torch:
the CLI and the config reader load it before anything heavy.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Dtype = Literal["fp32", "bf16", "fp16"]
Bits = Literal[4, 8]  # None (a dense base) is spelled `Bits | None` where it is allowed
QuantType = Literal["nf4", "fp4"]
Schedule = Literal["cosine", "linear", "constant"]
NanPolicy = Literal["skip", "stop"]
Engine = Literal["auto", "deepspeed", "none"]
FusedKernels = Literal["auto", "on", "off"]
Fp8Base = Literal["off", "backward", "all"]
WandbMode = Literal["online", "offline", "disabled"]
ZeroStage = Literal[0, 1, 2, 3]

DTYPES: tuple[str, ...] = get_args(Dtype)
BITS: tuple[int, ...] = get_args(Bits)
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
ZERO_STAGES: tuple[int, ...] = get_args(ZeroStage)

_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a `Dtype` name ("bf16" -> torch.bfloat16); the one table of them."""
    import torch

    check_choice("dtype", name, DTYPES)
    return getattr(torch, _TORCH_DTYPE_NAMES[name])


def check_choice(what: str, value: Any, choices: tuple[Any, ...], *, none_ok: bool = False) -> None:
    """Raise ValueError naming `what`, the value and the choices unless `value` is one of them.

    bool is refused where ints are expected (`True == 1` in Python).
    """
    if value is None and none_ok:
        return
    if isinstance(value, bool) or value not in choices:
        allowed = ", ".join(map(str, choices)) + (" or None" if none_ok else "")
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
