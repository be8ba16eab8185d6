"""Runs as detached processes: stop, kill, resume, the queue, and reattaching from a new process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import jobs, runfiles
from engine.interpret import metrics_frames
from engine.runs import get_run, list_runs
from engine.status import Stage, State
from tests.conftest import REPO_ROOT, epoch_events, job_config, wait_until

pytestmark = [pytest.mark.training, pytest.mark.usefixtures("slower_epochs")]


def wait_for_training(runs_dir, run_id, batches=3):
    run_dir = runs_dir / run_id
    return wait_until(lambda: len([event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl")
                                   if event["type"] == "batch"]) >= batches, what=f"{run_id} to train")


def test_start_runs_live_then_stops_cooperatively_with_model_and_evaluation(data, runs_dir):
    run_id = jobs.start(job_config(data), runs_dir)
    run_dir = runs_dir / run_id
    assert jobs.reconcile(run_dir).state in (State.QUEUED, State.RUNNING)
    wait_for_training(runs_dir, run_id)
    status = jobs.reconcile(run_dir)
    assert status.state is State.RUNNING and status.pid != os.getpid()
    assert time.time() - status.heartbeat < 3
    first_count = len(runfiles.read_jsonl(run_dir / "metrics.jsonl"))
    time.sleep(2.5)
    assert len(runfiles.read_jsonl(run_dir / "metrics.jsonl")) > first_count, "metrics stopped growing"

    asked = time.time()
    jobs.stop(run_id, runs_dir)
    final = jobs.wait_for(run_id, timeout=30, runs_dir=runs_dir)
    assert final.state is State.STOPPED, final
    assert time.time() - asked < 10
    assert (run_dir / "model.keras").is_file() and (run_dir / "evaluation.json").is_file()
    assert final.message.startswith("Stopped after")


def test_kill_minus_nine_of_the_worker_is_failed_within_ten_seconds(data, runs_dir):
    run_id = jobs.start(job_config(data), runs_dir)
    wait_for_training(runs_dir, run_id)
    run_dir = runs_dir / run_id
    os.kill(jobs.reconcile(run_dir).pid, signal.SIGKILL)
    killed = time.time()
    status = wait_until(lambda: (lambda s: s if s.state is State.FAILED else None)(jobs.reconcile(run_dir)),
                        timeout=10, what="failed state")
    assert time.time() - killed < 10
    assert "killed by signal 9" in status.message
    assert runfiles.read_json(run_dir / "config.json") and runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert (run_dir / "split.csv").is_file() and (run_dir / "worker.log").is_file()


def test_a_run_whose_supervisor_also_died_is_failed_by_reconcile_not_by_readers(data, runs_dir):
    run_id = jobs.start(job_config(data), runs_dir)
    wait_for_training(runs_dir, run_id)
    run_dir = runs_dir / run_id
    worker_pid = jobs.reconcile(run_dir).pid
    os.killpg(os.getpgid(worker_pid), signal.SIGKILL)  # the worker and its supervisor together
    wait_until(lambda: not jobs.lock_is_held(run_dir), timeout=10, what="the processes to end")
    # Reading never writes: nobody has recorded the death yet, so readers still see the last status.
    before = (run_dir / "status.json").read_bytes()
    assert get_run(run_dir).state is State.RUNNING and list_runs(runs_dir)[0].state is State.RUNNING
    assert (run_dir / "status.json").read_bytes() == before
    # The explicit reconcile step (the scheduler, the supervisor, the Monitor page) records it.
    status = jobs.reconcile(run_dir)
    assert status.state is State.FAILED and status.stage is Stage.DONE and status.pid is None
    assert status.message.startswith("The worker process ended without finishing")
    assert get_run(run_dir) == status


def test_resume_after_stop_and_after_kill_counts_epochs_on(data, runs_dir, monkeypatch):
    # Head epochs on cached features take a fraction of a second: without the sleep, the stop
    # and the kill below could land after the last epoch (it did once, in CI).
    monkeypatch.setenv(runfiles.FAULT_VARIABLE, "epoch_end:sleep:0.5")
    run_id = jobs.start(job_config(data, epochs=10), runs_dir)
    run_dir = runs_dir / run_id
    wait_until(lambda: len(epoch_events(run_dir)) >= 2, what="two epochs")
    jobs.stop(run_id, runs_dir)
    assert jobs.wait_for(run_id, timeout=30, runs_dir=runs_dir).state is State.STOPPED
    stopped_at = epoch_events(run_dir)[-1]["epoch"]

    jobs.resume(run_id, runs_dir)
    wait_until(lambda: epoch_events(run_dir)[-1]["epoch"] >= stopped_at + 1, what="an epoch after resume")
    jobs.kill(run_id, runs_dir)
    assert jobs.reconcile(run_dir).state is State.FAILED
    assert jobs.reconcile(run_dir).message == "Killed by the user."

    jobs.resume(run_id, runs_dir)
    final = jobs.wait_for(run_id, timeout=120, runs_dir=runs_dir)
    assert final.state is State.FINISHED, final
    epochs = [event["epoch"] for event in epoch_events(run_dir)]
    assert epochs == sorted(epochs) and len(epochs) == len(set(epochs)), epochs
    assert epochs[-1] == 10 and epochs[0] == 1
    resumes = [event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "resume"]
    assert len(resumes) == 2
    assert runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]["num_images"] > 0
    assert final.message.startswith("Finished after 10 epochs")


def _interval(run_dir):
    """(start, end) of a run's training, from its status and metrics."""
    events = runfiles.read_jsonl(Path(run_dir) / "metrics.jsonl")
    return events[0]["time"], events[-1]["time"]


def test_queue_with_one_slot_runs_in_start_order(data, runs_dir):
    jobs.set_max_concurrent(1, runs_dir)
    ids = [jobs.start(job_config(data, epochs=2, name=f"q{number}"), runs_dir) for number in range(3)]
    assert [jobs.reconcile(runs_dir / run_id).state for run_id in ids[1:]] == [State.QUEUED, State.QUEUED]
    for run_id in ids:
        assert jobs.wait_for(run_id, timeout=180, runs_dir=runs_dir).state is State.FINISHED
    intervals = [_interval(runs_dir / run_id) for run_id in ids]
    for earlier, later in zip(intervals, intervals[1:]):
        assert earlier[1] <= later[0], f"runs overlapped with one slot: {intervals}"


def test_queue_with_two_slots_overlaps(data, runs_dir):
    jobs.set_max_concurrent(2, runs_dir)
    ids = [jobs.start(job_config(data, epochs=3, name=f"p{number}"), runs_dir) for number in range(2)]
    # Polled states, not metrics times: head epochs on cached features take a fraction of a
    # second, but each worker is `running` from its start (imports, decoding, features) on.
    both_running = wait_until(
        lambda: all(jobs.reconcile(runs_dir / run_id).state is State.RUNNING for run_id in ids),
        timeout=120, interval=0.1, what="both runs to be running at the same moment")
    assert both_running
    for run_id in ids:
        assert jobs.wait_for(run_id, timeout=180, runs_dir=runs_dir).state is State.FINISHED


def test_a_fresh_process_lists_and_reattaches_to_a_running_run(data, runs_dir):
    run_id = jobs.start(job_config(data), runs_dir)
    wait_for_training(runs_dir, run_id)
    code = (
        "import json, sys; from engine.runs import list_runs; from engine import jobs; "
        f"runs = list_runs({str(runs_dir)!r}); "
        "print(json.dumps([(run.run_id, run.state.value) for run in runs])); "
        f"jobs.stop({run_id!r}, {str(runs_dir)!r}); "
        "assert 'tensorflow' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[run_id, "running"]]
    assert jobs.wait_for(run_id, timeout=30, runs_dir=runs_dir).state is State.STOPPED


def test_stopping_a_queued_run_takes_it_off_the_queue(data, runs_dir):
    jobs.set_max_concurrent(1, runs_dir)
    first = jobs.start(job_config(data), runs_dir)
    second = jobs.start(job_config(data), runs_dir)
    assert jobs.stop(second, runs_dir).state is State.STOPPED
    jobs.stop(first, runs_dir)
    assert jobs.wait_for(first, timeout=60, runs_dir=runs_dir).state is State.STOPPED
    time.sleep(1)
    assert jobs.reconcile(runs_dir / second).message == "Stopped before it started."
    assert not (runs_dir / second / "metrics.jsonl").exists()


def test_resume_refuses_a_running_or_finished_run(tmp_path):
    from engine.runs import create_run

    run_dir = create_run(job_config(tmp_path), tmp_path / "runs")
    status = runfiles.read_json(run_dir / "status.json")
    status["state"] = "finished"  # by hand, as a damaged or edited folder would be
    runfiles.atomic_write_json(run_dir / "status.json", status)
    with pytest.raises(ValueError, match="is finished; only stopped or failed runs resume"):
        jobs.resume(run_dir.name, tmp_path / "runs")


def test_corrupt_status_and_metrics_read_as_unknown_not_a_crash(tmp_path):
    from engine.runs import create_run

    run_dir = create_run(job_config(tmp_path), tmp_path / "runs")
    (run_dir / "status.json").write_text('{"state": "runn')
    (run_dir / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 1, "val_accuracy": 0.5}\nnot json\n{"type": "ep')
    (run_dir.parent / "empty-folder").mkdir()
    runs = list_runs(tmp_path / "runs")
    assert [run.state for run in runs if run.run_id == run_dir.name] == [State.UNKNOWN]
    # A damaged status has no summary to show; the metrics' good lines still read.
    assert get_run(run_dir).best_val_accuracy is None
    assert metrics_frames(run_dir)[1]["val_accuracy"].tolist() == [0.5]


def test_worker_refuses_a_run_another_worker_holds(data, runs_dir):
    run_id = jobs.start(job_config(data), runs_dir)
    wait_for_training(runs_dir, run_id)
    result = subprocess.run([sys.executable, "-m", "engine", "worker", str(runs_dir / run_id)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Another worker is already training" in result.stderr
    jobs.kill(run_id, runs_dir)


def test_cli_detach_stop_resume_kill_and_runs(data, runs_dir):
    def cli(*arguments):
        return subprocess.run([sys.executable, "-m", "engine", *map(str, arguments), "--runs-dir", runs_dir],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    started = subprocess.run(
        [sys.executable, "-m", "engine", "train", "--detach", "--data", data, "--backbone", "MobileNet",
         "--alpha", "0.25", "--weights", "none", "--image-size", "48", "--epochs", "200", "--batch-size", "4",
         "--runs-dir", runs_dir, "--max-concurrent", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    wait_until(lambda: len(epoch_events(runs_dir / run_id)) >= 1, what="an epoch")
    listed = cli("runs")
    assert run_id in listed.stdout and "running" in listed.stdout and "training_head" in listed.stdout
    assert cli("stop", run_id).returncode == 0
    assert jobs.wait_for(run_id, timeout=30, runs_dir=runs_dir).state is State.STOPPED
    assert cli("resume", run_id).stdout.startswith(("queued", "running"))
    wait_until(lambda: jobs.reconcile(runs_dir / run_id).stage in (Stage.TRAINING_HEAD, Stage.FINE_TUNING),
               what="resumed training")
    killed = cli("kill", run_id)
    assert killed.returncode == 0 and killed.stdout.startswith("failed: Killed by the user.")
    refused = cli("resume", "no-such-run")
    assert refused.returncode == 2 and refused.stderr.startswith("error: No run 'no-such-run'")
