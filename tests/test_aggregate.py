"""Every aggregation rule on hand-made clip probabilities, the video max over tracks, and rule choice."""
from __future__ import annotations

import pytest

from dfpipe.pipeline.config import load_config
from dfpipe.stages.aggregate import RULES, aggregate, choose_rule, video_score

# confident_high 0.8, confident_low 0.2 as in the DFDC rule; the fraction is set here so the
# hand-computed branches below do not depend on the shipped default.
PARAMS = {**load_config().score, "topk": 2, "confident_high": 0.8, "confident_low": 0.2,
          "confident_fraction": 0.3}
CLIPS = [0.1, 0.2, 0.9, 0.5]


@pytest.mark.parametrize("rule, expected", [
    ("mean", 0.425),
    ("median", 0.35),
    ("max", 0.9),
    ("topk", 0.7),        # mean of 0.9 and 0.5
    ("confident", 0.425),  # 1 fake clip is not > 30% of 4, 1 real clip not > 90%: plain mean
])
def test_rules(rule, expected):
    assert aggregate(CLIPS, rule, **PARAMS) == pytest.approx(expected)


def test_topk_with_fewer_clips_than_k():
    assert aggregate([0.2, 0.4], "topk", **{**PARAMS, "topk": 5}) == pytest.approx(0.3)


def test_confident_fake_branch():
    # 2 of 4 clips above 0.8 (> 30%): only those count
    assert aggregate([0.9, 0.95, 0.1, 0.5], "confident", **PARAMS) == pytest.approx(0.925)


def test_confident_fake_share_must_exceed_fraction():
    # exactly 30% confident fakes is not "more than": falls through to the mean
    assert aggregate([0.9] * 3 + [0.5] * 7, "confident", **PARAMS) == pytest.approx(0.62)


def test_confident_real_branch():
    # 10 of 11 clips below 0.2 (> 90%): the lone 0.9 spike is ignored instead of lifting the mean to 0.173
    assert aggregate([0.1] * 10 + [0.9], "confident", **PARAMS) == pytest.approx(0.1)


def test_confident_real_share_must_exceed_ninety_percent():
    # 9 of 10 below 0.2 is not > 90%: mean of all
    assert aggregate([0.1] * 9 + [0.6], "confident", **PARAMS) == pytest.approx(0.15)


def test_confident_mixed_branch():
    assert aggregate([0.1, 0.9, 0.6, 0.6], "confident", **PARAMS) == pytest.approx(0.55)


def test_bad_input():
    with pytest.raises(ValueError, match="no clip probabilities"):
        aggregate([], "mean", **PARAMS)
    with pytest.raises(ValueError, match="unknown rule 'vote'"):
        aggregate([0.5], "vote", **PARAMS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aggregate([2.5], "mean", **PARAMS)
    with pytest.raises(ValueError, match="no face tracks"):
        video_score({}, "mean", **PARAMS)


def test_video_score_takes_most_fake_track():
    score, per_track = video_score({0: [0.1, 0.2], 3: [0.8, 0.9], 7: [0.4]}, "mean", **PARAMS)
    assert per_track == pytest.approx({0: 0.15, 3: 0.85, 7: 0.4})
    assert score == pytest.approx(0.85)


def test_choose_rule_max_for_a_short_fake_burst():
    # each fake video shows one strongly fake clip among ordinary ones; reals are uniformly low
    fake = {0: [0.1, 0.1, 0.1, 0.95]}
    real = {0: [0.1, 0.1, 0.1, 0.1]}
    assert choose_rule([fake, real, fake, real], [1, 0, 1, 0], **PARAMS) == "max"


def test_choose_rule_confident_when_reals_have_spikes():
    # reals: one spurious high clip (only `confident` and `median` ignore it);
    # fakes: 40% confident clips (only `confident`, `max` and `topk` reach 0.9)
    real = {0: [0.1] * 10 + [0.9]}
    fake = {0: [0.9] * 4 + [0.5] * 6}
    assert choose_rule([real, fake], [0, 1], **PARAMS) == "confident"


def test_choose_rule_ties_prefer_simplest():
    # one clip per track: every rule gives the same scores
    videos = [{0: [0.2]}, {0: [0.7]}, {0: [0.4], 1: [0.9]}]
    assert choose_rule(videos, [0, 1, 1], **PARAMS) == RULES[0] == "mean"
