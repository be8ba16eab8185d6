"""ONNX export through Keras's own `model.export(format="onnx")` (tf2onnx underneath).

Keras's exporter traces the model's inference call to a concrete function and hands it
to `tf2onnx.convert.from_function`, patched by Keras for NumPy 2; calling tf2onnx
directly would only repeat that. The opset is fixed here (not left to tf2onnx's default)
so the README and `parity.json` can state it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "model.onnx"
# 17 is within what tf2onnx 1.17 writes and what ONNX Runtime ≥ 1.14 (and onnxruntime-web) run.
OPSET = 17


def write_onnx(model, folder: Path) -> dict:
    """Writes `folder/model.onnx` from the inference model.

    Returns:
        {"model_path", "runtime": {"name", "version"}, "opset"}.
    """
    import onnxruntime

    import numpy as np

    if not getattr(model, "_called", True):
        # Keras's ONNX exporter refuses a model never called ("The model provided has never
        # called"): a freshly loaded or rebuilt functional model has not been. One zero image does it.
        model(np.zeros((1, *model.input_shape[1:]), dtype="float32"), training=False)
    path = Path(folder) / MODEL_NAME
    model.export(str(path), format="onnx", opset_version=OPSET, verbose=False)
    return {"model_path": path, "runtime": {"name": "onnxruntime", "version": onnxruntime.__version__},
            "opset": OPSET}
