"""Several checkpoints scoring together (`score-video --checkpoint a.pt --checkpoint b.pt`): one decode-detect-align
pass cuts the clips, every model scores each clip, each model's video score comes from its own calibration
(temperature, rule, rule parameters), and the video score is their mean or median (`score.ensemble`).

Only models that would cut the same clips can share them: the checkpoints' frame stride, alignment settings and
clip length must agree. The threshold is `score.threshold` when given (such as one `dfpipe calibrate` fitted on a
labelled list), else the same mean or median of the models' own thresholds.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifests.units import sha256_file
from .calibration import decide
from .checkpoint import load_checkpoint
from .evaluate import binary_metrics, fit_threshold
from .inference import Predict
from .onnx_model import cached_card, runtime_for
from .labels import TARGET
from .score import Scoring, ScoreError, scoring_settings

COMBINE = {"mean": np.mean, "median": np.median}


@dataclass(frozen=True)
class EnsembleScoring(Scoring):
    """The first model's decode, crop and rule settings (what the clips, track scores and suspicious frames come
    from), and every model's own (``members``), which decide each model's video score."""
    members: tuple[Scoring, ...] = ()
    combine: str = "mean"

    def clip_extra(self) -> str | None:
        return "model_clip_probs"

    def _params(self, skip: tuple[str, ...] = ()) -> dict:
        """The members' settings by the same rule, so that a new threshold or rule re-decides stored rows."""
        return {**super()._params((*skip, "members")), "members": [m._params(skip) for m in self.members]}

    def decide(self, row: dict) -> dict:
        """Clip probabilities are the models' mean (`stacked`), each model's are ``model_clip_probs``."""
        base = decide(row, self)
        if row["status"] != "ok":
            return {**base, "model_scores": []}
        per_clip = row["model_clip_probs"]
        scores = [decide({**row, "clip_probs": [[t, probs[m], f] for (t, _, f), probs in
                                                zip(row["clip_probs"], per_clip)]}, member)["score"]
                  for m, member in enumerate(self.members)]
        score = float(COMBINE[self.combine](scores))
        return {**base, "score": score, "label": "fake" if score >= self.threshold else "real",
                "model_scores": scores}


def _settings(scoring: Scoring) -> dict:
    """What the clips depend on, by the config key a user would look up."""
    return {"extract.stride": scoring.stride, "dataset.clip_len": scoring.clip_len,
            **{f"align.{k}": v for k, v in scoring.align.items()}}


def ensemble_scoring(scorings: list[Scoring], checkpoints: list[str], score_cfg) -> EnsembleScoring:
    first = _settings(scorings[0])
    for scoring, checkpoint in zip(scorings[1:], checkpoints[1:]):
        own = _settings(scoring)
        for key in sorted(first.keys() | own.keys()):
            if first.get(key) != own.get(key):
                raise ScoreError(f"{checkpoint}: {key} {own.get(key)!r} differs from {checkpoints[0]}'s "
                                 f"{first.get(key)!r}; an ensemble's models must score the same clips")
    if score_cfg.mc_samples:
        raise ScoreError("score.mc_samples: Monte-Carlo dropout scores one checkpoint, not an ensemble")
    thresholds = [s.threshold for s in scorings]
    threshold = score_cfg.threshold if score_cfg.threshold is not None else COMBINE[score_cfg.ensemble](thresholds)
    return EnsembleScoring(**{**scorings[0].__dict__, "threshold": float(threshold)}, members=tuple(scorings),
                           combine=score_cfg.ensemble)


def stacked(models: list[Predict]) -> Predict:
    """(B, 1 + M) probabilities: the models' mean, then each model's (see `Clip.samples`)."""
    def predict(hq: np.ndarray, lq: np.ndarray) -> np.ndarray:
        probs = np.stack([model(hq, lq) for model in models], axis=1)
        return np.concatenate([probs.mean(axis=1, keepdims=True), probs], axis=1)
    return predict


def fitted_threshold(csv_path) -> str:
    """`dfpipe calibrate`: the balanced-accuracy threshold on the labelled videos' scores of a score-video CSV."""
    table = pd.read_csv(csv_path, keep_default_na=False)
    labelled = table[(table.true_label != "") & (table.score != "")]
    if labelled.true_label.nunique() < 2:
        raise ScoreError(f"{csv_path}: a threshold needs labelled real and fake videos with a score; "
                         f"{len(labelled)} scored video(s) of {labelled.true_label.nunique()} class(es)")
    labels, scores = labelled.true_label.map(TARGET).to_numpy(), labelled.score.astype(float).to_numpy()
    threshold = fit_threshold(labels, scores)
    accuracy = binary_metrics(labels, scores, threshold=threshold)["balanced_accuracy"]
    return (f"calibrate: threshold {threshold:.6g} (balanced accuracy {accuracy:.3f} over {len(labelled)} labelled "
            f"videos, scores in {csv_path}); give it to score-video as --threshold {threshold:.6g}")


def load_models(checkpoint: str | list[str], cfg, *, device: str = "auto") -> tuple[list[dict], Scoring]:
    """A checkpoint path, or a list of them (an ensemble, even of one): the checkpoints and their scoring, for
    scoring on `device`. Where the models run in onnxruntime there, a checkpoint whose export is cached is read from
    its card instead (`onnx_model.cached_card`: no weights, no torch)."""
    paths = [str(checkpoint)] if isinstance(checkpoint, (str, Path)) else [str(c) for c in checkpoint]
    cards = runtime_for(cfg.score.runtime, device, cfg.score.mc_samples) == "onnx"
    ckpts = [(cards and cached_card(path)) or load_checkpoint(path) for path in paths]
    scorings = [scoring_settings(ckpt, cfg, path) for ckpt, path in zip(ckpts, paths)]
    if isinstance(checkpoint, (str, Path)):
        return ckpts, scorings[0]
    return ckpts, ensemble_scoring(scorings, paths, cfg.score)


def models_digest(checkpoint: str | list[str]) -> str:
    """What a rerun's rows must have been scored with: the checkpoint file, or every file of the ensemble."""
    if isinstance(checkpoint, (str, Path)):
        return sha256_file(Path(checkpoint))[:16]
    digests = "+".join(sha256_file(Path(c))[:16] for c in checkpoint)
    return hashlib.sha256(digests.encode()).hexdigest()[:16]
