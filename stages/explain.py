"""Why the model called a clip fake: Grad-CAM on the HQ stream and the fusion's stream weights.

Grad-CAM (Selvaraju et al. 2017) weights the HQ backbone's last feature map by the clip logit's gradient with respect
to it, averaged over space, and keeps the positive part: where features pushed the logit towards "fake". The gradient
reaches that map through the ConvLSTM, the fusion and the head, so the map says what the whole model used, not what
the backbone alone sees. A hook on the backbone's output (not on a named layer) keeps it independent of the backbone
family and of whatever sits between backbone and ConvLSTM. Written here rather than taken from a Grad-CAM package:
those hook a named layer of a (B,3,H,W) classifier and cannot follow one logit back through the (B,T) clip axis of
a two-input model; the method itself is a few lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipExplanation:
    logit: float               # the model's raw clip logit (fp32, uncalibrated)
    attention: tuple[float, float]  # the fusion's weights of the HQ and the LQ stream, summing to 1
    heatmaps: np.ndarray       # (T, H, W) float32 in [0, 1] over the HQ crops, one scale for the whole clip


def explain_clip(model: torch.nn.Module, hq: np.ndarray, lq: np.ndarray) -> ClipExplanation:
    """``model``: a DualStreamNet in eval mode and fp32 (not `for_inference`'s bf16 form: Grad-CAM needs
    gradients at full precision); ``hq``/``lq``: one clip's uint8 crops (T, H, W, 3), as scoring feeds them."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    def clip_tensor(crops: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)

    hook = model.hq.backbone.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logit, weights = model(clip_tensor(hq), clip_tensor(lq), return_attention=True)
            logit.sum().backward()
    finally:
        hook.remove()
    features = captured[0]                                     # (T, C, h, w)
    channel_weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((channel_weights * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam.float(), size=hq.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    model.zero_grad(set_to_none=True)
    return ClipExplanation(logit=float(logit.item()), attention=tuple(float(w) for w in weights[0].tolist()),
                           heatmaps=cam.cpu().numpy().astype(np.float32))


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """The share of a heatmap's mass where ``mask`` (same shape, 0..1) is set: compared with the mask's share of the
    area, it says whether an explanation points at a known region more than chance would."""
    total = float(heatmap.sum())
    return float((heatmap * (mask > 0.5)).sum()) / total if total > 0 else 0.0
