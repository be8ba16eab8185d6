"""A new user's first run, offline: the digits sample with the Train page's defaults clears 0.93.

The time target (under two minutes) is measured by bench/first_run.py, not asserted here.
"""

import numpy as np
import pytest

from engine import runfiles
from engine.config import RunConfig, with_offline_backbone
from engine.runs import create_run
from engine.samples import ensure_sample
from engine.status import State
from engine.train import run_training

pytestmark = pytest.mark.training


def test_digits_with_the_default_settings_reaches_093_with_real_imagenet_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_DATA", str(tmp_path / "data"))
    data = ensure_sample("digits")
    config = with_offline_backbone(RunConfig()).replace(**{"data.path": str(data.resolve())})
    # What the Train page preselects on a fresh install: the backbone whose weights come with the app.
    assert (config.model.backbone, config.model.weights) == ("EfficientNetLite0", "imagenet")
    run_dir = create_run(config, tmp_path / "runs")
    assert run_training(run_dir) is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    validation = runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]
    print(f"digits, defaults: validation accuracy {validation['accuracy']:.3f}")
    assert validation["accuracy"] >= 0.93
    assert np.array(validation["confusion_matrix"]).shape == (10, 10)
    epochs = [event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "epoch"]
    assert len(epochs) == config.training.epochs  # the live curves have a point per epoch
