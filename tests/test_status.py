"""A run's status: one schema, one writer that refuses illegal moves, readers that never write,
old run folders that still list, open and resume, and a stop that keeps the best weights."""

import json
import threading

import numpy as np
import pytest

from engine import jobs, runfiles
from engine.runs import create_run, get_run, list_runs
from engine.status import (IllegalTransition, LaunchStatus, Stage, State, read_status, record_progress,
                           transition)
from engine.train import FAULT_VARIABLE, run_training
from engine.users import local_user
from tests.conftest import epoch_events, job_config, open_page, tiny_config, wait_until


@pytest.fixture
def queued_run(tmp_path):
    return create_run(job_config(tmp_path / "nowhere", name="unit"), tmp_path / "runs")


def test_a_new_run_is_queued_with_its_list_summary(queued_run):
    status = read_status(queued_run)
    assert status.state is State.QUEUED and status.stage is Stage.QUEUED
    assert (status.backbone, status.name, status.owner, status.epochs) == ("MobileNet", "unit", local_user().id, 200)
    assert status.dataset.endswith("nowhere") and status.created and status.pid is None
    on_disk = json.loads((queued_run / "status.json").read_text())
    assert on_disk["state"] == "queued" and on_disk["stage"] == "queued" and on_disk["schema"] == 2
    assert "path" not in on_disk


def test_transitions_follow_the_legal_moves_only(queued_run):
    with pytest.raises(IllegalTransition, match="is queued; it cannot move to finished"):
        transition(queued_run, State.FINISHED, stage=Stage.DONE, message="no")
    running = transition(queued_run, State.RUNNING, stage=Stage.STARTING, message="go", launch_id="first")
    assert running.state is State.RUNNING and read_status(queued_run).launch_id == "first"
    with pytest.raises(IllegalTransition, match="is running; it cannot move to queued"):
        transition(queued_run, State.QUEUED, stage=Stage.QUEUED, message="no")
    # Only the current launch ends its own launch.
    with pytest.raises(IllegalTransition, match="launched again"):
        transition(queued_run, State.FINISHED, stage=Stage.DONE, message="no", for_launch="an-old-launch")
    transition(queued_run, State.STOPPED, stage=Stage.DONE, message="stopped", for_launch="first")
    transition(queued_run, State.QUEUED, stage=Stage.QUEUED, message="again", expected={State.STOPPED})
    transition(queued_run, State.RUNNING, stage=Stage.STARTING, message="go", launch_id="second")
    transition(queued_run, State.FINISHED, stage=Stage.DONE, message="done", for_launch="second")
    for target in State:
        if target is not State.UNKNOWN:
            with pytest.raises(IllegalTransition, match="is finished"):
                transition(queued_run, target, stage=Stage.DONE, message="no")
    assert read_status(queued_run).message == "done"


def test_progress_of_a_superseded_launch_is_never_written(queued_run):
    transition(queued_run, State.RUNNING, stage=Stage.STARTING, message="go", launch_id="live")
    assert record_progress(queued_run, "live", epoch=3).epoch == 3
    before = (queued_run / "status.json").read_bytes()
    assert record_progress(queued_run, "dead", epoch=99) is None
    assert (queued_run / "status.json").read_bytes() == before
    with pytest.raises(ValueError, match="not the state"):
        record_progress(queued_run, "live", state=State.FINISHED)


def test_reading_and_listing_never_write(queued_run):
    transition(queued_run, State.RUNNING, stage=Stage.TRAINING_HEAD, message="go", launch_id="gone", pid=1)
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in queued_run.iterdir()
              if path.is_file()}
    # A running run whose worker is long gone (no lock held): readers still report what the file says.
    assert read_status(queued_run).state is State.RUNNING
    assert get_run(queued_run).state is State.RUNNING
    assert [run.state for run in list_runs(queued_run.parent)] == [State.RUNNING]
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in queued_run.iterdir()
             if path.is_file()}
    assert after == before
    # The explicit reconcile step is what records the death.
    reconciled = jobs.reconcile(queued_run)
    assert reconciled.state is State.FAILED and reconciled.pid is None
    assert "ended without finishing" in reconciled.message


def test_a_worker_on_a_finished_run_is_refused(queued_run):
    transition(queued_run, State.RUNNING, stage=Stage.STARTING, message="go", launch_id="one")
    transition(queued_run, State.FINISHED, stage=Stage.DONE, message="done", for_launch="one")
    with pytest.raises(IllegalTransition, match="is finished"):
        LaunchStatus(queued_run).begin(pid=1, host="here")


def write_the_old_way(run_dir, state, message):
    """status.json exactly as the code before the schema wrote it: a `phase` sentence, no summary."""
    runfiles.atomic_write_json(run_dir / "status.json", {
        "run_id": run_dir.name, "state": state, "phase": state, "message": message,
        "created": "2026-11-20T10:00:00+00:00", "queued_at": 1795000000.0, "heartbeat": 1795000100.0,
        "heartbeat_iso": "2026-11-20T10:01:40+00:00", "pid": None, "host": "old-host",
        "started": "2026-11-20T10:00:01+00:00", "epoch": 2, "epochs": 4, "step": 3, "steps": 3,
        "eta_seconds": 0, "images_per_second": 120.5, "last_completed_epoch": 2,
        "finished": "2026-11-20T10:01:40+00:00", "validation_accuracy": 0.5, "error": None,
        "launched_at": 1795000000.5})


@pytest.mark.training
def test_an_old_run_folder_lists_opens_and_resumes(tiny_dataset, runs_dir, monkeypatch):
    run_dir = create_run(tiny_config(tiny_dataset, **{"training.epochs": 2}), runs_dir)
    assert run_training(run_dir) is State.FINISHED
    # Rewrite it as a run of 4 epochs that the old code stopped after epoch 2.
    config = json.loads((run_dir / "config.json").read_text())
    config["training"]["epochs"] = 4
    (run_dir / "config.json").write_text(json.dumps(config))
    write_the_old_way(run_dir, "stopped", "Stopped after 2 epochs: validation accuracy 0.500.")

    listed = list_runs(runs_dir)
    assert [(run.run_id, run.state, run.stage) for run in listed] == [(run_dir.name, State.STOPPED, Stage.DONE)]
    old = listed[0]
    assert old.backbone == "MobileNet" and old.dataset == str(tiny_dataset)
    best = max(event["val_accuracy"] for event in epoch_events(run_dir))
    assert old.best_val_accuracy == best and old.launch_id is None and old.schema == 2
    # The pages open it as they open any run.
    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(runs_dir))
    for page in ("app_pages/home.py", "app_pages/monitor.py", "app_pages/evaluate.py"):
        app = open_page(page)
        assert not app.exception and not app.error, (page, app.exception, [error.value for error in app.error])
    assert "STOPPED" in open_page("app_pages/monitor.py").warning[0].value

    jobs.resume(run_dir.name, runs_dir)
    final = jobs.wait_for(run_dir.name, timeout=180, runs_dir=runs_dir, poll_seconds=0.2)
    assert final.state is State.FINISHED and final.message.startswith("Finished after 4 epochs"), final
    assert [event["epoch"] for event in epoch_events(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "status.json").read_text())["schema"] == 2


@pytest.mark.training
def test_a_resumed_run_never_shows_the_old_worker_as_live(tiny_dataset, runs_dir, monkeypatch):
    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.3")
    run_id = jobs.start(tiny_config(tiny_dataset, **{"training.epochs": 50}), runs_dir)
    run_dir = runs_dir / run_id
    wait_until(lambda: len(epoch_events(run_dir)) >= 1, what="an epoch")
    old = jobs.reconcile(run_dir)
    jobs.kill(run_id, runs_dir)
    assert read_status(run_dir).state is State.FAILED

    seen = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            status = read_status(run_dir)
            seen.append((status.state, status.pid, status.launch_id))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    resumed = jobs.resume(run_id, runs_dir)
    wait_until(lambda: read_status(run_dir).stage is Stage.TRAINING_HEAD, what="the resumed worker to train")
    watching.set()
    watcher.join(timeout=5)
    assert resumed.launch_id != old.launch_id
    assert seen and all(pid != old.pid for state, pid, _ in seen if state is State.RUNNING), seen
    assert all(launch != old.launch_id for state, _, launch in seen if state is not State.FAILED), seen
    live = read_status(run_dir)
    assert live.pid not in (None, old.pid) and live.launch_id not in (None, old.launch_id)
    jobs.kill(run_id, runs_dir)


@pytest.mark.training
def test_a_stop_after_the_best_epoch_keeps_the_best_weights_with_early_stopping(tmp_path, monkeypatch):
    """Stop leaves fit through Keras's lifecycle, so EarlyStopping's on_train_end restores the best weights."""
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "data", per_class=30)
    # A learning rate far too high makes the validation loss jump about, so the best epoch is not the last.
    config = tiny_config(data, **{"training.epochs": 60, "training.optimizer": "sgd",
                                  "training.learning_rate": 3.0, "training.batch_size": 8,
                                  "callbacks.early_stopping.enabled": True,
                                  "callbacks.early_stopping.patience": 1000,
                                  "callbacks.checkpoint.enabled": True})
    run_dir = create_run(config, tmp_path / "runs")
    # Each epoch waits half a second after its event is written: time for the stop request to
    # arrive before the epoch ends, so the run stops on the very epoch the test looked at.
    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.5")

    def worse_than_the_best():
        losses = [event["val_loss"] for event in epoch_events(run_dir)]
        return len(losses) >= 3 and losses[-1] > min(losses) + 0.01

    def stop_once_an_epoch_is_worse_than_the_best():
        wait_until(worse_than_the_best, timeout=120, interval=0.02, what="an epoch worse than the best")
        (run_dir / "stop.request").write_text("stop\n")

    stopper = threading.Thread(target=stop_once_an_epoch_is_worse_than_the_best, daemon=True)
    stopper.start()
    assert run_training(run_dir) is State.STOPPED
    stopper.join(timeout=5)

    losses = [event["val_loss"] for event in epoch_events(run_dir)]
    assert 3 <= len(losses) < 60 and worse_than_the_best(), losses
    assert int(np.argmin(losses)) != len(losses) - 1, f"the last epoch was the best, nothing to restore: {losses}"
    # best.keras is the full model at the best validation loss; model.keras must hold the same weights.
    import keras

    import engine.layers  # noqa: F401 - registers our layers for safe-mode loading

    saved = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    best = keras.models.load_model(run_dir / "best.keras", safe_mode=True)
    for left, right in zip(saved.get_weights(), best.get_weights()):
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-6)


def test_a_run_listing_rereads_only_the_status_files_that_changed(tmp_path, monkeypatch):
    import engine.runs
    from engine.runs import RunListing

    runs_dir = tmp_path / "runs"
    folders = [create_run(job_config(tmp_path, name=f"r{number}"), runs_dir) for number in range(5)]
    read = []
    real_read = engine.runs.read_status
    monkeypatch.setattr(engine.runs, "read_status", lambda folder: read.append(folder.name) or real_read(folder))
    listing = RunListing(runs_dir)
    first = listing.runs()
    assert [run.run_id for run in first] == sorted((folder.name for folder in folders), reverse=True)
    assert len(read) == 5
    assert listing.runs() is first and len(read) == 5  # nothing changed: nothing read
    transition(folders[2], State.STOPPED, stage=Stage.DONE, message="stopped")
    after = listing.runs()
    assert read[5:] == [folders[2].name]  # one status changed: one file read
    assert {run.run_id: run.state for run in after}[folders[2].name] is State.STOPPED
    assert list(after) == list_runs(runs_dir)


@pytest.mark.training
def test_a_run_trained_in_the_foreground_holds_its_lock_and_stays_running(tiny_dataset, tmp_path, monkeypatch):
    """`python -m engine train` and `engine.train_run` hold the worker lock too: reconcile sees them alive,
    and no second worker can take the run."""
    from engine.executors import WorkerBusy

    monkeypatch.setenv(FAULT_VARIABLE, "epoch_end:sleep:0.2")
    run_dir = create_run(tiny_config(tiny_dataset, **{"training.epochs": 200}), tmp_path / "runs")
    ended = []
    trainer = threading.Thread(target=lambda: ended.append(run_training(run_dir)), daemon=True)
    trainer.start()
    wait_until(lambda: len(epoch_events(run_dir)) >= 2, what="two epochs")
    assert jobs.reconcile(run_dir).state is State.RUNNING
    with pytest.raises(WorkerBusy, match="Another worker is already training"):
        run_training(run_dir)
    (run_dir / "stop.request").write_text("stop\n")
    trainer.join(timeout=60)
    assert ended == [State.STOPPED] and read_status(run_dir).state is State.STOPPED


@pytest.mark.training
def test_fine_tuning_counts_its_epochs_from_where_phase_one_really_ended(tiny_dataset, tmp_path):
    # Early stopping with an improvement nobody can make ends phase 1 after its second epoch.
    config = tiny_config(tiny_dataset, **{"training.epochs": 10, "fine_tuning.layers": 5, "fine_tuning.epochs": 2,
                                          "callbacks.early_stopping.enabled": True,
                                          "callbacks.early_stopping.patience": 0,
                                          "callbacks.early_stopping.min_delta": 10.0})
    run_dir = create_run(config, tmp_path / "runs")
    assert read_status(run_dir).epochs == 12  # as planned before training
    assert run_training(run_dir) is State.FINISHED
    events = [(event["phase"], event["epoch"]) for event in epoch_events(run_dir)]
    assert events == [(1, 1), (1, 2), (2, 3), (2, 4)], events
    final = read_status(run_dir)
    assert (final.epoch, final.epochs) == (4, 4)


def test_a_kill_asked_while_starting_ends_the_run_before_it_trains(queued_run):
    (queued_run / "kill.request").write_text("kill\n")
    assert run_training(queued_run) is State.FAILED
    status = read_status(queued_run)
    assert status.message == "Killed by the user." and not epoch_events(queued_run)


def test_a_late_supervisor_does_not_revive_an_ended_launch(queued_run):
    from engine.executors import supervise

    transition(queued_run, State.RUNNING, stage=Stage.STARTING, message="go", launch_id="slow")
    transition(queued_run, State.FAILED, stage=Stage.DONE, message="judged dead", for_launch="slow")
    assert supervise(queued_run) == 1
    status = read_status(queued_run)
    assert status.state is State.FAILED and status.message == "judged dead"
    assert not (queued_run / "worker.log").exists()
    with pytest.raises(IllegalTransition, match="no longer current"):
        LaunchStatus(queued_run).begin(pid=1, host="here", launch_id="slow")


def test_listings_record_a_run_whose_processes_all_died(queued_run):
    from tests.conftest import run_cli

    # Running, under a pid that no longer exists, silent for a minute: nobody is left to say so.
    transition(queued_run, State.RUNNING, stage=Stage.TRAINING_HEAD, message="go", launch_id="gone", pid=999999,
               heartbeat=0.0)
    runfiles.atomic_write_json(queued_run / "status.json", dict(
        json.loads((queued_run / "status.json").read_text()), heartbeat=1.0))
    listed = run_cli("runs", "--runs-dir", queued_run.parent)
    assert listed.returncode == 0 and " failed " in listed.stdout, listed.stdout
    assert read_status(queued_run).message.startswith("The worker process ended without finishing")


def test_time_left_counts_whole_epochs_with_their_validation_and_checkpoint(tmp_path, monkeypatch):
    """The ETA after the first epoch uses how long an epoch really took, not its batches alone."""
    import engine.callbacks
    from engine.callbacks import MetricsLogger, StopOnRequest

    clock = [0.0]
    monkeypatch.setattr(engine.callbacks.time, "time", lambda: clock[0])
    metrics = MetricsLogger(tmp_path, phase=1, steps_per_epoch=2, batch_size=8, total_epochs=5, started_at=0.0,
                            stop=StopOnRequest(tmp_path, 2))
    metrics.on_epoch_begin(0)
    for step in (1, 2):
        clock[0] = float(step)  # one second a batch
        metrics.on_train_batch_end(step - 1, {"loss": 0.5})
    clock[0] = 10.0  # validation and the checkpoint took eight more seconds
    metrics.on_epoch_begin(1)
    clock[0] = 11.0
    metrics.on_train_batch_end(0, {"loss": 0.5})
    # Three more whole epochs of ten seconds, and one batch of this one: 31 s (batches alone said 7 s).
    assert metrics.last_batch_event["eta_seconds"] == 31.0
