"""What a sweep costs: runs of one backbone share one feature computation.

Starts a backbone × learning-rate sweep through the queue (one run at a time, the default) on a
dataset, waits for it, and prints per run whether its features were computed or found in the
cache and how long it took, then the sweep's wall time against what the same runs would cost if
each computed its own features.

    .venv/bin/python bench/sweep_cost.py --data sample:digits
    .venv/bin/python bench/sweep_cost.py --data ../shared/data/cats_vs_dogs

Offline weights: MobileNet α=0.25 from ../shared/keras_home (copied into a temporary KERAS_HOME)
and EfficientNet-Lite0 (installed with the app). Caches and runs go to a temporary folder, so
the first run of each backbone really computes its features.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = REPO.parent / "shared" / "keras_home" / "models" / "mobilenet_2_5_224_tf_no_top.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample:digits")
    parser.add_argument("--rates", default="1e-3,3e-3,1e-2")
    parser.add_argument("--epochs", type=int, default=5)
    arguments = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    keras_home = scratch / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    shutil.copy(SHARED_WEIGHTS, keras_home / "models" / SHARED_WEIGHTS.name)
    os.environ.update({"KERAS_HOME": str(keras_home), "TRANSFER_STUDIO_CACHE": str(scratch / "cache"),
                       "TRANSFER_STUDIO_DATA": str(scratch / "appdata"), "TRANSFER_STUDIO_OFFLINE": "1"})
    sys.path.insert(0, str(REPO))
    from engine import runfiles
    from engine.config import RunConfig
    from engine.samples import ensure_sample
    from engine.status import read_status
    from engine.sweeps import parse_grid, start_sweep, wait_for_sweep

    data = arguments.data
    if data.startswith("sample:"):
        data = str(ensure_sample(data[len("sample:"):]))
    runs = scratch / "runs"
    # MobileNet's offline weights are α=0.25; EfficientNet-Lite0 has no width (the sweep drops it there).
    config = RunConfig().replace(**{"data.path": data, "model.backbone": "MobileNet", "model.alpha": 0.25,
                                    "model.image_size": 224, "training.epochs": arguments.epochs})
    grid = parse_grid(["model.backbone=MobileNet,EfficientNetLite0", f"training.learning_rate={arguments.rates}"])
    began = time.time()
    sweep = start_sweep(config, grid, runs, name="bench")
    wait_for_sweep(sweep, runs, timeout=6 * 3600)
    wall = time.time() - began
    rows, feature_seconds = [], {}
    for entry in sweep["runs"]:
        run_dir = runs / entry["run_id"]
        status = read_status(run_dir)
        log = (run_dir / runfiles.LOG_FILE).read_text()
        found = re.search(r"Features of (\d+) images computed in ([\d.]+) s", log)
        seconds = (datetime.fromisoformat(status.finished) - datetime.fromisoformat(status.started)).total_seconds()
        if found:
            feature_seconds[status.backbone] = float(found.group(2))
        rows.append((status.backbone, entry["settings"]["training.learning_rate"], "computed" if found else "cache",
                     seconds, status.validation_accuracy, status.state.value))
    print(f"\n{arguments.data}: {len(rows)} runs, {arguments.epochs} head epochs each\n")
    print("| backbone | learning rate | features | run seconds | validation accuracy | state |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backbone, rate, features, seconds, accuracy, state in rows:
        print(f"| {backbone} | {rate:g} | {features} | {seconds:.0f} | {accuracy if accuracy is None else f'{accuracy:.3f}'} "
              f"| {state} |")
    unshared = sum(feature_seconds.get(row[0], 0.0) for row in rows if row[2] == "cache")
    print(f"\nsweep wall time {wall:.0f} s; feature passes {len(feature_seconds)} "
          f"({', '.join(f'{name} {value:.0f} s' for name, value in feature_seconds.items())}); "
          f"without sharing the cached runs would each add their backbone's pass: about {wall + unshared:.0f} s")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
