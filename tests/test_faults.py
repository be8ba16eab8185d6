"""Faults: every one ends with a run folder that reads without raising and a state that is true.

Real worker processes, real files and real signals. Where a fault must land at an exact
point that timing cannot hit on tiny data (half-way through decoding the images, between
writing `model.keras` and renaming it), the worker is paused or failed there by the
test-only `$TRANSFER_STUDIO_FAULT` (see `engine.runfiles.fault_point`); everything else is
timed from the run folder, as a user would see it.
"""

import functools
import os
import shutil
import signal
import statistics
import threading
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import jobs, runfiles
from engine.interpret import metrics_frames
from engine.runfiles import log_tail
from engine.runs import get_run, list_runs, read_status
from engine.status import Stage, State
from engine.train import FAULT_VARIABLE, run_training
from tests.conftest import epoch_events, job_config, wait_until as shared_wait_until

pytestmark = [pytest.mark.training, pytest.mark.usefixtures("slower_epochs")]

# Order of states in one launch of a run: a state may only move forward, and a final one never changes.
STATE_RANK = {State.QUEUED: 0, State.RUNNING: 1, State.FINISHED: 2, State.FAILED: 2, State.STOPPED: 2}


# Head epochs on tiny data take milliseconds: poll often, so a kill lands in the phase meant.
wait_until = functools.partial(shared_wait_until, timeout=90.0, interval=0.05)


@pytest.fixture
def cache_dir(isolated_environment):
    return isolated_environment / "cache"


config_for = functools.partial(job_config, epochs=3)


def log_text(run_dir):
    path = Path(run_dir) / "worker.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def wait_for_log(run_dir, text, timeout=60.0):
    wait_until(lambda: text in log_text(run_dir), timeout=timeout, what=f"{text!r} in worker.log")


def kill_worker(run_dir):
    """SIGKILL the worker process (its supervisor lives on and records the kill)."""
    os.kill(int(jobs.reconcile(run_dir).pid), signal.SIGKILL)


def final_status(run_dir, timeout=120.0):
    return jobs.wait_for(str(run_dir), timeout=timeout, poll_seconds=0.1)


def assert_readable(run_dir, state):
    """Every reader reads the folder without raising, and they agree on `state`."""
    run_dir = Path(run_dir)
    summary = get_run(run_dir)
    assert summary.state == state, summary
    assert read_status(run_dir).state == state
    assert [run.state for run in list_runs(run_dir.parent) if run.run_id == run_dir.name] == [state]
    runfiles.read_jsonl(run_dir / "metrics.jsonl")
    metrics_frames(run_dir)
    log_tail(run_dir)
    message = summary.message
    assert message and "\n" not in message and len(message) <= 400, message
    return summary


def assert_epochs_counted_on(run_dir, last_epoch, resumes=1):
    epochs = [event["epoch"] for event in epoch_events(run_dir)]
    assert epochs and epochs[0] == 1 and epochs[-1] == last_epoch, epochs
    assert epochs == sorted(set(epochs)), f"an epoch was repeated: {epochs}"
    events = runfiles.read_jsonl(Path(run_dir) / "metrics.jsonl")
    assert len([event for event in events if event.get("type") == "resume"]) == resumes


def assert_no_temporaries(folder, pattern=".*"):
    """No file left under a temporary name (`.<pid>.model.keras`, `.status.json.<random>.tmp`, `.<key>.<pid>.npy`).

    In a run folder only the model-sized `.keras` ones are checked: a worker killed in the
    middle of an atomic JSON write may leave a few hundred bytes under a `.tmp` name, which
    no reader looks at.
    """
    leftovers = [path.name for path in Path(folder).rglob(pattern) if path.is_file()]
    assert not leftovers, leftovers


def assert_no_dead_saves(run_dir):
    assert_no_temporaries(run_dir, ".*.keras")


def assert_complete_zip(path):
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None


def kill_and_expect_failed(run_dir):
    """SIGKILLs the worker; the run must read `failed`, stay readable and hold no model.keras."""
    kill_worker(run_dir)
    status = final_status(run_dir, timeout=15)
    assert status.state is State.FAILED and "killed by signal 9" in status.message, status
    assert_readable(run_dir, State.FAILED)
    assert not (run_dir / "model.keras").exists()


def test_killed_while_caching_the_images_reads_failed_and_resumes(data, runs_dir, cache_dir, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "decoding:pause")
    run_id = jobs.start(config_for(data), runs_dir)
    run_dir = runs_dir / run_id
    wait_for_log(run_dir, "paused at decoding")
    assert jobs.reconcile(run_dir).stage is Stage.PREPARING_DATA
    # Half-way: the images are in a temporary file, nothing under the cache's final name yet.
    assert list((cache_dir / "images").glob(".*.npy.tmp")) and not list((cache_dir / "images").glob("*.npy"))
    kill_and_expect_failed(run_dir)

    monkeypatch.delenv(FAULT_VARIABLE)
    jobs.resume(run_id, runs_dir)
    assert final_status(run_dir).state is State.FINISHED
    assert_readable(run_dir, State.FINISHED)
    # Nothing to resume from (no epoch had finished): the run starts over, on a sound image cache.
    assert_epochs_counted_on(run_dir, 3, resumes=0)
    arrays = list((cache_dir / "images").glob("[!.]*.npy"))
    assert len(arrays) == 1 and np.load(arrays[0], mmap_mode="r").shape == (60, 48, 48, 3)
    # The killed worker's dataset-sized temporary was cleared by the next writer of that entry.
    assert not list((cache_dir / "images").glob(".*.npy.tmp"))


def test_killed_in_phase_one_reads_failed_and_resumes_counting_on(data, runs_dir):
    run_id = jobs.start(config_for(data, epochs=100), runs_dir)
    run_dir = runs_dir / run_id
    wait_until(lambda: len(epoch_events(run_dir)) >= 3, what="three head epochs")
    assert jobs.reconcile(run_dir).stage is Stage.TRAINING_HEAD
    kill_worker(run_dir)

    status = final_status(run_dir, timeout=15)
    assert status.state is State.FAILED and "killed by signal 9" in status.message, status
    assert_readable(run_dir, State.FAILED)
    killed_after = epoch_events(run_dir)[-1]["epoch"]
    assert killed_after < 100

    jobs.resume(run_id, runs_dir)
    final = final_status(run_dir)
    assert final.state is State.FINISHED and final.message.startswith("Finished after 100 epochs"), final
    assert_readable(run_dir, State.FINISHED)
    assert_epochs_counted_on(run_dir, 100)
    resume = next(event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "resume")
    # The checkpoint is saved before the epoch's event, so it is at most one epoch ahead of the metrics.
    assert resume["phase"] == 1 and resume["epoch"] in (killed_after, killed_after + 1)
    assert_no_dead_saves(run_dir)


def test_killed_while_fine_tuning_reads_failed_and_resumes_in_phase_two(data, runs_dir, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.3")  # the kill must land before the last epoch
    config = config_for(data, epochs=2, **{"fine_tuning.layers": 10, "fine_tuning.epochs": 8})
    run_id = jobs.start(config, runs_dir)
    run_dir = runs_dir / run_id
    wait_until(lambda: any(event["phase"] == 2 for event in epoch_events(run_dir)), what="a fine-tuning epoch")
    assert jobs.reconcile(run_dir).stage is Stage.FINE_TUNING
    kill_worker(run_dir)

    status = final_status(run_dir, timeout=15)
    assert status.state is State.FAILED and "killed by signal 9" in status.message, status
    assert_readable(run_dir, State.FAILED)

    jobs.resume(run_id, runs_dir)
    assert final_status(run_dir).state is State.FINISHED
    assert_readable(run_dir, State.FINISHED)
    assert_epochs_counted_on(run_dir, 10)
    assert all(event["phase"] == (1 if event["epoch"] <= 2 else 2) for event in epoch_events(run_dir))
    resume = next(event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "resume")
    assert resume["phase"] == 2
    assert_no_dead_saves(run_dir)


def test_killed_while_saving_leaves_no_model_and_resumes_to_a_whole_one(data, runs_dir, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "saving:pause")
    run_id = jobs.start(config_for(data, epochs=2), runs_dir)
    run_dir = runs_dir / run_id
    wait_for_log(run_dir, "paused at saving")
    status = jobs.reconcile(run_dir)
    assert status.stage is Stage.SAVING
    # Written under its temporary name, not yet renamed: the moment a kill must not leave half a model.
    assert (run_dir / f".{status.pid}.model.keras").is_file() and not (run_dir / "model.keras").exists()
    kill_and_expect_failed(run_dir)

    monkeypatch.delenv(FAULT_VARIABLE)
    jobs.resume(run_id, runs_dir)
    final = final_status(run_dir)
    assert final.state is State.FINISHED and final.message.startswith("Finished after 2 epochs"), final
    assert_readable(run_dir, State.FINISHED)
    assert_epochs_counted_on(run_dir, 2)
    assert_complete_zip(run_dir / "model.keras")
    assert_no_dead_saves(run_dir)  # the killed save's temporary is removed by the next worker


def test_a_failed_model_write_keeps_the_old_model_or_none(data, runs_dir, monkeypatch):
    """In the test process, as `python -m engine worker` runs it: stop, resume, fail, resume."""
    from engine.runs import create_run

    run_dir = create_run(config_for(data, epochs=40), runs_dir)
    stop_request = run_dir / "stop.request"

    def run(fault=None, stop_after_epochs=None):
        # A stop must land before the last of 40 quick epochs: slow each epoch down a little.
        faults = [fault] if fault else []
        if stop_after_epochs:
            faults.append("epoch_end:sleep:0.3")
        if faults:
            monkeypatch.setenv(FAULT_VARIABLE, ",".join(faults))
        else:
            monkeypatch.delenv(FAULT_VARIABLE, raising=False)
        stop_request.unlink(missing_ok=True)
        stopper = None
        if stop_after_epochs:
            target = len(epoch_events(run_dir)) + stop_after_epochs

            def stop_when_there():
                wait_until(lambda: len(epoch_events(run_dir)) >= target, what="epochs before the stop")
                stop_request.write_text("stop\n")

            stopper = threading.Thread(target=stop_when_there, daemon=True)
            stopper.start()
        state = run_training(run_dir)
        if stopper:
            stopper.join(timeout=5)
        return state

    # The first save fails (the stop path saves too): no model.keras at all, never half of one.
    assert run("saving:fail", stop_after_epochs=2) is State.FAILED
    status = assert_readable(run_dir, State.FAILED)
    assert "No space left on device" in status.message and read_status(run_dir).error == status.message
    log = log_text(run_dir)
    assert "Traceback" in log and "OSError: [Errno 28]" in log
    assert not (run_dir / "model.keras").exists()
    assert_no_temporaries(run_dir)

    # Resumed, it stops cleanly with a model; a later failed save must leave that model byte for byte.
    assert run(stop_after_epochs=2) is State.STOPPED
    old_model = (run_dir / "model.keras").read_bytes()
    assert run("saving:fail") is State.FAILED
    assert_readable(run_dir, State.FAILED)
    assert (run_dir / "model.keras").read_bytes() == old_model
    assert_no_temporaries(run_dir)

    assert run() is State.FINISHED
    assert_readable(run_dir, State.FINISHED)
    assert_epochs_counted_on(run_dir, 40, resumes=3)
    assert_complete_zip(run_dir / "model.keras")
    assert (run_dir / "model.keras").read_bytes() != old_model


def repaired_status(run_dir, run_id):
    status = runfiles.read_json(Path(run_dir) / "status.json")
    return status if isinstance(status, dict) and status.get("run_id") == run_id else None


def test_status_and_metrics_corrupted_by_hand_read_as_unknown_or_repaired(data, runs_dir, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.1")  # still in phase 1 after six repairs (≤ 1 s each)
    run_id = jobs.start(config_for(data, epochs=150), runs_dir)
    run_dir = runs_dir / run_id
    wait_until(lambda: len(epoch_events(run_dir)) >= 2, what="two epochs")

    corruptions = [
        b'{"state": "runn',                                                # cut short
        b"\x00\xff\xfe garbage",                                           # not text
        b'["running"]',                                                    # JSON, wrong shape
        b'{"state": "sleeping"}',                                          # unknown state
        b'{"state": "running", "host": "elsewhere", "heartbeat": "soon"}',   # wrong types
        b'{"state": "running", "phase": "starting", "launched_at": "now"}',
    ]
    for text in corruptions:
        (run_dir / "status.json").write_bytes(text)  # by hand, not atomically
        summary = get_run(run_dir)
        assert summary.state in (State.UNKNOWN, State.RUNNING), (text, summary)
        assert read_status(run_dir).state in (State.UNKNOWN, State.RUNNING)
        list_runs(runs_dir)
        # The worker keeps the whole status in memory: its next write (the heartbeat, within 1 s) repairs the file.
        repaired = wait_until(lambda: repaired_status(run_dir, run_id), timeout=5, what="status.json repaired")
        assert repaired["state"] == "running" and repaired["created"]  # the file itself, as written

    with open(run_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b'not json\n{"type": "epoch", "epo\n\xff\xfe\x00\n[1, 2]\n42\n')
    assert all(isinstance(event, dict) for event in runfiles.read_jsonl(run_dir / "metrics.jsonl"))
    metrics_frames(run_dir)
    assert jobs.reconcile(run_dir).stage is Stage.TRAINING_HEAD  # all of it while the worker was writing

    final = final_status(run_dir)
    assert final.state is State.FINISHED, final
    assert_readable(run_dir, State.FINISHED)
    # The bad lines are skipped; not one real event was lost to them.
    assert [event["epoch"] for event in epoch_events(run_dir)] == list(range(1, 151))
    assert get_run(run_dir).best_val_accuracy is not None

    # A finished run's status corrupted by hand reads as unknown, and stays so (no worker repairs it).
    (run_dir / "status.json").write_text('{"state": "finis')
    assert get_run(run_dir).state is State.UNKNOWN and jobs.reconcile(run_dir).state is State.UNKNOWN


def test_the_data_folder_vanishing_mid_run(data, runs_dir, tmp_path, monkeypatch):
    """While the images are read: failed, naming the folder. After they are decoded: the run finishes."""
    jobs.set_max_concurrent(2, runs_dir)
    late_data = shutil.copytree(data, tmp_path / "late_data")
    late = runs_dir / jobs.start(config_for(late_data, epochs=100), runs_dir)
    release = tmp_path / "release"
    monkeypatch.setenv(FAULT_VARIABLE, f"decoding:pause:{release}")
    early = runs_dir / jobs.start(config_for(data), runs_dir)

    wait_for_log(early, "paused at decoding")
    backup = shutil.copytree(data, tmp_path / "backup")  # same names, sizes and modification times
    shutil.rmtree(data)
    release.write_text("go\n")
    wait_until(lambda: len(epoch_events(late)) >= 2, what="two epochs of the late run")
    shutil.rmtree(late_data)
    assert jobs.reconcile(late).stage is Stage.TRAINING_HEAD

    status = final_status(early)
    assert status.state is State.FAILED, status
    assert str(data) in status.message and "disappeared" in status.message, status.message
    assert_readable(early, State.FAILED)
    assert not (early / "model.keras").exists()

    # Training and evaluation read the decoded image cache, never the folder again.
    assert final_status(late).state is State.FINISHED
    assert_readable(late, State.FINISHED)
    assert runfiles.read_json(late / "evaluation.json")["splits"]["validation"]["num_images"] == 6

    # The folder comes back as it was (the same fingerprint): nothing the vanished read saw was
    # cached under it, so every image is usable again.
    monkeypatch.delenv(FAULT_VARIABLE)
    shutil.copytree(backup, data)
    again = runs_dir / jobs.start(config_for(data, epochs=2), runs_dir)
    assert final_status(again).state is State.FINISHED
    assert runfiles.read_json(again / "data_report.json")["excluded"] == []


def test_two_runs_started_together_on_the_same_data_share_the_caches(data, runs_dir, cache_dir, tmp_path,
                                                                      monkeypatch):
    jobs.set_max_concurrent(2, runs_dir)
    release = tmp_path / "release"
    monkeypatch.setenv(FAULT_VARIABLE, f"decoding:pause:{release}")
    barrier = threading.Barrier(2)
    ids = []

    def start(name):
        barrier.wait()
        ids.append(jobs.start(config_for(data, epochs=4, name=name), runs_dir))

    starters = [threading.Thread(target=start, args=(name,)) for name in ("twin-a", "twin-b")]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join(timeout=60)
    assert len(ids) == 2
    # Both workers are half-way through decoding the same images into the same cache entry...
    for run_id in ids:
        wait_for_log(runs_dir / run_id, "paused at decoding")
    assert len(list((cache_dir / "images").glob(".*.npy.tmp"))) == 2
    # ...and are let go at the same moment, to finish, rename and compute features side by side.
    release.write_text("go\n")
    for run_id in ids:
        assert final_status(runs_dir / run_id).state is State.FINISHED
        assert_readable(runs_dir / run_id, State.FINISHED)
        assert_epochs_counted_on(runs_dir / run_id, 4, resumes=0)

    assert_no_temporaries(cache_dir)
    arrays = list((cache_dir / "images").glob("*.npy"))
    assert len(arrays) == 1 and np.load(arrays[0], mmap_mode="r").shape == (60, 48, 48, 3)
    features = list((cache_dir / "features").glob("*.npy"))
    assert features
    for path in features:
        meta = runfiles.read_json(path.with_suffix(".json"))
        assert list(np.load(path).shape) == meta["shape"]
    first, second = ((runs_dir / run_id / "split.csv").read_text() for run_id in ids)
    assert first == second


class Poller:
    """A page polling runs from another thread: records every state seen, every error, and latencies."""

    def __init__(self, run_dirs, interval, full_page=True):
        self.run_dirs = [Path(run_dir) for run_dir in run_dirs]
        self.interval = interval
        self.full_page = full_page
        self.seen = {run_dir.name: [] for run_dir in self.run_dirs}
        self.all_running = False  # whether one poll found every run running at once
        self.record_counts = {run_dir.name: [] for run_dir in self.run_dirs}
        self.errors = []
        self.latencies = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join(timeout=30)

    def _loop(self):
        while not self._done.is_set():
            began = time.perf_counter()
            try:
                running = 0
                for run_dir in self.run_dirs:
                    run = get_run(run_dir)
                    running += run.state is State.RUNNING
                    status = read_status(run_dir)
                    records = runfiles.read_jsonl(run_dir / "metrics.jsonl")
                    if self.full_page:
                        metrics_frames(run_dir)
                        log_tail(run_dir)
                    self.seen[run_dir.name].append((run.state, status.state))
                    self.record_counts[run_dir.name].append(len(records))
                if self.full_page:
                    list_runs(self.run_dirs[0].parent)
                self.all_running = self.all_running or running == len(self.run_dirs)
            except Exception:  # noqa: BLE001 - every error is the finding
                self.errors.append(traceback.format_exc())
            self.latencies.append(time.perf_counter() - began)
            self._done.wait(max(0.0, self.interval - (time.perf_counter() - began)))

    def check(self, final_states):
        """No errors, no state going backwards, every final state seen is the true outcome."""
        assert not self.errors, self.errors[0]
        for name, seen in self.seen.items():
            states = [state for pair in seen for state in pair]
            assert State.UNKNOWN not in states, name
            ranks = [STATE_RANK[state] for state in states]
            assert all(a <= b for a, b in zip(ranks, ranks[1:])), f"{name} went backwards: {states}"
            assert all(state == final_states[name] for state in states if STATE_RANK[state] == 2), (name, states)
            assert states[-1] == final_states[name]
            counts = self.record_counts[name]
            assert all(a <= b for a, b in zip(counts, counts[1:])), f"{name}: metrics.jsonl shrank"


def test_twenty_polls_a_second_on_a_writing_run_never_fail_nor_go_back(data, runs_dir):
    config = config_for(data, epochs=30, **{"fine_tuning.layers": 10, "fine_tuning.epochs": 3})
    run_dir = runs_dir / jobs.start(config, runs_dir)
    began = time.time()
    with Poller([run_dir], interval=0.05) as poller:
        final = final_status(run_dir)
        time.sleep(0.5)
    seconds = time.time() - began
    poller.check({run_dir.name: final.state})
    assert final.state is State.FINISHED
    assert len(poller.latencies) >= 12 * seconds, (len(poller.latencies), seconds)  # ~20/s, allowing slow reads
    phases = {event["phase"] for event in epoch_events(run_dir)}
    assert phases == {1, 2}


def test_load_three_concurrent_runs_polled_every_quarter_second(data, runs_dir):
    jobs.set_max_concurrent(3, runs_dir)
    run_dirs = [runs_dir / jobs.start(config_for(data, epochs=epochs, name=f"load{number}"), runs_dir)
                for number, epochs in enumerate((20, 30, 40))]
    with Poller(run_dirs, interval=0.25, full_page=False) as poller:
        finals = {run_dir.name: final_status(run_dir, timeout=180) for run_dir in run_dirs}
        time.sleep(0.5)
    assert all(status.state is State.FINISHED for status in finals.values()), finals
    poller.check({name: status.state for name, status in finals.items()})
    assert poller.all_running, "the three runs never ran at the same time"
    assert statistics.median(poller.latencies) < 0.25


def test_only_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path):
    import socket
    import subprocess

    from engine.runfiles import process_tag, remove_orphaned_temporaries

    dead_pid = subprocess.Popen(["true"])  # a process that has ended: its pid is free
    dead_pid.wait()
    host = socket.gethostname()
    dead = tmp_path / f".key.{host}-{dead_pid.pid}.npy.tmp"
    live = tmp_path / f".key.{process_tag()}.npy.tmp"
    other_host = tmp_path / f".key.elsewhere-{dead_pid.pid}.npy.tmp"
    other_key = tmp_path / f".other.{host}-{dead_pid.pid}.npy.tmp"
    for path in (dead, live, other_host, other_key):
        path.write_bytes(b"x")
    remove_orphaned_temporaries(tmp_path, ".key.")
    assert not dead.exists() and live.exists() and other_host.exists() and other_key.exists()
