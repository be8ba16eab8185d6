"""How long a run's model takes to answer for one image on this machine: `latency.json`, written only here.

Measured on demand (the sweep command after its runs end, the leaderboard's button), not during
training, so a run's training time stays its own; the numbers say which machine they came from.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np

from engine import runfiles

LATENCY_FILE = "latency.json"
REPEATS = 20


def measure_latency(run_dir: str | os.PathLike, repeats: int = REPEATS, user=None) -> dict:
    """Times the run's model on one image (median of `repeats` calls after a warm-up) and writes latency.json.

    Writing into the run folder is for its owner or an admin (`user`; None is the local user).

    Raises:
        ValueError: the run has no saved model yet.
        PermissionError: a viewer, or a member who does not own the run.
    """
    from engine.jobs import authorize
    from engine.predict import load_run_model
    from engine.status import read_status

    authorize(user, read_status(run_dir), "measure")

    model, _, image_size = load_run_model(run_dir)
    image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3)).astype("float32")
    model(image, training=False)  # warm-up: the first call traces the graph
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        np.asarray(model(image, training=False))
        times.append((time.perf_counter() - began) * 1000)
    result = {"one_image_ms": float(np.median(times)), "repeats": repeats, "image_size": image_size,
              "machine": platform.node(), "cpu_count": os.cpu_count(), "measured": time.time()}
    runfiles.atomic_write_json(Path(run_dir) / LATENCY_FILE, result)
    return result


def read_latency(run_dir: str | os.PathLike) -> Optional[dict]:
    """latency.json of a run, or None when it was never measured."""
    result = runfiles.read_json(Path(run_dir) / LATENCY_FILE)
    return result if isinstance(result, dict) else None
