"""ONNX Runtime sessions over graphs cached in `$DFPIPE_CACHE/onnx`: the scoring model's export (`onnx_model`) and
MTCNN's three networks (`mtcnn_nets`).

A graph is made once (with torch, which exports it) and read back by every later process, which then needs neither
torch nor the weights it came from: importing torch is 1.6 s and ~470 MB of a process (AMD EPYC, 2 cores). This
module imports neither torch nor onnxruntime until a session is built, so that such a process can do without torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..manifests.progress import warn
from ..manifests.table import NotWritable, atomic_write_bytes


_UNWRITABLE: set[Path] = set()  # cache folders this process could not write to, and has said so


def cache_dir() -> Path:
    return Path(os.environ.get("DFPIPE_CACHE") or Path.home() / ".cache" / "dfpipe").expanduser() / "onnx"


def cached_session(path: Path, make: Callable[[], bytes], *, optimize: bool = False):
    """The session of the graph cached at `path`, made by `make` first if missing or unreadable (a damaged cache
    file is replaced); from the bytes themselves where the cache cannot be written. With `optimize`, the graph as
    onnxruntime optimised it for this CPU is cached beside it too (see `session`)."""
    optimized = _optimized_path(path) if optimize else None
    if path.is_file():
        try:
            return session(str(path), optimized=optimized)
        except Exception as e:  # onnxruntime raises its own types, e.g. InvalidProtobuf for a damaged file
            warn(f"warning: {path}: not a readable export ({str(e).splitlines()[0][:200]}); exporting again")
    data = make()
    try:
        atomic_write_bytes(path, data)
    except NotWritable as e:
        if path.parent not in _UNWRITABLE:  # once per folder: the model's export and MTCNN's three would repeat it
            _UNWRITABLE.add(path.parent)
            warn(f"warning: {e}; exporting again next time (set DFPIPE_CACHE to a writable folder)")
        return session(data)
    return session(str(path), optimized=optimized)


def _optimized_path(export_path: Path) -> Path:
    """Where the export as optimised here goes: onnxruntime's NCHWc layout is chosen for the CPU's vector width
    (8 floats with AVX2, 16 with AVX-512), so the name holds onnxruntime's version and the CPU's instruction set,
    and a cache shared between machines never hands one CPU another's layout."""
    import onnxruntime as ort
    key = hashlib.sha256(f"{ort.__version__} {platform.machine()} {platform.processor()} {cpu_flags()}".encode())
    return export_path.with_name(f"{export_path.stem}-optimized-{key.hexdigest()[:16]}.onnx")


def cpu_flags() -> str:
    """The kernel's list of the CPU's instruction-set extensions ("" where there is no /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    return next((line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")


def session(model: str | bytes, optimized: Path | None = None):
    """The session of an export. With `optimized`, the graph onnxruntime optimised for this CPU is read from
    there (a damaged file is made again) or saved there once: optimising the default scoring model's graph is
    0.36-0.49 s of a start-up, loading it optimised 0.07-0.09 s (the same logits, bit for bit)."""
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


def threads() -> int:
    """torch's intra-op thread count where torch is loaded (it may have been set), else OMP_NUM_THREADS, else 0:
    onnxruntime's default, one per physical core, which is torch's default too."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else 0


def _build(model: str | bytes, *, preoptimized: bool = False, save: Path | None = None):
    """Threads sleep rather than spin between calls, leaving the cores to the decoder and the face path that run
    beside the model."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
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
