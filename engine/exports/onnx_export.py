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


def write_onnx(model, folder: Path, backbone: str = "") -> dict:
    """Writes `folder/model.onnx` from the inference model.

    Returns:
        {"model_path", "runtime": {"name", "version"}, "opset"}.

    Raises:
        ValueError: tf2onnx left TensorFlow ops it could not translate (named in the message).
    """
    import onnxruntime

    import numpy as np

    if not getattr(model, "_called", True):
        # Keras's ONNX exporter refuses a model never called ("The model provided has never
        # called"): a freshly loaded or rebuilt functional model has not been. One zero image does it.
        model(np.zeros((1, *model.input_shape[1:]), dtype="float32"), training=False)
    path = Path(folder) / MODEL_NAME
    model.export(str(path), format="onnx", opset_version=OPSET, verbose=False)
    check_onnx_ops(path, backbone)
    return {"model_path": path, "runtime": {"name": "onnxruntime", "version": onnxruntime.__version__},
            "opset": OPSET}


def check_onnx_ops(path: Path, backbone: str = "") -> None:
    """Raises ValueError when the graph holds ops that are not ONNX's own, or inputs besides the image.

    tf2onnx keeps a TensorFlow op it cannot translate as a node of that name (e.g.
    `StatefulPartitionedCall` for Keras's grouped convolutions in ConvNeXt), which ONNX
    Runtime then refuses to load: said here, with the op and the layer, rather than as a
    runtime error.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    schemas = {schema.name for schema in onnx.defs.get_all_schemas()}
    unknown: dict[str, list[str]] = {}
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in schemas:
            unknown.setdefault(node.op_type, []).append(node.name)
    model = f"the {backbone} model" if backbone else "the model"
    initializers = {initializer.name for initializer in graph.initializer}
    extra_inputs = [item.name for item in graph.input if item.name not in initializers][1:]
    if extra_inputs:
        # Seen with Keras's Normalization layer inside EfficientNetB0–B3: its mean and variance
        # come out as inputs the caller would have to feed, not as constants.
        raise ValueError(f"ONNX (opset {OPSET}) cannot convert {model}: tf2onnx turned layer variable(s) into extra "
                         f"graph input(s) ({', '.join(extra_inputs[:3])}); expected one input, the image. Export "
                         f"this run as SavedModel or TFLite instead (see docs/exports.md).")
    if unknown:
        named = "; ".join(f"{op} (e.g. in {nodes[0].split('/StatefulPartitionedCall')[0]})"
                          for op, nodes in unknown.items())
        raise ValueError(f"ONNX (opset {OPSET}) cannot convert {model}: tf2onnx left TensorFlow op(s) it could not "
                         f"translate: {named}. Export this run as SavedModel or TFLite instead (see docs/exports.md).")
