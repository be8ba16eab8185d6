"""The files beside an exported model: `labels.json`, `input_spec.json` and `README.md`.

The exported signature returns probabilities as the model gives them (uncalibrated); the run's
calibration temperature and operating point travel in `labels.json`, and the README shows
the one-line formula, so a user can apply both exactly as the app does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from engine import runfiles

LABELS_NAME = "labels.json"
INPUT_SPEC_NAME = "input_spec.json"
README_NAME = "README.md"

_TITLES = {"savedmodel": "TensorFlow SavedModel", "tflite": "TFLite (LiteRT)", "onnx": "ONNX"}

_LOAD = {
    "savedmodel": '''import tensorflow as tf

signature = tf.saved_model.load("{model}").signatures["serving_default"]
input_name = list(signature.structured_input_signature[1])[0]
outputs = next(iter(signature(**{{input_name: tf.constant(pixels.astype(np.float32))}}).values())).numpy()''',
    "tflite": '''from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path="{model}")
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels.astype({input_dtype}))
interpreter.invoke()
outputs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])''',
    "onnx": '''import onnxruntime

session = onnxruntime.InferenceSession("{model}", providers=["CPUExecutionProvider"])
outputs = session.run(None, {{session.get_inputs()[0].name: pixels.astype(np.float32)}})[0]''',
}

_PIP = {"savedmodel": "tensorflow", "tflite": "ai-edge-litert", "onnx": "onnxruntime"}


def output_description(num_classes: int) -> dict:
    """What the output holds: one sigmoid unit for two classes, a softmax row otherwise."""
    if num_classes == 2:
        return {"shape": [None, 1], "kind": "sigmoid",
                "meaning": "probability of classes[1]; classes[0] has 1 - p"}
    return {"shape": [None, num_classes], "kind": "softmax", "meaning": "one probability per class, in classes order"}


def write_bundle(folder: Path, format: str, quantize: str, model_name: str, class_names: list[str], image_size: int,
                 input_dtype: str, temperature: float, decision: Optional[dict], run_id: str,
                 opset: Optional[int]) -> None:
    """Writes labels.json, input_spec.json and README.md into the export folder."""
    folder = Path(folder)
    runfiles.atomic_write_json(folder / LABELS_NAME, {
        "classes": list(class_names),
        "image_size": image_size,
        "output": output_description(len(class_names)),
        "calibration": {"temperature": temperature, "formula": "calibrated = softmax(log(p) / temperature)"},
        "operating_point": decision,
        "run": run_id,
    })
    runfiles.atomic_write_json(folder / INPUT_SPEC_NAME, {
        "shape": [None, image_size, image_size, 3], "layout": "NHWC", "dtype": input_dtype,
        "range": [0, 255], "colour": "RGB",
        "resize": f"to {image_size}x{image_size} (the app uses Pillow bilinear), no crop",
        "normalisation": "none: the model normalises inside (its 'preprocess' layer)",
        "output": output_description(len(class_names)), "format": format, "quantize": quantize, "opset": opset,
    })
    runfiles.atomic_write_text(folder / README_NAME, readme_text(format, quantize, model_name, class_names,
                                                                 image_size, input_dtype, temperature, decision,
                                                                 run_id, opset))


def snippet(format: str, model_name: str, input_dtype: str) -> str:
    """A Python snippet that classifies `picture.jpg` with the export, run from the export's folder."""
    load = _LOAD[format].format(model=model_name, input_dtype=f"np.{input_dtype}")
    return f'''import json

import numpy as np
from PIL import Image

labels = json.load(open("labels.json"))
size, classes = labels["image_size"], labels["classes"]
image = Image.open("picture.jpg").convert("RGB").resize((size, size), Image.BILINEAR)
pixels = np.asarray(image, dtype=np.uint8)[None]  # raw 0-255 RGB, shape (1, size, size, 3): no normalisation

{load}

p = np.asarray(outputs, dtype=np.float64).reshape(1, -1)
if len(classes) == 2:  # one sigmoid unit: the probability of classes[1]
    p = np.concatenate([1 - p, p], axis=1)
# Calibrate as the app does: softmax(log(p) / T).
logits = np.log(np.clip(p, 1e-12, 1)) / labels["calibration"]["temperature"]
calibrated = np.exp(logits - logits.max(axis=1, keepdims=True))
calibrated /= calibrated.sum(axis=1, keepdims=True)
print(classes[int(calibrated.argmax())], float(calibrated.max()))
'''


def readme_text(format: str, quantize: str, model_name: str, class_names: list[str], image_size: int,
                input_dtype: str, temperature: float, decision: Optional[dict], run_id: str,
                opset: Optional[int]) -> str:
    """The export's README: what it is, its input and output, a working snippet, calibration."""
    title = _TITLES[format] + ("" if quantize == "none" else f", {quantize}")
    output = output_description(len(class_names))
    lines = [
        f"# {title} export of run {run_id}",
        "",
        f"- Model: `{model_name}`" + (f" (ONNX opset {opset})" if opset else ""),
        f"- Input: raw 0–255 RGB, shape (N, {image_size}, {image_size}, 3), {input_dtype}; resize the picture to "
        f"{image_size}×{image_size}, no other normalisation (the model does its own).",
        f"- Output: {output['kind']}, {output['meaning']}; uncalibrated, as the model gives it.",
        f"- Classes (`labels.json`): {', '.join(class_names)}.",
        f"- Calibration temperature: {temperature:g}. Calibrated probabilities: `softmax(log(p) / T)`.",
    ]
    if decision:
        parts = []
        if decision.get("threshold") is not None and len(class_names) == 2:
            parts.append(f"answer {class_names[1]} from a calibrated probability of {decision['threshold']:g}")
        if decision.get("minimum_confidence"):
            parts.append(f"say \"not sure\" below a calibrated probability of {decision['minimum_confidence']:g} "
                         f"for the answered class")
        if parts:
            lines.append(f"- Operating point (the run's `decision.json`, also in `labels.json`): {'; '.join(parts)}.")
    lines += [
        "",
        f"Needs `pip install {_PIP[format]} numpy pillow`. From this folder:",
        "",
        "```python",
        snippet(format, model_name, input_dtype).rstrip(),
        "```",
        "",
        "`parity.json` holds the check this export passed (or failed) against the run's `model.keras`.",
        "",
    ]
    return "\n".join(lines)
