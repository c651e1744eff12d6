"""dfpipe as a library, under the `dfpipe` command: the stages as functions, and `Detector` to score videos.

    import dfpipe
    dfpipe.extract("videos/", "ws")                    # each stage returns the summary the command prints
    dfpipe.align("ws")
    dfpipe.train("ws", "run", train={"epochs": 5})     # sections of pipeline/defaults.yaml as keyword arguments
    detector = dfpipe.Detector.from_checkpoint("run/best.pt")
    result = detector.score("clip.mp4")                # a VideoScore: score, label, status, tracks, ...

`import dfpipe` loads no torch: `Detector`, `VideoScore` and the stages' modules are imported on first use, so
that `dfpipe status` (which imports this package first, as every `dfpipe.*` module does) stays instant.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .pipeline import __version__
from .pipeline.config import Config, load_config

_LAZY = {name: "dfpipe.stages.detector" for name in ("Detector", "VideoScore", "TrackScore", "ClipScore")}
__all__ = ["Detector", "VideoScore", "TrackScore", "ClipScore", "extract", "align", "train", "load_config",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dfpipe' has no attribute {name!r}")


def _config(config: str | Path | Config | None, sections: dict) -> Config:
    """A loaded Config as it is; else defaults, the YAML file ``config``, then ``sections`` ({"extract": {...}})."""
    if isinstance(config, Config):
        return load_config(overrides=[config.to_dict(), sections])
    return load_config(config, [sections])


def extract(input_path: str | Path, work: str | Path, *, dataset: str = "auto", config=None, progress: bool = False,
            retry_failed: bool = False, prune: bool = False, **sections):
    """`dfpipe extract INPUT --work WORK`; returns its RunSummary (done, skipped and failed videos)."""
    from .manifests.workspace import Workspace
    from .stages.extract import run_extract
    _, summary = run_extract(Workspace(work), input_path, _config(config, sections), dataset=dataset,
                             retry_failed=retry_failed, prune=prune, progress=progress)
    return summary


def align(work: str | Path, *, config=None, progress: bool = False, retry_failed: bool = False, **sections):
    """`dfpipe align --work WORK`; returns its RunSummary."""
    from .manifests.workspace import Workspace
    from .stages.align import run_align
    return run_align(Workspace(work), _config(config, sections), retry_failed=retry_failed, progress=progress)


def train(work: str | Path, run_dir: str | Path, *, config=None, resume: bool = False, progress: bool = False,
          **sections) -> dict:
    """`dfpipe train --work WORK --run RUN_DIR`; returns the run's summary (best epoch, losses, calibration)."""
    from .stages.train import run_train
    return run_train(work, run_dir, _config(config, sections), resume=resume, progress=progress)
