"""MTCNN's three networks, P-Net, R-Net and O-Net, as facenet-pytorch (2.5.3) defines them, layer for layer and with
its state-dict keys, loading the weights facenet-pytorch ships (`facenet_pytorch/data/{pnet,rnet,onet}.pt`), and
the two runtimes that run them for `mtcnn.py`: numpy arrays in (NCHW float32), numpy arrays out.

On the CPU they run in onnxruntime, from graphs exported once with torch and cached under `$DFPIPE_CACHE/onnx`
(`ort_session`): a process that detects faces then never imports torch, and starts its detector in 0.35-0.38 s and
119 MB instead of 1.4 s and 530 MB (2-core AMD EPYC without AMX); there, with its PReLUs exported as
`_prelu_for_onnxruntime` says, onnxruntime also runs the nets as fast as torch's channels_last kernels or faster
(the face path 1.3x faster, see `mtcnn.py`). A cache file is named by the sha256 of facenet-pytorch's weight file,
so finding it needs no torch either; torch is imported only to export on a cache miss. On CUDA, and where
onnxruntime is not installed, torch runs them, channels_last (convolutions and max-pooling on CPU are ~2x slower in
NCHW).

Defined here rather than imported because `import facenet_pytorch` (any of its modules: the package's __init__
runs first) imports torchvision, and torchvision imports torch._dynamo: 1.2-1.7 s and ~165 MB of every process's
start-up on a 2-core AMD EPYC. The weight files are found with `importlib.util.find_spec`, which locates a
top-level package without running its __init__. The torch modules are in `mtcnn_modules.py`, imported only where
torch runs or exports them, so that importing this module imports no torch. tests/test_mtcnn.py checks these nets give
facenet-pytorch's outputs, and onnxruntime's graphs torch's.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np

from ..manifests.errors import InputError
from ..manifests.progress import note
from ..manifests.units import sha256_file
from .ort_session import cache_dir, cached_session

PACKAGE = "facenet_pytorch"  # used by name, never imported
RUNTIMES = ("auto", "torch", "onnx")
ONNX_MODULES = ("onnxruntime", "onnx")  # the runtime, and what torch.onnx.export needs on a cache miss
EXPORT_FORMAT = 1  # bump when the exported graphs change for the same weights: older cache files are not read
# Each net's outputs, in the order the torch modules return them; P-Net's are maps over its 12 x 12 windows.
OUTPUTS = {"pnet": ("reg", "probs"), "rnet": ("reg", "probs"), "onet": ("reg", "landmarks", "probs")}
EXAMPLE_SIDES = {"pnet": (48, 64), "rnet": (24, 24), "onet": (48, 48)}  # inputs the export traces with


def weights_file(name: str) -> Path:
    """facenet-pytorch's `data/<name>.pt`, found without importing facenet_pytorch."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / "data" / f"{name}.pt" if folders else None
    if path is None or not path.is_file():
        raise InputError(f"MTCNN's weights ({name}.pt) come with facenet-pytorch, which is not installed here: "
                         "pip install facenet-pytorch==2.5.3")
    return path


def load(device, runtime: str = "auto") -> list:
    """P-Net, R-Net and O-Net, run on `device` (a torch.device or its name) by `runtime`: `auto` is onnxruntime
    on the CPU where it is installed, torch elsewhere."""
    if runtime not in RUNTIMES:
        raise InputError(f"MTCNN runtime '{runtime}' is none of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        on_cpu = str(device).split(":")[0] == "cpu"
        runtime = "onnx" if on_cpu and all(importlib.util.find_spec(m) for m in ONNX_MODULES) else "torch"
    if runtime == "torch":
        return [TorchNet(name, device) for name in OUTPUTS]
    paths = {name: cache_path(name) for name in OUTPUTS}
    if not all(path.is_file() for path in paths.values()):
        note(f"align: exporting MTCNN's networks for onnxruntime (once; cached in {cache_dir()})")
    return [OnnxNet(cached_session(path, functools.partial(export, name))) for name, path in paths.items()]


class OnnxNet:
    """A net's cached export in onnxruntime: NCHW float32 array in, its outputs as arrays."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"x": x})


class TorchNet:
    """A net in torch on `device`, channels_last: NCHW float32 array in, its outputs as arrays."""

    def __init__(self, name: str, device):
        import torch
        self.device = torch.device(str(device))
        self.module = module(name).to(self.device, memory_format=torch.channels_last)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        import torch
        # mtcnn.py's NCHW arrays are views of NHWC memory: channels_last already, no copy on the CPU.
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(x).to(self.device, memory_format=torch.channels_last))
        return [out.cpu().numpy() for out in outputs]


def cache_path(name: str) -> Path:
    return cache_dir() / f"mtcnn-{name}-{sha256_file(weights_file(name))[:16]}-f{EXPORT_FORMAT}.onnx"


def export(name: str) -> bytes:
    """The net as an ONNX graph for any batch size (P-Net: and any image size), as onnx_model.py exports, its
    PReLUs written as `_prelu_for_onnxruntime`."""
    import torch
    net = module(name)
    for prelu in [layer for layer in net.modules() if isinstance(layer, torch.nn.PReLU)]:
        prelu.forward = functools.partial(_prelu_for_onnxruntime, prelu.weight.detach())
    images = {0: "batch", 2: "height", 3: "width"} if name == "pnet" else {0: "batch"}
    maps = {0: "batch", 2: "rows", 3: "columns"} if name == "pnet" else {0: "batch"}
    axes = {"x": images, **{output: maps for output in OUTPUTS[name]}}
    out = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and the tracer's shape warnings
        torch.onnx.export(net, (torch.zeros(1, 3, *EXAMPLE_SIDES[name]),), out, dynamo=False,
                          input_names=["x"], output_names=list(OUTPUTS[name]), dynamic_axes=axes, opset_version=17)
    return out.getvalue()


def _prelu_for_onnxruntime(slope, y):
    """PReLU(y) as y + (1 - slope) * relu(-y), the scalings as BatchNormalizations: onnxruntime runs a PRelu on one
    thread in NCHW, between reorders from and back to the NCHWc layout of its convolutions, and these as NCHWc
    depthwise convolutions with the relu and the sum fused in. Measured on a 2-core AMD EPYC without AMX: R-Net on
    300 crops and O-Net on 90 1.7-1.9x faster than with PRelu, P-Net over a 640 x 360 pyramid 1.15x; outputs within
    ~1e-6 of torch's either way."""
    import torch
    from torch.nn.functional import batch_norm
    zeros, ones = torch.zeros_like(slope), torch.ones_like(slope)
    negative = torch.relu(batch_norm(y, zeros, ones, -ones, zeros, eps=0.0))
    return y + batch_norm(negative, zeros, ones, 1 - slope, zeros, eps=0.0)


def module(name: str):
    """The torch module of `name` (pnet, rnet, onet) with facenet-pytorch's weights, in eval mode."""
    from .mtcnn_modules import NETS
    return NETS[name]().load_weights().eval()
