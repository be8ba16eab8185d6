"""Leakage found by the data doctor is written into the run's data_report.json and shown on Monitor."""

import shutil

import pytest

from engine import runfiles
from engine.config import RunConfig
from engine.interpret import data_findings
from engine.runs import create_run
from engine.status import State
from engine.train import run_training
from tests.conftest import make_dataset, open_page

pytestmark = pytest.mark.training


def train_split_folder(root, runs):
    config = RunConfig().replace(**{"data.path": str(root), "model.backbone": "MobileNet", "model.alpha": 0.25,
                                    "model.weights": "none", "model.image_size": 32, "training.epochs": 1,
                                    "training.batch_size": 8, "data.cache": "memory"})
    run_dir = create_run(config, runs)
    assert run_training(run_dir) is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    return run_dir


def test_a_validation_copy_of_a_training_image_is_reported_and_shown(app_environment, monkeypatch, tmp_path):
    data = make_dataset(tmp_path / "leaky", per_class=8, split=True)
    leaked = data / "validation" / "cats" / "copy_of_cats_0.jpg"
    shutil.copy(data / "train" / "cats" / "cats_0.jpg", leaked)
    run_dir = train_split_folder(data, tmp_path / "runs")

    doctor = runfiles.read_json(run_dir / "data_report.json")["doctor"]
    assert doctor["checked"] and doctor["num_leaks"] >= 1
    pair = next(leak for leak in doctor["leakage"] if str(leaked) in leak["paths"])
    assert pair["exact"] and pair["splits"] == ["train", "validation"]
    findings = data_findings(run_dir)
    assert findings["num_leaks"] == doctor["num_leaks"] and "too optimistic" in findings["sentence"]

    monkeypatch.setenv("TRANSFER_STUDIO_RUNS", str(tmp_path / "runs"))
    monitor = open_page("app_pages/monitor.py")
    assert not monitor.exception, monitor.exception
    assert any("same or nearly the same picture" in warning.value for warning in monitor.warning)


def test_a_clean_split_says_so_and_an_old_run_is_not_claimed_checked(tmp_path):
    run_dir = train_split_folder(make_dataset(tmp_path / "clean", per_class=8, split=True), tmp_path / "runs")
    findings = data_findings(run_dir)
    assert findings["checked"] and findings["num_leaks"] == 0 and "No validation or test image" in findings["sentence"]

    report = runfiles.read_json(run_dir / "data_report.json")
    del report["doctor"]  # as a run trained before the check
    runfiles.atomic_write_json(run_dir / "data_report.json", report)
    assert data_findings(run_dir)["checked"] is False
