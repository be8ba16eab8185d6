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

Viewers mode (issue 12, "twenty people watching"):

    .venv/bin/python bench/load_test.py --viewers 20 [--seconds 60] [--metrics-mb 5]
        [--refresh 1.5] [--write-interval 0.5] [--steps-per-epoch 40] [--template RUN_DIR]

One small finished run is trained (MobileNet α=0.25, random weights, 32 px, 2 epochs; a child
process, offline; or `--template`), and copied three times under a temporary runs root: a short
run as it is, and two long runs whose `metrics.jsonl` is padded to `--metrics-mb` MB of per-batch
events (hours of a real run). First, the single-refresh comparison: one Monitor session
(Streamlit's AppTest of `streamlit_app.py`, switched to `app_pages/monitor.py`) per run, opened
once, then rerun five times; the medians of the reruns of the long and the short run, and
their ratio (target: at most 2×). Then `--viewers` sessions in threads of this process (one
process, as one Streamlit server), half on each long run, each rerunning the page every
`--refresh` seconds (the live view's period) for `--seconds` from the moment all have opened
their page (the opening burst is not measured), while a writer thread appends a
batch event to each long run every `--write-interval` seconds (an epoch event every
`--steps-per-epoch` batches), as a training worker does; the appended epochs are fine-tuning
ones, so the charts carry the fine-tuning marker. It prints the process's CPU use
(CPU time ÷ wall time, in cores; the AppTest harness's own parsing of every page is
included, so a real server spends less), the median, 95th-percentile and maximum refresh
time, and every exception or error a page showed. Targets: under one core, p95 under
300 ms, no errors. A rerun is the whole Monitor page; in a browser the live view reruns
only its fragment, so this is the dearer case.
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


class MetricsWriter:
    """Appends batch events (and an epoch event at each epoch's end) to runs' metrics.jsonl from a thread.

    Each run's events continue its last epoch's numbering, with the keys of its last batch event,
    as a training worker writes them every BATCH_EVENT_INTERVAL_SECONDS.
    """

    def __init__(self, run_dirs: list[Path], interval: float, steps_per_epoch: int):
        from engine import runfiles

        self.interval = interval
        self.steps_per_epoch = steps_per_epoch
        self.events_written = 0
        self.runs = []
        for run_dir in run_dirs:
            events = runfiles.read_jsonl(run_dir / runfiles.METRICS_FILE)
            batch = next(event for event in reversed(events) if event.get("type") == "batch")
            epoch = next(event for event in reversed(events) if event.get("type") == "epoch")
            # The appended epochs are fine-tuning (phase 2), so the charts carry the fine-tuning marker.
            self.runs.append({"path": run_dir / runfiles.METRICS_FILE, "batch": dict(batch, phase=2),
                              "epoch_event": dict(epoch, phase=2), "epoch": int(epoch["epoch"]) + 1, "step": 0})
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        import random

        from engine import runfiles

        randomness = random.Random(0)
        while not self._done.wait(self.interval):
            now = time.time()
            for run in self.runs:
                run["step"] += 1
                loss = max(0.01, 1.0 / run["epoch"] + randomness.uniform(-0.05, 0.05))
                events = [dict(run["batch"], epoch=run["epoch"], step=run["step"], steps=self.steps_per_epoch,
                               loss=loss, accuracy=min(1.0, 1.0 - loss / 2), time=now)]
                if run["step"] == self.steps_per_epoch:
                    events.append(dict(run["epoch_event"], epoch=run["epoch"], loss=loss, val_loss=loss * 1.1,
                                       accuracy=1.0 - loss / 2, val_accuracy=1.0 - loss / 1.8, time=now))
                    run["epoch"] += 1
                    run["step"] = 0
                runfiles.append_jsonl(run["path"], events)
                self.events_written += len(events)


# AppTest swaps process-wide state for each run (the mock Runtime, the `global.appTest` option),
# so two AppTest runs at once break each other's widgets. Runs take turns here; a Streamlit
# server's script threads take turns too, on Python's global lock, so the time a viewer waits
# for its turn is counted in its refresh time, as a viewer of a busy server waits.
APP_TEST_TURN = threading.Lock()


class Watch:
    """The viewers' common clock: the watch begins once every viewer has opened its page.

    The first open of a page is the dearest (a new session, and the first viewer of a run reads
    its whole file); twenty people do not open the page in the same second, so the opening
    burst is kept out of the measured refreshes and of the CPU time.
    """

    def __init__(self, viewers: int, seconds: float):
        self.seconds = seconds
        self.began_wall = self.began_cpu = self.deadline = 0.0
        self.opened = threading.Barrier(viewers, action=self._begin)

    def _begin(self) -> None:
        self.began_wall, self.began_cpu = time.perf_counter(), time.process_time()
        self.deadline = self.began_wall + self.seconds


class Viewer:
    """One browser tab on the Monitor page of one run: a Streamlit AppTest session rerun every `refresh` s."""

    def __init__(self, run_id: str, refresh: float, start_delay: float, watch: Watch):
        self.run_id = run_id
        self.refresh = refresh
        self.start_delay = start_delay
        self.watch = watch
        self.refresh_seconds: list[float] = []  # from asking to having the page, the wait for a turn included
        self.server_seconds: list[float] = []  # the page's own run
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _loop(self) -> None:
        try:
            app = open_monitor(self.run_id)
            self.errors += page_problems(app, self.run_id)
        except Exception:  # noqa: BLE001 - every error is a finding
            self.errors.append(traceback.format_exc())
            app = None
        self.watch.opened.wait()
        if app is None:
            return
        time.sleep(self.start_delay)  # real viewers do not refresh in step
        while time.perf_counter() < self.watch.deadline:
            began = time.perf_counter()
            try:
                with APP_TEST_TURN:
                    turn = time.perf_counter()
                    app.run()
                    self.server_seconds.append(time.perf_counter() - turn)
                self.errors += page_problems(app, self.run_id)
            except Exception:  # noqa: BLE001 - every error is a finding
                self.errors.append(traceback.format_exc())
            self.refresh_seconds.append(time.perf_counter() - began)
            time.sleep(max(0.0, self.refresh - (time.perf_counter() - began)))


def open_monitor(run_id: str):
    """A new session of the dashboard on the Monitor page of `run_id` (as a link with `?run=` opens it)."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    app.query_params["run"] = run_id
    app.switch_page("app_pages/monitor.py")
    with APP_TEST_TURN:
        return app.run()


def page_problems(app, run_id: str) -> list[str]:
    """The exceptions and errors the page showed, and a page that shows another run than asked."""
    problems = [str(getattr(item, "message", item))[:300] for item in app.exception]
    problems += [str(item.value)[:300] for item in app.error]
    shown = app.selectbox(key="monitor_run").value if not problems else run_id
    if shown != run_id:
        problems.append(f"the page showed run {shown}, not {run_id}")
    return problems


def refresh_times(run_id: str, repeats: int = 5) -> tuple[float, float]:
    """Seconds of a new Monitor session's first run on `run_id`, and the median of `repeats` reruns."""
    began = time.perf_counter()
    app = open_monitor(run_id)
    first = time.perf_counter() - began
    problems = page_problems(app, run_id)
    if problems:
        raise RuntimeError(f"the Monitor page of {run_id} failed: {problems[0]}")
    reruns = []
    for _ in range(repeats):
        began = time.perf_counter()
        with APP_TEST_TURN:
            app.run()
        reruns.append(time.perf_counter() - began)
    return first, statistics.median(reruns)


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of the sorted `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def watch(arguments) -> int:
    """The viewers mode: the single-refresh comparison, then `--viewers` Monitor sessions on two growing runs."""
    import shlex

    work = Path(tempfile.mkdtemp(prefix="load_test_viewers_"))
    for name in ("cache", "data", "keras_home", "runs"):
        (work / name).mkdir()
    os.environ.update(TRANSFER_STUDIO_CACHE=str(work / "cache"), TRANSFER_STUDIO_RUNS=str(work / "runs"),
                      TRANSFER_STUDIO_DATA=str(work / "data"), KERAS_HOME=str(work / "keras_home"),
                      TRANSFER_STUDIO_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", BENCH_REPO=str(REPO))
    os.chdir(REPO)
    from streamlit import logger

    from bench.many_runs import copy_names, make_template, padded_metrics, read_events

    # AppTest without a server warns on every run ("No runtime found", "missing ScriptRunContext");
    # keep the output readable.
    logger.set_log_level("error")
    logger.get_logger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel("ERROR")
    command = " ".join([".venv/bin/python", "bench/load_test.py"] + [shlex.quote(part) for part in sys.argv[1:]])
    try:
        if arguments.template:
            template = Path(arguments.template).resolve()
        else:
            print("Training the template run…", file=sys.stderr, flush=True)
            template = make_template(work, dict(os.environ))
        long_text = padded_metrics(read_events(template / "metrics.jsonl"), int(arguments.metrics_mb * 1024 * 1024))
        short_id, *long_ids = copy_names(template, 3)
        for run_id in [short_id] + long_ids:
            shutil.copytree(template, work / "runs" / run_id)
        for run_id in long_ids:
            (work / "runs" / run_id / "metrics.jsonl").write_text(long_text, encoding="utf-8")
        short_kb = (work / "runs" / short_id / "metrics.jsonl").stat().st_size / 1024

        print("Single refreshes: a short run, then a long one…", file=sys.stderr, flush=True)
        open_monitor(short_id)  # Python's imports and plotly's first figure are not charged to either run
        short_first, short_rerun = refresh_times(short_id)
        long_first, long_rerun = refresh_times(long_ids[0])

        print(f"{arguments.viewers} viewers for {arguments.seconds:.0f} s…", file=sys.stderr, flush=True)
        writer = MetricsWriter([work / "runs" / run_id for run_id in long_ids], arguments.write_interval,
                               arguments.steps_per_epoch)
        watch = Watch(arguments.viewers, arguments.seconds)
        viewers = [Viewer(long_ids[number % 2], arguments.refresh, arguments.refresh * number / arguments.viewers,
                          watch) for number in range(arguments.viewers)]
        writer.start()
        for viewer in viewers:
            viewer.start()
        for viewer in viewers:
            viewer.join()
        wall, cpu = time.perf_counter() - watch.began_wall, time.process_time() - watch.began_cpu
        writer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    refreshes_ms = [1000 * seconds for viewer in viewers for seconds in viewer.refresh_seconds]
    server_ms = [1000 * seconds for viewer in viewers for seconds in viewer.server_seconds]
    errors = [error for viewer in viewers for error in viewer.errors]
    print(f"\n    {command}\n")
    print(f"Long runs: metrics.jsonl {len(long_text.encode()) / 1024 / 1024:.1f} MB ({long_text.count(chr(10))} "
          f"events); short run: {short_kb:.0f} KB; {os.cpu_count()} CPU cores.\n")
    print("| Monitor refresh | short run | long run | long ÷ short |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| first open (ms) | {1000 * short_first:.0f} | {1000 * long_first:.0f} | {long_first / short_first:.1f}× |")
    print(f"| rerun, median of 5 (ms) | {1000 * short_rerun:.0f} | {1000 * long_rerun:.0f} | "
          f"{long_rerun / short_rerun:.1f}× |")
    print()
    header = ["viewers", "seconds", "refreshes", "events appended", "CPU (cores)", "median refresh (ms)",
              "p95 refresh (ms)", "max refresh (ms)", "median page run (ms)", "errors"]
    row = [str(arguments.viewers), f"{wall:.0f}", str(len(refreshes_ms)), str(writer.events_written),
           f"{cpu / wall:.2f}", f"{statistics.median(refreshes_ms):.0f}" if refreshes_ms else "-",
           f"{percentile(refreshes_ms, 0.95):.0f}" if refreshes_ms else "-",
           f"{max(refreshes_ms):.0f}" if refreshes_ms else "-",
           f"{statistics.median(server_ms):.0f}" if server_ms else "-", str(len(errors))]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---:" for _ in header) + " |")
    print("| " + " | ".join(row) + " |")
    for error in sorted(set(errors))[:5]:
        print(error, file=sys.stderr)
    within = (not errors and refreshes_ms and cpu / wall < 1.0 and percentile(refreshes_ms, 0.95) < 300
              and long_rerun <= 2 * short_rerun)
    print("\nTargets (under one core, p95 under 300 ms, no errors, long rerun at most 2× the short): "
          + ("met" if within else "not met"))
    return 0 if within else 1


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
    viewers = parser.add_argument_group("viewers mode (--viewers N): N Monitor pages on two long runs that grow")
    viewers.add_argument("--viewers", type=int, default=0, help="simulated Monitor viewers; 0 for the runs mode")
    viewers.add_argument("--seconds", type=float, default=60.0, help="how long the viewers watch")
    viewers.add_argument("--metrics-mb", type=float, default=5.0, help="each long run's metrics.jsonl, in MB")
    viewers.add_argument("--refresh", type=float, default=1.5, help="seconds between one viewer's refreshes")
    viewers.add_argument("--write-interval", type=float, default=0.5,
                         help="seconds between the batch events appended to each long run")
    viewers.add_argument("--steps-per-epoch", type=int, default=40, help="batch events per appended epoch")
    viewers.add_argument("--template", help="a finished run folder to copy instead of training a small one")
    arguments = parser.parse_args(argv)
    if arguments.viewers:
        return watch(arguments)

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
