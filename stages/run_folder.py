"""A run folder besides its checkpoints: config.yaml, run.json (provenance), training_pairs.csv (the splits it was
trained on), and which settings a run continued in it may change."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from ..manifests.progress import tee
from ..manifests.table import atomic_write_bytes, write_table
from ..pipeline import __version__
from ..pipeline.config import load_config
from . import pairs as pairs_mod
from .distributed import Ranks


@dataclass(frozen=True)
class RunPaths:
    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"


def run_config(run_dir: str | Path, config_file: str | Path | None, resume: bool) -> str | Path | None:
    """The config a run starts from: `--resume` continues with the run's own config.yaml unless one is given."""
    own = Path(run_dir) / "config.yaml"
    return own if resume and config_file is None and own.is_file() else config_file


LOG = "train.log"


def git_commit(folder: Path | None = None) -> str | None:
    """The commit checked out in ``folder`` (default: dfpipe's own source), if it is in a git repository."""
    try:
        out = subprocess.run(["git", "-C", str(folder or Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def train_log(run_dir: str | Path, cfg):
    """RUN_DIR/train.log (appended by each call, rank 0 alone): what train prints, after a header saying what ran,
    where and with what, so that a log found without its shell or job script still tells how it was made."""
    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return tee(Path(run_dir) / LOG, log_header(cfg))


def log_header(cfg) -> str:
    import torch
    from importlib.metadata import version
    gpus = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "no CUDA GPU")
    config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return "\n".join([
        f"==== dfpipe train, {datetime.now(timezone.utc).isoformat(timespec='seconds')} ====",
        f"command: dfpipe {shlex.join(sys.argv[1:])}",
        f"versions: dfpipe {__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {version('torchvision')}, timm {version('timm')}",
        f"device: train.device {cfg.train.device}; {gpus}; CPU {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        f"git commit of {Path.cwd()}: {git_commit(Path.cwd()) or 'none (not a git repository)'}",
        "config:", *(f"  {line}" for line in config.splitlines()), ""])


# What a resumed run may change: how long it goes on and where it runs. Anything else (clip length, model, learning
# rate, ...) would make its later epochs incomparable with the earlier ones that best-epoch selection weighs them
# against.
RESUMABLE = ("train.epochs", "train.early_stop_patience", "train.workers", "train.device")
WHERE_IT_RUNS = ("train.workers", "train.device")  # what the same command run again may change


# Settings added since runs were first made whose defaults are what a run made before them did (off): such a run's
# config lacks them, and reads as having the defaults, so the same command still continues or finds it finished.
OFF_BEFORE = ("dataset.augment.randaugment", "dataset.augment.mixup", "dataset.augment.cutmix", "train.peft")


def changed_settings(saved: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """`key (run: x, now: y)` for each training setting (pairs, dataset, model, train) not in `may_change` that
    differs."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out
    old, new = (flat({k: c.get(k, {}) for k in ("pairs", "dataset", "model", "train")}) for c in (saved, now))
    defaults = flat(load_config().to_dict())
    old.update({k: defaults[k] for k in defaults.keys() - old.keys() if k.startswith(OFF_BEFORE)})
    return [f"{k} (run: {old.get(k)!r}, now: {new.get(k)!r})" for k in sorted(old.keys() | new.keys())
            if k not in may_change and old.get(k) != new.get(k)]


def write_run_files(run_dir: Path, cfg, pairs: pd.DataFrame, ctx: Ranks, resume: bool,
                    initial_weights: dict, parameters: dict | None = None) -> None:
    """config.yaml (the resolved config), run.json (provenance: where each backbone's starting weights came
    from, "random" included; how many parameters train (``parameters``); a resume appends its start time) and the
    training pairs the run was trained on: the
    workspace's may be redrawn by a later run, and its held-out split must still be the one this model never saw."""
    digest = pairs_mod.pairs_digest(pairs)
    write_table(run_dir / pairs_mod.RUN_PAIRS, pairs, pairs_mod.COLUMNS)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if resume and path.is_file() else {"started": now, "resumed": []}
    if resume:
        info["resumed"].append(now)
    info.update(dfpipe_version=__version__, git_commit=git_commit(), pairs_digest=digest, world_size=ctx.world,
                device=str(ctx.device), initial_weights=info.get("initial_weights", initial_weights),
                parameters=parameters)
    atomic_write_bytes(path, (json.dumps(info, indent=1) + "\n").encode())
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
