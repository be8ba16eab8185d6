"""The incremental metrics reader: appends, half-written lines, replaced files, resumes, thinning, sharing.

Small generated `metrics.jsonl` files in the format `engine.callbacks.MetricsLogger` writes; no training.
"""

import json
import os
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from engine import runfiles
from engine.interpret import metrics_frames
from engine.metrics_reader import MetricsReader


def batch_event(epoch, step, steps, phase=1, loss=None):
    """A per-batch event with the keys MetricsLogger writes."""
    return {"type": "batch", "phase": phase, "epoch": epoch, "step": step, "steps": steps,
            "loss": loss if loss is not None else 1.0 / (epoch + step / steps), "accuracy": 0.5 + 0.01 * epoch,
            "learning_rate": 0.001, "elapsed_seconds": round(epoch * 10 + step * 0.5, 3),
            "images_per_second": 100.0 + step, "eta_seconds": float(steps - step), "time": 1.7e9 + epoch * 10 + step}


def epoch_event(epoch, phase=1):
    """A per-epoch event with the keys MetricsLogger writes."""
    return {"type": "epoch", "phase": phase, "epoch": epoch, "loss": 1.0 / epoch, "accuracy": 0.5 + 0.01 * epoch,
            "val_loss": 1.1 / epoch, "val_accuracy": 0.5 + 0.02 * epoch, "learning_rate": 0.001,
            "elapsed_seconds": epoch * 10.0, "epoch_seconds": 10.0, "images_per_second": 100.0,
            "eta_seconds": 0.0, "time": 1.7e9 + epoch * 10}


def training_events(first_epoch, last_epoch, steps, phase=1):
    """The events of whole epochs: `steps` batch events, then the epoch event."""
    events = []
    for epoch in range(first_epoch, last_epoch + 1):
        events += [batch_event(epoch, step, steps, phase) for step in range(1, steps + 1)]
        events.append(epoch_event(epoch, phase))
    return events


def lines(events):
    return "".join(json.dumps(event) + "\n" for event in events)


def reference_frames(run_dir):
    """metrics_frames as it was before the reader: the whole file, every point (the test's oracle)."""
    events = runfiles.read_jsonl(Path(run_dir) / runfiles.METRICS_FILE)
    kept = []
    for event in events:
        if event.get("type") == "resume":
            resumed_after = event.get("epoch", 0)
            kept = [item for item in kept if item.get("epoch", 0) <= resumed_after]
        else:
            kept.append(event)
    batches = pd.DataFrame([event for event in kept if event.get("type") == "batch"])
    epochs = pd.DataFrame([event for event in kept if event.get("type") == "epoch"])
    if not batches.empty:
        batches["progress"] = batches["epoch"] - 1 + batches["step"] / batches["steps"]
    if not epochs.empty:
        epochs["progress"] = epochs["epoch"].astype(float)
    return batches, epochs


def assert_frames_equal(actual, expected):
    for actual_frame, expected_frame in zip(actual, expected):
        pd.testing.assert_frame_equal(actual_frame, expected_frame)


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "runs" / "20260101-000000-MobileNet-abcd"
    folder.mkdir(parents=True)
    return folder


def metrics_path(run_dir):
    return run_dir / runfiles.METRICS_FILE


def append(run_dir, text):
    with open(metrics_path(run_dir), "a", encoding="utf-8") as handle:
        handle.write(text)


def test_a_growing_file_is_read_only_where_it_grew(run_dir):
    append(run_dir, lines(training_events(1, 2, steps=20)))
    reader = MetricsReader(run_dir)
    batches, epochs = reader.frames()
    assert (len(batches), len(epochs)) == (40, 2)
    assert reader.bytes_read == metrics_path(run_dir).stat().st_size

    reader.frames()  # nothing new: nothing read
    assert reader.bytes_read == metrics_path(run_dir).stat().st_size

    size_before = metrics_path(run_dir).stat().st_size
    appended = lines(training_events(3, 3, steps=20))
    append(run_dir, appended)
    batches, epochs = reader.frames()
    assert reader.bytes_read == size_before + len(appended.encode())
    assert (len(batches), len(epochs)) == (60, 3)
    assert_frames_equal((batches, epochs), reference_frames(run_dir))


def test_a_half_written_line_is_left_for_the_next_read(run_dir):
    append(run_dir, lines(training_events(1, 1, steps=5)))
    last = json.dumps(batch_event(2, 1, 5)) + "\n"
    append(run_dir, last[:30])  # the writer is in the middle of this line
    reader = MetricsReader(run_dir)
    batches, _ = reader.frames()
    assert len(batches) == 5 and batches["epoch"].max() == 1

    append(run_dir, last[30:])
    batches, _ = reader.frames()
    assert len(batches) == 6
    assert batches.iloc[-1]["epoch"] == 2 and batches.iloc[-1]["step"] == 1
    assert_frames_equal(reader.frames(), reference_frames(run_dir))


def test_a_corrupt_line_is_skipped_and_nothing_else_is_lost(run_dir):
    append(run_dir, lines(training_events(1, 1, steps=3)) + "{not json\n" + lines(training_events(2, 2, steps=3)))
    batches, epochs = MetricsReader(run_dir).frames()
    assert (len(batches), len(epochs)) == (6, 2)


def test_a_replaced_file_is_read_again_from_its_start(run_dir):
    append(run_dir, lines(training_events(1, 3, steps=10)))
    reader = MetricsReader(run_dir)
    assert len(reader.frames()[1]) == 3

    # A new file under the same name (written elsewhere, then renamed over the old one), shorter.
    replacement = run_dir / "new.jsonl"
    replacement.write_text(lines(training_events(1, 1, steps=4)), encoding="utf-8")
    os.replace(replacement, metrics_path(run_dir))
    assert_frames_equal(reader.frames(), reference_frames(run_dir))
    assert len(reader.frames()[0]) == 4


def test_a_file_rewritten_in_place_is_read_again_from_its_start(run_dir):
    append(run_dir, lines(training_events(1, 1, steps=10)))
    reader = MetricsReader(run_dir)
    reader.frames()
    # Truncated and written again, longer than before: same inode, and the file only seems to have grown.
    with open(metrics_path(run_dir), "w", encoding="utf-8") as handle:
        handle.write(lines(training_events(1, 2, steps=12, phase=2)))
    batches, epochs = reader.frames()
    assert_frames_equal((batches, epochs), reference_frames(run_dir))
    assert set(batches["phase"]) == {2} and len(batches) == 24

    with open(metrics_path(run_dir), "w", encoding="utf-8") as handle:
        handle.write("")  # truncated to nothing
    batches, epochs = reader.frames()
    assert batches.empty and epochs.empty


def test_a_run_folder_removed_and_made_again_at_the_same_path(run_dir):
    append(run_dir, lines(training_events(1, 2, steps=6)))
    reader = MetricsReader(run_dir)
    assert len(reader.frames()[1]) == 2
    shutil.rmtree(run_dir)
    batches, epochs = reader.frames()
    assert batches.empty and epochs.empty
    run_dir.mkdir()
    append(run_dir, lines(training_events(1, 1, steps=3)))
    assert_frames_equal(reader.frames(), reference_frames(run_dir))


@pytest.mark.parametrize("read_between", [False, True], ids=["one read", "read before the resume"])
def test_a_resume_drops_the_epochs_the_resumed_run_repeats(run_dir, read_between):
    # Killed during epoch 4 (its batches written, no epoch event) after the checkpoint of epoch 3,
    # whose event was lost too: the resumed run starts again at epoch 3.
    events = training_events(1, 2, steps=5) + [batch_event(3, step, 5) for step in range(1, 6)]
    events += [batch_event(4, step, 5) for step in range(1, 3)]
    append(run_dir, lines(events))
    reader = MetricsReader(run_dir)
    if read_between:
        assert reader.frames()[0]["epoch"].max() == 4
    append(run_dir, lines([{"type": "resume", "epoch": 2}] + training_events(3, 5, steps=5)))
    batches, epochs = reader.frames()
    assert_frames_equal((batches, epochs), reference_frames(run_dir))
    assert_frames_equal((batches, epochs), metrics_frames(run_dir))
    assert list(epochs["epoch"]) == [1, 2, 3, 4, 5]
    assert len(batches) == 25 and list(batches["epoch"]) == sorted(batches["epoch"])


def test_frames_equal_metrics_frames_before_the_reader(run_dir):
    # Two phases, a resume, a corrupt line, a half-written last line: the reader, metrics_frames
    # (which now uses it) and the old whole-file algorithm agree on every column and row.
    events = training_events(1, 3, steps=7) + [{"type": "resume", "epoch": 2}] + training_events(3, 4, steps=7)
    events += training_events(5, 6, steps=9, phase=2)
    append(run_dir, lines(events[:20]) + "garbage\n" + lines(events[20:]) + '{"type": "batch", "ep')
    expected = reference_frames(run_dir)
    assert_frames_equal(MetricsReader(run_dir).frames(), expected)
    assert_frames_equal(metrics_frames(run_dir), expected)
    assert list(expected[1]["epoch"]) == [1, 2, 3, 4, 5, 6]


def test_thinning_bounds_the_points_and_keeps_each_epochs_first_and_last(run_dir):
    steps = 3000
    append(run_dir, lines(training_events(1, 3, steps=steps)))
    append(run_dir, lines([batch_event(4, step, steps) for step in range(1, 1001)]))
    reader = MetricsReader(run_dir, max_points=400)
    batches, epochs = reader.frames()
    assert len(batches) <= 400 + 4, len(batches)  # a share per epoch, plus each epoch's latest point
    assert len(batches) >= 150  # thinned, not emptied
    assert len(epochs) == 3  # epoch events are never thinned
    for epoch in (1, 2, 3):
        steps_kept = batches[batches["epoch"] == epoch]["step"]
        assert steps_kept.iloc[0] == 1 and steps_kept.iloc[-1] == steps
    assert batches.iloc[-1]["step"] == 1000  # the run's latest point is always there
    assert list(batches["progress"]) == sorted(batches["progress"])


def test_thinning_does_not_depend_on_how_the_file_was_read(run_dir, tmp_path):
    events = training_events(1, 2, steps=1500) + [batch_event(3, step, 1500) for step in range(1, 700)]
    text = lines(events)
    append(run_dir, text)
    whole = MetricsReader(run_dir, max_points=300).frames()

    growing_dir = tmp_path / "growing"
    growing_dir.mkdir()
    reader = MetricsReader(growing_dir, max_points=300)
    for start in range(0, len(text), 9_999):  # cuts fall in the middle of lines
        append(growing_dir, text[start:start + 9_999])
        reader.frames()
    assert_frames_equal(reader.frames(), whole)


def test_small_files_are_not_thinned(run_dir):
    append(run_dir, lines(training_events(1, 4, steps=100)))
    assert len(MetricsReader(run_dir, max_points=2000).frames()[0]) == 400


def test_a_missing_file_reads_as_empty_until_it_appears(run_dir):
    reader = MetricsReader(run_dir)
    batches, epochs = reader.frames()
    assert batches.empty and epochs.empty
    append(run_dir, lines(training_events(1, 1, steps=2)))
    assert len(reader.frames()[0]) == 2


def test_callers_get_copies(run_dir):
    append(run_dir, lines(training_events(1, 1, steps=3)))
    reader = MetricsReader(run_dir)
    batches, _ = reader.frames()
    batches["loss"] = 0.0
    assert (reader.frames()[0]["loss"] != 0.0).all()


def test_one_reader_shared_by_many_viewers_while_the_run_writes(run_dir):
    append(run_dir, lines(training_events(1, 1, steps=50)))
    reader = MetricsReader(run_dir)
    errors, done = [], threading.Event()

    def view():
        while not done.is_set():
            try:
                batches, _ = reader.frames()
                assert list(batches["progress"]) == sorted(batches["progress"])
            except Exception as error:  # noqa: BLE001 - every error is the finding
                errors.append(error)

    viewers = [threading.Thread(target=view) for _ in range(6)]
    for viewer in viewers:
        viewer.start()
    for epoch in range(2, 12):
        for event in training_events(epoch, epoch, steps=50):
            runfiles.append_jsonl(metrics_path(run_dir), [event])
    done.set()
    for viewer in viewers:
        viewer.join()
    assert not errors, errors[0]
    assert_frames_equal(reader.frames(), reference_frames(run_dir))


def test_max_points_below_two_is_refused(run_dir):
    with pytest.raises(ValueError, match="`max_points` must be ≥ 2"):
        MetricsReader(run_dir, max_points=1)
