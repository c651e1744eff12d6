"""Parameter-efficient fine-tuning of the backbones (`train.peft`): LoRA adapters, or Effort's split of each weight
into a frozen principal part and a trainable residual.

Both act on the backbones' pointwise layers (1x1 convolutions with groups 1, and Linear layers in transformer
backbones), which hold 93% of EfficientNet-Lite0/2's weights; everything else in a backbone (depthwise convolutions,
biases, BatchNorm) stays as loaded, and the head trains in full. What trains has ``rank`` components per layer:

- ``lora`` (Hu et al. 2021): the weight W (frozen) becomes W + B A, A (rank x in) and B (out x rank) trained; B
  starts at zero, so training starts from the loaded model.
- ``svd`` (Effort, Yan et al. 2024): W = U S V^T is split into its top singular components (frozen: what
  pretraining learned) and the residual of its ``rank`` smallest ones, whose factors U_r, S_r, V_r^T train.
  Effort's orthogonality and singular-value constraints on those factors are not applied.

Written here on `torch.nn.utils.parametrize` (~100 lines) rather than taken from Hugging Face's peft: peft has no
Effort-style split (its PiSSA init trains the principal part and freezes the residual, the opposite), reaches timm's
convolutions only by module-name patterns, and would bring transformers and accelerate along. A parametrization
changes only how a layer's weight is computed, so every layer keeps its own forward (timm's and
efficientnet-pytorch's "same" padding), the adapters sit in the state dict under the layer
(``<layer>.parametrizations.weight.original`` is the frozen part, ``...weight.0.*`` the trainable one), and `merge`
turns the weight back into one plain tensor for inference: scoring then costs what it costs without PEFT.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..manifests.errors import InputError

METHODS = ("none", "lora", "svd")


class LoRA(nn.Module):
    """weight = frozen + B A (flattened to out x in)."""

    def __init__(self, weight: torch.Tensor, rank: int, init: bool):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        self.a = nn.Parameter(torch.empty(rank, fan_in, device=weight.device))
        self.b = nn.Parameter(torch.zeros(out, rank, device=weight.device))
        if init:  # A as nn.Linear initialises its weight, as the LoRA paper and HF peft do
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        return frozen + (self.b @ self.a).view_as(frozen)


class SVDResidual(nn.Module):
    """weight = principal (frozen) + U_r diag(S_r) V_r^T, initialised with W's ``rank`` smallest components."""

    def __init__(self, weight: torch.Tensor, rank: int, init: bool):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        if init:
            # fp32: ~3.5x faster than fp64 (Lite2 + Lite0's 74 layers: 4 s against 14 s on an AMD EPYC, 2 cores;
            # 10-23 s for the whole apply under load 6), and the frozen part is W less the residual, so the sum is
            # W to rounding however exactly the components came out
            u, s, vh = torch.linalg.svd(weight.detach().flatten(1).float(), full_matrices=False)
            u, s, vh = (t.to(weight.dtype) for t in (u[:, -rank:], s[-rank:], vh[-rank:]))
        else:  # shapes only: a checkpoint's values replace them
            u, s, vh = (torch.empty(shape, device=weight.device) for shape in ((out, rank), (rank,), (rank, fan_in)))
        self.u, self.s, self.vh = nn.Parameter(u), nn.Parameter(s), nn.Parameter(vh)

    def residual(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh

    def forward(self, principal: torch.Tensor) -> torch.Tensor:
        return principal + self.residual().view_as(principal)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """What is stored as the frozen part: W less the initial residual, so the sum is W again (to rounding)."""
        return weight - self.residual().view_as(weight)


ADAPTERS = {"lora": LoRA, "svd": SVDResidual}


def targets(backbone: nn.Module) -> Iterator[nn.Module]:
    for module in backbone.modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                             and module.kernel_size == (1, 1)):
            yield module


def apply(model: nn.Module, method: str, rank: int, *, init: bool = True) -> None:
    """Adapters on both backbones of a DualStreamNet, recorded as ``model.peft`` (what its checkpoint stores to
    rebuild it). Every backbone tensor but the adapters stops training. ``init=False`` only gives the adapters their
    shapes (a model built on the meta device for a checkpoint's weights)."""
    if method not in ADAPTERS:
        raise InputError(f"train.peft: '{method}' is none of {', '.join(METHODS)}")
    for backbone in (model.hq.backbone, model.lq.backbone):
        layers = list(targets(backbone))
        if not layers:
            raise InputError(f"train.peft: backbone {backbone.name} has no pointwise layer to adapt")
        backbone.requires_grad_(False)
        for layer in layers:
            if rank > min(layer.weight.shape[0], layer.weight[0].numel()):
                raise InputError(f"train.peft_rank: {rank} exceeds the rank of a {tuple(layer.weight.shape)} "
                                 f"weight of backbone {backbone.name}")
            parametrize.register_parametrization(layer, "weight", ADAPTERS[method](layer.weight, rank, init))
    model.peft = {"method": method, "rank": rank}


def trainable(backbone: nn.Module) -> Iterator[nn.Parameter]:
    """The adapters' parameters (what trains under PEFT)."""
    for module in backbone.modules():
        if isinstance(module, tuple(ADAPTERS.values())):
            yield from module.parameters()


def merge(backbone: nn.Module) -> None:
    """Each adapted weight becomes the plain tensor it computes: the layer as it was, with the trained weight."""
    for module in list(backbone.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def count(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, for the run's log and run.json."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
