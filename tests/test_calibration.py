"""How sure the model is: temperature scaling, calibration error, and the run's operating point."""

import csv

import numpy as np
import pytest

from engine import runfiles
from engine.calibration import (apply_temperature, calibration_report, expected_calibration_error,
                                fit_temperature, reliability_bins)
from engine.operating_point import (NOT_SURE, Decision, binary_curves, confusion_at, decide,
                                    per_class_precision_recall, read_decision, save_decision, verdict)
from engine.users import Role, User


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def overconfident_sample(count=4000, classes=3, overconfidence=3.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports softmax(z × overconfidence)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(count, classes))
    truth = np.array([rng.choice(classes, p=row) for row in softmax(logits)])
    return softmax(logits * overconfidence), truth


def test_temperature_keeps_the_ranking_and_one_is_the_identity():
    probabilities, _ = overconfident_sample(200)
    softened = apply_temperature(probabilities, 2.5)
    assert np.array_equal(softened.argmax(axis=1), probabilities.argmax(axis=1))
    assert np.allclose(softened.sum(axis=1), 1.0)
    assert softened.max(axis=1).mean() < probabilities.max(axis=1).mean()
    assert np.array_equal(apply_temperature(probabilities, 1.0), probabilities)


def test_two_class_temperature_is_the_sigmoid_of_the_scaled_logit():
    positive = np.array([0.1, 0.5, 0.8, 0.99])
    scaled = apply_temperature(np.stack([1 - positive, positive], axis=1), 2.0)[:, 1]
    logit = np.log(positive / (1 - positive))
    assert scaled == pytest.approx(1 / (1 + np.exp(-logit / 2.0)), abs=1e-9)


def test_the_fitted_temperature_undoes_a_known_overconfidence():
    probabilities, truth = overconfident_sample(overconfidence=3.0)
    temperature = fit_temperature(probabilities, truth)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert fit_temperature(*overconfident_sample(overconfidence=1.0, seed=1)) == pytest.approx(1.0, rel=0.15)


def test_expected_calibration_error_by_hand():
    # Ten images all "90 % sure", five right: one bin, |0.5 − 0.9| = 0.4.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    truth = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.4)
    table = reliability_bins(probabilities, truth)
    assert len(table) == 15 and sum(row["count"] for row in table) == 10
    (full,) = [row for row in table if row["count"]]
    assert full["lower"] < 0.9 <= full["upper"] and full["accuracy"] == 0.5 and full["confidence"] == pytest.approx(0.9)
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0)) is None


def test_the_report_says_which_number_is_which_and_calibration_helps():
    probabilities, truth = overconfident_sample(overconfidence=3.0)
    held_out, held_out_truth = overconfident_sample(overconfidence=3.0, seed=5)
    report = calibration_report(probabilities, truth, {"test": (held_out, held_out_truth)})
    assert report["fitted_on"] == "validation" and report["bins"] == 15
    errors = report["expected_calibration_error"]
    assert errors["calibrated"] < errors["uncalibrated"]
    test_errors = report["splits"]["test"]["expected_calibration_error"]
    assert test_errors["calibrated"] < test_errors["uncalibrated"]
    assert len(report["reliability"]["calibrated"]) == 15


def test_decide_with_a_threshold_and_a_minimum_confidence():
    probabilities = np.array([[0.7, 0.3], [0.45, 0.55], [0.1, 0.9]])
    answered, sure = decide(probabilities, Decision())
    assert answered.tolist() == [0, 1, 1] and sure.all()
    answered, _ = decide(probabilities, Decision(threshold=0.25))
    assert answered.tolist() == [1, 1, 1]
    answered, sure = decide(probabilities, Decision(minimum_confidence=0.6))
    assert answered.tolist() == [0, 1, 1] and sure.tolist() == [True, False, True]
    assert verdict([0.45, 0.55], ["cats", "dogs"], Decision(minimum_confidence=0.6)) == (NOT_SURE, False)
    assert verdict([0.1, 0.9], ["cats", "dogs"], Decision(minimum_confidence=0.6)) == ("dogs", True)


def test_confusion_at_an_operating_point_keeps_not_sure_apart():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    truth = np.array([0, 1, 1, 0])
    plain = confusion_at(probabilities, truth, Decision(), 2)
    assert plain["matrix"] == [[1, 1], [1, 1]] and plain["coverage"] == 1.0
    shifted = confusion_at(probabilities, truth, Decision(threshold=0.35, minimum_confidence=0.65), 2)
    # 0.6/0.4 → class 1 at 40 %: not sure; 0.3/0.7 → 1 (70 %); 0.9/0.1 → 0; 0.2/0.8 → 1.
    assert shifted["matrix"] == [[1, 1], [0, 1]] and shifted["not_sure"] == [0, 1]
    assert shifted["coverage"] == 0.75 and shifted["accuracy"] == pytest.approx(2 / 3)


def test_curves_for_two_classes_and_per_class():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 300)
    positive = np.clip(truth * 0.4 + rng.uniform(0, 0.6, 300), 0, 1)
    curves = binary_curves(np.stack([1 - positive, positive], axis=1), truth)
    assert 0.5 < curves["roc_auc"] <= 1.0 and 0.5 < curves["average_precision"] <= 1.0
    pr = curves["precision_recall"]
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["threshold"])
    assert max(curves["roc"]["threshold"]) <= 1.0  # no infinity in JSON
    assert binary_curves(np.array([[0.4, 0.6]]), np.array([1]))["roc"] is None

    probabilities, labels = overconfident_sample(300)
    per_class = per_class_precision_recall(probabilities, labels, ["a", "b", "c"])
    assert set(per_class) == {"a", "b", "c"} and all(0 < curve["average_precision"] <= 1 for curve in per_class.values())


def finished_run(tmp_path, classes=("cats", "dogs"), owner=None):
    """A run folder as training leaves it, without training: status, labels."""
    from engine.config import RunConfig
    from engine.runs import create_run
    from engine.status import Stage, State, transition

    run_dir = create_run(RunConfig().replace(**{"data.path": str(tmp_path)}), tmp_path / "runs",
                         owner=owner or User("local:me", "me", role=Role.ADMIN))
    runfiles.atomic_write_json(run_dir / runfiles.LABELS_FILE, {"classes": list(classes)})
    transition(run_dir, State.RUNNING, stage=Stage.STARTING, message="Starting.")
    transition(run_dir, State.FINISHED, stage=Stage.DONE, message="Finished.")
    return run_dir


def test_the_operating_point_round_trips_and_only_the_owner_may_set_it(tmp_path):
    owner = User("issuer|ann", "Ann", role=Role.MEMBER)
    run_dir = finished_run(tmp_path, owner=owner)
    assert read_decision(run_dir) == Decision()
    saved = save_decision(run_dir, threshold=0.3, minimum_confidence=0.7, user=owner)
    assert read_decision(run_dir) == saved == Decision(0.3, 0.7)
    with pytest.raises(PermissionError, match="Ann"):
        save_decision(run_dir, threshold=0.9, user=User("issuer|bob", "Bob", role=Role.MEMBER))
    with pytest.raises(PermissionError, match="viewer"):
        save_decision(run_dir, threshold=0.9, user=User("issuer|vic", "Vic", role=Role.VIEWER))
    save_decision(run_dir, threshold=0.9, user=User("issuer|ada", "Ada", role=Role.ADMIN))
    assert read_decision(run_dir).threshold == 0.9
    with pytest.raises(ValueError, match="threshold"):
        save_decision(run_dir, threshold=1.5, user=owner)
    audit = (tmp_path / "runs" / "audit.jsonl").read_text()
    assert "set_operating_point" in audit


def test_a_threshold_needs_two_classes(tmp_path):
    run_dir = finished_run(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(ValueError, match="two-class"):
        save_decision(run_dir, threshold=0.4)
    assert save_decision(run_dir, minimum_confidence=0.5) == Decision(None, 0.5)


@pytest.mark.training
def test_a_trained_run_is_calibrated_and_predictions_obey_its_operating_point(tiny_dataset, tmp_path):
    from engine import train_run
    from engine.calibration import apply_temperature as scale
    from engine.predict import predict_images, run_temperature
    from tests.conftest import tiny_config

    run_dir = train_run(tiny_config(tiny_dataset), tmp_path / "runs")
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    calibration = evaluation["calibration"]
    assert calibration["temperature"] == run_temperature(run_dir) > 0
    assert set(calibration["expected_calibration_error"]) == {"uncalibrated", "calibrated"}
    assert "test" in calibration["splits"]

    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    path = rows[0]["path"]
    (plain,) = predict_images(run_dir, [path], top_k=2)
    saved = [float(rows[0]["prob_cats"]), float(rows[0]["prob_dogs"])]
    # Prediction shows the same calibrated probabilities as predictions.csv.
    assert [plain["probabilities"]["cats"], plain["probabilities"]["dogs"]] == pytest.approx(saved, abs=1e-4)
    assert plain["sure"] and plain["verdict"] == plain["top"][0]["class"]

    save_decision(run_dir, minimum_confidence=1.0)
    (doubtful,) = predict_images(run_dir, [path], top_k=2)
    assert doubtful["verdict"] == NOT_SURE and doubtful["sure"] is False
    # Undoing the temperature gives back the raw probabilities, which predict shows uncalibrated nowhere.
    raw = scale(np.array([saved]), 1 / calibration["temperature"])[0]
    assert raw.sum() == pytest.approx(1.0)


def test_the_cli_shows_and_sets_the_operating_point_keeping_what_is_not_given(tmp_path):
    import json

    from tests.conftest import run_cli

    run_dir = finished_run(tmp_path)
    runs = tmp_path / "runs"
    shown = run_cli("operating-point", "--run", run_dir.name, "--runs-dir", runs)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["threshold"] is None
    assert run_cli("operating-point", "--run", run_dir.name, "--runs-dir", runs, "--minimum-confidence", "0.6").returncode == 0
    changed = run_cli("operating-point", "--run", run_dir.name, "--runs-dir", runs, "--threshold", "0.4")
    assert json.loads(changed.stdout)["minimum_confidence"] == 0.6 and json.loads(changed.stdout)["threshold"] == 0.4
    assert read_decision(run_dir) == Decision(0.4, 0.6)
    refused = run_cli("operating-point", "--run", run_dir.name, "--runs-dir", runs, "--threshold", "2")
    assert refused.returncode == 2 and refused.stderr.startswith("error: `threshold` must be a number from 0")
