"""What the Monitor and Evaluate pages show, computed from a run folder (fastai-style interpretation).

Reads `metrics.jsonl`, `evaluation.json`, `predictions.csv` and `data_report.json`; never
imports TensorFlow, so the pages that use it stay light.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from engine import runfiles
from engine.metrics_reader import MetricsReader


def metrics_frames(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-batch and per-epoch events as tables, with `progress` in epochs (e.g. 2.5 = half of epoch 3).

    After a resume, events of epochs the resumed run repeats are dropped, so each epoch appears once.
    Reads the whole file and keeps every point; a page that redraws a growing run shares a
    `engine.metrics_reader.MetricsReader` instead, which reads only what was appended.
    """
    return MetricsReader(run_dir, max_points=None).frames()


def phase_two_start(epochs: pd.DataFrame):
    """The epoch after which fine-tuning began, or None."""
    if epochs.empty or "phase" not in epochs:
        return None
    phase_two = epochs[epochs["phase"] == 2]
    return None if phase_two.empty else float(phase_two["epoch"].min() - 1)


def load_predictions(run_dir: str | os.PathLike) -> pd.DataFrame:
    """`predictions.csv` with `confidence` (probability of the prediction), `true_probability` and `loss`."""
    rows = runfiles.read_csv(Path(run_dir) / runfiles.PREDICTIONS_FILE)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    probability_columns = [column for column in frame.columns if column.startswith("prob_")]
    frame[probability_columns] = frame[probability_columns].astype(float)
    classes = [column[len("prob_"):] for column in probability_columns]
    probabilities = frame[probability_columns].to_numpy()
    true_index = frame["true"].map({name: index for index, name in enumerate(classes)}).to_numpy()
    predicted_index = frame["predicted"].map({name: index for index, name in enumerate(classes)}).to_numpy()
    rows_index = np.arange(len(frame))
    frame["confidence"] = probabilities[rows_index, predicted_index]
    frame["true_probability"] = probabilities[rows_index, true_index]
    frame["loss"] = -np.log(np.clip(frame["true_probability"], 1e-7, 1.0))
    frame["correct"] = frame["true"] == frame["predicted"]
    return frame


def cell_images(predictions: pd.DataFrame, split: str, true: str, predicted: str) -> pd.DataFrame:
    """The images of one confusion-matrix cell, most confident first."""
    if predictions.empty:
        return predictions
    chosen = predictions[(predictions["split"] == split) & (predictions["true"] == true)
                         & (predictions["predicted"] == predicted)]
    return chosen.sort_values("confidence", ascending=False)


def top_losses(predictions: pd.DataFrame, split: str, count: int = 12) -> pd.DataFrame:
    """The images the model got most wrong: highest loss first."""
    if predictions.empty:
        return predictions
    return predictions[predictions["split"] == split].sort_values("loss", ascending=False).head(count)


def most_confused(split_evaluation: dict, minimum: int = 1, count: int = 10) -> list[tuple[str, str, int]]:
    """(true class, predicted class, images) for the off-diagonal cells, largest first."""
    classes = split_evaluation.get("classes", [])
    matrix = split_evaluation.get("confusion_matrix") or []
    pairs = [(classes[row], classes[column], int(value))
             for row, values in enumerate(matrix) for column, value in enumerate(values)
             if row != column and value >= minimum]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:count]


def per_class_table(split_evaluation: dict) -> pd.DataFrame:
    """Precision, recall, F1 and support per class."""
    per_class = split_evaluation.get("per_class") or {}
    return pd.DataFrame([{"class": name, **values} for name, values in per_class.items()])


def data_findings(run_dir: str | os.PathLike) -> dict:
    """What the data doctor found in the run's split (`data_report.json` → `doctor`), in words.

    Returns:
        {"checked": bool, "sentence": str, "leakage": [pairs], "num_leaks": int,
        "num_duplicate_files": int, "excluded": int}; "checked" is False for runs trained
        before the check existed, or when it failed.
    """
    report = runfiles.read_json(Path(run_dir) / runfiles.DATA_REPORT_FILE) or {}
    doctor = report.get("doctor") or {}
    excluded = int(report.get("num_excluded") or len(report.get("excluded") or []))
    if not doctor.get("checked"):
        return {"checked": False, "leakage": [], "num_leaks": 0, "num_duplicate_files": 0, "excluded": excluded,
                "sentence": "This run's images were not checked for duplicates and leakage "
                            "(it was trained before the check, or the check failed)."}
    leaks, duplicates = int(doctor.get("num_leaks") or 0), int(doctor.get("num_duplicate_files") or 0)
    if leaks:
        sentence = (f"{leaks} validation/test image(s) are the same or nearly the same picture as a training image: "
                    "the accuracy measured on them is likely too optimistic. Remove the copies and train again.")
    else:
        sentence = "No validation or test image is a copy of a training image."
    if duplicates:
        sentence += f" {duplicates} file(s) are exact copies of another file."
    return {"checked": True, "sentence": sentence, "leakage": doctor.get("leakage") or [], "num_leaks": leaks,
            "num_duplicate_files": duplicates, "excluded": excluded}


def class_columns(predictions: pd.DataFrame) -> list[str]:
    """The class names of a predictions table, in the model's output order."""
    return [column[len("prob_"):] for column in predictions.columns if column.startswith("prob_")]


def apply_decision(predictions: pd.DataFrame, decision) -> pd.DataFrame:
    """The predictions as the run answers at an operating point (`engine.operating_point.Decision`).

    `predicted` becomes the answered class or "not sure", `confidence` the probability of the
    answered class and `correct` is False for "not sure"; `true_probability` and `loss` stay.
    """
    from engine.operating_point import NOT_SURE, decide

    if predictions.empty:
        return predictions
    classes = class_columns(predictions)
    probabilities = predictions[[f"prob_{name}" for name in classes]].to_numpy()
    answered, sure = decide(probabilities, decision)
    changed = predictions.copy()
    changed["predicted"] = np.where(sure, np.asarray(classes, dtype=object)[answered], NOT_SURE)
    changed["confidence"] = probabilities[np.arange(len(changed)), answered]
    changed["correct"] = sure & (changed["predicted"] == changed["true"])
    return changed


def confusion_table(predictions: pd.DataFrame, split: str, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """Counts per (true class, answer) of one split; a "not sure" column is added when any image has it.

    Returns:
        (matrix of shape classes × answers, the answer names in column order).
    """
    from engine.operating_point import NOT_SURE

    rows = predictions[predictions["split"] == split] if not predictions.empty else predictions
    answers = list(classes) + ([NOT_SURE] if not rows.empty and (rows["predicted"] == NOT_SURE).any() else [])
    matrix = np.zeros((len(classes), len(answers)), dtype=int)
    if not rows.empty:
        row_of = {name: index for index, name in enumerate(classes)}
        column_of = {name: index for index, name in enumerate(answers)}
        for true, predicted in zip(rows["true"], rows["predicted"]):
            if true in row_of and predicted in column_of:
                matrix[row_of[true], column_of[predicted]] += 1
    return matrix, answers


def split_probabilities(predictions: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(calibrated probabilities, true class indices, class names) of one split, for curves."""
    classes = class_columns(predictions)
    rows = predictions[predictions["split"] == split] if not predictions.empty else predictions
    if rows.empty:
        return np.zeros((0, len(classes))), np.zeros(0, dtype=int), classes
    index_of = {name: index for index, name in enumerate(classes)}
    return (rows[[f"prob_{name}" for name in classes]].to_numpy(dtype=float),
            rows["true"].map(index_of).to_numpy(dtype=int), classes)
