"""Benchmark: how the run listing scales with 10, 100 and 1,000 finished runs in the runs folder.

    .venv/bin/python bench/many_runs.py [--counts 10,100,1000] [--repeats 3] [--metrics-kb 500]
                                        [--template RUN_DIR] [--keep]

Not part of the test suite. One small finished run is trained with the engine (MobileNet α=0.25,
random weights, 32 px, 2 epochs on a generated two-class dataset; a child process, offline), or
taken from `--template`. Its `metrics.jsonl` is padded to about `--metrics-kb` KB with per-batch
events like the ones the engine writes (at 500 KB each of its 2 epochs gets about a thousand
batches, with steps, times and losses that advance), as a long run's file would be. The run is then copied under a temporary
runs root, growing it to each count in turn; each copy differs from the template only in its folder
name (its run id). `metrics.jsonl` and the small files are plain copies, the saved models hard links.

For each count it measures, the median over `--repeats`:

  CLI       wall time of `python -m engine runs --runs-dir ROOT` as a subprocess (interpreter
            start-up included, as a user pays it);
  pages     server time of the Home, Monitor and Evaluate pages under Streamlit's AppTest
            (`TRANSFER_STUDIO_RUNS=ROOT`): a first run of a fresh AppTest (Streamlit's caches
            cleared first, so nothing is carried over from the repeat before) and a second
            `app.run()` of the same AppTest, the rerun a user pays on every click.

The last row divides the largest count's time by the smallest count's, per column; the target is
at most 3× on every page and in the CLI. Every page is rendered once on a root holding one run
before the clock starts, so Python's imports and plotly's first figure are not charged to the
smallest count. Under "Problems seen" it lists page exceptions and errors, a failed CLI, a page
offering fewer runs than the root holds (its longest table or picker), and a `runs --json` listing
with the wrong count or with fewer distinct run ids than folders.

The script talks to the engine only through the CLI, AppTest, `create_run` and `run_training`,
so it keeps working when the run listing changes inside. Everything it runs gets temporary
`TRANSFER_STUDIO_CACHE`, `TRANSFER_STUDIO_RUNS`, `TRANSFER_STUDIO_DATA` and `KERAS_HOME` folders
and `TRANSFER_STUDIO_OFFLINE=1`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = {"Home": "app_pages/home.py", "Monitor": "app_pages/monitor.py", "Evaluate": "app_pages/evaluate.py"}
METRICS_FILE = "metrics.jsonl"
# Files above this size (the saved models) are hard-linked into each copy; the rest are copied.
LINK_ABOVE_BYTES = 64 * 1024
# Each child prints one JSON line prefixed with this marker.
MARKER = "BENCH_RESULT "

TEMPLATE_CHILD = r'''
import json, os, sys
sys.path.insert(0, os.environ["BENCH_REPO"])
from pathlib import Path
import numpy as np
from PIL import Image
from engine.config import RunConfig
from engine.runs import create_run
from engine.train import run_training

work = Path(sys.argv[1])
# Two classes of 12 coloured 40×32 images with a little noise, like tests/conftest.py make_dataset.
for class_index, (name, colour) in enumerate({"cats": (220, 40, 40), "dogs": (40, 60, 220)}.items()):
    for number in range(12):
        rng = np.random.default_rng(class_index * 1000 + number)
        array = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-25, 25, (32, 40, 3)), 0, 255)
        path = work / "data" / name / f"{name}_{number}{'.jpg' if number % 2 == 0 else '.png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8), "RGB").save(path)
config = RunConfig().replace(**{"data.path": str(work / "data"), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                "model.weights": "none", "model.image_size": 32, "training.epochs": 2,
                                "data.cache": "memory"})
run_dir = create_run(config, work / "template")
state = run_training(run_dir)
# run_training returns the final state; tolerate a richer return value (a dict or an object with .state).
if not isinstance(state, str):
    state = state.get("state") if isinstance(state, dict) else getattr(state, "state", state)
print("BENCH_RESULT " + json.dumps({"run_dir": str(run_dir), "state": str(state)}), flush=True)
'''


def make_template(work: Path, environment: dict) -> Path:
    """Trains the small finished run in a child process; returns its folder."""
    completed = subprocess.run([sys.executable, "-c", TEMPLATE_CHILD, str(work)], capture_output=True, text=True,
                               env=environment, cwd=REPO)
    for line in completed.stdout.splitlines():
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
            if "finished" not in result["state"].lower():
                raise RuntimeError(f"the template run ended as {result['state']!r}, expected 'finished':\n"
                                   f"{completed.stderr[-3000:]}")
            return Path(result["run_dir"])
    raise RuntimeError(f"training the template run failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


def read_events(path: Path) -> list[dict]:
    """The complete JSON lines of a metrics file (a cut or corrupt line is skipped, as the engine does)."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def padded_metrics(events: list[dict], target_bytes: int) -> str:
    """The run's events with enough per-batch events before each epoch event to reach about `target_bytes`.

    The batch events copy the keys of the run's own batch event (or, without one, of its epoch events)
    and advance step, time, elapsed time and loss, as a run with many batches per epoch writes them.
    """
    epochs = [event for event in events if event.get("type") == "epoch"]
    if not epochs:
        raise ValueError("the template's metrics.jsonl has no epoch events to pad around; "
                         "give a finished run as --template.")
    model = next((event for event in events if event.get("type") == "batch"), None)
    if model is None:
        model = {key: value for key, value in epochs[0].items() if not key.startswith("val_") and key != "epoch_seconds"}
        model.update(type="batch", step=1, steps=1)
    sample = json.dumps(dict(model, step=9999, steps=9999, time=model.get("time", 0.0) + 99999.123456)) + "\n"
    original = sum(len(json.dumps(event)) + 1 for event in events if event.get("type") != "batch")
    steps = max(1, (target_bytes - original) // (len(sample) * len(epochs)))
    randomness = random.Random(0)
    clock = float(events[0].get("time") or time.time())
    elapsed = 0.0
    lines = []
    for event in events:
        if event.get("type") == "batch":
            continue  # replaced by the synthetic batches below
        if event.get("type") == "epoch":
            loss = float(event.get("loss") or 1.0)
            accuracy = float(event.get("accuracy") or 0.5)
            for step in range(1, steps + 1):
                clock += 0.05
                elapsed += 0.05
                batch = dict(model, phase=event.get("phase", model.get("phase", 1)), epoch=event.get("epoch"),
                             step=step, steps=steps, time=round(clock, 6), elapsed_seconds=round(elapsed, 3))
                if "loss" in batch:
                    batch["loss"] = loss * (1.2 - 0.2 * step / steps) + randomness.uniform(-0.02, 0.02)
                if "accuracy" in batch:
                    batch["accuracy"] = min(1.0, max(0.0, accuracy + randomness.uniform(-0.05, 0.05)))
                if "eta_seconds" in batch:
                    batch["eta_seconds"] = round((steps - step) * 0.05, 1)
                lines.append(json.dumps(batch))
            event = dict(event, time=round(clock, 6))
            if "elapsed_seconds" in event:
                event["elapsed_seconds"] = round(elapsed, 3)
        lines.append(json.dumps(event))
    return "\n".join(lines) + "\n"


def copy_names(template: Path, count: int) -> list[str]:
    """`count` folder names in the engine's style (time-backbone-suffix), one a minute back from the template's."""
    parts = template.name.split("-")
    try:
        stamp = datetime.datetime.strptime("-".join(parts[:2]), "%Y%m%d-%H%M%S")
        label = "-".join(parts[2:-1]) or "run"
    except ValueError:
        stamp, label = datetime.datetime(2026, 1, 1), "run"
    return [f"{(stamp - datetime.timedelta(minutes=index)).strftime('%Y%m%d-%H%M%S')}-{label}-{index:04x}"
            for index in range(count)]


def grow_root(template: Path, metrics_text: str, root: Path, names: list[str]) -> None:
    """Makes the missing copies of the template under `root`, with the padded metrics file."""
    for name in names:
        folder = root / name
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        for source in template.iterdir():
            target = folder / source.name
            if source.name == METRICS_FILE:
                target.write_text(metrics_text, encoding="utf-8")
            elif source.is_dir():
                shutil.copytree(source, target)
            elif source.stat().st_size > LINK_ABOVE_BYTES:
                os.link(source, target)
            else:
                shutil.copy2(source, target)


def listed_runs(output: str) -> tuple[int | None, int | None]:
    """How many runs `python -m engine runs --json` printed (a list, or a dict holding one), and how many
    distinct run ids among them (None when the entries carry no `run_id`)."""
    try:
        listing = json.loads(output)
    except ValueError:
        return None, None
    if isinstance(listing, dict):
        listing = next((value for value in listing.values() if isinstance(value, list)), None)
    if not isinstance(listing, list):
        return None, None
    ids = [entry.get("run_id") for entry in listing if isinstance(entry, dict)]
    return len(listing), (len(set(ids)) if ids and None not in ids else None)


def time_cli(root: Path, environment: dict) -> tuple[float, list[str]]:
    """Wall seconds of `python -m engine runs --runs-dir ROOT`, start-up included, and its error if it failed.

    A failure is reported, not raised, so that one broken command does not lose a long bench's pages.
    """
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "engine", "runs", "--runs-dir", str(root)], capture_output=True,
                               text=True, env=environment, cwd=REPO)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        return seconds, [f"CLI exit {completed.returncode}: {last_line[:200]}"]
    return seconds, []


def time_page(page: str) -> tuple[float, float, list[str], int]:
    """Seconds of a fresh AppTest's first run and of its rerun, any exceptions or errors it showed, and
    how many runs it offered after the rerun."""
    import streamlit as st
    from streamlit import logger
    from streamlit.testing.v1 import AppTest

    # AppTest without a server warns twice per app ("No runtime found"); keep the progress lines readable.
    logger.set_log_level("error")
    # A cache filled by the repeat before would make the "first" run a warm one.
    st.cache_data.clear()
    st.cache_resource.clear()
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=600)
    app.switch_page(page)
    started = time.perf_counter()
    app.run()
    first = time.perf_counter() - started
    started = time.perf_counter()
    app.run()
    rerun = time.perf_counter() - started
    problems = [str(getattr(item, "message", item))[:200] for item in app.exception]
    problems += [str(item.value)[:200] for item in app.error]
    return first, rerun, problems, shown_runs(app)


def shown_runs(app) -> int:
    """How many runs a page offers: the longest table (Home) or run picker (Monitor, Evaluate) on it.

    A fast page that lists no runs measures nothing, so the bench reports a page that shows fewer
    runs than the root holds.
    """
    lengths = [0]
    for table in app.dataframe:
        try:
            lengths.append(len(table.value))
        except Exception:  # noqa: BLE001 - an element AppTest cannot read is not a listing
            pass
    for picker in app.selectbox:
        lengths.append(len(getattr(picker, "options", []) or []))
    return max(lengths)


def measure(count: int, root: Path, environment: dict, repeats: int) -> tuple[dict, list[str]]:
    """The median seconds of the CLI and of each page's first run and rerun, over `repeats`."""
    os.environ["TRANSFER_STUDIO_RUNS"] = str(root)
    samples: dict[str, list[float]] = {"CLI": []}
    for name in PAGES:
        samples[f"{name} first"], samples[f"{name} rerun"] = [], []
    problems: list[str] = []
    for repeat in range(repeats):
        print(f"{count} runs: repeat {repeat + 1}/{repeats}: CLI…", file=sys.stderr, flush=True)
        seconds, cli_problems = time_cli(root, environment)
        samples["CLI"].append(seconds)
        problems += [f"{count} runs: {problem}" for problem in cli_problems]
        for name, page in PAGES.items():
            print(f"{count} runs: repeat {repeat + 1}/{repeats}: {name} page…", file=sys.stderr, flush=True)
            first, rerun, page_problems, shown = time_page(page)
            if shown < count:
                page_problems.append(f"offered {shown} runs in its longest table or picker")
            samples[f"{name} first"].append(first)
            samples[f"{name} rerun"].append(rerun)
            problems += [f"{count} runs, {name}: {problem}" for problem in page_problems]
        print(f"{count} runs: repeat {repeat + 1}/{repeats}: "
              + ", ".join(f"{column} {values[-1]:.2f} s" for column, values in samples.items()),
              file=sys.stderr, flush=True)
    return {column: statistics.median(values) for column, values in samples.items()}, sorted(set(problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,1000", help="run folder counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per count; the table shows medians")
    parser.add_argument("--metrics-kb", type=int, default=500, help="pad each run's metrics.jsonl to about this size")
    parser.add_argument("--template", help="copy this finished run folder instead of training a small one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print where it is")
    arguments = parser.parse_args()
    try:
        counts = sorted({int(text) for text in arguments.counts.split(",") if text.strip()})
    except ValueError:
        parser.error(f"--counts takes whole numbers separated by commas; received {arguments.counts!r}.")
    if not counts or counts[0] < 1 or arguments.repeats < 1:
        parser.error(f"--counts must be ≥ 1 and --repeats ≥ 1; received --counts {arguments.counts!r} "
                     f"--repeats {arguments.repeats}.")
    if arguments.template and not (Path(arguments.template) / METRICS_FILE).is_file():
        parser.error(f"--template must be a run folder holding {METRICS_FILE}; received {arguments.template!r}.")
    command = " ".join([".venv/bin/python", "bench/many_runs.py"] + [shlex.quote(part) for part in sys.argv[1:]])

    work = Path(tempfile.mkdtemp(prefix="bench_many_runs_"))
    for name in ("cache", "data", "keras_home"):
        (work / name).mkdir()
    os.environ.update(TRANSFER_STUDIO_CACHE=str(work / "cache"), TRANSFER_STUDIO_RUNS=str(work / "template"),
                      TRANSFER_STUDIO_DATA=str(work / "data"), KERAS_HOME=str(work / "keras_home"),
                      TRANSFER_STUDIO_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", BENCH_REPO=str(REPO))
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    bench_started = time.perf_counter()
    rows, problems = {}, []
    try:
        if arguments.template:
            template = Path(arguments.template).resolve()
        else:
            print("Training the template run…", file=sys.stderr, flush=True)
            template = make_template(work, dict(os.environ))
        metrics_text = padded_metrics(read_events(template / METRICS_FILE), arguments.metrics_kb * 1024)
        run_bytes = sum(path.stat().st_size for path in template.rglob("*") if path.is_file()
                        and path.name != METRICS_FILE) + len(metrics_text.encode())
        # Pages stop early on an empty root, so the warm-up root holds one run: plotly's and pandas'
        # first figures and tables are then not charged to the smallest count.
        print("Warming up: every page once on a root holding one run…", file=sys.stderr, flush=True)
        grow_root(template, metrics_text, work / "warm_runs", copy_names(template, 1))
        os.environ["TRANSFER_STUDIO_RUNS"] = str(work / "warm_runs")
        for page in PAGES.values():
            time_page(page)
        root = work / "runs"
        names = copy_names(template, counts[-1])
        for count in counts:
            grow_root(template, metrics_text, root, names[:count])
            environment = dict(os.environ, TRANSFER_STUDIO_RUNS=str(root))
            listing = subprocess.run([sys.executable, "-m", "engine", "runs", "--runs-dir", str(root), "--json"],
                                     capture_output=True, text=True, env=environment, cwd=REPO)
            listed, distinct = listed_runs(listing.stdout)
            if listed is None:
                problems.append(f"{count} runs: `python -m engine runs --json` printed no list (exit "
                                f"{listing.returncode})")
            elif listed != count or (distinct is not None and distinct != count):
                problems.append(f"{count} runs: `python -m engine runs --json` listed {listed} runs, "
                                f"{distinct} distinct run ids (each copy differs only in its folder name)")
            rows[count], count_problems = measure(count, root, environment, arguments.repeats)
            problems += count_problems
    finally:
        if arguments.keep:
            print(f"Kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench_seconds = time.perf_counter() - bench_started

    columns = ["CLI"] + [f"{name} {kind}" for name in PAGES for kind in ("first", "rerun")]
    print(f"\n    {command}\n")
    print(f"Each run folder: {run_bytes / 1024:.0f} KB, its metrics.jsonl {len(metrics_text.encode()) / 1024:.0f} KB "
          f"({metrics_text.count(chr(10))} events); median of {arguments.repeats}; {os.cpu_count()} CPU cores; "
          f"bench took {bench_seconds / 60:.1f} min.\n")
    print("| runs | " + " | ".join(f"{column} s" for column in columns) + " |")
    print("| ---: | " + " | ".join("---:" for _ in columns) + " |")
    for count, row in rows.items():
        print(f"| {count:,} | " + " | ".join(f"{row[column]:.2f}" for column in columns) + " |")
    if len(rows) > 1:
        smallest, largest = rows[counts[0]], rows[counts[-1]]
        print(f"| {counts[-1]:,} ÷ {counts[0]:,} | "
              + " | ".join(f"{largest[column] / smallest[column]:.1f}×" for column in columns) + " |")
        print("\nTarget: the last row at most 3× in every column.")
    if problems:
        print("\nProblems seen:")
        for problem in problems:
            print(f"  {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
