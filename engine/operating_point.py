"""The run's operating point: where "yes" starts, and below which confidence a prediction reads "not sure".

Two settings, kept in the run's `decision.json` (this module is its only writer):

  * `threshold` (two classes only): the probability of the second class (in `labels.json`
    order) from which the model answers that class. 0.5 is the plain argmax; a lower value
    finds more of that class at the price of more false alarms. The precision–recall and ROC
    curves on the Evaluate page show what each value costs.
  * `minimum_confidence` (any number of classes): when the probability of the answered class
    is below it, the answer is "not sure" instead of a class.

Both apply to calibrated probabilities (`engine.calibration`), wherever a prediction is shown.
Curves come from scikit-learn; this module never imports TensorFlow.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from engine import runfiles
from engine.users import User

NOT_SURE = "not sure"


@dataclass(frozen=True)
class Decision:
    """A run's operating point; None means the default (argmax, always sure)."""

    threshold: Optional[float] = None
    minimum_confidence: Optional[float] = None

    def describe(self, class_names: list[str]) -> str:
        """One sentence for people: what the model answers and when it says "not sure"."""
        parts = []
        if self.threshold is not None and len(class_names) == 2:
            parts.append(f"It answers {class_names[1]} from a probability of {self.threshold:.0%}")
        if self.minimum_confidence:
            parts.append(f"it says \"not sure\" below {self.minimum_confidence:.0%}")
        if not parts:
            return "It answers the most probable class and is never \"not sure\"."
        sentence = "; ".join(parts) + "."
        return sentence[0].upper() + sentence[1:]


def _check_fraction(name: str, value, lowest: float, highest: float) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lowest <= float(value) <= highest:
        raise ValueError(f"`{name}` must be a number from {lowest} to {highest}; received {name}={value!r}.")
    return float(value)


def read_decision(run_dir: str | os.PathLike) -> Decision:
    """The run's saved operating point, or the default when none is saved (or the file is unreadable)."""
    saved = runfiles.read_json(Path(run_dir) / runfiles.DECISION_FILE)
    if not isinstance(saved, dict):
        return Decision()
    try:
        return Decision(_check_fraction("threshold", saved.get("threshold"), 0.0, 1.0),
                        _check_fraction("minimum_confidence", saved.get("minimum_confidence"), 0.0, 1.0))
    except ValueError:
        return Decision()  # A file damaged by hand falls back to the default rather than breaking every page.


def save_decision(run_dir: str | os.PathLike, threshold: Optional[float] = None,
                  minimum_confidence: Optional[float] = None, user: Optional[User] = None,
                  source: str = "python") -> Decision:
    """Saves the operating point of a trained run; only its owner or an admin may.

    Args:
        threshold: Two-class runs: the second class's probability from which it is answered.
        minimum_confidence: Below this probability of the answered class, "not sure".
        user: Who asks (None: the local user).

    Raises:
        PermissionError: a viewer, or a member who does not own the run.
        ValueError: a value outside 0–1, or a threshold on a run with more than two classes.
    """
    from engine import audit
    from engine.jobs import authorize
    from engine.status import read_status

    run_dir = Path(run_dir)
    acting = authorize(user, read_status(run_dir), "set the operating point of")
    threshold = _check_fraction("threshold", threshold, 0.0, 1.0)
    minimum_confidence = _check_fraction("minimum_confidence", minimum_confidence, 0.0, 1.0)
    classes = (runfiles.read_json(run_dir / runfiles.LABELS_FILE) or {}).get("classes") or []
    if threshold is not None and len(classes) != 2:
        raise ValueError(f"A threshold needs a two-class run; run {run_dir.name} has {len(classes)} classes. "
                         "Set `minimum_confidence` instead.")
    decision = Decision(threshold, minimum_confidence)
    runfiles.atomic_write_json(run_dir / runfiles.DECISION_FILE,
                               {**asdict(decision), "by": acting.id, "time": time.time()})
    audit.record(run_dir.parent, acting, "set_operating_point", run_dir.name, source,
                 detail={"threshold": threshold, "minimum_confidence": minimum_confidence})
    return decision


def decide(probabilities: np.ndarray, decision: Decision) -> tuple[np.ndarray, np.ndarray]:
    """The answered class per image and whether the model is sure of it.

    Args:
        probabilities: (N, classes) calibrated probabilities.

    Returns:
        (class indices, sure flags), each of length N.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(probabilities) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=bool)
    if probabilities.shape[1] == 2 and decision.threshold is not None:
        answered = (probabilities[:, 1] >= decision.threshold).astype(int)
    else:
        answered = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(probabilities)), answered]
    sure = confidence >= (decision.minimum_confidence or 0.0)
    return answered, sure


def verdict(probabilities_row, class_names: list[str], decision: Decision) -> tuple[str, bool]:
    """(the answered class name or "not sure", sure) for one image."""
    answered, sure = decide(np.asarray(probabilities_row, dtype=np.float64)[None, :], decision)
    return (class_names[int(answered[0])] if sure[0] else NOT_SURE), bool(sure[0])


def confusion_at(probabilities: np.ndarray, true_indices, decision: Decision, num_classes: int) -> dict:
    """The confusion matrix at an operating point, the images answered "not sure" kept apart.

    Returns:
        {"matrix": (classes × classes) counts of sure answers, "not_sure": count per true class,
        "accuracy": share right among sure answers (None if none), "coverage": share answered}.
    """
    true_indices = np.asarray(true_indices, dtype=int)
    answered, sure = decide(probabilities, decision)
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (true_indices[sure], answered[sure]), 1)
    not_sure = np.bincount(true_indices[~sure], minlength=num_classes)
    answered_count = int(sure.sum())
    return {
        "matrix": matrix.tolist(),
        "not_sure": not_sure.tolist(),
        "accuracy": float(np.trace(matrix) / answered_count) if answered_count else None,
        "coverage": float(answered_count / len(true_indices)) if len(true_indices) else None,
    }


def binary_curves(probabilities: np.ndarray, true_indices) -> dict:
    """Precision–recall and ROC curves for the second class of a two-class run, with their areas.

    Returns:
        {"precision_recall": {"precision", "recall", "threshold"}, "roc": {"false_positive_rate",
        "true_positive_rate", "threshold"}, "average_precision", "roc_auc"}; None values when one
        class is absent from the images.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    true_indices = np.asarray(true_indices, dtype=int)
    scores = np.asarray(probabilities, dtype=np.float64)[:, 1]
    if len(np.unique(true_indices)) < 2:
        return {"precision_recall": None, "roc": None, "average_precision": None, "roc_auc": None}
    precision, recall, pr_thresholds = precision_recall_curve(true_indices, scores)
    false_positive, true_positive, roc_thresholds = roc_curve(true_indices, scores)
    return {
        # precision_recall_curve has one more point than thresholds (recall 0, precision 1).
        "precision_recall": {"precision": precision[:-1].tolist(), "recall": recall[:-1].tolist(),
                             "threshold": pr_thresholds.tolist()},
        "roc": {"false_positive_rate": false_positive.tolist(), "true_positive_rate": true_positive.tolist(),
                # roc_curve starts at +inf (nothing answered positive); JSON has no infinity.
                "threshold": np.minimum(roc_thresholds, 1.0).tolist()},
        "average_precision": float(average_precision_score(true_indices, scores)),
        "roc_auc": float(roc_auc_score(true_indices, scores)),
    }


def per_class_precision_recall(probabilities: np.ndarray, true_indices, class_names: list[str]) -> dict:
    """One-vs-rest precision–recall curve and average precision per class (for more than two classes)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    true_indices = np.asarray(true_indices, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    curves = {}
    for index, name in enumerate(class_names):
        is_class = (true_indices == index).astype(int)
        if is_class.sum() == 0 or is_class.sum() == len(is_class):
            curves[name] = None
            continue
        precision, recall, thresholds = precision_recall_curve(is_class, probabilities[:, index])
        curves[name] = {"precision": precision[:-1].tolist(), "recall": recall[:-1].tolist(),
                        "threshold": thresholds.tolist(),
                        "average_precision": float(average_precision_score(is_class, probabilities[:, index]))}
    return curves
