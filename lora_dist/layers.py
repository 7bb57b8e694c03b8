"""LoRALayer: a frozen base linear (dense, 8-bit or 4-bit) plus a trainable low-rank update.

    y = base(x) + scaling * lora_B(lora_A(dropout(x)))        scaling = alpha / rank
                                                              (alpha / sqrt(rank) with rsLoRA)

The base is wrapped, never subclassed, so one class serves `nn.Linear` and every bitsandbytes
linear alike; state-dict keys read `<name>.base_layer.weight`, `<name>.lora_A.weight`,
`<name>.lora_B.weight`, the PEFT layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist import kernels, quant

INITS = ("kaiming", "gaussian")


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_hparams(rank: int, alpha: float, dropout: float, init: str) -> None:
    """Raise a one-line ValueError naming the first bad LoRA hyperparameter."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; typical values are 8, 16, 64")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}; a common choice is 2 * rank")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class LoRALayer(nn.Module):
    """A frozen base linear plus `scaling * lora_B(lora_A(dropout(x)))`.

    Build one over a new dense base with `LoRALayer(in_features, out_features, ...)`, or wrap an
    existing `nn.Linear` / bitsandbytes `Linear8bitLt` / `Linear4bit` with `LoRALayer.from_base`.

    Args:
        in_features: input width of the base.
        out_features: output width of the base.
        rank: rank r of the update (>= 1).
        alpha: scale numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the adapter input only, in [0, 1).
        merge_weights: merge the update into the base at construction.
        bias: whether the dense base made by this constructor has a bias.
        use_rslora: rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski, 2023).
        init: "kaiming" (A Kaiming-uniform as nn.Linear, B zeros) or "gaussian" (A normal, std 1/r).
        dtype: dtype of lora_A / lora_B; default float32 whatever the base, because AdamW updates of
            about lr * 1 are below bf16's resolution near 1 (the forward casts to the input dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        merge_weights: bool = False,
        bias: bool = True,
        *,
        use_rslora: bool = False,
        init: str = "kaiming",
        dtype: torch.dtype | None = None,
        base: nn.Linear | None = None,
    ):
        super().__init__()
        check_hparams(rank, alpha, dropout, init)
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        elif not quant.is_supported_linear(base):
            raise TypeError(
                f"LoRALayer wraps torch.nn.Linear, bitsandbytes Linear8bitLt or Linear4bit; "
                f"got {type(base).__name__}"
            )
        elif (base.in_features, base.out_features) != (in_features, out_features):
            raise ValueError(
                f"base is {base.in_features}->{base.out_features} but the layer was asked for "
                f"{in_features}->{out_features}; pass the base's own sizes"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.merge_weights = merge_weights
        self.merged = False

        self.base_layer = base
        quant.keep_portable_layout(base)
        for p in base.parameters():
            p.requires_grad_(False)
        dtype = dtype or torch.float32
        device = base.weight.device
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init)

        # Merge state: a dense base is folded in place (original kept for an exact unmerge);
        # a quantized base is left untouched and a dense merged weight is used instead, or, with
        # requantize=True, re-quantized in place with the original bytes kept aside.
        self._dense_backup: torch.Tensor | None = None
        self._quant_backup: quant.QuantSnapshot | None = None
        self.merged_weight: torch.Tensor | None = None
        if merge_weights:
            self.merge_lora_weights()

    @classmethod
    def from_base(
        cls,
        base: nn.Linear,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        merge_weights: bool = False,
        **kwargs,
    ) -> LoRALayer:
        """Wrap an existing linear (dense or bitsandbytes) without copying or dequantizing it."""
        if not quant.is_supported_linear(base):
            raise TypeError(
                f"LoRALayer.from_base needs torch.nn.Linear, bitsandbytes Linear8bitLt or Linear4bit; "
                f"got {type(base).__name__}"
            )
        in_features = kwargs.pop("in_features", base.in_features)
        out_features = kwargs.pop("out_features", base.out_features)
        return cls(in_features, out_features, rank, alpha, dropout, merge_weights, base=base, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A random, B zeros: the layer starts out computing exactly its base."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters this layer trains (lora_A, lora_B)."""
        return [self.lora_A.weight, self.lora_B.weight]

    @property
    def bits(self) -> int | None:
        """4 or 8 for a bitsandbytes base, None for a dense one."""
        return quant.bits_of(self.base_layer)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update scaling * B @ A as a dense (out_features, in_features) tensor."""
        a = self.lora_A.weight.to(dtype)
        b = self.lora_B.weight.to(dtype)
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    "LoRALayer is merged: gradients would not reach lora_A/lora_B. "
                    "Call unmerge_lora_weights() (or LoRAModel.unmerge()) before training"
                )
            if self.merged_weight is not None:
                w = self.merged_weight
                bias = self.base_layer.bias
                bias = None if bias is None else bias.to(w.dtype)
                return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
            return self.base_layer(x)
        if x.is_cuda and self.bits == 4 and torch.is_grad_enabled() and kernels.supports_fast_path(self):
            # Training on a 4-bit base: one autograd function that saves only x and x @ A.T and
            # dequantizes the base again in backward (see kernels.py for the numerics).
            return kernels.lora_linear(x, self)
        result = self.base_layer(x)
        adapter_dtype = self.lora_A.weight.dtype
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(adapter_dtype))))  # (..., out)
        return result + (update * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge_lora_weights(self, requantize: bool = False) -> None:
        """Fold the update into the base so the forward is one matmul with no adapter work.

        Dense base: W += delta in place (the original W is kept for an exact unmerge).
        Quantized base, requantize=False: the base stays packed and untouched; the layer computes
        with a dense dequantize(W) + delta in the base's compute dtype (fp32 when it has none).
        Quantized base, requantize=True: dequantize(W) + delta is quantized back into the base with
        its own settings, so memory stays 4/8-bit; this adds one quantization error on top of the
        base's own (see the README's tolerance table). The original bytes are kept for unmerge.
        """
        if self.merged:
            return
        delta = self.delta_weight(torch.float32)
        base = self.base_layer
        if self.bits is None:
            self._dense_backup = base.weight.detach().clone()
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        elif requantize:
            self._quant_backup = quant.requantize_(base, quant.dequantize_weight(base) + delta)
        else:
            merged = quant.dequantize_weight(base) + delta
            # the dtype the base computes in (bf16 for a bf16 QLoRA): fp32 would cost 8x the packed bytes
            self.merged_weight = merged.to(getattr(base, "compute_dtype", None) or torch.float32)
        self.merged = True

    @torch.no_grad()
    def unmerge_lora_weights(self) -> None:
        """Restore the base exactly as it was before the merge (bit for bit, also when packed)."""
        if not self.merged:
            return
        if self._dense_backup is not None:
            self.base_layer.weight.copy_(self._dense_backup)
            self._dense_backup = None
        if self._quant_backup is not None:
            quant.restore_(self.base_layer, self._quant_backup)
            self._quant_backup = None
        self.merged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, bits={self.bits}, merged={self.merged}"
        )
