"""Low-rank adaptation (LoRA) of linear layers, loralib convention: a frozen base ``y = x W^T + b``
plus a trainable update ``(x A^T B^T) * alpha / r`` with ``A`` [r, in] Kaiming-uniform and ``B``
[out, r] zero, so a freshly adapted layer computes exactly what its base did."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

LORA_PARAMETER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update. It reuses the base layer's ``weight`` and ``bias``
    parameters under the same names, so a model's state-dict keys only gain ``lora_A`` and
    ``lora_B`` when a layer is adapted (pretrained weights load the same way before and after).

    Input [..., in_features] -> output [..., out_features]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """``A`` as loralib initialises it (Kaiming-uniform, a = sqrt(5)), ``B`` zero: the update
        starts at exactly zero while ``A`` already carries gradient signal once ``B`` moves."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}"
        )


def apply_lora(model: nn.Module, module_names: Iterable[str], rank: int, alpha: float) -> None:
    """Replace each named ``nn.Linear`` submodule of ``model`` (dotted names as in
    ``named_modules``) by a :class:`LoRALinear` around it. Requires-grad flags are left alone:
    :func:`mark_only_lora_trainable` decides what trains."""
    for name in module_names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA needs an nn.Linear at {name!r}, found {type(base).__name__}")
        setattr(parent, child_name, LoRALinear(base, rank, alpha))


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the LoRA factors."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.rpartition(".")[2] in LORA_PARAMETER_NAMES)
