"""Optimizer state as data: a torch optimizer's state as named tensors (safetensors) and JSON, and back.

Shared by checkpoint.py (single process) and distributed.py (DeepSpeed's stage-0 optimizer is a torch
one); parameters are named by their path in the base model, so a state written by one layout of
param groups (or one world size) reads into another.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_dist.errors import CheckpointError
from lora_dist.model import LoRAModel


def trainable_names(model: LoRAModel) -> dict[int, str]:
    """{id(parameter): its name in the base model} for every trainable parameter, in training order."""
    names = {id(p): n for n, p in model.base_model.named_parameters(remove_duplicate=False)}
    return {id(p): names[id(p)] for p in model.get_trainable_parameters()}


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    return value


def torch_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors, JSON) of a torch optimizer that holds the trainable parameters themselves.

    Tensors: "<name>::fp32" (the parameter, as fp32) and "<name>::<key>" for every tensor of its state.
    JSON: the param groups' hyper-parameters (with parameter names instead of indices) and non-tensor state.
    """
    tensors, scalars, groups = {}, {}, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter the model does not train; build it with LoRAOptimizer")
            name = names[id(p)]
            tensors[f"{name}::fp32"] = p.detach().float()
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{name}::{key}"] = value.detach()
                else:
                    scalars.setdefault(name, {})[key] = _json_value(value)
        groups.append({**{k: _json_value(v) for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
    return tensors, {"param_groups": groups, "scalars": scalars}


def set_torch_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict) -> None:
    """Put the state of `torch_optimizer_state` back (parameter values included)."""
    index, state = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
    saved_groups = meta["param_groups"]
    mine = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in saved_groups] != mine:
        raise CheckpointError("the checkpoint's optimizer holds other parameters than this model trains")
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.copy_(tensors[f"{names[id(p)]}::fp32"])
    for name, i in index.items():
        entry = {key.split("::", 1)[1]: t for key, t in tensors.items() if key.startswith(name + "::")}
        entry.pop("fp32", None)
        entry.update(meta["scalars"].get(name, {}))
        if entry:
            state[i] = entry
    groups = []
    for saved, group in zip(saved_groups, optimizer.param_groups):
        restored = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()}
        restored["params"] = [index[n] for n in saved["params"]]
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def to_torch_layout(meta: dict, names: dict[int, str], tensors: dict[str, torch.Tensor]) -> None:
    """Turn DeepSpeed's layout (one step per group) into torch's (one per parameter), in place."""
    scalars = {}
    for i, group in enumerate(meta["param_groups"]):
        for key, value in meta["groups"][i].items():
            for name in group["params"]:
                if f"group{i}::{key}" in tensors:
                    tensors[f"{name}::{key}"] = tensors[f"group{i}::{key}"].clone()
                else:
                    scalars.setdefault(name, {})[key] = value
    meta["scalars"] = scalars
