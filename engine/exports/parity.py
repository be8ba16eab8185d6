"""The parity check: an export, run by its own runtime in a separate process, against `model.keras`.

The runner scripts in `runtimes/` import only their runtime and NumPy: each is started as
`python -s runtimes/<format>_runner.py` with `PYTHONPATH` removed and a temporary working
folder, so nothing of `engine` (or of this checkout) can be imported. The pixels go in as a
`.npy` of raw uint8 RGB; the outputs come back as a `.npy`, the timings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIMES_FOLDER = Path(__file__).resolve().parent / "runtimes"
RUNNERS = {"savedmodel": "savedmodel_runner.py", "tflite": "tflite_runner.py", "onnx": "onnx_runner.py"}
RUNNER_TIMEOUT_SECONDS = 1800

# The pass marks, one per (format, quantize). "difference": the largest absolute difference
# of any class probability; "agreement" and "accuracy_drop" for int8, whose rounding is
# expected to move probabilities by more than a float export's.
MARKS = {
    ("savedmodel", "none"): {"max_abs_difference": 1e-5},
    ("onnx", "none"): {"max_abs_difference": 1e-4},
    ("tflite", "none"): {"max_abs_difference": 1e-4},
    ("tflite", "float16"): {"max_abs_difference": 1e-2},
    ("tflite", "int8"): {"min_top1_agreement": 0.98, "max_accuracy_drop": 0.01},
}


def describe_mark(mark: dict) -> str:
    """The pass mark in words and numbers."""
    if "max_abs_difference" in mark:
        return f"largest absolute probability difference from model.keras ≤ {mark['max_abs_difference']:g}"
    return (f"top-1 agreement with model.keras ≥ {mark['min_top1_agreement']:.0%} and accuracy at most "
            f"{mark['max_accuracy_drop'] * 100:g} point below model.keras")


def run_runner(format: str, model_path: Path, pixels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Runs the export in its runtime in a fresh process.

    Returns:
        (outputs as the export gives them, (N, K) float32; timings dict from the runner).

    Raises:
        RuntimeError: the runner failed (its error output is in the message), or could import `engine`.
    """
    script = RUNTIMES_FOLDER / RUNNERS[format]
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="parity-") as work:
        work = Path(work)
        np.save(work / "images.npy", pixels)
        completed = subprocess.run(
            [sys.executable, "-s", str(script), str(Path(model_path).resolve()), str(work / "images.npy"),
             str(work / "outputs.npy"), str(work / "timings.json")],
            cwd=work, env=environment, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_SECONDS)
        if completed.returncode != 0 or not (work / "timings.json").is_file():
            tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"The {format} parity runner ({script.name}) failed with exit code "
                               f"{completed.returncode}; expected it to load {Path(model_path).name} and predict. "
                               f"Its last error lines:\n{tail}")
        outputs = np.load(work / "outputs.npy")
        timings = json.loads((work / "timings.json").read_text(encoding="utf-8"))
    if timings.get("imported_engine"):
        raise RuntimeError(f"The {format} parity runner could import `engine`; expected it to see only its runtime.")
    return outputs, timings


def compare(format: str, quantize: str, export_probabilities: np.ndarray, keras_probabilities: np.ndarray,
            labels: np.ndarray) -> dict:
    """The numbers of the comparison and whether they meet the format's mark.

    Args:
        export_probabilities, keras_probabilities: (N, classes), one column per class.
        labels: (N,) true class indices.
    """
    mark = MARKS[(format, quantize)]
    difference = float(np.max(np.abs(export_probabilities - keras_probabilities)))
    export_top1 = np.argmax(export_probabilities, axis=1)
    keras_top1 = np.argmax(keras_probabilities, axis=1)
    agreement = float(np.mean(export_top1 == keras_top1))
    accuracy_export = float(np.mean(export_top1 == labels))
    accuracy_keras = float(np.mean(keras_top1 == labels))
    if "max_abs_difference" in mark:
        passed = bool(np.isfinite(difference) and difference <= mark["max_abs_difference"])
    else:
        # A small tolerance so 1 point exactly (e.g. 2 of 200) counts as within the mark.
        passed = bool(agreement >= mark["min_top1_agreement"]
                      and accuracy_export >= accuracy_keras - mark["max_accuracy_drop"] - 1e-9)
    return {"max_abs_difference": difference, "top1_agreement": agreement, "accuracy_export": accuracy_export,
            "accuracy_keras": accuracy_keras, "mark": {"text": describe_mark(mark), **mark}, "passed": passed}


def folder_bytes(path: Path) -> int:
    """The size of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def parity_record(format: str, quantize: str, runtime: dict, opset, sample, skipped: int, comparison: dict,
                  timings: dict, file_bytes: int) -> dict:
    """The `parity.json` content, with plain keys the model card reads."""
    return {
        "format": format, "quantize": quantize, "runtime": runtime, "opset": opset,
        "images": int(len(sample.labels)), "split": sample.split, "skipped_images": int(skipped),
        "max_abs_difference": comparison["max_abs_difference"], "top1_agreement": comparison["top1_agreement"],
        "accuracy_export": comparison["accuracy_export"], "accuracy_keras": comparison["accuracy_keras"],
        "file_bytes": int(file_bytes), "load_seconds": float(timings["load_seconds"]),
        "latency_one_ms": float(timings["latency_one_ms"]),
        "latency_batch32_ms": float(timings["latency_batch32_ms"]),
        "mark": comparison["mark"], "passed": comparison["passed"], "created": time.time(),
    }
