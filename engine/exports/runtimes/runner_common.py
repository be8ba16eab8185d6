"""What every parity runner shares: arguments, batching, timings, the result files.

The runners run in a fresh process with only the venv's packages on the path (never
`engine`), so a runner proves that the export works with its runtime alone. This module
sits beside them and is imported as `runner_common` (the script's folder is on `sys.path`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

BATCH = 32
ONE_IMAGE_REPEATS = 10
BATCH_REPEATS = 3


def parse_arguments(description: str) -> argparse.Namespace:
    """`runner MODEL IMAGES.npy OUTPUT.npy TIMINGS.json`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="the exported model (file or folder)")
    parser.add_argument("images", help=".npy of raw uint8 RGB pixels, shape (N, H, W, 3)")
    parser.add_argument("output", help="where to write the .npy of the model's outputs, shape (N, K)")
    parser.add_argument("timings", help="where to write the timings as JSON")
    return parser.parse_args()


def median_milliseconds(call, repeats: int) -> float:
    """The median wall time of `repeats` calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def run(load, predict, runtime_name: str, runtime_version: str) -> None:
    """Loads the model, predicts every image in batches of 32, times one image and a batch of 32.

    Args:
        load: `load(model_path)` -> a loaded model (timed as the load time).
        predict: `predict(loaded, uint8_batch)` -> float array (batch, K) of the model's outputs.
        runtime_name, runtime_version: Written into the timings.
    """
    arguments = parse_arguments(f"Parity runner for {runtime_name}")
    images = np.load(arguments.images)
    start = time.perf_counter()
    loaded = load(arguments.model)
    load_seconds = time.perf_counter() - start
    outputs = [np.asarray(predict(loaded, images[first:first + BATCH]), dtype=np.float32).reshape(
        min(BATCH, len(images) - first), -1) for first in range(0, len(images), BATCH)]
    np.save(arguments.output, np.concatenate(outputs, axis=0))
    # The batch of 32 repeats the sample's images when it has fewer than 32.
    batch = np.resize(images, (BATCH,) + images.shape[1:])
    timings = {
        "runtime": {"name": runtime_name, "version": runtime_version},
        "load_seconds": load_seconds,
        "latency_one_ms": median_milliseconds(lambda: predict(loaded, images[:1]), ONE_IMAGE_REPEATS),
        "latency_batch32_ms": median_milliseconds(lambda: predict(loaded, batch), BATCH_REPEATS),
        # The parent checks this: a runner that could reach our own package would prove nothing.
        "imported_engine": any(name == "engine" or name.startswith("engine.") for name in sys.modules),
    }
    with open(arguments.timings, "w", encoding="utf-8") as handle:
        json.dump(timings, handle)
