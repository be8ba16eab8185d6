"""Benchmark: the first run a new user makes — the digits sample with the default (offline) backbone.

Not part of the test suite. Prints a table: image size, epochs, wall time from start to
finished (scan, decode, build, train, save, evaluate), validation accuracy.

    .venv/bin/python bench/first_run.py [--image-sizes 96 224] [--epochs 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import runfiles  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.runs import create_run  # noqa: E402
from engine.samples import ensure_sample  # noqa: E402
from engine.train import run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--epochs", type=int, default=10)
    arguments = parser.parse_args()
    data = ensure_sample("digits")
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for image_size in arguments.image_sizes:
            config = RunConfig().replace(**{"data.path": str(data.resolve()), "model.image_size": image_size,
                                            "training.epochs": arguments.epochs, "data.cache": "memory"})
            run_dir = create_run(config, runs_dir)
            started = time.perf_counter()
            state = run_training(run_dir)
            seconds = time.perf_counter() - started
            evaluation = runfiles.read_json(run_dir / "evaluation.json") or {}
            accuracy = evaluation.get("splits", {}).get("validation", {}).get("accuracy")
            rows.append((config.model.backbone, image_size, arguments.epochs, state, seconds, accuracy))
    print(f"{'backbone':<18} {'size':>5} {'epochs':>6} {'state':<9} {'seconds':>8} {'val accuracy':>12}")
    for backbone, size, epochs, state, seconds, accuracy in rows:
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        print(f"{backbone:<18} {size:>5} {epochs:>6} {state:<9} {seconds:>8.1f} {shown:>12}")


if __name__ == "__main__":
    main()
