"""Metrics, calibration and plots for fake-probability scores (label 1 = fake, score = P(fake)).

Training calls these every epoch on the validation clips and `score-video --labels` calls them on videos,
so everything takes plain arrays and tolerates a split that holds a single class (a small validation
fold or a folder of fakes only): the metrics that need both classes come back NaN instead of raising.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _metrics():
    """sklearn.metrics, imported on first use: with matplotlib ~60 MB of memory that score-video without labels
    never needs (its memory budget is tight)."""
    from sklearn import metrics
    return metrics

# Temperatures outside this range only appear when the fit is degenerate (perfectly separable
# validation logits drive T to 0), and such a T would turn every later score into 0 or 1.
_TEMPERATURE_RANGE = (0.05, 20.0)


def _binary_inputs(y_true, y_score, where: str, *, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{where}: {y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError(f"{where}: no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where}: labels must be 0 (real) or 1 (fake), got {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"{where}: scores contain NaN or infinity")
    if probabilities and (s.min() < 0 or s.max() > 1):
        raise ValueError(f"{where}: probabilities must lie in [0, 1], got [{s.min():.4g}, {s.max():.4g}]")
    return y.astype(np.int64), s


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < y.size


def equal_error_rate(y_true, y_score) -> tuple[float, float]:
    """The operating point where false-fake and missed-fake rates are equal, with its threshold.

    The ROC is a step function, so FPR and FNR rarely meet at a vertex; both the rate and the threshold
    are linearly interpolated on the ROC segment where FPR - FNR changes sign. (nan, nan) for one class.
    """
    y, s = _binary_inputs(y_true, y_score, "equal_error_rate", probabilities=False)
    if not _both_classes(y):
        return float("nan"), float("nan")
    fpr, tpr, thresholds = _metrics().roc_curve(y, s, drop_intermediate=False)
    # roc_curve's first threshold is +inf (nothing predicted fake); interpolating towards it would give
    # inf, so the segment leaving that corner uses the top score as its upper end.
    thresholds[0] = thresholds[1]
    gap = fpr - (1 - tpr)  # -1 at the (0, 0) corner, rises to +1 at (1, 1)
    i = int(np.flatnonzero(gap >= 0)[0])
    j = i - 1
    t = gap[j] / (gap[j] - gap[i])
    eer = fpr[j] + t * (fpr[i] - fpr[j])
    threshold = thresholds[j] + t * (thresholds[i] - thresholds[j])
    return float(eer), float(threshold)


def log_loss(y_true, y_score) -> float:
    """DFDC's metric. sklearn clips the probabilities to [eps, 1 - eps], so one confident mistake costs
    about 36 instead of making the mean infinite; labels=[0, 1] keeps it defined for a single class."""
    y, s = _binary_inputs(y_true, y_score, "log_loss", probabilities=True)
    return float(_metrics().log_loss(y, s, labels=[0, 1]))


def binary_metrics(y_true, y_score, *, threshold: float) -> dict:
    """All per-epoch / per-run numbers in one flat dict, ready for a CSV row or a JSON report."""
    y, s = _binary_inputs(y_true, y_score, "binary_metrics", probabilities=True)
    pred = (s >= threshold).astype(np.int64)
    both = _both_classes(y)
    metrics = _metrics()
    nan = float("nan")
    with warnings.catch_warnings():  # one class only: the undefined metrics are NaN or 0 by design, said here
        warnings.simplefilter("ignore", UserWarning)
        return {
            "auc": float(metrics.roc_auc_score(y, s)) if both else nan,
            "ap": float(metrics.average_precision_score(y, s)) if both else nan,
            "accuracy": float(metrics.accuracy_score(y, pred)),
            "balanced_accuracy": float(metrics.balanced_accuracy_score(y, pred)),
            "precision": float(metrics.precision_score(y, pred, zero_division=0)),
            "recall": float(metrics.recall_score(y, pred, zero_division=0)),
            "f1": float(metrics.f1_score(y, pred, zero_division=0)),
            "eer": equal_error_rate(y, s)[0],
            "log_loss": log_loss(y, s),
            "n": int(y.size),
            "n_real": int((y == 0).sum()),
            "n_fake": int(y.sum()),
        }


def fit_temperature(logits, labels) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of sigmoid(logits / T).

    One scalar cannot change the ranking (AUC) but makes the probabilities honest, which the
    DFDC-style log-loss and the fixed decision threshold both depend on. Searched on log T within
    _TEMPERATURE_RANGE. A single-class split carries no calibration signal and returns 1.0; so does a
    split the logits separate perfectly, whose NLL only falls as T -> 0: sharpening is not evidence there,
    and the fit would give 1e-18-style probabilities that a single unseen mistake makes ruinous.
    """
    y, z = _binary_inputs(labels, logits, "fit_temperature", probabilities=False)
    if not _both_classes(y) or z[y == 0].max() < z[y == 1].min():
        return 1.0

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    from scipy.optimize import minimize_scalar  # on first use: 0.4 s of every score-video's start-up
    result = minimize_scalar(nll, bounds=np.log(_TEMPERATURE_RANGE), method="bounded")
    return float(np.exp(result.x))


def fit_threshold(y_true, probs) -> float:
    """The validation threshold with the best balanced accuracy (predict fake when prob >= threshold).

    Balanced accuracy, because FF++/DFDC splits hold several fakes per real and plain accuracy would
    push the threshold down. Every threshold strictly between two neighbouring distinct scores gives
    the same predictions, so the candidates are those gaps' midpoints (a margin on both sides) plus 0.5
    itself; among equally good candidates the one closest to 0.5 wins, which keeps 0.5 whenever it is
    optimal. 0.5 when the split holds a single class.
    """
    y, p = _binary_inputs(y_true, probs, "fit_threshold", probabilities=True)
    if not _both_classes(y):
        return 0.5
    fpr, tpr, thresholds = _metrics().roc_curve(y, p, drop_intermediate=False)
    # thresholds[0] is +inf and thresholds[-1] the lowest score (everything fake); for 1 <= k < last,
    # the midpoint between thresholds[k] and thresholds[k + 1] reproduces "p >= thresholds[k]".
    candidates = np.append((thresholds[1:-1] + thresholds[2:]) / 2, 0.5)
    scores = np.append((tpr[1:-1] + 1 - fpr[1:-1]) / 2,
                       _metrics().balanced_accuracy_score(y, (p >= 0.5).astype(np.int64)))
    best = np.isclose(scores, scores.max(), rtol=0, atol=1e-12)
    closest = np.argmin(np.where(best, np.abs(candidates - 0.5), np.inf))
    return float(candidates[closest])


def write_plots(y_true, y_score, *, threshold: float, out_dir: str | Path) -> list[Path]:
    """ROC, precision-recall, per-class score histogram and confusion matrix as PNGs in out_dir.

    Figures are built with matplotlib's object API (Agg canvas, no pyplot), so training workers and
    headless servers never touch a display or pyplot's global figure list. A single-class split still
    gets all four files; its undefined ROC and PR curves say so instead of sklearn's warnings and empty axes.
    """
    from matplotlib.figure import Figure  # on first use, like sklearn (see _metrics)
    y, s = _binary_inputs(y_true, y_score, "write_plots", probabilities=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in _PLOTS.items():
        fig = Figure(figsize=(5, 4), dpi=100)
        ax = fig.add_subplot()
        if draw in (_roc, _precision_recall) and len(np.unique(y)) < 2:
            ax.text(0.5, 0.5, "undefined: the labels are all of one class", ha="center", va="center")
        else:
            draw(ax, y, s, threshold)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, format="png")
        paths.append(path)
    return paths


def _roc(ax, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    _metrics().RocCurveDisplay.from_predictions(y, s, ax=ax, name="model", plot_chance_level=True)


def _precision_recall(ax, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    _metrics().PrecisionRecallDisplay.from_predictions(y, s, ax=ax, name="model", plot_chance_level=True)


def _histogram(ax, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    bins = np.linspace(0, 1, 41)
    for label, name, color in ((0, "real", "tab:blue"), (1, "fake", "tab:red")):
        ax.hist(s[y == label], bins=bins, alpha=0.6, color=color, label=f"{name} (n={int((y == label).sum())})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("P(fake)")
    ax.set_ylabel("count")
    ax.legend()


def _confusion(ax, y: np.ndarray, s: np.ndarray, threshold: float) -> None:
    _metrics().ConfusionMatrixDisplay.from_predictions(y, (s >= threshold).astype(np.int64), labels=[0, 1],
                                                    display_labels=["real", "fake"], ax=ax)
    ax.set_title(f"threshold {threshold:.3f}")


_PLOTS = {"roc.png": _roc, "pr.png": _precision_recall, "hist.png": _histogram, "confusion.png": _confusion}
