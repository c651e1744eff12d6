"""From clip probabilities to one score per face track and one per video.

The model scores short clips; a video is judged on all of them. Each face track is aggregated on its
own because a DFDC-style fake may swap only one of several people, and averaging identities together
would dilute exactly the face that matters.
"""
from __future__ import annotations

import math

import numpy as np

from dfpipe.stages.evaluate import log_loss

# Simplest first: choose_rule keeps the earlier rule when two fit the validation videos equally well.
RULES = ("mean", "median", "topk", "max", "confident")
# The `score:` settings the rules read; training stores them beside the rule it chose with them.
RULE_KEYS = ("topk", "confident_high", "confident_low", "confident_fraction")

# The share of confidently-real clips that lets `confident` trust them, as in selimsef's rule (0.9 * sz).
_CONFIDENT_REAL_FRACTION = 0.9


def aggregate(probs, rule: str, *, topk: int, confident_high: float, confident_low: float,
              confident_fraction: float, **_) -> float:
    """One track's fake probability from its clip probabilities, by `rule` (one of RULES).

    mean / median / max are the usual poolings; topk is the mean of the `topk` largest clips (all clips
    when there are fewer), a max that one outlier clip cannot decide alone.

    confident follows the DFDC winner's `confident_strategy` (selimsef/dfdc_deepfake_challenge,
    kernel_utils.py): if more than `confident_fraction` of the clips are above `confident_high`, the mean
    of those; elif more than 90% are below `confident_low`, the mean of those; else the mean of all. It
    trusts a consistent signal and otherwise stays near 0.5, which is what log loss rewards.
    Differences from the original, whose unit was one of 32 frames x faces per video: its fake test was
    `fakes > sz // 2.5 and fakes > 11`; the share is the `confident_fraction` key here (0.4 there), and
    the absolute minimum of 11 is dropped because a track yields only a handful of clips, so it could
    never be met. Its thresholds 0.8 and 0.2 are the `confident_high` / `confident_low` keys.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("aggregate: no clip probabilities to aggregate")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("aggregate: clip probabilities must be finite and lie in [0, 1]")
    if rule == "mean":
        return float(p.mean())
    if rule == "median":
        return float(np.median(p))
    if rule == "max":
        return float(p.max())
    if rule == "topk":
        if topk < 1:
            raise ValueError(f"aggregate: topk must be at least 1, got {topk}")
        return float(np.sort(p)[-topk:].mean())
    if rule == "confident":
        fake = p[p > confident_high]
        if fake.size > confident_fraction * p.size:
            return float(fake.mean())
        real = p[p < confident_low]
        if real.size > _CONFIDENT_REAL_FRACTION * p.size:
            return float(real.mean())
        return float(p.mean())
    raise ValueError(f"aggregate: unknown rule '{rule}' (expected one of {', '.join(RULES)})")


def video_score(track_probs: dict[int, list[float]], rule: str, **params) -> tuple[float, dict[int, float]]:
    """The video's fake probability and each track's: the max over tracks, since a video is as fake
    as its most fake identity (one swapped face among several real ones makes the whole video fake)."""
    if not track_probs:
        raise ValueError("video_score: the video has no face tracks to score")
    per_track = {track: aggregate(probs, rule, **params) for track, probs in track_probs.items()}
    return max(per_track.values()), per_track


def choose_rule(videos: list[dict[int, list[float]]], labels, **params) -> str:
    """The rule whose video scores have the lowest log loss on validation videos (stored in the checkpoint).

    Log loss, not AUC, because the rules mostly differ in how far they push scores towards 0 or 1, which
    ranking metrics ignore. Losses equal up to rounding keep the simpler rule (order of RULES).
    """
    if len(videos) != len(labels):
        raise ValueError(f"choose_rule: {len(videos)} videos but {len(labels)} labels")
    losses = {}
    for rule in RULES:
        scores = [video_score(tracks, rule, **params)[0] for tracks in videos]
        losses[rule] = log_loss(labels, scores)
    best = min(losses.values())
    return next(rule for rule in RULES if math.isclose(losses[rule], best))
