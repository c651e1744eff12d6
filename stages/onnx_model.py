"""The scoring model in ONNX Runtime: the CPU path where torch has no fast low precision to run in.

On a CPU without AMX, torch runs the default model in fp32 (no bf16 instructions) or in bf16 on AVX512-BF16 alone;
ONNX Runtime's fp32 kernels (NCHWc convolutions) are faster than torch's fp32 and close to its bf16, and a process
that scores through it never imports timm, which imports torchvision, which imports torch._dynamo. Measured on an
AMD EPYC, 2 cores, AVX512-BF16, no AMX, default Lite2+Lite0 model, one clip of 10 frames: torch fp32 0.20-0.23 s,
onnxruntime fp32 0.15 s, torch bf16 0.12 s; the imports it saves, 1.4 s and 190 MB of every score-video's start-up.
On a CPU with AMX torch's bf16 is ~4x its fp32 (the card's B4 22 ms per 224 px frame), beyond onnxruntime's fp32:
`auto` keeps torch there, and on CUDA.

The export (torch.onnx's TorchScript exporter: the clip model at its one clip length, any batch size) is made once
per checkpoint and cached by the checkpoint file's sha256 under `$DFPIPE_CACHE` (default ~/.cache/dfpipe): a
later run reads no weights from the checkpoint at all. The graph takes the uint8 (B, T, H, W, 3) crop batches
`Predict` gets and returns logits; it is the model in fp32 after `for_inference` (BatchNorm folded, adapters
merged), so its logits are torch's fp32 ones up to float rounding (tests/test_score.py, the onnxruntime section).
Beside it goes the graph as onnxruntime optimised it for this CPU, which later sessions load without optimising
again: 0.07-0.09 s instead of 0.36-0.49 s of every score-video's start-up, the same logits bit for bit.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import io
import os
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..manifests.errors import InputError
from ..manifests.progress import note, warn
from ..manifests.table import NotWritable, atomic_write_bytes
from ..manifests.units import sha256_file
from ..pipeline import __version__
from .checkpoint import model_from_checkpoint

RUNTIMES = ("auto", "torch", "onnx")
EXPORT_FORMAT = 1  # bump when the exported graph changes for the same checkpoint: older cache files are not read
FRAMES_PER_CALL = 5
MODULES = ("onnxruntime", "onnx")  # the runtime, and what torch.onnx.export needs (imported there, not here)


def cache_dir() -> Path:
    return Path(os.environ.get("DFPIPE_CACHE") or Path.home() / ".cache" / "dfpipe").expanduser() / "onnx"


def choose_runtime(runtime: str, device: torch.device, mc_samples: int) -> str:
    """torch or onnx for this machine; `onnx` asked for where it cannot serve is refused in one line."""
    if runtime not in RUNTIMES:
        raise InputError(f"score.runtime: '{runtime}' is none of {', '.join(RUNTIMES)}")
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if runtime == "onnx" and missing:
        raise InputError(f"score.runtime: onnx needs {' and '.join(missing)}, not installed here: "
                         f"pip install {' '.join(missing)}")
    if runtime == "onnx":
        if device.type != "cpu":
            raise InputError(f"score.runtime: onnx runs on the CPU, and score.device is {device.type}")
        if mc_samples:
            raise InputError("score.runtime: onnx runs the model without dropout; score.mc_samples needs torch")
        return "onnx"
    if (runtime == "auto" and device.type == "cpu" and not mc_samples and not missing
            and not torch.cpu._is_amx_tile_supported()):
        return "onnx"
    return "torch"


class _UInt8Clips(torch.nn.Module):
    """What `ClipModel` does before the network (uint8 NHWC crops to [0, 1] NCHW), inside the graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.model(hq.permute(0, 1, 4, 2, 3).float() / 255, lq.permute(0, 1, 4, 2, 3).float() / 255)


def export(model: torch.nn.Module, clip_len: int, hq_size: int, lq_size: int) -> bytes:
    """The eval-mode `DualStreamNet` in fp32 as an ONNX graph taking uint8 crop batches of any batch size. Its
    backbones see FRAMES_PER_CALL frames of a clip at a time: onnxruntime plans memory for every activation of the
    graph, and half a clip's frames at once keep ~95 MB less alive at the same speed (default model, one clip)."""
    for stream in (model.hq, model.lq):
        stream.frames_per_call = FRAMES_PER_CALL
    model = _UInt8Clips(model.for_inference()).eval()
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
    export's format, the model code's version and the exporter's."""
    digest = sha256_file(Path(checkpoint))[:32]
    return cache_dir() / f"{digest}-T{clip_len}-f{EXPORT_FORMAT}-dfpipe{__version__}-torch{torch.__version__}.onnx"


def cached_session(ckpt: dict, checkpoint: str | Path, clip_len: int):
    """The session of the cached export, exported first if missing or unreadable (a damaged cache file is
    replaced); from the bytes themselves where the cache cannot be written."""
    path = _cache_path(checkpoint, clip_len)
    if path.is_file():
        try:
            return session(str(path), optimized=_optimized_path(path))
        except Exception as e:  # onnxruntime raises its own types, e.g. InvalidProtobuf for a damaged file
            warn(f"warning: {path}: not a readable export ({str(e).splitlines()[0][:200]}); exporting again")
    model = model_from_checkpoint(ckpt, "cpu")  # a checkpoint that does not load fails before the note
    note(f"score-video: exporting {checkpoint} for onnxruntime (once per checkpoint; cached in {path.parent})")
    data = export(model, clip_len, int(ckpt["align"]["hq_size"]), int(ckpt["align"]["lq_size"]))
    try:
        atomic_write_bytes(path, data)
    except NotWritable as e:
        warn(f"warning: {e}; exporting again next time (set DFPIPE_CACHE to a writable folder)")
        return session(data)
    return session(str(path), optimized=_optimized_path(path))


def _optimized_path(export_path: Path) -> Path:
    """Where the export as optimised here goes: onnxruntime's NCHWc layout is chosen for the CPU's vector width
    (8 floats with AVX2, 16 with AVX-512), so the name holds onnxruntime's version and the CPU's instruction set,
    and a cache shared between machines never hands one CPU another's layout."""
    import onnxruntime as ort
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "") \
        if cpuinfo.is_file() else ""
    key = hashlib.sha256(f"{ort.__version__} {platform.machine()} {platform.processor()} {flags}".encode())
    return export_path.with_name(f"{export_path.stem}-optimized-{key.hexdigest()[:16]}.onnx")


def session(model: str | bytes, optimized: Path | None = None):
    """The session of an export. With `optimized`, the graph onnxruntime optimised for this CPU is read from
    there (a damaged file is made again) or saved there once: optimising the default model's graph is ~0.3 s."""
    if optimized is not None and optimized.is_file():
        try:
            return _build(str(optimized), preoptimized=True)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own types; the export itself is still there
            warn(f"warning: {optimized}: not a readable optimised graph ({str(e).splitlines()[0][:200]}); "
                 "optimising again")
    if optimized is None:
        return _build(model)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / optimized.name
        loaded = _build(model, save=saved)
        try:
            atomic_write_bytes(optimized, saved.read_bytes())
        except NotWritable as e:
            warn(f"warning: {e}; optimising again next time")
    return loaded


def _build(model: str | bytes, *, preoptimized: bool = False, save: Path | None = None):
    """Threads as torch's (OMP_NUM_THREADS, torch.set_num_threads); they sleep rather than spin between calls,
    leaving the cores to the decoder and the face path that run beside the model."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if preoptimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save is not None:
        options.optimized_model_filepath = str(save)
        options.log_severity_level = 3  # its warning that the saved graph suits this CPU only: hence the key
    loaded = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    _return_freed_memory()
    return loaded


def _return_freed_memory() -> None:
    """Building a session frees ~130 MB of transient copies of the weights (the model file's bytes, the weights
    before their reordering for the NCHWc kernels) that glibc keeps in its heap; the video loop's large buffers
    (frames, activations) are mapped afresh and never reuse them, so without this they stay in the peak RSS
    (measured on the default model: +232 MB after the session, +102 MB after the trim). Not glibc: nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class OnnxClipModel:
    """`ClipModel`'s contract (uint8 crop batches in, calibrated probabilities out) over an onnxruntime session."""

    def __init__(self, ckpt: dict, checkpoint: str | Path, *, clip_len: int, temperature: float, tta_flip: bool):
        self.session = cached_session(ckpt, checkpoint, clip_len)
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
