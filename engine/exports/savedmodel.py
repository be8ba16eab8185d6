"""SavedModel export through Keras's own `model.export(format="tf_saved_model")`.

Keras writes a `serve` endpoint and the `serving_default` signature TensorFlow Serving and
`tf.saved_model.load` use; the signature takes raw 0–255 RGB float32 (N, H, W, 3).
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "saved_model"


def write_savedmodel(model, folder: Path) -> dict:
    """Writes `folder/saved_model/` from the inference model.

    Returns:
        {"model_path": the folder to load, "runtime": {"name", "version"}}.
    """
    import tensorflow as tf

    path = Path(folder) / MODEL_NAME
    model.export(str(path), format="tf_saved_model", verbose=False)
    return {"model_path": path, "runtime": {"name": "tensorflow", "version": tf.__version__}}
