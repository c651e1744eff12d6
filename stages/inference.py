"""The model at inference: the precision it runs in, clips in and calibrated probabilities out, and the queue that
fills its batches with the clips of several videos."""
from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..manifests.errors import InputError

if TYPE_CHECKING:
    import torch

# torch is imported where the model runs in it: a scoring process whose model runs in onnxruntime uses the queue
# alone and may never import torch (see `ort_session`).

# uint8 HQ and LQ crop batches (B, T, H, W, 3) -> probabilities (B,)
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CPU needs no loss scaling; fp16 on CUDA is the fast path of most GPUs and needs a GradScaler.
    A CPU without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 and runs slower than fp32: fp32 there."""
    import torch
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cpu":
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return torch.bfloat16 if native else None
        return torch.float16
    raise InputError(f"train.amp: '{amp}' is neither auto nor off")


class ClipModel:
    """The network as a function of uint8 crop batches (B, T, H, W, 3) -> calibrated probabilities (B,).

    Crops travel to the device as uint8 (4x less to copy than float) and are permuted, not copied, into (B,T,3,H,W):
    each frame is then already channels_last in memory, the layout the model runs in. With `tta_flip` the
    probability is the mean of the clip's and its mirror image's. With `mc_samples` N the probabilities are
    (B, 1 + N): the model's, then N Monte-Carlo dropout samples (see DualStreamNet.forward).
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype | None,
                 temperature: float, tta_flip: bool, mc_samples: int = 0):
        # Takes the model over: it is put in its inference form, on CPU with bf16 stream weights (see
        # DualStreamNet.for_inference); on CUDA autocast does the casting.
        self.cast = dtype is not None and device.type == "cpu"
        self.model = model.for_inference(dtype if self.cast else None)
        if self.cast:
            # The cast made bf16 copies, but what it left alone (the fp32 head, integer buffers) still views the
            # checkpoint's memory map, which would keep the map, and every page of it the cast read (~230 MB for
            # B4+B0), resident: copy those out too.
            for tensor in chain(self.model.parameters(), self.model.buffers()):
                if tensor.dtype != dtype:
                    tensor.data = tensor.data.clone()
        self.device = device
        self.dtype = dtype
        self.temperature = temperature
        self.tta_flip = tta_flip
        self.mc_samples = mc_samples

    def _tensor(self, crops: np.ndarray) -> torch.Tensor:
        import torch
        x = torch.from_numpy(crops)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3)
        return x.to(self.dtype).div_(255) if self.cast else x.float().div_(255)

    def _probs(self, hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        import torch
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None and not self.cast):
            # an fp32 sigmoid near 0.5 rounds to steps of 6e-8: ties
            logits = self.model(hq, lq, mc_samples=self.mc_samples).double()
        return torch.sigmoid(logits / self.temperature)

    def __call__(self, hq: np.ndarray, lq: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            hq_t, lq_t = self._tensor(hq), self._tensor(lq)
            probs = self._probs(hq_t, lq_t)
            if self.tta_flip:
                probs = (probs + self._probs(hq_t.flip(-1), lq_t.flip(-1))) / 2
            return probs.double().cpu().numpy()


def model_batch(batch_size: int | None, device_type: str) -> int:
    """A GPU needs many clips per call to stay busy; a CPU is no faster with more than one (measured with
    benchmarks/bench_score.py), and each extra clip of B4 activations costs ~100 MB of memory."""
    return batch_size if batch_size is not None else (16 if device_type == "cuda" else 1)


class ClipQueue:
    """Clips of any number of videos waiting for the model; a batch runs when full or at `flush`, so a batch may
    span video boundaries. Each clip comes back with its `owner` (whatever the caller needs to route the result)."""

    def __init__(self, predict: Predict, batch_size: int):
        if batch_size < 1:
            raise InputError(f"score.batch_size must be at least 1, got {batch_size}")
        self.predict = predict
        self.batch_size = batch_size
        self._items: list[tuple[Any, np.ndarray, np.ndarray]] = []

    def put(self, owner: Any, hq: np.ndarray, lq: np.ndarray) -> list[tuple[Any, float]]:
        self._items.append((owner, hq, lq))
        return self.flush() if len(self._items) >= self.batch_size else []

    def flush(self) -> list[tuple[Any, float]]:
        if not self._items:
            return []
        owners, hq, lq = zip(*self._items)
        self._items = []
        return list(zip(owners, self.predict(np.stack(hq), np.stack(lq)).tolist()))
