"""train.peft: LoRA and Effort-style SVD adapters on the backbones, trained by a real tiny run (test_train's
workspace), saved, rebuilt from the checkpoint and merged for inference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfpipe.manifests.errors import InputError
from dfpipe.models import peft
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import ConfigError, load_config
from dfpipe.stages.checkpoint import load_checkpoint, model_from_checkpoint
from dfpipe.stages.detector import Detector
from dfpipe.stages.onnx_model import OnnxClipModel
from dfpipe.stages.train import run_train
from test_train import HQ, LQ, make_workspace, tiny_cfg

RANK = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["lora", "svd"])
def peft_run(request, tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("ws"), per_class=4, val_per_class=1)
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(epochs=2, steps_per_epoch=2, peft=request.param, peft_rank=RANK)
    run_train(root, run_dir, cfg, resume=False)
    return request.param, run_dir, cfg


def as_trained(cfg, method: str) -> DualStreamNet:
    """The run's model before its first step: train.seed, then the adapters."""
    torch.manual_seed(cfg.train.seed)
    model = DualStreamNet.from_config(cfg.model)
    peft.apply(model, method, RANK)
    return model


def clips(seed: int = 0, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 4, 3, HQ, HQ, generator=gen), torch.rand(batch, 4, 3, LQ, LQ, generator=gen)


def is_adapter(key: str) -> bool:
    return ".parametrizations.weight.0." in key


def test_frozen_tensors_stay_bit_identical_while_the_adapters_and_head_train(peft_run):
    method, run_dir, cfg = peft_run
    initial = as_trained(cfg, method).state_dict()
    trained = load_checkpoint(run_dir / "last.pt")["model"]
    assert initial.keys() == trained.keys()
    backbone = [k for k in initial if ".backbone." in k]
    frozen = [k for k in backbone if not is_adapter(k)]
    adapters = [k for k in backbone if is_adapter(k)]
    assert adapters and sum(k.endswith("weight.original") for k in frozen) >= 10
    # BatchNorm statistics included, although tiny_cfg trains with freeze_bn false: PEFT keeps them
    assert all(torch.equal(initial[k], trained[k]) for k in frozen)
    assert sum(not torch.equal(initial[k], trained[k]) for k in adapters) >= len(adapters) // 2
    assert not all(torch.equal(initial[k], trained[k]) for k in initial if ".backbone." not in k)


def test_the_run_records_how_many_parameters_train(peft_run):
    method, run_dir, cfg = peft_run
    model = as_trained(cfg, method)
    plain = DualStreamNet.from_config(cfg.model)
    adapters = sum(p.numel() for p in model.backbone_parameters())
    head = sum(p.numel() for p in model.head_parameters())
    recorded = json.loads((run_dir / "run.json").read_text())["parameters"]
    assert recorded == {"trainable": adapters + head, "total": sum(p.numel() for p in model.parameters())}
    backbone = sum(p.numel() for p in plain.hq.backbone.parameters()) * 2
    assert adapters < backbone / 4 and recorded["total"] == sum(p.numel() for p in plain.parameters()) + adapters
    assert load_checkpoint(run_dir / "best.pt")["peft"] == {"method": method, "rank": RANK}


def test_a_saved_peft_checkpoint_scores_exactly_like_the_model_it_was_trained_as(peft_run):
    method, run_dir, cfg = peft_run
    best = load_checkpoint(run_dir / "best.pt")
    reference = as_trained(cfg, method)
    reference.load_state_dict(best["model"])
    reference.eval()
    hq, lq = clips()
    with torch.no_grad():
        expected = reference(hq, lq)
        assert torch.equal(model_from_checkpoint(best, "cpu")(hq, lq), expected)
    # score-video's and dfpipe.Detector's path: rebuilt, adapters merged, fp32 (train.amp off), calibrated
    config = load_config(overrides=[{"train": {"amp": "off"}, "score": {"runtime": "torch"}}])
    detector = Detector.from_checkpoint(run_dir / "best.pt", device="cpu", config=config)
    as_uint8 = [(x * 255).round().to(torch.uint8) for x in (hq, lq)]
    probs = detector._predict(*(x.permute(0, 1, 3, 4, 2).numpy() for x in as_uint8))
    with torch.no_grad():
        logits = reference(*(x.float() / 255 for x in as_uint8)).double()
    assert np.allclose(probs, torch.sigmoid(logits / best["calibration"]["temperature"]).numpy(), atol=1e-5)
    merged = detector._predict.model
    assert not any("parametrizations" in k for k in merged.state_dict())   # plain weights: no slower to score
    assert merged.state_dict().keys() == DualStreamNet.from_config(cfg.model).state_dict().keys()
    # and onnxruntime's export (the CPU default without AMX), at the crop sizes the checkpoint scores
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (2, best["clip_len"], best["align"][k], best["align"][k], 3), dtype=np.uint8)
             for k in ("hq_size", "lq_size")]
    exported = OnnxClipModel(best, run_dir / "best.pt", clip_len=best["clip_len"],
                             temperature=best["calibration"]["temperature"], tta_flip=False)
    with torch.no_grad():
        logits = reference(*(torch.from_numpy(c).permute(0, 1, 4, 2, 3).float() / 255 for c in crops)).double()
    assert np.allclose(exported(*crops), torch.sigmoid(logits / best["calibration"]["temperature"]).numpy(),
                       atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "svd"])
def test_merging_the_adapters_keeps_the_outputs_with_batchnorm_folded_too(method):
    """efficientnet-pytorch's inference form folds BatchNorm into the convolutions: the adapters are merged first."""
    cfg = tiny_cfg()
    cfg.model.update(hq_backbone="efficientnet-b0")
    torch.manual_seed(0)
    model = DualStreamNet.from_config(cfg.model)
    peft.apply(model, method, RANK)
    with torch.no_grad():
        for p in model.backbone_parameters():   # adapters that change the model (LoRA's B starts at zero)
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    hq, lq = clips(1, batch=2)

    def outputs(net):   # the backbones' feature maps (a random head's logits hardly vary) and the logits
        return net.hq.backbone(hq.flatten(0, 1)), net.lq.backbone(lq.flatten(0, 1)), net(hq, lq)
    with torch.no_grad():
        adapted = outputs(model)
        unadapted = outputs(without_adapters(model, cfg.model))
        merged = outputs(model.for_inference())
    for a, u, m in zip(adapted, unadapted, merged):
        assert torch.allclose(m, a, atol=1e-4, rtol=1e-4)
    assert all((a - u).abs().max() > 1e-2 * a.abs().max() for a, u in zip(adapted[:2], unadapted[:2]))


def without_adapters(model: DualStreamNet, model_cfg) -> DualStreamNet:
    """A copy whose adapted layers hold only their frozen part."""
    plain = DualStreamNet.from_config(model_cfg)
    state = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in model.state_dict().items()
             if not is_adapter(k)}
    plain.load_state_dict(state)
    return plain.eval()


def test_checkpoints_from_before_peft_still_load():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = DualStreamNet.from_config(cfg.model).eval()
    old = {"model": model.state_dict(), "model_config": cfg.model.to_dict(), "format": 2}
    hq, lq = clips(2)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(old, "cpu")(hq, lq), model(hq, lq))


def test_bad_peft_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"train.peft: must be one of none, lora, svd, got 'qlora'"):
        load_config(overrides=[{"train": {"peft": "qlora"}}])
    model = DualStreamNet.from_config(tiny_cfg().model)
    with pytest.raises(InputError, match=r"train.peft_rank: 99 exceeds the rank of a \(\d+, \d+, 1, 1\) weight"):
        peft.apply(model, "lora", 99)
