"""Training on several devices: `training.gpus` and tf.distribute.MirroredStrategy (docs/training.md, "Several GPUs").

There is no GPU here, so the mirrored runs split the CPU into two logical devices
(`TRANSFER_STUDIO_LOGICAL_CPU_DEVICES=2`), which only works before TensorFlow starts: those
runs train in fresh processes, through the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import runfiles
from engine.config import ConfigError, RunConfig, get_setting
from engine.devices import LOGICAL_CPU_DEVICES_VARIABLE, logical_cpu_devices, training_devices
from engine.status import State, read_status
from tests.conftest import REPO_ROOT, epoch_events, make_dataset, run_cli, tiny_config

TWO_LOGICAL_DEVICES = {LOGICAL_CPU_DEVICES_VARIABLE: "2"}
# One device against two mirrored ones, same seed, one batch per epoch and no dropout (so the
# order of the images within an epoch and the dropout masks play no part): in every repeat
# measured, the epoch losses differed by at most 1.19e-7 and the saved models' probabilities
# by at most 2.98e-8 (docs/training.md, "Several GPUs", with the command).
LOSS_TOLERANCE = 1e-5
PROBABILITY_TOLERANCE = 1e-5


def train(data: Path, runs_dir: Path, keras_home: Path, gpus: int, env: dict | None = None, *extra) -> Path:
    """Trains MobileNet α=0.25 (ImageNet weights) in a fresh process; the run folder."""
    trained = run_cli("train", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25", "--image-size", "64",
                      "--epochs", "3", "--batch-size", "32", "--learning-rate", "0.01", "--dropout", "0",
                      "--fine-tune-layers", "10", "--fine-tune-epochs", "1", "--fine-tune-learning-rate", "0.0001",
                      "--gpus", gpus, "--runs-dir", runs_dir, "--quiet",
                      # Both fine-tune end to end: several devices always do, and one device would
                      # otherwise train on float16 cached activations (not the same arithmetic).
                      "--set", "fine_tuning.cached_activations=false", *extra,
                      env={"KERAS_HOME": str(keras_home), **(env or {})})
    assert trained.returncode == 0, trained.stderr[-3000:]
    return Path(trained.stdout.strip().splitlines()[-1])


def devices_events(run_dir: Path) -> list[dict]:
    return [event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event.get("type") == "devices"]


def held_out_probabilities(run_dir: Path) -> tuple[list[str], np.ndarray]:
    """The saved model's own probabilities (not calibrated) for the run's validation and test images."""
    from engine.images import load_rgb
    from engine.predict import load_run_model, predict_probabilities

    model, class_names, image_size = load_run_model(run_dir)
    paths = sorted(row["path"] for row in runfiles.read_csv(run_dir / "split.csv") if row["split"] != "train")
    images = np.stack([load_rgb(path, image_size) for path in paths])
    return paths, predict_probabilities(model, images, len(class_names))


@pytest.mark.training
@pytest.mark.real_data
def test_two_mirrored_devices_train_what_one_device_trains(tmp_path, keras_home_with_mobilenet):
    # 40 images: 32 train in one batch of 32 (16 per device), 4 validation, 4 test; phase 1 on
    # cached features, then one epoch of fine-tuning on the images (the full model mirrored).
    data = make_dataset(tmp_path / "data", per_class=20)
    one = train(data, tmp_path / "runs", keras_home_with_mobilenet, 0)
    two = train(data, tmp_path / "runs", keras_home_with_mobilenet, 2, TWO_LOGICAL_DEVICES)

    # The mirrored run really trained on two replicas, and says so; one device has no strategy at all.
    assert devices_events(one) == []
    [event] = devices_events(two)
    assert (event["strategy"], event["replicas"], len(event["devices"])) == ("MirroredStrategy", 2, 2)
    assert all(name.endswith(("CPU:0", "CPU:1")) for name in event["devices"]), event
    assert "Training on 2 devices with tf.distribute.MirroredStrategy" in (two / "worker.log").read_text()
    for run_dir in (one, two):
        assert read_status(run_dir).state is State.FINISHED, read_status(run_dir).message

    one_epochs, two_epochs = epoch_events(one), epoch_events(two)
    assert [(event["phase"], event["epoch"]) for event in one_epochs] == [(1, 1), (1, 2), (1, 3), (2, 4)]
    assert [(event["phase"], event["epoch"]) for event in two_epochs] == [(1, 1), (1, 2), (1, 3), (2, 4)]
    loss_gap = max(abs(first[key] - second[key]) for first, second in zip(one_epochs, two_epochs)
                   for key in ("loss", "val_loss"))
    paths, one_probabilities = held_out_probabilities(one)
    same_paths, two_probabilities = held_out_probabilities(two)
    assert paths == same_paths
    probability_gap = float(np.abs(one_probabilities - two_probabilities).max())
    print(f"\none device vs two mirrored: largest epoch-loss gap {loss_gap:.2e}, "
          f"largest probability gap {probability_gap:.2e}")
    # The runs learned something, so agreeing is not agreeing on nothing.
    assert one_epochs[-1]["loss"] < one_epochs[0]["loss"] - 0.1, one_epochs
    assert loss_gap <= LOSS_TOLERANCE
    assert probability_gap <= PROBABILITY_TOLERANCE
    assert (one_probabilities.argmax(axis=1) == two_probabilities.argmax(axis=1)).all()


@pytest.mark.slow
@pytest.mark.training
def test_a_mirrored_run_with_dropout_uneven_batches_and_the_slow_path_finishes(tmp_path):
    # Phase 1 end to end on the images (no cached features), three classes, dropout on, 21
    # training images in batches of 4 (the last batch, one image, cannot feed two devices and is
    # left out), 6 validation images (batches of 4 and 2), 3 test images (split 2 and 1).
    data = make_dataset(tmp_path / "data", classes=("birds", "cats", "dogs"), per_class=10)
    trained = run_cli("train", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25", "--weights", "none",
                      "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--dropout", "0.2", "--gpus", "2",
                      "--validation-fraction", "0.2", "--set", "training.cached_features=false",
                      "--runs-dir", tmp_path / "runs", "--quiet", env=TWO_LOGICAL_DEVICES)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = Path(trained.stdout.strip().splitlines()[-1])
    assert read_status(run_dir).state is State.FINISHED, read_status(run_dir).message
    assert [event["replicas"] for event in devices_events(run_dir)] == [2]
    counts = {split: 0 for split in ("train", "validation", "test")}
    for row in runfiles.read_csv(run_dir / "split.csv"):
        counts[row["split"]] += 1
    assert counts == {"train": 21, "validation": 6, "test": 3}
    epochs = epoch_events(run_dir)
    assert [event["epoch"] for event in epochs] == [1, 2]
    # Five batches of 4 per epoch: the sixth, of one image, was left out.
    batches = [event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event.get("type") == "batch"]
    assert {event["steps"] for event in batches} == {5}
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    assert (evaluation["splits"]["validation"]["num_images"], evaluation["splits"]["test"]["num_images"]) == (6, 3)


def test_batches_for_several_devices_leave_none_without_an_image():
    from engine.train import batch_for_devices

    # One device, or batches that already split: as asked.
    assert batch_for_devices(64, 32, 2, first_even=True) == 32
    # 233 validation images on 2 devices: 232 would leave one image for the last batch; 230 leaves 3.
    assert batch_for_devices(233, 1024, 2, first_even=True) == 230
    assert batch_for_devices(233, 1024, 4, first_even=True) == 228
    # Predicting needs no even first batch, only no device left without an image.
    assert batch_for_devices(65, 64, 2, first_even=False) == 63
    assert batch_for_devices(3, 64, 2, first_even=False) == 3
    # 3 validation images cannot feed 2 devices in every batch with an even first batch; 1 image never can.
    assert batch_for_devices(3, 1024, 2, first_even=True) is None
    assert batch_for_devices(1, 64, 2, first_even=False) is None


def test_asking_for_more_gpus_than_the_worker_sees_fails_the_run_with_a_sentence(tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    from engine.train import train_run

    monkeypatch.delenv(LOGICAL_CPU_DEVICES_VARIABLE, raising=False)
    run_dir = train_run(tiny_config(tiny_dataset, **{"training.gpus": 4}), runs_dir=tmp_path / "runs")
    status = read_status(run_dir)
    assert status.state is State.FAILED
    # This machine has no GPU: the worker sees none of the 4 asked for, and says what to do.
    assert status.message.startswith("`training.gpus` asked for 4 GPUs, this worker sees none"), status.message
    assert "Lower `training.gpus` to 0 or 1 (one device)" in status.message
    assert not (run_dir / "model.keras").exists()


def test_fewer_logical_devices_than_asked_name_the_devices_seen():
    # In a fresh process: the CPU is split in two before TensorFlow starts, then 4 are asked for.
    script = ("from engine.devices import training_devices\n"
              "try:\n    training_devices(4)\nexcept ValueError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, **TWO_LOGICAL_DEVICES})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("`training.gpus` asked for 4 GPUs, this worker sees 2: /device:CPU:0, "
                                     f"/device:CPU:1 (logical CPU devices from {LOGICAL_CPU_DEVICES_VARIABLE}=2). "
                                     "Lower `training.gpus` to 2,"), result.stdout


def test_one_device_uses_no_strategy_and_does_not_load_tensorflow():
    script = ("import sys\nfrom engine.devices import training_devices\n"
              "for gpus in (0, 1):\n"
              "    devices = training_devices(gpus)\n"
              "    assert devices.strategy is None and devices.replicas == 1, devices\n"
              "print('tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, **TWO_LOGICAL_DEVICES})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("text", ["two", "-1", "65", "1.5"])
def test_a_malformed_logical_device_count_is_refused_by_name(text):
    with pytest.raises(ValueError, match=f"`{LOGICAL_CPU_DEVICES_VARIABLE}` must be a whole number from 0 to 64"):
        logical_cpu_devices({LOGICAL_CPU_DEVICES_VARIABLE: text})
    assert logical_cpu_devices({}) == 0 and logical_cpu_devices({LOGICAL_CPU_DEVICES_VARIABLE: " "}) == 0


def test_gpus_setting_declares_its_flag_and_range_and_splits_batches_evenly():
    gpus = get_setting("training.gpus")
    assert (gpus.type, gpus.default, gpus.low, gpus.high, gpus.flag) == (int, 0, 0, 64, "--gpus")
    assert "MirroredStrategy" in gpus.help and "Ray" in gpus.help
    assert RunConfig().replace(**{"training.gpus": 4}).training.gpus == 4  # 32 splits into 4 × 8
    expected = (r"`training.batch_size` must be a multiple of `training.gpus`.*"
                r"received `training.batch_size=30` with `training.gpus=4`\. Use 28 or 32\.")
    with pytest.raises(ConfigError, match=expected) as raised:
        RunConfig().replace(**{"training.gpus": 4, "training.batch_size": 30})
    assert raised.value.field == "training.batch_size"
    with pytest.raises(ConfigError, match=r"`training.gpus` must be ≥ 0 and ≤ 64"):
        RunConfig().replace(**{"training.gpus": 65})
    # A config written before the setting existed reads as one device.
    assert RunConfig.from_dict({"training": {"epochs": 3}}).training.gpus == 0
    assert training_devices(0).strategy is None
