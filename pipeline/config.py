"""One config object for every stage.

Defaults come only from ``defaults.yaml`` next to this file; a user file and CLI overrides are laid on top,
and a key that does not exist in the defaults is an error (a typo must not silently train with defaults).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")


class ConfigError(ValueError):
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
        if isinstance(base[key], dict) and isinstance(value, Mapping):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def parse_override(text: str) -> dict:
    """``train.lr_head=3e-4`` -> ``{'train': {'lr_head': 0.0003}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[Mapping] | None = None) -> Config:
    with open(DEFAULTS_PATH) as f:
        cfg = yaml.safe_load(f)
    if path is not None:
        try:
            with open(path) as f:
                user = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        _merge(cfg, user, "")
    for update in overrides or []:
        _merge(cfg, update, "")
    return _wrap(cfg)
