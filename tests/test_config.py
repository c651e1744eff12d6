"""The one config object: defaults, overrides, and the up-front check of every value."""
from __future__ import annotations

import pytest
import torch
import yaml

from dfpipe.pipeline.config import DEFAULTS_PATH, RULES, ConfigError, load_config, parse_override
from dfpipe.stages import faces
from dfpipe.stages.faces import device_type, resolve_device


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def test_every_rule_names_a_real_key_and_the_defaults_pass_them():
    defaults = flat_keys(yaml.safe_load(DEFAULTS_PATH.read_text()))
    assert set(RULES) <= defaults  # a misspelt rule would never check anything
    cfg = load_config()
    assert cfg.align.margin == 1.3 and cfg.train.lr_head == 1e-3


def test_overrides_and_nullable_values():
    cfg = load_config(overrides=[parse_override("score.threshold=0.3"), parse_override("extract.max_frames=null"),
                                 parse_override("align.thresholds=[0.5, 0.6, 0.7]"), parse_override("demo.n_fake=0"),
                                 parse_override("train.grad_clip=null")])
    assert (cfg.score.threshold, cfg.extract.max_frames, cfg.align.thresholds) == (0.3, None, [0.5, 0.6, 0.7])
    assert (cfg.demo.n_fake, cfg.train.grad_clip) == (0, None)


@pytest.mark.parametrize("override, message", [
    ("extract.stride=abc", "extract.stride: must be an integer >= 1, got 'abc'"),
    ("extract.stride=0", "extract.stride: must be an integer >= 1, got 0"),
    ("extract.stride=2.5", "extract.stride: must be an integer >= 1, got 2.5"),
    ("extract.decoder=foo", "extract.decoder: must be one of auto, decord, pyav, got 'foo'"),
    ("extract.timeout=-1", "extract.timeout: must be a number > 0 or null, got -1"),
    ("extract.max_frames=0", "extract.max_frames: must be an integer >= 1 or null, got 0"),
    ("align.thresholds=abc", "align.thresholds: must be a list of 3 values, each a number in [0, 1], got 'abc'"),
    ("align.thresholds=[0.6, 0.7]", "align.thresholds: must be a list of 3 values"),
    ("align.min_face_size=0", "align.min_face_size: must be an integer >= 6, got 0"),
    ("align.smooth_window=true", "align.smooth_window: must be an integer >= 1, got True"),
    ("model.mlp=[]", "model.mlp: must be a list of values, each an integer >= 1, got []"),
    ("dataset.clip_len=0", "dataset.clip_len: must be an integer >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"),
    ("train.channels=3", "unknown config key 'train.channels'"),
    ("score.threshold=1.5", "score.threshold: must be a number in [0, 1] or null, got 1.5"),
    ("score.threshold=.nan", "score.threshold: must be a number in [0, 1] or null, got nan"),
    ("score.tta_flip=3", "score.tta_flip: must be true or false, got 3"),
    ("extract=3", "'extract' is a section, not a value: set its keys (e.g. extract.stride=...)"),
    ("extract.stride.x=1", "'extract.stride' is a value, not a section"),
    ("model.mlp=[1,2", "override 'model.mlp=[1,2': not valid YAML"),
    ("train.seed=-1", "train.seed: must be an integer from 0 to 2**32 - 1, got -1"),
    ("demo.seed=4294967296", "demo.seed: must be an integer from 0 to 2**32 - 1, got 4294967296"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[parse_override(override)])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_bad_value_in_a_config_file_is_named_with_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("align:\n  margin: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert str(e.value) == f"{tmp_path / 'c.yaml'}: align.margin: must be a number >= 0.5, got -1"
    (tmp_path / "c.yaml").write_text("align:\n  margn: 1.3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'align\.margn'"):
        load_config(tmp_path / "c.yaml")


def test_a_config_file_in_utf16_is_read_and_one_in_latin1_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes("extract:\n  stride: 2\n".encode("utf-16"))  # with its BOM
    assert load_config(tmp_path / "c.yaml").extract.stride == 2
    (tmp_path / "c.yaml").write_bytes("# caf\xe9\nextract:\n  stride: 2\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'c.yaml'}: not valid YAML (") and "\n" not in str(e.value)


def test_yaml_reads_numbers_and_words_as_people_write_them(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr_head: 3e-4\n  amp: off\n")
    cfg = load_config(tmp_path / "c.yaml", overrides=[parse_override("train.lr_backbone=1E-5")])
    assert (cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.amp) == (3e-4, 1e-5, "off")
    with pytest.raises(ConfigError, match="score.tta_flip: must be true or false, got 'yes'"):
        load_config(overrides=[parse_override("score.tta_flip=yes")])


@pytest.mark.parametrize("override, message", [
    ({"model": {"mlp": [16, 8, 4], "dropout": [0.5]}}, "model.dropout needs one value per hidden layer"),
    ({"model": {"convlstm_kernel": 4}}, "model.convlstm_kernel must be odd"),
    ({"pairs": {"val_fraction": 0.5, "test_fraction": 0.5}}, "pairs.val_fraction + pairs.test_fraction"),
    ({"score": {"confident_low": 0.9, "confident_high": 0.8}}, "score.confident_low must not exceed"),
    ({"train": {"plateau_factor": 1}}, "train.plateau_factor: must be a number in (0, 1), got 1"),
])
def test_values_that_are_only_wrong_together_are_caught_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(message)


def test_an_unusable_cuda_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is usable here"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_device_type_asks_torch_only_where_a_gpu_driver_is_loaded(monkeypatch):
    asked = []
    monkeypatch.setattr(faces, "resolve_device", lambda d: asked.append(d) or torch.device("cuda"))
    monkeypatch.setattr(faces.os.path, "exists", lambda p: False)
    assert (device_type("auto"), device_type("cpu"), asked) == ("cpu", "cpu", [])  # no driver: the CPU
    monkeypatch.setattr(faces.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert (device_type("auto"), device_type("cuda:1"), asked) == ("cuda", "cuda", ["auto", "cuda:1"])


def test_values_wrong_together_only_in_the_file_may_be_completed_by_an_override(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  mlp: [256, 128]\n")  # default dropout: two values
    cfg = load_config(tmp_path / "c.yaml", overrides=[parse_override("model.dropout=[0.3]")])
    assert (cfg.model.mlp, cfg.model.dropout) == ([256, 128], [0.3])
    with pytest.raises(ConfigError, match="model.dropout needs one value per hidden layer"):
        load_config(tmp_path / "c.yaml")
