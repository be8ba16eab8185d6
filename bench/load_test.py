"""Load test: concurrent detached runs while a client polls every run's status and metrics.

    .venv/bin/python bench/load_test.py [--runs 3] [--max-concurrent 3] [--epochs 10]
        [--fine-tune-epochs 2] [--image-size 64] [--per-class 50] [--interval 0.25] [--data DIR]

Starts `--runs` runs through the queue (`engine.jobs.start`, queue size `--max-concurrent`)
on small data: by default a generated folder of three classes of coloured pictures, or
`--data DIR`. Each run trains MobileNet α=0.25 from random weights (no downloads): the head
on cached features, then `--fine-tune-epochs` epochs of fine-tuning, save, evaluate. While
they run, one client thread does what the Monitor page does for each run every `--interval`
seconds: `get_run` (the status; the main loop reconciles liveness) and `read_jsonl` of
`metrics.jsonl`. It records every error, the latency of each read, and every state seen.

It prints a table: runs, queue size, wall time from the first start to the last final
state, polls done (one poll = one run's status and metrics), poll errors, median and
maximum poll latency, whether a state ever went backwards (e.g. finished → running), and
whether every status seen agreed with the run's final outcome (no final state but the
true one, ever). Everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STATE_RANK = {"queued": 0, "running": 1, "finished": 2, "failed": 2, "stopped": 2}
COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (200, 200, 40), (160, 40, 200)]


def make_small_data(root: Path, classes: int, per_class: int) -> Path:
    """Class folders of noisy one-colour pictures (half JPEG, half PNG), learnable in a few epochs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(classes):
        folder = root / f"class_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(COLOURS[index % len(COLOURS)], dtype=np.int16)
        for number in range(per_class):
            pixels = np.clip(colour + rng.integers(-25, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{index}_{number}.{'jpg' if number % 2 else 'png'}")
    return root


class Client:
    """Polls every run's status and metrics each `interval` seconds from a thread, as a page would."""

    def __init__(self, run_dirs: list[Path], interval: float):
        self.run_dirs = run_dirs
        self.interval = interval
        self.seen = {run_dir.name: [] for run_dir in run_dirs}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        from engine import runfiles
        from engine.runs import get_run

        while not self._done.is_set():
            began = time.perf_counter()
            for run_dir in self.run_dirs:
                polled = time.perf_counter()
                try:
                    state = get_run(run_dir).state.value
                    runfiles.read_jsonl(run_dir / runfiles.METRICS_FILE)
                    self.seen[run_dir.name].append(state)
                except Exception:  # noqa: BLE001 - every error is a finding
                    self.errors.append(traceback.format_exc())
                self.latencies.append(time.perf_counter() - polled)
            self._done.wait(max(0.0, self.interval - (time.perf_counter() - began)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-concurrent", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="0 for none")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=50, help="images per class of the generated data")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between polls of every run")
    parser.add_argument("--data", help="a folder of class subfolders instead of the generated data")
    parser.add_argument("--timeout", type=float, default=900.0)
    arguments = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="load_test_"))
    # The workers inherit this environment: their own cache, no downloads.
    os.environ["TRANSFER_STUDIO_CACHE"] = str(work / "cache")
    os.environ["TRANSFER_STUDIO_OFFLINE"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from engine import jobs
    from engine.config import RunConfig
    from engine.status import FINAL_STATES, State, read_status

    try:
        if arguments.data:
            data = Path(arguments.data).resolve()
        else:
            data = make_small_data(work / "data", 3, arguments.per_class)
        runs_dir = work / "runs"
        jobs.set_max_concurrent(arguments.max_concurrent, runs_dir)
        started = time.time()
        run_dirs = []
        for number in range(arguments.runs):
            values = {"name": f"load{number}", "data.path": str(data), "model.backbone": "MobileNet",
                      "model.alpha": 0.25, "model.weights": "none", "model.image_size": arguments.image_size,
                      "training.epochs": arguments.epochs, "training.batch_size": 16,
                      "training.learning_rate": 3e-3 * (number + 1)}
            if arguments.fine_tune_epochs:
                values.update({"fine_tuning.layers": 10, "fine_tuning.epochs": arguments.fine_tune_epochs})
            run_dirs.append(runs_dir / jobs.start(RunConfig().replace(**values), runs_dir))
        client = Client(run_dirs, arguments.interval)
        client.start()
        finals = {}
        ended = {}
        while len(finals) < len(run_dirs) and time.time() - started < arguments.timeout:
            for run_dir in run_dirs:
                if run_dir.name not in finals:
                    status = jobs.reconcile(run_dir)
                    if status.state in FINAL_STATES:
                        finals[run_dir.name] = status.state.value
                        ended[run_dir.name] = time.time()
            time.sleep(0.2)
        wall = max(ended.values(), default=time.time()) - started
        time.sleep(2 * arguments.interval)  # a few polls of the final states too
        client.stop()
        for run_dir in run_dirs:
            finals.setdefault(run_dir.name, read_status(run_dir).state.value)

        backwards = agree = 0
        for name, seen in client.seen.items():
            ranks = [STATE_RANK.get(state, -1) for state in seen]
            backwards += any(later < earlier for earlier, later in zip(ranks, ranks[1:]))
            agree += (bool(seen) and seen[-1] == finals[name]
                      and all(state in ("queued", "running") or state == finals[name] for state in seen))
        latencies_ms = sorted(1000 * value for value in client.latencies)
        outcomes = ", ".join(f"{state} {list(finals.values()).count(state)}" for state in sorted(set(finals.values())))

        header = ["runs", "queue size", "wall time (s)", "polls", "poll errors", "median poll (ms)",
                  "max poll (ms)", "state went backwards", "every status agreed with outcome", "outcomes"]
        row = [str(arguments.runs), str(arguments.max_concurrent), f"{wall:.1f}", str(len(latencies_ms)),
               str(len(client.errors)), f"{statistics.median(latencies_ms):.1f}" if latencies_ms else "-",
               f"{latencies_ms[-1]:.1f}" if latencies_ms else "-", "yes" if backwards else "no",
               "yes" if agree == len(run_dirs) else f"no ({len(run_dirs) - agree} runs)", outcomes]
        print(f"data: {data} ({'generated' if not arguments.data else 'given'}); MobileNet alpha 0.25, "
              f"{arguments.image_size} px, random weights; {arguments.epochs} head epochs"
              + (f" + {arguments.fine_tune_epochs} fine-tuning" if arguments.fine_tune_epochs else "")
              + f"; polled every {arguments.interval} s; {os.cpu_count()} CPU cores")
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        print("| " + " | ".join(row) + " |")
        for error in client.errors[:3]:
            print(error, file=sys.stderr)
        ok = not client.errors and not backwards and agree == len(run_dirs) and set(finals.values()) == {"finished"}
        return 0 if ok else 1
    finally:
        # Runs still going after the timeout are killed before their folders are removed.
        for run_dir in (work / "runs").glob("*/"):
            if read_status(run_dir).state in (State.QUEUED, State.RUNNING):
                jobs.kill(str(run_dir))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
