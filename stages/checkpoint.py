"""The checkpoint: what train writes and `Detector` reads. A checkpoint holds only tensors and plain Python values
(it loads with ``weights_only=True``): `Trained`'s fields (the layout, versioned by FORMAT), then the model's
weights, `epoch`, `early_stop` and `history`; `last.pt` adds RESUME_ONLY, what continuing needs.
"""
from __future__ import annotations

import io
import logging
import random
import sys
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..manifests.errors import InputError
from ..manifests.table import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from ..models.dual_stream import DualStreamNet

# torch and the models are imported where they are used: a process that scores through onnxruntime with a cached
# export reads what it needs of a checkpoint from its card (`onnx_model.cached_card`) and never imports torch.


class CheckpointError(InputError):
    """A checkpoint that is missing, damaged, or not dfpipe's."""


# The checkpoint layout's version; checkpoints without one are format 1, which had no `format` key. 3 added `peft`
# (the weights of a PEFT run are adapter tensors an older dfpipe cannot place).
FORMAT = 3


@dataclass(frozen=True)
class Trained:
    """What a checkpoint says about how its model was made, which scoring repeats: the layout, written once."""
    config: dict           # the run's resolved config
    model_config: dict     # builds the network the weights fit
    extract: dict          # stride and JPEG quality the frames were sampled and stored with
    align: dict            # how the crops were made
    clip_len: int
    pairs_digest: str      # the training pairs (the run folder's training_pairs.csv)
    dfpipe_version: str
    calibration: dict | None = None  # temperature, threshold, rule: set on best.pt when train calibrates it
    peft: dict | None = None  # {"method": lora | svd, "rank": r}: the backbones carry adapters (models/peft.py)
    format: int = FORMAT

    def state(self) -> dict:
        return asdict(self)


SCORING_KEYS = ("extract", "align", "clip_len", "calibration")  # the Trained fields scoring settings are read from
CARD_KEYS = (*SCORING_KEYS, "pairs_digest")  # all that scoring reads of a checkpoint besides the weights


def rng_state(device: torch.device) -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and plain lists (weights_only-loadable). CUDA: only
    this rank's GPU, so a run resumes on a machine with fewer GPUs."""
    import torch
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict, device: torch.device) -> None:
    import torch
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":  # earlier last.pt files hold every visible GPU's state
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[min(device.index or 0, len(cuda) - 1)], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(path: Path, state: dict) -> None:
    import torch
    buffer = io.BytesIO()
    torch.save(_canonical(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _canonical(obj):
    """Equal checkpoints pickle to equal bytes, so a resumed run's files are byte-identical to an uninterrupted
    run's: pickle writes an object it has seen as a reference back, so which of the equal strings happen to be one
    object (a resumed run's came from unpickling) changed the bytes. Every string is interned and every container
    rebuilt (a state dict keeps its version metadata)."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = _canonical(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng")  # in last.pt only: best.pt is what scoring needs


def restore_best(last: dict, best_path: Path) -> None:
    """A run killed between writing last.pt and best.pt of an improved epoch resumes with a best.pt of an older
    epoch than its history names as best: last.pt holds that epoch's weights, so best.pt is written from it."""
    if last["early_stop"]["best_epoch"] != last["epoch"]:
        return
    if best_path.is_file() and load_checkpoint(best_path)["epoch"] == last["epoch"]:
        return
    save_checkpoint(best_path, {k: v for k, v in last.items() if k not in RESUME_ONLY})


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``run_train``, on the CPU; loading never executes pickled code. Memory-mapped, so
    only the tensors used are read (a last.pt also holds the optimizer state, twice the model's size), and the
    model's own are read once, straight into their bf16 or GPU copies (measured: 1.1 s -> 0.1 s to load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # else torch's own complaint is about mmap, which misleads
        with open(path, "rb") as f:
            cut = f.read(4) == b"PK\x03\x04"  # a zip's start without its end: a copy or a write cut short
        why = ("truncated or damaged checkpoint (the zip archive torch.save writes has no end); copy it again, or use "
               "last.pt / best.pt" if cut else
               "not a checkpoint (torch.save writes a zip archive; this file is not one)")
        raise CheckpointError(f"{path}: {why}")
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all the same to the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a dfpipe checkpoint (no model weights or model_config)")
    if ckpt.get("format", 1) > FORMAT:
        raise CheckpointError(f"{path}: written by a newer dfpipe (checkpoint format {ckpt['format']}; this one "
                              f"reads up to {FORMAT}): update dfpipe")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device) -> DualStreamNet:
    """The trained network in eval mode, its tensors those of the checkpoint (built on the meta device, so no
    random initialisation is computed and stored only to be overwritten). Backbones are built without their
    pretrained files (the checkpoint's weights replace them, and the files need not exist where the model is used),
    so the random-init warning that building them would log is silenced."""
    import torch

    from ..models import peft
    from ..models.dual_stream import DualStreamNet
    backbones_log = logging.getLogger("dfpipe.models.backbones")
    level = backbones_log.level
    backbones_log.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            model = DualStreamNet.from_config({**ckpt["model_config"], "pretrained_hq": None, "pretrained_lq": None})
            if ckpt.get("peft"):  # the adapters as trained; `DualStreamNet.for_inference` merges them
                peft.apply(model, **ckpt["peft"], init=False)
    finally:
        backbones_log.setLevel(level)
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except RuntimeError as e:  # "Error(s) in loading state_dict ...:" then one tab-indented line per key
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"the checkpoint's weights do not fit its model_config ({first})") from None
    for stream in (model.hq, model.lq):
        stream.set_normalisation()
        stream.to(memory_format=stream.memory_format)  # assign=True kept the layout the tensors were saved in
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint has no values for {', '.join(left[:3])}")
    return model.to(device).eval()
