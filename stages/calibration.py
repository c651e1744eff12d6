"""From clip logits to a decision: train fits the temperature, the clip -> video rule and the threshold on the
validation videos (`calibrate`); scoring applies them to a video's clips (`decide`), fresh or from a stored row."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .aggregate import RULE_KEYS, choose_rule, video_score
from .evaluate import fit_temperature, fit_threshold


def calibrate(pred: pd.DataFrame, score_cfg) -> dict:
    """Temperature for honest clip probabilities, the clip -> video rule that best fits the val videos, and the
    balanced-accuracy threshold on the video scores that rule gives: what score-video applies to turn clip logits
    into a decision. The threshold is fitted on video scores, not clip probabilities, because it is applied to
    them, and the max over tracks and rules such as topk push video scores above their clips'."""
    import torch  # training's; scoring imports this module for `decide`, and may run without torch

    temperature = fit_temperature(pred.logit, pred.label)
    pred = pred.assign(prob=torch.sigmoid(torch.tensor(pred.logit.to_numpy()) / temperature).numpy())
    videos = [{int(t): g.prob.tolist() for t, g in clips.groupby("track_id")} for _, clips in pred.groupby("video_id")]
    labels = pred.groupby("video_id").label.first().tolist()
    params = {k: score_cfg[k] for k in RULE_KEYS}
    rule = choose_rule(videos, labels, **params)
    threshold = fit_threshold(labels, [video_score(tracks, rule, **params)[0] for tracks in videos])
    return {"temperature": temperature, "threshold": threshold, "aggregate": rule, "rule_params": params}


def decide(row: dict, scoring) -> dict:
    # scoring: a score.Scoring (its rule, rule_params, threshold, fallback_score, suspicious_frames)
    """The row with its score, label and most suspicious frames made from its clips' probabilities by the
    scoring's rule, threshold and fallback (the DECISION fields): one code for a freshly scored video and for a
    stored row whose clips still hold but whose decision settings changed."""
    clips = row["clip_probs"]
    score, per_track = None, {}
    if row["status"] == "ok":
        score, per_track = video_score({t: [p for u, p, _ in clips if u == t] for t in sorted({c[0] for c in clips})},
                                       scoring.rule, **scoring.rule_params)
    elif scoring.fallback_score is not None:
        score = float(scoring.fallback_score)
    ranked = sorted(clips, key=lambda c: (-c[1], c[2][0]))
    suspicious = list(dict.fromkeys(frames[0] for _, _, frames in ranked))[:scoring.suspicious_frames]
    return {**row, "score": score, "score_std": _score_std(row, scoring),
            "label": "" if score is None else ("fake" if score >= scoring.threshold else "real"),
            "threshold": scoring.threshold, "track_scores": {str(t): p for t, p in per_track.items()},
            "suspicious_frames": suspicious}


def _score_std(row: dict, scoring) -> float | None:
    """The spread of the video score over Monte-Carlo dropout samples (score.mc_samples): sample k of every clip
    gives one video score by the same rule; None without samples or without a score of the model's own."""
    samples = row.get("clip_samples")
    if not samples or row["status"] != "ok":
        return None
    tracks = [track for track, _, _ in row["clip_probs"]]
    scores = [video_score({t: [s[k] for u, s in zip(tracks, samples) if u == t] for t in sorted(set(tracks))},
                          scoring.rule, **scoring.rule_params)[0] for k in range(len(samples[0]))]
    return float(np.std(scores))
