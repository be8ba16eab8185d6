"""TFLite (LiteRT) export through Keras's own `model.export(format="litert")`.

Keras's exporter writes a SavedModel and runs `tf.lite.TFLiteConverter.from_saved_model`,
passing extra keyword arguments on to the converter. Its default allows Flex ops
(`SELECT_TF_OPS`); we override that with built-in ops only, because the pip interpreters
(`ai-edge-litert`, `tf.lite.Interpreter`) cannot run Flex ops, and a model that converts
with them would fail at its user's first call rather than here.

Quantisation:
    none: float32 weights and activations.
    float16: float16 weights (half the file), float32 input and output; the CPU kernels
        dequantise the weights once at load.
    int8: full-integer: int8 weights and activations calibrated on the run's training images,
        uint8 input (raw 0–255 pixels map one to one: scale 1, zero point 0), float32 output
        (one dequantise op at the end, so the output is a probability as in the float models).
"""

from __future__ import annotations

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
    if quantize == "float16":
        converter_settings["optimizations"] = [tf.lite.Optimize.DEFAULT]
        converter_settings["target_spec"]["supported_types"] = [tf.float16]
    elif quantize == "int8":
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
    elif quantize != "none":
        raise ValueError(f"`quantize` must be 'none', 'float16' or 'int8' for TFLite; received quantize={quantize!r}.")

    path = Path(folder) / MODEL_NAME
    try:
        model.export(str(path), format="litert", verbose=False, **converter_settings)
    except Exception as error:  # noqa: BLE001 - the converter raises its own ConverterError types
        raise unsupported_ops_error(error, backbone, quantize) from error
    return {"model_path": path,
            "runtime": {"name": "ai-edge-litert", "version": importlib.metadata.version("ai-edge-litert")},
            "input_dtype": "uint8" if quantize == "int8" else "float32",
            "representative_images": representative_count}


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
