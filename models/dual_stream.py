"""The detector: a high-resolution and a low-resolution stream over the same face clip, fused by attention.

The HQ stream sees fine blending artefacts; the LQ stream sees coarse, compression-robust cues. Which one to trust
differs per clip (a c40 video has few fine artefacts left), hence learned per-sample weights instead of a concat.
"""
from __future__ import annotations

from itertools import chain
from typing import Iterator, Mapping

import torch
from torch import nn

from dfpipe.models import peft
from dfpipe.models.backbones import Backbone, build_backbone
from dfpipe.models.convlstm import ConvLSTM

from ..manifests.errors import InputError


class Stream(nn.Module):
    """Backbone on every frame, ConvLSTM over time, global average pool: (B,T,3,H,W) in [0,1] -> (B, filters[-1]).

    ``bottleneck`` C puts a 1x1 convolution to C channels between them: an EfficientNet's last map has 1280-1792
    channels, and the ConvLSTM's first 3x3 gates over all of them cost more than the whole backbone (~0.7 GMAC per
    224 px frame against Lite2's ~0.4), for features a linear projection keeps."""

    def __init__(self, backbone: Backbone, filters: list[int], kernel_size: int, channels_last: bool,
                 bottleneck: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.bottleneck = nn.Conv2d(backbone.out_channels, bottleneck, 1) if bottleneck else nn.Identity()
        self.temporal = ConvLSTM(bottleneck or backbone.out_channels, filters, kernel_size)
        self.set_normalisation()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # the ConvLSTM too: a weight in the other layout is copied per call

    def set_normalisation(self) -> None:
        """Normalising here (and nowhere in the data pipeline) ties it to the weights it belongs to. Not saved with
        them (the backbone defines it), so a model built on the meta device and given a checkpoint's tensors calls
        this again."""
        self.register_buffer("mean", torch.tensor(self.backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.backbone.std).view(1, 3, 1, 1), persistent=False)

    frames_per_call: int | None = None  # in eval mode, the backbone sees this many frames of each clip at a time

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Training runs the backbone over all frames at once (its BatchNorm statistics are over all of them); in
        eval mode ``frames_per_call`` splits the clips along time, so that fewer frames' activations are alive at
        once (set for the CPU export, see stages/onnx_model.py; same outputs)."""
        step = self.frames_per_call if self.frames_per_call and not self.training else clips.shape[1]
        parts = [self._features(part) for part in clips.split(step, dim=1)]
        return self.temporal(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).mean(dim=(2, 3))

    def _features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B,t,3,H,W) -> (B,t,C,h,w). The batch size as -1 so that the ONNX export takes any (see ConvLSTMCell)."""
        frames = ((clips.flatten(0, 1) - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        return self.bottleneck(self.backbone(frames)).unflatten(0, (-1, clips.shape[1]))


class AttentionFusion(nn.Module):
    """Projects both streams to one size and returns their softmax-weighted sum plus the (B,2) weights."""

    def __init__(self, hq_features: int, lq_features: int, dim: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Sequential(nn.Linear(n, dim), nn.ReLU()) for n in (hq_features, lq_features))
        self.score = nn.Linear(dim, 1)

    def forward(self, hq: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        streams = torch.stack([self.project[0](hq), self.project[1](lq)], dim=1)
        weights = self.score(streams).squeeze(-1).softmax(dim=1)
        return (weights.unsqueeze(-1) * streams).sum(dim=1), weights


def classifier_head(mlp: list[int], dropout: list[float]) -> nn.Sequential:
    """mlp[0] -> mlp[1] -> ... -> 1, with dropout[i] after hidden layer i."""
    if len(dropout) != len(mlp) - 1:
        raise InputError(f"model.dropout needs {len(mlp) - 1} values (one per hidden layer of model.mlp), "
                         f"got {dropout}")
    layers: list[nn.Module] = []
    for size_in, size_out, p in zip(mlp, mlp[1:], dropout):
        layers += [nn.Linear(size_in, size_out), nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers, nn.Linear(mlp[-1], 1))


def _check_clips(name: str, clips: torch.Tensor) -> None:
    if clips.ndim != 5 or clips.shape[2] != 3 or not clips.is_floating_point():
        raise ValueError(f"{name} clips must be float (B,T,3,H,W), got {clips.dtype} {tuple(clips.shape)}")


class DualStreamNet(nn.Module):
    def __init__(self, *, hq_backbone: str, lq_backbone: str, convlstm_filters: list[int], convlstm_kernel: int,
                 mlp: list[int], dropout: list[float], pretrained_hq: str | None, pretrained_lq: str | None,
                 channels_last: bool, bottleneck: int | None = None):
        """``bottleneck`` defaults to none: the shape of checkpoints written before it existed."""
        super().__init__()
        self.hq = Stream(build_backbone(hq_backbone, pretrained=pretrained_hq, setting="model.pretrained_hq"),
                         convlstm_filters, convlstm_kernel, channels_last, bottleneck)
        self.lq = Stream(build_backbone(lq_backbone, pretrained=pretrained_lq, setting="model.pretrained_lq"),
                         convlstm_filters, convlstm_kernel, channels_last, bottleneck)
        self.fusion = AttentionFusion(convlstm_filters[-1], convlstm_filters[-1], mlp[0])
        self.classifier = classifier_head(mlp, dropout)
        self.backbones_frozen = self.backbone_stats_fixed = False
        self.peft: dict | None = None  # set by peft.apply: {"method": lora | svd, "rank": r}

    @classmethod
    def from_config(cls, model_cfg: Mapping) -> "DualStreamNet":
        return cls(**model_cfg)

    def forward(self, hq: torch.Tensor, lq: torch.Tensor, return_attention: bool = False, mc_samples: int = 0):
        """Clips in [0,1], (B,T,3,H,W) each -> logits (B,) [and stream weights (B,2): column 0 HQ, 1 LQ]. With
        ``mc_samples`` N the logits are (B, 1 + N): the model's, then N with the classifier's dropout on."""
        _check_clips("hq", hq)
        _check_clips("lq", lq)
        if hq.shape[0] != lq.shape[0]:
            raise ValueError(f"hq and lq batch sizes differ ({hq.shape[0]} vs {lq.shape[0]})")
        features = self.hq(hq), self.lq(lq)
        # The head runs in fp32 even under bf16 autocast or with bf16 streams: a bf16 logit keeps 8 bits of
        # mantissa, so near-equal clips would tie exactly, flattening AUC, thresholds and temperature fitting.
        with torch.autocast(hq.device.type, enabled=False):
            fused, weights = self.fusion(*(f.float() for f in features))
            logits = self.classifier(fused).squeeze(-1)
            if mc_samples:
                logits = torch.stack([logits, *self._dropout_samples(fused, mc_samples)], dim=-1)
        return (logits, weights) if return_attention else logits

    def _dropout_samples(self, fused: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Monte-Carlo dropout (Gal and Ghahramani 2016) over the head only: the streams' features are computed
        once. Each clip's masks come from the same fixed seed (torch's global RNG is restored after), so a clip's
        spread depends on the clip alone: not on its place in a batch, the batch size or a resumed run."""
        was_training = self.classifier.training
        with torch.random.fork_rng(devices=[fused.device] if fused.device.type == "cuda" else []):
            self.classifier.train()
            try:
                per_clip = []
                for clip in fused.split(1):
                    torch.manual_seed(0)
                    per_clip.append(torch.stack([self.classifier(clip).squeeze(-1) for _ in range(count)]))
                return list(torch.cat(per_clip, dim=1))
            finally:
                self.classifier.train(was_training)

    def for_inference(self, dtype: torch.dtype | None = None) -> "DualStreamNet":
        """See Backbone.for_inference; `dtype` casts the streams' weights (bf16 on CPU, where autocast would convert
        every layer's input and output, measured ~1.4x slower). The head stays fp32 (see forward)."""
        self.eval()
        for stream in (self.hq, self.lq):
            peft.merge(stream.backbone)  # plain weights again, before BatchNorm is folded into them
            stream.backbone.for_inference()
            if dtype is not None:
                stream.to(dtype)
        return self

    @property
    def initial_weights(self) -> dict[str, str]:
        """Where each backbone's weights came from ("random", "imagenet: <file> (<where found>)", "file: <path>")."""
        return {"hq": self.hq.backbone.weights, "lq": self.lq.backbone.weights}

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """What trains of the backbones: under PEFT only the adapters (the rest stays as loaded)."""
        backbones = self.hq.backbone, self.lq.backbone
        return chain.from_iterable(peft.trainable(b) if self.peft else b.parameters() for b in backbones)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        backbone = {id(p) for p in chain(self.hq.backbone.parameters(), self.lq.backbone.parameters())}
        return (p for p in self.parameters() if id(p) not in backbone)

    def freeze_backbones(self, frozen: bool, *, keep_bn_stats: bool = False) -> None:
        """Frozen backbones also keep their BatchNorm statistics: updating them from a few deepfake clips would
        drift the pretrained features the head is being fitted to. ``keep_bn_stats`` keeps them while the
        backbones train too (BatchNorm as a fixed affine layer, the usual way to fine-tune on small batches)."""
        self.backbones_frozen = frozen
        self.backbone_stats_fixed = frozen or keep_bn_stats or self.peft is not None  # PEFT: nothing else moves
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)  # re-applies the mode so the backbones' BatchNorm follows the new setting now

    def train(self, mode: bool = True) -> "DualStreamNet":
        super().train(mode)
        if self.backbone_stats_fixed:
            self.hq.backbone.eval()
            self.lq.backbone.eval()
        return self
