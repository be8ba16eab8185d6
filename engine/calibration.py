"""How sure the model really is: temperature scaling and expected calibration error.

A network's softmax (or sigmoid) output is often over-confident: of the images it calls
"95 % sure", fewer than 95 % are right. Temperature scaling (Guo et al., "On Calibration of
Modern Neural Networks", 2017) divides the log-probabilities by one number T fitted on the
validation images to minimise the negative log-likelihood; T > 1 softens, T < 1 sharpens.
It never changes which class ranks first, so accuracy and the confusion matrix stay as they
are, only the probabilities shown change.

The expected calibration error (ECE) groups the images by the confidence of their top class
into equal-width bins and averages |accuracy − confidence| weighted by the bin's share of the
images; the reliability diagram draws the same bins.

Written here rather than taken from a library: scikit-learn's `CalibratedClassifierCV` needs
an estimator to refit (and its sigmoid/isotonic methods change the ranking of classes for
more than two), and TensorFlow Probability or netcal would be a large dependency for one
scalar fit. The fit is `scipy.optimize.minimize_scalar` (SciPy comes with scikit-learn).
This module never imports TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

# Fifteen equal-width bins, as in Guo et al. and the issue.
BINS = 15
# The temperature is searched between these bounds (on log T); beyond them the fit is a symptom.
MINIMUM_TEMPERATURE = 0.05
MAXIMUM_TEMPERATURE = 20.0
# Probabilities are clipped before taking logs: a float32 sigmoid saturates to exactly 0 or 1.
_SMALLEST_PROBABILITY = 1e-12


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _SMALLEST_PROBABILITY, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softened (T > 1) or sharpened (T < 1): softmax(log p / T), one row per image.

    Two-class probabilities [1 − p, p] become the sigmoid of logit(p) / T, the same thing.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.size == 0 or temperature == 1.0:
        return probabilities
    scaled = _log_probabilities(probabilities) / float(temperature)
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, true_indices) -> float:
    """Mean −log p(true class) over the images."""
    true_indices = np.asarray(true_indices, dtype=int)
    chosen = np.asarray(probabilities, dtype=np.float64)[np.arange(len(true_indices)), true_indices]
    return float(-np.mean(np.log(np.clip(chosen, _SMALLEST_PROBABILITY, 1.0))))


def fit_temperature(probabilities: np.ndarray, true_indices) -> float:
    """The temperature that minimises the negative log-likelihood of the true classes.

    Args:
        probabilities: (N, classes) probabilities of the model on held-out images.
        true_indices: The true class index per image.

    Returns:
        T in [MINIMUM_TEMPERATURE, MAXIMUM_TEMPERATURE]; 1.0 when there are no images.
    """
    from scipy.optimize import minimize_scalar

    probabilities = np.asarray(probabilities, dtype=np.float64)
    true_indices = np.asarray(true_indices, dtype=int)
    if len(true_indices) == 0:
        return 1.0
    log_probabilities = _log_probabilities(probabilities)
    rows = np.arange(len(true_indices))

    def loss(log_temperature: float) -> float:
        scaled = log_probabilities / math.exp(log_temperature)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_normaliser = np.log(np.exp(scaled).sum(axis=1))
        return float(np.mean(log_normaliser - scaled[rows, true_indices]))

    # On log T the objective is smooth and the bounds are symmetric around T = 1.
    result = minimize_scalar(loss, bounds=(math.log(MINIMUM_TEMPERATURE), math.log(MAXIMUM_TEMPERATURE)),
                             method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def reliability_bins(probabilities: np.ndarray, true_indices, bins: int = BINS) -> list[dict]:
    """Equal-width bins of top-class confidence: each bin's range, image count, mean confidence and accuracy.

    Empty bins are listed with count 0 and None for the means, so every table has `bins` rows.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    true_indices = np.asarray(true_indices, dtype=int)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == true_indices) if len(probabilities) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table = []
    for number in range(bins):
        members = which == number
        count = int(members.sum())
        table.append({
            "lower": float(edges[number]), "upper": float(edges[number + 1]), "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return table


def expected_calibration_error(probabilities: np.ndarray, true_indices, bins: int = BINS) -> float | None:
    """Σ over bins of (share of images) × |accuracy − mean confidence|; None without images."""
    table = reliability_bins(probabilities, true_indices, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return None
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]))


def calibration_report(fit_probabilities: np.ndarray, fit_true_indices, other_splits: dict | None = None) -> dict:
    """Fits a temperature on one split and measures calibration before and after, for `evaluation.json`.

    Args:
        fit_probabilities: Raw probabilities on the split the temperature is fitted on (validation).
        fit_true_indices: Its true class indices.
        other_splits: {split: (raw probabilities, true indices)} measured with the same temperature
            (a test split is the honest check: the temperature never saw it).

    Returns:
        {"temperature", "fitted_on", "bins", "expected_calibration_error": {"uncalibrated", "calibrated"},
        "negative_log_likelihood": {...}, "reliability": {"uncalibrated": [...], "calibrated": [...]},
        "splits": {split: the same measures}} — the top-level measures are for the fit split.
    """
    temperature = fit_temperature(fit_probabilities, fit_true_indices)

    def measures(probabilities, true_indices) -> dict:
        calibrated = apply_temperature(probabilities, temperature)
        return {
            "num_images": int(len(true_indices)),
            "expected_calibration_error": {"uncalibrated": expected_calibration_error(probabilities, true_indices),
                                           "calibrated": expected_calibration_error(calibrated, true_indices)},
            "negative_log_likelihood": {"uncalibrated": negative_log_likelihood(probabilities, true_indices),
                                        "calibrated": negative_log_likelihood(calibrated, true_indices)},
            "reliability": {"uncalibrated": reliability_bins(probabilities, true_indices),
                            "calibrated": reliability_bins(calibrated, true_indices)},
        }

    report = {"temperature": temperature, "fitted_on": "validation", "bins": BINS,
              **measures(fit_probabilities, fit_true_indices), "splits": {}}
    for split, (probabilities, true_indices) in (other_splits or {}).items():
        report["splits"][split] = measures(probabilities, true_indices)
    return report
