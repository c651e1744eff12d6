"""One config object for every stage.

Defaults come only from ``defaults.yaml`` next to this file; a user file and CLI overrides are laid on top,
and a key that does not exist in the defaults is an error (a typo must not silently train with defaults).
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..manifests.errors import InputError

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")


class _Loader(yaml.SafeLoader):
    """YAML as configs are written: `3e-4` is a number (YAML 1.1 wants `3.0e-4`) and only true/false are booleans
    (YAML 1.1 also reads on/off/yes/no, so `amp: off` would be False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(InputError):
    pass


class Config(dict):
    """A nested dict whose keys are also attributes (``cfg.align.margin``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def _merge(base: dict, update: Mapping, where: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}'")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{where}{key}' is a section, not a value: set its keys "
                                  f"(e.g. {where}{key}.{next(iter(base[key]))}=...)")
            _merge(base[key], value, f"{where}{key}.")
        elif isinstance(value, Mapping):
            raise ConfigError(f"'{where}{key}' is a value, not a section")
        else:
            base[key] = value


# ---------------------------------------------------------------- what each value may be
# Checked once when the config is loaded, so a bad value is one line naming the key before any work starts (not
# the same Python error for every video in a worker). Keys not listed here must have the type of their default.

Rule = tuple[Callable[[Any], bool], str]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _at_least(low: float, *, integer: bool = True) -> Rule:
    kind = _is_int if integer else _is_number
    return (lambda v: kind(v) and v >= low), f"{'an integer' if integer else 'a number'} >= {low:g}"


def _between(low: float, high: float, *, open_high: bool = False) -> Rule:
    return ((lambda v: _is_number(v) and low <= v and (v < high if open_high else v <= high)),
            f"a number in [{low:g}, {high:g}{')' if open_high else ']'}")


def _positive() -> Rule:
    return (lambda v: _is_number(v) and v > 0), "a number > 0"


def _one_of(*names: str) -> Rule:
    return (lambda v: v in names), f"one of {', '.join(names)}"


def _or_null(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v)), f"{rule[1]} or null"


def _list_of(rule: Rule, length: int | None = None) -> Rule:
    size = f"{length} " if length else ""
    return ((lambda v: isinstance(v, list) and len(v) >= 1 and (length is None or len(v) == length)
             and all(rule[0](x) for x in v)), f"a list of {size}values, each {rule[1]}")


COUNT, POSITIVE, NON_NEGATIVE = _at_least(0), _at_least(1), _at_least(0, integer=False)
SEED = ((lambda v: _is_int(v) and 0 <= v < 2 ** 32), "an integer from 0 to 2**32 - 1")  # numpy's range
FRACTION, PROBABILITY = _between(0, 1, open_high=True), _between(0, 1)
DEVICE = _one_of("auto", "cpu", "cuda")
WEIGHT_FILE = _or_null(((lambda v: isinstance(v, str) and bool(v)), "imagenet or a weight file path"))
RULES: dict[str, Rule] = {
    "extract.stride": POSITIVE, "extract.max_frames": _or_null(POSITIVE), "extract.jpeg_quality": _between(1, 100),
    "extract.decoder": _one_of("auto", "decord", "pyav"), "extract.workers": COUNT,
    "extract.timeout": _or_null(_positive()),
    "align.device": DEVICE, "align.batch_size": POSITIVE, "align.detect_every": POSITIVE,
    # below P-Net's 12 px window the frame is enlarged by 12 / min_face_size: past 2x, a larger detect_max_side
    # finds the same faces for less
    "align.detect_max_side": _at_least(12), "align.min_face_size": _at_least(6),
    "align.thresholds": _list_of(PROBABILITY, 3), "align.min_prob": PROBABILITY,
    "align.track_iou": _between(0, 1), "align.track_max_gap": COUNT, "align.track_max_shift": NON_NEGATIVE,
    "align.min_track_len": POSITIVE, "align.max_faces": _or_null(POSITIVE), "align.smooth_window": POSITIVE,
    "align.margin": _at_least(0.5, integer=False), "align.hq_size": _at_least(16), "align.lq_size": _at_least(8),
    "align.jpeg_quality": _between(1, 100),
    "pairs.val_fraction": FRACTION, "pairs.test_fraction": FRACTION,
    "dataset.clip_len": POSITIVE, "dataset.short_tracks": _one_of("skip", "pad"),
    "dataset.val_clips_per_track": POSITIVE,
    **{f"dataset.augment.{k}": PROBABILITY for k in ("flip", "affine", "color_jitter", "jpeg", "blur", "noise",
                                                      "cutout", "randaugment", "mixup", "cutmix")},
    "dataset.augment.randaugment_ops": POSITIVE, "dataset.augment.randaugment_magnitude": (
        lambda v: _is_int(v) and 0 <= v <= 30, "an integer from 0 to 30"),
    "dataset.augment.mixup_alpha": _positive(), "dataset.augment.cutmix_alpha": _positive(),
    "dataset.synthesize": _one_of("none", "sbi"), "dataset.sbi_fraction": PROBABILITY,
    "model.bottleneck": _or_null(POSITIVE), "model.convlstm_filters": _list_of(POSITIVE), "model.convlstm_kernel": POSITIVE,
    "model.mlp": _list_of(POSITIVE), "model.dropout": (lambda v: v == [] or _list_of(FRACTION)[0](v),
                                                        _list_of(FRACTION)[1]),
    "model.pretrained_hq": WEIGHT_FILE, "model.pretrained_lq": WEIGHT_FILE,
    "train.device": DEVICE, "train.epochs": POSITIVE, "train.batch_size": POSITIVE, "train.workers": COUNT,
    "train.lr_backbone": NON_NEGATIVE, "train.lr_head": NON_NEGATIVE, "train.weight_decay": NON_NEGATIVE,
    "train.scheduler": _one_of("plateau", "cosine", "onecycle"),
    "train.plateau_factor": ((lambda v: _is_number(v) and 0 < v < 1), "a number in (0, 1)"),
    "train.plateau_patience": COUNT, "train.warmup_epochs": COUNT, "train.early_stop_patience": POSITIVE,
    "train.grad_clip": _or_null(_positive()), "train.accumulate": POSITIVE, "train.amp": _one_of("auto", "off"),
    "train.freeze_backbone_epochs": COUNT, "train.loss": _one_of("bce", "focal", "smooth"),
    "train.peft": _one_of("none", "lora", "svd"), "train.peft_rank": POSITIVE,
    "train.label_smoothing": FRACTION, "train.focal_gamma": NON_NEGATIVE,
    "train.steps_per_epoch": _or_null(POSITIVE),
    "score.device": DEVICE, "score.batch_size": _or_null(POSITIVE),
    "score.aggregate": _or_null(_one_of("mean", "median", "max", "topk", "confident")), "score.topk": POSITIVE,
    "score.confident_high": PROBABILITY, "score.confident_low": PROBABILITY,
    "score.confident_fraction": PROBABILITY, "score.clip_every": POSITIVE,
    "score.threshold": _or_null(PROBABILITY), "score.fallback_score": _or_null(PROBABILITY),
    "score.suspicious_frames": COUNT, "score.mc_samples": COUNT, "score.ensemble": _one_of("mean", "median"),
    "score.runtime": _one_of("auto", "torch", "onnx"),
    "report.faces": COUNT, "report.strip_frames": COUNT, "report.thumb_size": _at_least(16),
    **{f"{section}.seed": SEED for section in ("pairs", "train", "demo")},
    "demo.n_real": POSITIVE, "demo.n_fake": COUNT, "demo.frames": POSITIVE, "demo.width": _at_least(64),
    "demo.height": _at_least(64), "demo.fps": POSITIVE,
}


def _default_type(default: Any) -> Rule:
    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "true or false"
    if _is_int(default):
        return _is_int, "an integer"
    if isinstance(default, float):
        return _is_number, "a number"
    return (lambda v: isinstance(v, type(default))), f"a {type(default).__name__}"


# Values that are only wrong together: (check over the whole config, what must hold).
TOGETHER: list[tuple[Callable[[dict], bool], str]] = [
    (lambda c: len(c["model"]["dropout"]) == len(c["model"]["mlp"]) - 1,
     "model.dropout needs one value per hidden layer of model.mlp (len(mlp) - 1)"),
    (lambda c: c["model"]["convlstm_kernel"] % 2 == 1, "model.convlstm_kernel must be odd (it keeps the grid size)"),
    (lambda c: c["pairs"]["val_fraction"] + c["pairs"]["test_fraction"] < 1,
     "pairs.val_fraction + pairs.test_fraction must leave videos to train on (sum < 1)"),
    (lambda c: c["score"]["confident_low"] <= c["score"]["confident_high"],
     "score.confident_low must not exceed score.confident_high"),
    (lambda c: c["dataset"]["augment"]["mixup"] + c["dataset"]["augment"]["cutmix"] <= 1,
     "dataset.augment.mixup + dataset.augment.cutmix must not exceed 1 (a clip is mixed one way at most)"),
]


def _validate(cfg: dict, defaults: dict) -> None:
    _check_values(cfg, defaults)
    for check, what in TOGETHER:
        if not check(cfg):
            raise ConfigError(what)


def _check_values(cfg: dict, defaults: dict, where: str = "") -> None:
    for key, value in cfg.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            _check_values(value, defaults[key], f"{name}.")
            continue
        check, what = RULES.get(name) or _default_type(defaults[key])
        if not check(value):
            raise ConfigError(f"{name}: must be {what}, got {value!r}")


def parse_override(text: str) -> dict:
    """``train.lr_head=3e-4`` -> ``{'train': {'lr_head': 0.0003}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': not valid YAML ({str(e).splitlines()[0]})") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[Mapping] | None = None) -> Config:
    with open(DEFAULTS_PATH, "rb") as f:
        cfg = read_yaml(f)
    defaults = copy.deepcopy(cfg)
    if path is not None:
        try:
            with open(path, "rb") as f:  # bytes: PyYAML reads UTF-8 and, by their BOM, UTF-16 files
                user = read_yaml(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        try:  # per-value rules name the file; rules across values wait for the overrides that may complete it
            _merge(cfg, user, "")
            _check_values(cfg, defaults)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for update in overrides or []:
        _merge(cfg, update, "")
    _validate(cfg, defaults)
    return _wrap(cfg)
