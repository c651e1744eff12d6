"""The optimiser, the learning-rate schedule and the loss of a training run, from the config's `train:` section."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau
from torchvision.ops import sigmoid_focal_loss

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


def make_criterion(*, loss: str, label_smoothing: float, focal_gamma: float, **_):
    """The training loss on (logits, float labels). Validation always uses plain BCE, so runs trained with
    different losses are selected and compared on the same number (the log loss of the DFDC metric)."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits
    if loss == "smooth":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y * (1 - label_smoothing) + label_smoothing / 2)
    if loss == "focal":
        # alpha=-1: no class weighting, the balanced sampler already evens out the classes.
        return lambda z, y: sigmoid_focal_loss(z, y, alpha=-1, gamma=focal_gamma, reduction="mean")
    raise TrainError(f"train.loss: '{loss}' is none of bce, focal, smooth")
