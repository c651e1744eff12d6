"""The optimiser, the learning-rate schedule and the loss of a training run, from the config's `train:` section."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from ..models.dual_stream import DualStreamNet
from .train_data import TrainError


def make_optimizer(model: DualStreamNet, *, lr_backbone: float, lr_head: float, weight_decay: float,
                   **_) -> torch.optim.AdamW:
    """Pretrained backbones need a smaller step than the freshly initialised ConvLSTM and head."""
    groups = [{"params": list(model.backbone_parameters()), "lr": lr_backbone},
              {"params": list(model.head_parameters()), "lr": lr_head}]
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def make_scheduler(optimizer, updates_per_epoch: int, *, scheduler: str, epochs: int, plateau_factor: float,
                   plateau_patience: int, warmup_epochs: int, **_):
    """(scheduler, stepped after every optimiser update?). plateau steps once per epoch on the val loss."""
    total = epochs * updates_per_epoch
    if scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, factor=plateau_factor, patience=plateau_patience), False
    if scheduler == "cosine":
        warmup = warmup_epochs * updates_per_epoch

        def factor(step: int) -> float:
            """Linear up to 1 at the last warmup update, then a half cosine that never reaches 0 (no wasted step)."""
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step + 1 - warmup) / (total + 1 - warmup)))
        return LambdaLR(optimizer, factor), True
    if scheduler == "onecycle":
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total), True
    raise TrainError(f"train.scheduler: '{scheduler}' is none of plateau, cosine, onecycle")


def soft_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The focal loss as Generalized Focal Loss (Li et al. 2020) writes it for soft targets: BCE x |y - p|^gamma.
    For 0/1 labels that is torchvision's sigmoid_focal_loss without class weights (|y - p| = 1 - p_t); for a mixed
    clip's target (dataset.augment mixup, cutmix) it is smallest where p is the target, which (1 - p_t)^gamma is
    not (it pulls p below a target of 0.3)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * (targets - torch.sigmoid(logits)).abs() ** gamma).mean()


def make_criterion(*, loss: str, label_smoothing: float, focal_gamma: float, **_):
    """The training loss on (logits, float targets): 0 or 1, or a mixed clip's share of fake pixels, which every
    loss here is smallest at (smoothed for `smooth`). Validation always uses plain BCE, so runs trained with
    different losses are selected and compared on the same number (the log loss of the DFDC metric)."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits
    if loss == "smooth":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y * (1 - label_smoothing) + label_smoothing / 2)
    if loss == "focal":
        # no class weighting (torchvision's alpha): the balanced sampler already evens out the classes
        return lambda z, y: soft_focal_loss(z, y, focal_gamma)
    raise TrainError(f"train.loss: '{loss}' is none of bce, focal, smooth")
