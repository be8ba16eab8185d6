"""Loading a trained run's model and predicting on new images.

Only models this tool trained itself are loaded, from a run folder, with Keras
`safe_mode=True` (no arbitrary code in the file is run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from engine import runfiles


def load_run_model(run_dir: str | os.PathLike):
    """Loads `model.keras` of a run in safe mode.

    Returns:
        (model, class_names, image_size).

    Raises:
        ValueError: the run has no saved model or labels.
    """
    import keras

    import engine.layers  # noqa: F401 - registers our layers so safe mode can rebuild them

    run_dir = Path(run_dir)
    model_path = run_dir / runfiles.MODEL_FILE
    labels = runfiles.read_json(run_dir / runfiles.LABELS_FILE)
    if not model_path.is_file():
        raise ValueError(f"Run {run_dir.name} has no {runfiles.MODEL_FILE} yet: it has not finished training.")
    if not isinstance(labels, dict) or not labels.get("classes"):
        raise ValueError(f"Run {run_dir.name} has no readable {runfiles.LABELS_FILE}.")
    model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    image_size = int(model.input_shape[1])
    return model, list(labels["classes"]), image_size


def run_temperature(run_dir: str | os.PathLike) -> float:
    """The run's calibration temperature (`evaluation.json`), 1.0 for runs trained before calibration."""
    evaluation = runfiles.read_json(Path(run_dir) / runfiles.EVALUATION_FILE) or {}
    temperature = (evaluation.get("calibration") or {}).get("temperature")
    return float(temperature) if isinstance(temperature, (int, float)) and temperature > 0 else 1.0


def predict_probabilities(model, images: np.ndarray, num_classes: int, batch_size: int = 64,
                          rows: Optional[list[int]] = None) -> np.ndarray:
    """Runs the model over a (N, size, size, 3) uint8 array (or only its `rows`); returns (N, classes) probabilities."""
    from engine.modeling import probabilities_per_class
    from engine.pipeline import make_dataset

    count = len(images) if rows is None else len(rows)
    if count == 0:
        return np.zeros((0, num_classes))
    # model.predict runs a compiled graph over a prefetched pipeline: several times faster
    # than calling the model eagerly batch by batch.
    dataset = make_dataset(images, np.zeros(count, dtype=np.int32), batch_size, rows=rows).map(lambda x, y: x)
    return probabilities_per_class(model.predict(dataset, verbose=0), num_classes)


def predict_images(run_dir: str | os.PathLike, image_paths: list[str], top_k: int = 3, loaded=None) -> list[dict]:
    """Predicts the class of each image file.

    Args:
        run_dir: The run whose model to use.
        image_paths: Image files.
        top_k: How many classes to list per image.
        loaded: The result of `load_run_model(run_dir)`, when the caller keeps it loaded.

    Returns:
        One dictionary per image: path, and either `top` (list of {class, probability},
        best first), `probabilities` (all calibrated with the run's temperature), `verdict`
        (the answered class at the run's operating point, or "not sure") and `sure`; or
        `error` naming why the file could not be used.
    """
    from engine.calibration import apply_temperature
    from engine.images import load_usable_images
    from engine.operating_point import read_decision, verdict

    model, class_names, image_size = loaded or load_run_model(run_dir)
    temperature, decision = run_temperature(run_dir), read_decision(run_dir)
    results, arrays, positions = load_usable_images(image_paths, image_size)
    if arrays:
        probabilities = apply_temperature(predict_probabilities(model, np.stack(arrays), len(class_names)),
                                          temperature)
        for position, row in zip(positions, probabilities):
            results[position]["verdict"], results[position]["sure"] = verdict(row, class_names, decision)
            order = np.argsort(row)[::-1][:max(1, top_k)]
            results[position]["top"] = [{"class": class_names[index], "probability": float(row[index])}
                                        for index in order]
            results[position]["probabilities"] = {name: float(value) for name, value in zip(class_names, row)}
    return results
