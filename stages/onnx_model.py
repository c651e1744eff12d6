"""The scoring model in ONNX Runtime: the CPU path where torch has no fast low precision to run in.

On a CPU without AMX, torch runs the default model in fp32 (no bf16 instructions) or in bf16 on AVX512-BF16 alone;
ONNX Runtime's fp32 kernels (NCHWc convolutions) are faster than torch's fp32 and close to its bf16, and a process
that scores through it, once the export is cached, never imports torch. Measured on an AMD EPYC, 2 cores,
AVX512-BF16, no AMX, default Lite2+Lite0 model, one clip of 10 frames: torch fp32 0.20-0.23 s, onnxruntime fp32
0.15 s, torch bf16 0.12 s; the imports it saves, 1.6 s and ~470 MB of every score-video's start-up.
On a CPU with AMX torch's bf16 is ~4x its fp32 (the card's B4 22 ms per 224 px frame), beyond onnxruntime's fp32:
`auto` keeps torch there, and on CUDA.

The export (torch.onnx's TorchScript exporter: the clip model at its one clip length, any batch size) is made once
per checkpoint and cached by the checkpoint file's sha256 under `$DFPIPE_CACHE` (default ~/.cache/dfpipe), with the
checkpoint's card beside it (what scoring reads of it besides the weights, as JSON): a later run reads nothing of
the checkpoint but its bytes' hash (see `ort_session`). The graph takes the uint8 (B, T, H, W, 3) crop batches
`Predict` gets and returns logits; it is the model in fp32 after `for_inference` (BatchNorm folded, adapters
merged), so its logits are torch's fp32 ones up to float rounding (tests/test_score.py, the onnxruntime section).
Beside it goes the graph as onnxruntime optimised it for this CPU, which later sessions load without optimising
again: 0.07-0.09 s instead of 0.36-0.49 s of every score-video's start-up, the same logits bit for bit.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..manifests.errors import InputError
from ..manifests.progress import note
from ..manifests.table import NotWritable, atomic_write_bytes
from ..manifests.units import sha256_file
from ..pipeline import __version__
from .checkpoint import CARD_KEYS
from .faces import device_type
from .ort_session import cache_dir, cached_session, cpu_flags

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "torch", "onnx")
EXPORT_FORMAT = 1  # bump when the exported graph changes for the same checkpoint: older cache files are not read
CARD_FORMAT = 1    # the same for the checkpoint's card
FRAMES_PER_CALL = 5
MODULES = ("onnxruntime", "onnx")  # the runtime, and what torch.onnx.export needs (imported there, not here)


def choose_runtime(runtime: str, device_type: str, mc_samples: int) -> str:
    """torch or onnx for this machine (`device_type`: cpu or cuda); `onnx` asked for where it cannot serve is
    refused in one line."""
    if runtime not in RUNTIMES:
        raise InputError(f"score.runtime: '{runtime}' is none of {', '.join(RUNTIMES)}")
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if runtime == "onnx" and missing:
        raise InputError(f"score.runtime: onnx needs {' and '.join(missing)}, not installed here: "
                         f"pip install {' '.join(missing)}")
    if runtime == "onnx":
        if device_type != "cpu":
            raise InputError(f"score.runtime: onnx runs on the CPU, and score.device is {device_type}")
        if mc_samples:
            raise InputError("score.runtime: onnx runs the model without dropout; score.mc_samples needs torch")
        return "onnx"
    if runtime == "auto" and device_type == "cpu" and not mc_samples and not missing and not has_amx():
        return "onnx"
    return "torch"


def runtime_for(runtime: str, device, mc_samples: int) -> str:
    """`choose_runtime` for a device setting (auto, cpu, cuda:N, or a torch.device)."""
    return choose_runtime(runtime, device_type(str(device)), mc_samples)


def has_amx() -> bool:
    """AMX tiles, where torch's bf16 outruns onnxruntime's fp32: from the kernel's CPU flags, which needs no torch;
    torch's own check where there are none (not Linux)."""
    flags = cpu_flags()
    if flags:
        return "amx_tile" in flags.split()
    import torch
    return torch.cpu._is_amx_tile_supported()


def export(model: torch.nn.Module, clip_len: int, hq_size: int, lq_size: int) -> bytes:
    """The eval-mode `DualStreamNet` in fp32 as an ONNX graph taking uint8 crop batches (B, T, H, W, 3) of any batch
    size, doing what `ClipModel` does before the network (to [0, 1] NCHW) inside the graph. Its backbones see
    FRAMES_PER_CALL frames of a clip at a time: onnxruntime plans memory for every activation of the graph, and
    half a clip's frames at once keep ~95 MB less alive at the same speed (default model, one clip)."""
    import torch

    class UInt8Clips(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
            return self.model(hq.permute(0, 1, 4, 2, 3).float() / 255, lq.permute(0, 1, 4, 2, 3).float() / 255)

    for stream in (model.hq, model.lq):
        stream.frames_per_call = FRAMES_PER_CALL
    model = UInt8Clips(model.for_inference()).eval()
    example = (torch.zeros(1, clip_len, hq_size, hq_size, 3, dtype=torch.uint8),
               torch.zeros(1, clip_len, lq_size, lq_size, 3, dtype=torch.uint8))
    out = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and the tracer's Python-bool warnings
        torch.onnx.export(model, example, out, dynamo=False, input_names=["hq", "lq"], output_names=["logits"],
                          dynamic_axes={"hq": batch, "lq": batch, "logits": batch}, opset_version=17)
    return out.getvalue()


def _cache_path(checkpoint: str | Path, clip_len: int) -> Path:
    """The checkpoint's bytes and everything else the graph depends on: the clip length it is traced at, the
    export's format, the model code's version and the exporter's (read from the installed package's metadata:
    a cache hit imports no torch)."""
    exporter = importlib.metadata.version("torch")
    return cache_dir() / f"{_digest(checkpoint)}-T{clip_len}-f{EXPORT_FORMAT}-dfpipe{__version__}-torch{exporter}.onnx"


def _card_path(checkpoint: str | Path) -> Path:
    return cache_dir() / f"{_digest(checkpoint)}-card{CARD_FORMAT}.json"


def _digest(checkpoint: str | Path) -> str:
    stat = Path(checkpoint).stat()
    return _file_digest(str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Once per file version and process: the export's and the card's names both need it (~0.06 s per 90 MB)."""
    return sha256_file(Path(path))[:32]


def cached_card(checkpoint: str | Path) -> dict | None:
    """What scoring reads of the checkpoint besides its weights (`CARD_KEYS`), where its export is cached too: a
    process that finds both reads neither the checkpoint nor imports torch. None where either is missing or the
    card is unreadable (the next scoring through onnxruntime writes it again)."""
    try:
        card = json.loads(_card_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not set(CARD_KEYS) <= card.keys() or not isinstance(card["clip_len"], int):
        return None
    return card if _cache_path(checkpoint, card["clip_len"]).is_file() else None


def _write_card(ckpt: dict, checkpoint: str | Path) -> None:
    """Only a card that reads back equal is written (JSON has no tuples, no integer keys): else none, and the
    checkpoint is read each time."""
    card = {k: ckpt.get(k) for k in CARD_KEYS}
    text = json.dumps(card, sort_keys=True)
    if json.loads(text) == card:
        try:
            atomic_write_bytes(_card_path(checkpoint), text.encode())
        except NotWritable:
            pass  # the export's own write has said so


def clip_model_session(ckpt: dict, checkpoint: str | Path, clip_len: int):
    """The session of the checkpoint's cached export (see `ort_session.cached_session`), exported first if need be;
    `ckpt` may be the checkpoint's card, whose export was cached when it was read (if it has gone since, the
    checkpoint is read to export it again)."""
    def make() -> bytes:
        from .checkpoint import load_checkpoint, model_from_checkpoint
        full = ckpt if "model" in ckpt else load_checkpoint(checkpoint)
        model = model_from_checkpoint(full, "cpu")  # a checkpoint that does not load fails before the note
        note(f"score-video: exporting {checkpoint} for onnxruntime (once per checkpoint; cached in {cache_dir()})")
        return export(model, clip_len, int(full["align"]["hq_size"]), int(full["align"]["lq_size"]))

    loaded = cached_session(_cache_path(checkpoint, clip_len), make, optimize=True)
    if "model" in ckpt and cached_card(checkpoint) is None:
        _write_card(ckpt, checkpoint)
    return loaded


class OnnxClipModel:
    """`ClipModel`'s contract (uint8 crop batches in, calibrated probabilities out) over an onnxruntime session."""

    def __init__(self, ckpt: dict, checkpoint: str | Path, *, clip_len: int, temperature: float, tta_flip: bool):
        self.session = clip_model_session(ckpt, checkpoint, clip_len)
        self.temperature = temperature
        self.tta_flip = tta_flip

    def _probs(self, hq: np.ndarray, lq: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {"hq": hq, "lq": lq})[0].astype(np.float64)
        return 1 / (1 + np.exp(-logits / self.temperature))

    def __call__(self, hq: np.ndarray, lq: np.ndarray) -> np.ndarray:
        probs = self._probs(np.ascontiguousarray(hq), np.ascontiguousarray(lq))
        if self.tta_flip:
            flip = lambda x: np.ascontiguousarray(x[:, :, :, ::-1])  # noqa: E731  (B, T, H, W, 3): mirror W
            probs = (probs + self._probs(flip(hq), flip(lq))) / 2
        return probs
