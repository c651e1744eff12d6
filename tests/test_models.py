"""The detector network: backbones, ConvLSTM, dual-stream fusion. Tiny timm test models unless a name is the point."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import timm
import torch
from efficientnet_pytorch import EfficientNet
from safetensors.torch import save_file
from torch import nn

from dfpipe.models.backbones import build_backbone
from dfpipe.models.convlstm import ConvLSTM, ConvLSTMCell
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config
from dfpipe.stages.checkpoint import model_from_checkpoint
from dfpipe.stages.inference import ClipModel

TINY = "test_efficientnet"


def tiny_model_cfg(**overrides) -> dict:
    cfg = dict(load_config().model, hq_backbone=TINY, lq_backbone=TINY, convlstm_filters=[8, 4], mlp=[16, 8, 4],
               pretrained_hq=None, pretrained_lq=None, bottleneck=None)
    cfg.update(overrides)
    return cfg


def clips(batch: int = 2, steps: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, steps, 3, 64, 64, generator=g), torch.rand(batch, steps, 3, 32, 32, generator=g)


def assert_same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert own, "module has no weights"
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


# ---- backbones ------------------------------------------------------------------------------------------------

def test_timm_backbone_returns_unpooled_last_feature_map():
    backbone = build_backbone(TINY, pretrained=None).eval()
    out = backbone(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, backbone.out_channels, 2, 2)


def test_efficientnet_pytorch_backbone_returns_last_feature_map():
    backbone = build_backbone("efficientnet-b0", pretrained=None).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        assert out.shape == (1, 1280, 2, 2) and backbone.out_channels == 1280
        assert torch.equal(out, backbone.net.extract_features(x))


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Random init leaves every BatchNorm an identity; give them statistics so that folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, low, high in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5),
                                 (m.bias, -0.2, 0.2)):
                t.data.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)


def test_efficientnet_pytorch_backbone_computes_exactly_the_original_network():
    """SiLU for the custom Swish and the convolutions' own padding for stride-1 "same" padding are rewrites, not
    changes: with the same weights, the original efficientnet-pytorch network gives the same features."""
    backbone = build_backbone("efficientnet-b0", pretrained=None).eval()
    randomise_batchnorm(backbone)
    original = EfficientNet.from_name("efficientnet-b0", include_top=False, image_size=None).eval()
    original.load_state_dict(backbone.net.state_dict())
    assert not any(type(m).__name__ == "MemoryEfficientSwish" for m in backbone.modules())
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), original.extract_features(x), rtol=1e-5, atol=1e-5)


def test_inference_form_keeps_the_outputs_and_removes_every_batchnorm():
    model = DualStreamNet.from_config(dict(tiny_model_cfg(), hq_backbone="efficientnet-b0",
                                           lq_backbone="efficientnet-b0")).eval()
    randomise_batchnorm(model.hq.backbone)
    randomise_batchnorm(model.lq.backbone, seed=1)
    hq, lq = torch.rand(2, 3, 3, 112, 112), torch.rand(2, 3, 3, 56, 56)
    with torch.no_grad():
        want = model.hq.backbone(hq[0]), model(hq, lq)
        model.for_inference()
        got = model.hq.backbone(hq[0]), model(hq, lq)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert want[0].abs().mean() > 0.01  # the features are not all zero: the comparison means something
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_random_init_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dfpipe.models.backbones"):
        build_backbone(TINY, pretrained=None)
    assert any("randomly initialised" in r.getMessage() and TINY in r.getMessage() for r in caplog.records)


def test_timm_weights_from_local_safetensors_are_loaded(tmp_path):
    source = timm.create_model(TINY, pretrained=False)  # with its 1000-class classifier, like a published file
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    backbone = build_backbone(TINY, pretrained=path)
    assert_same_weights(backbone.net, source.state_dict())


def test_efficientnet_pytorch_weights_from_local_pth_are_loaded(tmp_path):
    source = EfficientNet.from_name("efficientnet-b0")  # includes _fc, as lukemelas' released files do
    path = tmp_path / "b0.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("efficientnet-b0", pretrained=path)
    assert_same_weights(backbone.net, source.state_dict())


def test_missing_weight_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_backbone(TINY, pretrained=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model(TINY, pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit backbone efficientnet-b0") as err:
        build_backbone("efficientnet-b0", pretrained=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_weight_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a weight file \(expected what torch.save writes") as err:
        build_backbone(TINY, pretrained=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(b"PK\x03\x04 a cut zip")  # looks like torch.save's, but cannot be read
    with pytest.raises(ValueError, match="cannot read weights") as err:
        build_backbone(TINY, pretrained=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_backbone_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'efficientnet-b9'"):
        build_backbone("efficientnet-b9", pretrained=None)


def test_convnext_returns_nchw():
    backbone = build_backbone("convnext_atto", pretrained=None).eval()
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 320, 2, 2)


def test_nhwc_output_is_turned_into_nchw():
    # test_mambaout is a tiny timm model that, like swin, emits NHWC from forward_features.
    backbone = build_backbone("test_mambaout", pretrained=None).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        nhwc = backbone.net.forward_features(x)
    assert nhwc.shape == (1, 2, 2, 64)
    assert out.shape == (1, 64, 2, 2) and backbone.out_channels == 64
    assert torch.equal(out[0, :, 0, 1], nhwc[0, 0, 1])


def test_vit_tokens_are_reshaped_to_a_grid_without_the_class_token():
    backbone = build_backbone("test_vit", pretrained=None).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = backbone(x)
        tokens = backbone.net.forward_features(x)
    assert tokens.shape == (1, 17, 64) and out.shape == (1, 64, 4, 4)
    assert torch.equal(out[0, :, 1, 3], tokens[0, 1 + 1 * 4 + 3])


# ---- ConvLSTM -------------------------------------------------------------------------------------------------

def test_convlstm_cell_matches_hand_computation():
    # 1x1 kernel, one channel each: every pixel is an independent scalar LSTM we can compute with math.
    weights = {"i": (0.5, -0.3, 0.1), "f": (0.2, 0.4, -0.1), "o": (-0.6, 0.3, 0.2), "g": (0.9, -0.7, 0.05)}
    net = ConvLSTM(1, [1], 1)
    cell = net.cells[0]
    with torch.no_grad():
        for row, gate in enumerate("ifog"):
            wx, wh, b = weights[gate]
            cell.input_conv.weight[row, 0, 0, 0], cell.hidden_conv.weight[row, 0, 0, 0] = wx, wh
            cell.input_conv.bias[row] = b

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    def expected(xs):
        h = c = 0.0
        for x in xs:
            pre = {k: wx * x + wh * h + b for k, (wx, wh, b) in weights.items()}
            c = sigmoid(pre["f"]) * c + sigmoid(pre["i"]) * math.tanh(pre["g"])
            h = sigmoid(pre["o"]) * math.tanh(c)
        return h

    sequences = [(1.0, -2.0, 0.5), (0.0, 3.0, -1.0)]  # one per pixel
    x = torch.tensor(sequences).T.reshape(1, 3, 1, 1, 2)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 1, 1, 2)
    for pixel, xs in enumerate(sequences):
        assert out[0, 0, 0, pixel].item() == pytest.approx(expected(xs), abs=1e-6)


def test_convlstm_stack_shapes_and_state_carry_over_time():
    net = ConvLSTM(5, [6, 3], 3)
    x = torch.rand(2, 4, 5, 7, 7)
    out = net(x)
    assert out.shape == (2, 3, 7, 7)
    assert not torch.allclose(out, net(x.flip(1)))  # order of frames matters: state is carried


def test_convlstm_equals_one_gate_conv_over_input_and_hidden_state_and_loads_its_weights():
    # The textbook cell: one conv over [x_t, h_{t-1}]. Checkpoints written before the split hold that conv's tensors.
    torch.manual_seed(0)
    reference = [nn.Conv2d(5 + 6, 24, 3, padding=1).double(), nn.Conv2d(6 + 3, 12, 3, padding=1).double()]
    net = ConvLSTM(5, [6, 3], 3).double()
    net.load_state_dict({f"cells.{k}.conv.{name}": tensor for k, conv in enumerate(reference)
                         for name, tensor in conv.state_dict().items()})
    x = torch.rand(2, 4, 5, 7, 7, dtype=torch.float64)
    sequence = list(x.unbind(1))
    for conv, hidden in zip(reference, (6, 3)):
        h = c = torch.zeros(2, hidden, 7, 7, dtype=torch.float64)
        for t, x_t in enumerate(sequence):
            i, f, o, g = conv(torch.cat([x_t, h], dim=1)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = sequence[t] = torch.sigmoid(o) * torch.tanh(c)
    with torch.no_grad():
        assert torch.allclose(net(x), sequence[-1], rtol=0, atol=1e-12)


def test_convlstm_cell_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        ConvLSTMCell(4, 4, 2)


# ---- dual stream ----------------------------------------------------------------------------------------------

def test_forward_shapes_and_attention_weights_sum_to_one():
    model = DualStreamNet.from_config(tiny_model_cfg()).eval()
    hq, lq = clips(batch=3)
    with torch.no_grad():
        logits, weights = model(hq, lq, return_attention=True)
        assert torch.equal(model(hq, lq), logits)
    assert logits.shape == (3,) and weights.shape == (3, 2)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))
    assert (weights > 0).all()


def test_frames_per_call_splits_the_clip_in_eval_mode_only():
    torch.manual_seed(0)
    model = DualStreamNet.from_config(tiny_model_cfg())
    hq, lq = clips(batch=2, steps=5)
    model.eval()
    with torch.no_grad():
        whole = model(hq, lq)
        calls = []
        hook = model.hq.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        for stream in (model.hq, model.lq):
            stream.frames_per_call = 2
        split = model(hq, lq)
    assert calls == [4, 4, 2]  # 2 clips x 2 frames, twice, then the last frame of each
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    model.train()  # training's BatchNorm statistics must cover all frames at once
    calls.clear()
    model(hq, lq)
    hook.remove()
    assert calls == [10]


def test_gradients_reach_both_backbones_and_convlstms():
    # Seeded: with dropout 0.5 in a 16-8-4 head, about one random init in twenty drops every path to a backbone.
    torch.manual_seed(0)
    model = DualStreamNet.from_config(tiny_model_cfg()).train()
    model(*clips()).sum().backward()
    for part in (model.hq.backbone, model.lq.backbone, model.hq.temporal, model.lq.temporal, model.fusion):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(part).__name__
    for stream in (model.hq, model.lq):
        for cell in stream.temporal.cells:
            assert cell.input_conv.weight.grad.abs().sum() > 0 and cell.hidden_conv.weight.grad.abs().sum() > 0


def test_backbone_and_head_parameters_partition_the_model():
    model = DualStreamNet.from_config(tiny_model_cfg())
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.hq.backbone.parameters()} <= backbone


def test_frozen_backbones_get_no_gradient_and_keep_batchnorm_statistics():
    model = DualStreamNet.from_config(tiny_model_cfg())
    model.freeze_backbones(True)
    model.train()
    stats = {k: v.clone() for k, v in model.hq.backbone.state_dict().items() if "running_mean" in k}
    model(*clips()).sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert any(p.grad is not None for p in model.head_parameters())
    assert all(torch.equal(v, model.hq.backbone.state_dict()[k]) for k, v in stats.items())
    model.freeze_backbones(False)
    assert model.hq.backbone.training and all(p.requires_grad for p in model.backbone_parameters())


def test_bf16_autocast_channels_last_is_close_to_fp32():
    reference = DualStreamNet.from_config(tiny_model_cfg(channels_last=False, dropout=[0.0, 0.0]))
    fast = DualStreamNet.from_config(tiny_model_cfg(channels_last=True, dropout=[0.0, 0.0]))
    fast.load_state_dict(reference.state_dict())
    assert fast.hq.backbone.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    hq, lq = clips(batch=4)
    with torch.no_grad():
        want = reference.hq(hq), reference.lq(lq), reference(hq, lq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast.hq(hq), fast.lq(lq), fast(hq, lq)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        assert (g.float() - w).abs().max() <= 0.03 * w.abs().max() + 1e-3
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert got[2].dtype == torch.float32 and not on_bf16_grid(got[2])  # the head ran in fp32: no tied logits


def on_bf16_grid(x: torch.Tensor) -> bool:
    return bool(torch.equal(x.bfloat16().float(), x))


def test_the_bottleneck_feeds_the_convlstm_and_checkpoints_without_it_score_as_before():
    """The default model projects the backbone's map to the ConvLSTM's width first; a checkpoint written before the
    setting existed (no `bottleneck` key in its model_config) rebuilds without one and gives its own logits."""
    assert load_config().model.bottleneck == load_config().model.convlstm_filters[0]
    torch.manual_seed(0)
    narrow = DualStreamNet.from_config(tiny_model_cfg(bottleneck=6, dropout=[0.0, 0.0])).eval()
    assert narrow.hq.bottleneck.out_channels == narrow.hq.temporal.cells[0].input_conv.in_channels == 6
    old_config = {k: v for k, v in tiny_model_cfg(dropout=[0.0, 0.0]).items() if k != "bottleneck"}
    old = DualStreamNet(**old_config).eval()
    assert not any("bottleneck" in key for key in old.state_dict())
    rebuilt = model_from_checkpoint({"model": old.state_dict(), "model_config": old_config}, "cpu")
    hq, lq = clips()
    with torch.no_grad():
        assert torch.equal(rebuilt(hq, lq), old(hq, lq))
        assert narrow(hq, lq).shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_fp16_scoring_on_cuda_is_close_to_fp32_on_the_cpu():
    model = DualStreamNet.from_config(tiny_model_cfg(dropout=[0.0, 0.0])).eval()
    rng = np.random.default_rng(0)
    hq, lq = (rng.integers(0, 256, (4, 3, size, size, 3), dtype=np.uint8) for size in (64, 32))
    cpu = ClipModel(copy.deepcopy(model), device=torch.device("cpu"), dtype=None, temperature=1.0, tta_flip=False)
    cuda = ClipModel(model.cuda(), device=torch.device("cuda"), dtype=torch.float16, temperature=1.0,
                     tta_flip=False)
    np.testing.assert_allclose(cuda(hq, lq), cpu(hq, lq), atol=0.01)


def test_bad_clip_shape_is_rejected():
    model = DualStreamNet.from_config(tiny_model_cfg())
    hq, lq = clips()
    with pytest.raises(ValueError, match=r"hq clips must be float \(B,T,3,H,W\)"):
        model(hq[:, 0], lq)


def test_dropout_count_must_match_mlp():
    with pytest.raises(ValueError, match="model.dropout needs 2 values"):
        DualStreamNet.from_config(tiny_model_cfg(dropout=[0.5]))
