"""Metrics against scikit-learn and hand-computed values; calibration on synthetic logits; plot files."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn import metrics

from dfpipe.stages.evaluate import (binary_metrics, equal_error_rate, fit_temperature, fit_threshold, log_loss,
                                    write_plots)

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


def test_binary_metrics_match_sklearn():
    m = binary_metrics(Y, S, threshold=0.5)
    pred = (S >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(metrics.roc_auc_score(Y, S))
    assert m["ap"] == pytest.approx(metrics.average_precision_score(Y, S))
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(Y, pred))
    assert m["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(Y, pred))
    assert m["precision"] == pytest.approx(metrics.precision_score(Y, pred))
    assert m["recall"] == pytest.approx(metrics.recall_score(Y, pred))
    assert m["f1"] == pytest.approx(metrics.f1_score(Y, pred))
    assert m["log_loss"] == pytest.approx(metrics.log_loss(Y, S))
    assert (m["n"], m["n_real"], m["n_fake"]) == (8, 4, 4)


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, S, threshold=0.5)
    # 16 real/fake pairs, only (real 0.6, fake 0.4) is misordered
    assert m["auc"] == pytest.approx(15 / 16)
    # at 0.5: fakes 0.7, 0.8, 0.9 found, fake 0.4 missed, real 0.6 flagged
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["eer"] == pytest.approx(0.25)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.7, 0.4, 0.4, 0.7, 0.8, 0.9])))


def test_perfect_separation():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8], threshold=0.5)
    assert m["auc"] == 1.0 and m["ap"] == 1.0 and m["eer"] == 0.0
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_class_gives_nan_not_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no sklearn warnings on the user's terminal
        m = binary_metrics([1, 1, 1], [0.0, 0.6, 0.9], threshold=0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and math.isnan(m["eer"])
    assert m["recall"] == pytest.approx(2 / 3)
    # a probability of exactly 0 for a fake is clipped, so the loss is large but finite
    assert 10 < m["log_loss"] < 40


def test_bad_input_raises():
    with pytest.raises(ValueError, match="labels"):
        binary_metrics([0, 2], [0.1, 0.9], threshold=0.5)
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        log_loss([0, 1], [0.1, 0.9, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binary_metrics([0, 1], [-3.0, 4.0], threshold=0.5)


def test_equal_error_rate_at_a_vertex():
    # at threshold 0.6 exactly one real of four is flagged and one fake of four missed
    assert equal_error_rate(Y, S) == pytest.approx((0.25, 0.6))


def test_equal_error_rate_interpolated():
    # ROC points (fpr, fnr): (0.5, 1) at >= 0.6, (0.5, 0) at >= 0.4; FNR crosses 0.5 halfway between
    eer, threshold = equal_error_rate([0, 0, 1], [0.2, 0.6, 0.4])
    assert eer == pytest.approx(0.5)
    assert threshold == pytest.approx(0.5)


def test_equal_error_rate_on_the_first_roc_segment():
    # tied scores: the ROC jumps from (0, 0) straight to (1, 1); EER 0.5 at the tied score, not at +inf
    assert equal_error_rate([0, 1], [0.5, 0.5]) == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_temperature_recovers_known_temperature(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, 20000)
    labels = (rng.random(logits.size) < 1 / (1 + np.exp(-logits / 2.0))).astype(int)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.15)


def test_fit_temperature_one_class_leaves_logits_alone():
    assert fit_temperature([1.0, 2.0, -1.0], [1, 1, 1]) == 1.0


def test_fit_temperature_does_not_sharpen_a_perfectly_separated_split():
    assert fit_temperature([-3.0, -1.0, 0.5, 2.0], [0, 0, 1, 1]) == 1.0
    assert 0.05 < fit_temperature([-3.0, 0.6, 0.5, 2.0], [0, 0, 1, 1]) < 20  # one overlap: fitted as usual


def test_fit_threshold_keeps_half_when_optimal():
    assert fit_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8]) == 0.5


def test_fit_threshold_moves_for_low_scores():
    # every score is under 0.5; the only perfect cut lies between 0.1 and 0.2
    assert fit_threshold([0, 0, 1, 1], [0.05, 0.1, 0.2, 0.3]) == pytest.approx(0.15)


def test_fit_threshold_maximises_balanced_accuracy():
    # sorted: 0.1 r, 0.3 f, 0.6 r, 0.65 r, 0.9 f. Cut above 0.65: BA (1/2 + 1) / 2 = 0.75, the best;
    # cut at 0.5: (1/2 + 1/3) / 2 only
    t = fit_threshold([0, 0, 0, 1, 1], [0.1, 0.6, 0.65, 0.3, 0.9])
    assert t == pytest.approx(0.775)
    assert binary_metrics([0, 0, 0, 1, 1], [0.1, 0.6, 0.65, 0.3, 0.9], threshold=t)["balanced_accuracy"] == 0.75


def test_fit_threshold_one_class():
    assert fit_threshold([0, 0, 0], [0.7, 0.8, 0.9]) == 0.5


def _separable_scores():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    return y, np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1)


def test_write_plots(tmp_path):
    y, s = _separable_scores()
    paths = write_plots(y, s, threshold=0.5, out_dir=tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["confusion.png", "hist.png", "pr.png", "roc.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        # something drawn: many distinct colours, not a white canvas
        assert image[..., :3].std() > 0.05
        assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 20


def test_single_class_plots_are_written_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_plots([1, 1, 1], [0.2, 0.6, 0.9], threshold=0.5, out_dir=tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["confusion.png", "hist.png", "pr.png", "roc.png"]
    for path in paths:  # the undefined curves carry their note: not a blank canvas
        assert imread(path)[..., :3].std() > 0.01


def test_confusion_plot_counts_at_the_threshold(tmp_path):
    # both thresholds print as 0.500, but the fake scored exactly 0.5 changes cell between them
    y, s = _separable_scores()
    s[-1] = 0.5
    below = write_plots(y, s, threshold=0.4999, out_dir=tmp_path / "below")
    above = write_plots(y, s, threshold=0.5001, out_dir=tmp_path / "above")
    by_name = {a.name: (imread(a), imread(b)) for a, b in zip(below, above)}
    assert np.array_equal(*by_name["roc.png"])
    assert not np.array_equal(*by_name["confusion.png"])
