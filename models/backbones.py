"""Per-frame feature extractors for the two streams.

A backbone returns its last feature map un-pooled, because the ConvLSTM that follows needs the spatial grid.
Weights only ever come from this machine (a file, or ImageNet weights found by `pretrained`): nothing here may
touch the network (training machines are offline and a silent download would make runs irreproducible).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dfpipe.models.pretrained import IMAGENET, fit_to, require_imagenet

from ..manifests.errors import InputError

log = logging.getLogger(__name__)

EFFICIENTNET_PYTORCH = tuple(f"efficientnet-b{i}" for i in range(8))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Wraps a network so every family answers the same way: (N,3,H,W) -> (N,out_channels,h,w).

    ``head_keys`` name the classifier tensors a published checkpoint carries and this backbone does not have;
    ``mean``/``std`` are the input normalisation the weights were trained with.
    """

    def __init__(self, name: str, net: nn.Module, out_channels: int, head_keys: tuple[str, ...],
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.name = name
        self.net = net
        self.out_channels = out_channels
        self.head_keys = head_keys
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.weights = "random"  # or "imagenet: <file> (<where found>)", "file: <path>"

    def for_inference(self) -> None:
        """Families without a known conv -> BatchNorm layout are left as they are."""


class EfficientNetPytorchBackbone(Backbone):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def for_inference(self) -> None:
        """Inference only: each BatchNorm becomes part of the convolution before it (same outputs, one pass over
        the activations fewer per layer), and every Swish, which then always follows a convolution, overwrites that
        convolution's output instead of allocating its own (fresh memory costs page faults: measured ~3x slower than
        the in-place activation at B4's 112x112 stage). The module then no longer trains or loads a checkpoint."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, norm in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
            setattr(owner, norm, nn.Identity())
        for module in net.modules():
            if hasattr(module, "_swish"):
                module._swish = nn.SiLU(inplace=True)


class TimmBackbone(Backbone):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net.forward_features(x)
        if y.ndim == 3:
            return self._tokens_to_grid(y, x.shape[-2], x.shape[-1])
        if getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            # A permuted NHWC tensor is already an NCHW tensor in channels_last layout: no copy needed.
            return y.permute(0, 3, 1, 2)
        return y

    def _tokens_to_grid(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patches = tokens[:, getattr(self.net, "num_prefix_tokens", 0):]
        n = patches.shape[1]
        rows = max(1, round(math.sqrt(n * height / width)))
        cols = n // rows
        if rows * cols != n:
            raise InputError(f"backbone {self.name}: {n} patch tokens do not form a grid for a {height}x{width} input")
        return patches.reshape(patches.shape[0], rows, cols, patches.shape[2]).permute(0, 3, 1, 2)


def _efficientnet_pytorch(name: str) -> Backbone:
    # image_size=None selects dynamic "same" padding, which is correct at any input size; the static default
    # pads for the architecture's native resolution (380 px for B4), not for the 224/112 px crops used here.
    net = EfficientNet.from_name(name, include_top=False, image_size=None)
    # Its Swish is x * sigmoid(x) as a custom autograd function: three kernels and an fp32 round trip under
    # autocast. nn.SiLU is the same function as one native kernel (measured: ~1.5x faster B4 inference on CPU).
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.SiLU()
        # "Same" padding of a stride-1 convolution is symmetric at every input size: the convolution's own padding
        # does it without the extra copy of the input that efficientnet-pytorch's F.pad makes per call.
        for child, conv in module.named_children():
            if isinstance(conv, Conv2dDynamicSamePadding) and tuple(conv.stride) == (1, 1):
                setattr(module, child, _padded_conv(conv))
    return EfficientNetPytorchBackbone(name, net, net._conv_head.out_channels, ("_fc",), IMAGENET_MEAN, IMAGENET_STD)


def _padded_conv(conv: nn.Conv2d) -> nn.Conv2d:
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0 or tuple(conv.dilation) != (1, 1):
        return conv
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=(kh // 2, kw // 2),
                      groups=conv.groups, bias=conv.bias is not None)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


def is_backbone(name: str) -> bool:
    import timm  # here, not at the top: its import costs ~180 MB of memory that efficientnet-bN runs never need
    return name in EFFICIENTNET_PYTORCH or timm.is_model(name)


def _timm(name: str) -> Backbone:
    import timm
    if not is_backbone(name):
        raise InputError(f"unknown backbone '{name}': neither efficientnet-b0..b7 nor a timm model name")
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    cfg = net.pretrained_cfg
    classifier = cfg.get("classifier") or ()
    head_keys = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return TimmBackbone(name, net, net.num_features, head_keys,
                        cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weight file not found")
    try:
        # timm's reader: .safetensors, or torch.load(weights_only=True); unwraps 'state_dict'/'model' and 'module.'.
        from timm.models import load_state_dict
        return load_state_dict(str(path))
    except Exception as e:  # any unreadable file (pickle, zip, safetensors header) gets the same one-line report
        with open(path, "rb") as f:
            head = f.read(4)
        if path.suffix != ".safetensors" and head[:2] != b"PK" and head[:1] != b"\x80":  # zip or pickle: torch.save
            raise InputError(f"{path}: not a weight file (expected what torch.save writes, or .safetensors)") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot read weights ({reason})") from None


def load_weights(backbone: Backbone, path: str | Path) -> None:
    """Loads a local checkpoint strictly, ignoring only its classifier (see `pretrained.fit_to` for files of
    another implementation of the same network).

    Strict on purpose: timm's own file loading (``pretrained_cfg_overlay=dict(file=...)``) turns strict off when the
    classifier is dropped, so a checkpoint of the wrong architecture would leave the backbone silently random.
    """
    path = Path(path)
    state = fit_to(_read_state_dict(path), backbone.net.state_dict(), backbone.head_keys, path, backbone.name)
    backbone.net.load_state_dict(state, strict=True)


def build_backbone(name: str, *, pretrained: str | Path | None, setting: str = "pretrained") -> Backbone:
    """``efficientnet-bN`` names use efficientnet-pytorch, any other name a timm model; ``pretrained`` is
    ``imagenet`` (found on this machine, see `pretrained`), a local weight file, or None for random init.
    ``backbone.weights`` says which, for the run's record."""
    backbone = _efficientnet_pytorch(name) if name in EFFICIENTNET_PYTORCH else _timm(name)
    if pretrained is None:
        log.warning("backbone %s is randomly initialised (no pretrained weights given)", name)
        backbone.weights = "random"
    elif str(pretrained) == IMAGENET:
        source = require_imagenet(name, setting)
        load_weights(backbone, source.path)
        backbone.weights = f"imagenet: {source.describe()}"
    else:
        load_weights(backbone, pretrained)
        backbone.weights = f"file: {Path(pretrained)}"
    return backbone
