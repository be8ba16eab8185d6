"""Evaluation: metrics per split, predictions per image, and evaluating a run on a new folder.

Metrics come from scikit-learn; the dashboard only draws what is written here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from engine import runfiles
from engine.calibration import apply_temperature, calibration_report
# predict_probabilities lives in engine.predict (running a model is prediction); it is
# imported here by name too because engine.train imports it from this module.
from engine.predict import load_run_model, predict_probabilities, run_temperature


def classification_metrics(true_indices, predicted_indices, class_names: list[str],
                           probabilities: Optional[np.ndarray] = None) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix (and mean loss).

    Args:
        true_indices: True class index per image.
        predicted_indices: Predicted class index per image.
        class_names: Names in index order.
        probabilities: Optional (N, classes) probabilities, for the mean cross-entropy.
    """
    true_indices = np.asarray(true_indices, dtype=int)
    predicted_indices = np.asarray(predicted_indices, dtype=int)
    labels = list(range(len(class_names)))
    count = len(true_indices)
    result: dict = {"num_images": int(count), "classes": list(class_names)}
    if count == 0:
        result.update(accuracy=None, per_class={}, confusion_matrix=[[0] * len(labels) for _ in labels])
        return result
    precision, recall, f1, support = precision_recall_fscore_support(
        true_indices, predicted_indices, labels=labels, zero_division=0
    )
    result["accuracy"] = float(np.mean(true_indices == predicted_indices))
    result["per_class"] = {
        name: {
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
        }
        for index, name in enumerate(class_names)
    }
    result["macro_f1"] = float(np.mean(f1))
    result["confusion_matrix"] = confusion_matrix(true_indices, predicted_indices, labels=labels).tolist()
    if probabilities is not None:
        chosen = np.clip(probabilities[np.arange(count), true_indices], 1e-7, 1.0)
        loss = float(-np.mean(np.log(chosen)))
        result["loss"] = loss if math.isfinite(loss) else None
    return result


def write_evaluation(run_dir: str | os.PathLike, class_names: list[str], split_results: dict,
                     calibrate: bool = True) -> dict:
    """Writes `evaluation.json` and `predictions.csv` for the evaluated splits.

    Args:
        run_dir: The run folder.
        class_names: Names in index order.
        split_results: {split: (paths, true_indices, raw probabilities)}.
        calibrate: Fit a temperature on the validation split (`engine.calibration`), report
            the calibration error before and after, and store calibrated probabilities.

    Returns:
        The evaluation dictionary written.
    """
    split_results = dict(split_results)
    evaluation: dict = {"classes": class_names, "splits": {}}
    validation = split_results.get("validation")
    if calibrate and validation is not None and len(validation[0]):
        # The temperature is fitted on the validation images and applied to every split, so
        # everything downstream (predictions.csv, the pages, the model card) shows calibrated
        # probabilities; the ranking of classes, hence accuracy, does not change.
        others = {split: (probabilities, true_indices)
                  for split, (paths, true_indices, probabilities) in split_results.items()
                  if split != "validation" and len(paths)}
        evaluation["calibration"] = calibration_report(validation[2], validation[1], others)
        temperature = evaluation["calibration"]["temperature"]
        split_results = {split: (paths, true_indices, apply_temperature(probabilities, temperature))
                         for split, (paths, true_indices, probabilities) in split_results.items()}
    rows = []
    for split, (paths, true_indices, probabilities) in split_results.items():
        predicted = probabilities.argmax(axis=1) if len(paths) else np.zeros(0, dtype=int)
        evaluation["splits"][split] = classification_metrics(true_indices, predicted, class_names, probabilities)
        for path, true_index, predicted_index, probability_row in zip(paths, true_indices, predicted, probabilities):
            rows.append([path, split, class_names[int(true_index)], class_names[int(predicted_index)]]
                        + [f"{value:.6f}" for value in probability_row])
    runfiles.atomic_write_json(Path(run_dir) / runfiles.EVALUATION_FILE, evaluation)
    runfiles.write_csv(Path(run_dir) / runfiles.PREDICTIONS_FILE,
                       ["path", "split", "true", "predicted"] + [f"prob_{name}" for name in class_names], rows)
    return evaluation


def evaluate_folder(run_dir: str | os.PathLike, data_dir: str | os.PathLike, batch_size: int = 64) -> dict:
    """Evaluates a trained run on another folder of class subfolders.

    Every usable image of the folder is used (all splits of a pre-split folder).
    Files that cannot be used are listed in the result, not silently skipped.

    Raises:
        ValueError: the folder's classes are not classes the run was trained on.
    """
    from engine.data import scan_dataset
    from engine.pipeline import build_image_cache

    model, class_names, image_size = load_run_model(run_dir)
    scan = scan_dataset(data_dir)
    unknown = sorted({item.label for item in scan.files} - set(class_names))
    if unknown:
        raise ValueError(
            f"{data_dir} has class folder(s) {', '.join(unknown)} that the run was not trained on; "
            f"the run knows: {', '.join(class_names)}."
        )
    if not scan.files:
        raise ValueError(f"{data_dir} has no usable images in class subfolders.")
    paths = [item.path for item in scan.files]
    cache = build_image_cache(paths, image_size, cache="memory")
    keep = [index for index in range(len(paths)) if index not in cache.failed]
    true_indices = np.array([class_names.index(scan.files[index].label) for index in keep], dtype=int)
    probabilities = apply_temperature(predict_probabilities(model, cache.images[keep], len(class_names), batch_size),
                                      run_temperature(run_dir))
    metrics = classification_metrics(true_indices, probabilities.argmax(axis=1), class_names, probabilities)
    metrics["data"] = str(Path(data_dir).resolve())
    metrics["excluded"] = scan.excluded + [
        {"path": paths[index], "reason": reason} for index, reason in sorted(cache.failed.items())
    ]
    return metrics
