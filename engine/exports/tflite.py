"""TFLite (LiteRT) export through Keras's own `model.export(format="litert")`.

Keras's exporter writes a SavedModel and runs `tf.lite.TFLiteConverter.from_saved_model`,
passing extra keyword arguments on to the converter. Its default allows Flex ops
(`SELECT_TF_OPS`); we override that with built-in ops only, because the pip interpreters
(`ai-edge-litert`, `tf.lite.Interpreter`) cannot run Flex ops, and a model that converts
with them would fail at its user's first call rather than here.

Quantisation:
    none: float32 weights and activations.
    float16: the convolution and dense weights stored as float16 (about half the file), float32
        input and output; the CPU kernels dequantise them once at load. Written from the float32
        conversion by `store_large_weights_in_float16`, not by the converter's float16 mode: that
        mode rounds every constant, and rounding MobileNet's small depthwise kernels (batch norm
        folded in) alone moved its probabilities by 1.5e-2, over the float16 mark, for 3 % of the
        file; the converter cannot keep selected ops in float32 (docs/exports.md, "float16").
    int8: full-integer: int8 weights and activations calibrated on the run's training images,
        uint8 input (raw 0–255 pixels map one to one: scale 1, zero point 0), float32 output
        (one dequantise op at the end, so the output is a probability as in the float models).
"""

from __future__ import annotations

import collections
import importlib.metadata
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

MODEL_NAME = "model.tflite"


class UnsupportedOpsError(ValueError):
    """The model has ops without a TFLite built-in kernel."""


def write_tflite(model, folder: Path, quantize: str = "none",
                 representative_images: Optional[Callable[[], np.ndarray]] = None, backbone: str = "") -> dict:
    """Writes `folder/model.tflite` from the inference model.

    Args:
        model: The inference model (raw 0–255 float32 in).
        folder: Where to write.
        quantize: "none", "float16" or "int8".
        representative_images: For int8: returns a (N, H, W, 3) uint8 array of raw training
            images to calibrate the activation ranges on.
        backbone: The backbone's name, for error messages.

    Returns:
        {"model_path", "runtime": {"name", "version"}, "input_dtype", "representative_images"}.

    Raises:
        UnsupportedOpsError (a ValueError): the model needs ops that are not TFLite built-ins;
            the message names them.
    """
    import tensorflow as tf

    converter_settings: dict = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    representative_count = 0
    if quantize == "int8":
        images = representative_images() if representative_images else None
        if images is None or len(images) == 0:
            raise ValueError("int8 quantisation needs representative images (the run's training images); "
                             "received none. Check that the run's split.csv lists readable training images.")
        representative_count = len(images)

        def representative_dataset():
            for position, image in enumerate(images):
                # Raw 0–255 pixels as float32, exactly what the float model takes.
                image = image[None].astype(np.float32)
                if position == 0:
                    # The input's range is calibrated from these images too; one black and one
                    # white pixel make it exactly 0–255, so the uint8 input has scale 1 and zero
                    # point 0 and a user feeds raw pixels as they are (no quantisation step).
                    image[0, 0, 0], image[0, 0, 1] = 0.0, 255.0
                yield [image]

        converter_settings.update({
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": representative_dataset,
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "inference_input_type": tf.uint8,
            "inference_output_type": tf.float32,
        })
    elif quantize not in ("none", "float16"):
        raise ValueError(f"`quantize` must be 'none', 'float16' or 'int8' for TFLite; received quantize={quantize!r}.")

    path = Path(folder) / MODEL_NAME
    try:
        model.export(str(path), format="litert", verbose=False, **converter_settings)
    except Exception as error:  # noqa: BLE001 - the converter raises its own ConverterError types
        raise unsupported_ops_error(error, backbone, quantize) from error
    float16_weights = store_large_weights_in_float16(path) if quantize == "float16" else 0
    return {"model_path": path, "float16_weights": float16_weights,
            "runtime": {"name": "ai-edge-litert", "version": importlib.metadata.version("ai-edge-litert")},
            "input_dtype": "uint8" if quantize == "int8" else "float32",
            "representative_images": representative_count}


# The weights stored in float16: those read by these (op, input position) pairs. Everything else
# (depthwise kernels, biases, the preprocessing's scale and offset) stays float32.
FLOAT16_WEIGHT_INPUTS = (("CONV_2D", 1), ("FULLY_CONNECTED", 1))
# Of those, the smallest tensors up to this share of their elements stay float32 too. They are
# the first layers (few channels), whose rounding error every later layer carries: on MobileNet
# α=0.25, rounding one of its first seven convolutions alone moved the probabilities by
# 0.002–0.006, one of the last eight by 0.0002–0.002; the first seven are 7 % of the weights.
FLOAT32_SMALLEST_SHARE = 0.10
# DEQUANTIZE with a float16 input is version 3 of the op (what the converter itself writes).
DEQUANTIZE_FLOAT16_VERSION = 3


def store_large_weights_in_float16(path: Path) -> int:
    """Rewrites a float32 .tflite in place so convolution and dense weights are stored as float16.

    The smallest of those weights, up to FLOAT32_SMALLEST_SHARE of their elements, stay float32
    (see there). Each other weight becomes a float16 constant followed by a DEQUANTIZE op whose float32
    output is the tensor the convolution reads: the same pattern the converter's float16 mode
    writes, which the interpreters (XNNPACK included) run as float32 after dequantising once at
    load. Only the weights of CONV_2D and FULLY_CONNECTED are rounded; they are nearly all of
    the file. TensorFlow's own flatbuffer object API does the reading and writing
    (`tensorflow.lite.tools.flatbuffer_utils`); no library offers selective float16 storage.

    Returns:
        How many weight tensors are now stored as float16.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    operator_names = {number: name for name, number in vars(schema.BuiltinOperator).items() if name.isupper()}

    def operator_name(operator) -> str:
        code = model.operatorCodes[operator.opcodeIndex]
        # Codes above 127 live only in builtinCode; below, older files fill only the deprecated field.
        return operator_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

    dequantize = _operator_code_index(model, schema.BuiltinOperator.DEQUANTIZE, DEQUANTIZE_FLOAT16_VERSION)
    # A buffer two tensors share keeps its float32 bytes; one only this tensor reads is emptied.
    readers = collections.Counter(tensor.buffer for subgraph in model.subgraphs for tensor in subgraph.tensors)
    stored = 0
    for subgraph in model.subgraphs:
        weights = sorted({operator.inputs[position] for operator in subgraph.operators
                          for name, position in FLOAT16_WEIGHT_INPUTS
                          if operator_name(operator) == name and len(operator.inputs) > position
                          and operator.inputs[position] >= 0})
        dequantize_operators = []
        for index in _largest_weights(model, subgraph, weights, FLOAT32_SMALLEST_SHARE):
            tensor = subgraph.tensors[index]
            data = model.buffers[tensor.buffer].data
            halves = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.float32).astype(np.float16)
            half_tensor = schema.TensorT()
            half_tensor.shape, half_tensor.type = tensor.shape, schema.TensorType.FLOAT16
            half_tensor.name = (tensor.name or b"") + b"_float16"
            half_tensor.buffer = _append_buffer(model, np.frombuffer(halves.tobytes(), dtype=np.uint8))
            subgraph.tensors.append(half_tensor)
            if readers[tensor.buffer] == 1:
                model.buffers[tensor.buffer].data = None
            tensor.buffer = _append_buffer(model, None)  # now computed by the DEQUANTIZE op
            operator = schema.OperatorT()
            operator.opcodeIndex, operator.inputs, operator.outputs = dequantize, [len(subgraph.tensors) - 1], [index]
            dequantize_operators.append(operator)
            stored += 1
        # First in the list: they read only constants, so the order stays a valid execution order.
        subgraph.operators = dequantize_operators + subgraph.operators
    flatbuffer_utils.write_model(model, str(path))
    return stored


def _largest_weights(model, subgraph, candidates: list, kept_share: float) -> list:
    """The float32 constant tensors among `candidates`, without the smallest ones up to `kept_share` of their elements."""
    from tensorflow.lite.python import schema_py_generated as schema

    constants = []
    for index in candidates:
        tensor = subgraph.tensors[index]
        data = model.buffers[tensor.buffer].data
        if tensor.type == schema.TensorType.FLOAT32 and data is not None and len(data) > 0:
            constants.append((len(data) // 4, index))  # not an activation, nor already quantised
    total = sum(size for size, _ in constants)
    kept, chosen = 0, []
    for size, index in sorted(constants):
        if kept + size <= kept_share * total:
            kept += size
        else:
            chosen.append(index)
    return sorted(chosen)


def _operator_code_index(model, builtin_code: int, version: int) -> int:
    """The index of an operator code in the model's table, added when the model has none."""
    from tensorflow.lite.python import schema_py_generated as schema

    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin_code:
            code.version = max(code.version, version)
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin_code
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _append_buffer(model, data) -> int:
    """Adds a buffer (None: empty, for a tensor an op computes) and returns its index."""
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = data
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def ops_named_in(message: str) -> list[str]:
    """The TensorFlow op names a converter error message names, in order, without repeats."""
    names = re.findall(r"'tf\.(\w+)' op", message)
    for listed in re.findall(r"Flex ops: ([\w, ]+)", message):
        names += [name.strip().removeprefix("Flex") for name in listed.split(",")]
    names += re.findall(r"\btf\.(\w+)\b[^\n]*(?:is neither|not supported|failed to legalize)", message)
    return list(dict.fromkeys(name for name in names if name))


def unsupported_ops_error(error: BaseException, backbone: str, quantize: str) -> ValueError:
    """A ValueError that says which ops stopped the conversion and what to use instead."""
    message = str(error)
    names = ops_named_in(message)
    model = f"the {backbone} model" if backbone else "the model"
    if names:
        return UnsupportedOpsError(
            f"TFLite ({quantize}) cannot convert {model} with built-in ops only: op(s) {', '.join(names)} have no "
            f"TFLite built-in kernel. Flex (SELECT_TF_OPS) is not used because the pip interpreters cannot run it. "
            f"Export this run as SavedModel or ONNX instead, or train it on a backbone that converts "
            f"(see docs/exports.md).")
    first_lines = " ".join(message.strip().splitlines()[:3])[:600]
    return ValueError(f"TFLite ({quantize}) conversion of {model} failed: {first_lines}")
