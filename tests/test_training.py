"""Training end to end on tiny generated images with `weights none`: the run folder is the contract."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engine import runfiles
from engine.config import RunConfig
from engine.runs import create_run, get_run, list_runs
from engine.status import State
from engine.train import run_training
from tests.conftest import RUN_FILES, make_dataset, tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.training

def train(config, tmp_path):
    run_dir = create_run(config, tmp_path / "runs")
    state = run_training(run_dir)
    return run_dir, state


def test_run_folder_holds_every_file_with_the_documented_content(tiny_dataset, tmp_path):
    run_dir, state = train(tiny_config(tiny_dataset), tmp_path)
    assert state is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{name} missing"

    status = runfiles.read_json(run_dir / "status.json")
    assert status["state"] == "finished" and status["epoch"] == 2 and "validation accuracy" in status["message"]
    assert status["stage"] == "done" and status["best_val_accuracy"] is not None and status["backbone"] == "MobileNet"
    assert RunConfig.load(run_dir / "config.json") == tiny_config(tiny_dataset)

    split_rows = list(csv.DictReader(open(run_dir / "split.csv")))
    assert {row["split"] for row in split_rows} == {"train", "validation", "test"}
    assert len(split_rows) == 24

    events = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    batches = [event for event in events if event["type"] == "batch"]
    epochs = [event for event in events if event["type"] == "epoch"]
    assert [event["epoch"] for event in epochs] == [1, 2]
    for key in ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate",
                "elapsed_seconds", "images_per_second"):
        assert key in epochs[-1], key
    assert batches and all(key in batches[0] for key in ("step", "steps", "loss", "images_per_second", "eta_seconds"))

    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    assert set(evaluation["splits"]) == {"validation", "test"}
    validation = evaluation["splits"]["validation"]
    assert np.array(validation["confusion_matrix"]).sum() == validation["num_images"] == 2
    assert set(validation["per_class"]["cats"]) == {"precision", "recall", "f1", "support"}
    assert runfiles.read_json(run_dir / "labels.json") == {"classes": ["cats", "dogs"]}

    summary = get_run(run_dir)
    assert summary.state is State.FINISHED and summary.backbone == "MobileNet"
    assert [run.run_id for run in list_runs(tmp_path / "runs")] == [run_dir.name]


def test_saved_model_takes_raw_images_and_agrees_with_predictions_csv(tiny_dataset, tmp_path):
    from engine.calibration import apply_temperature
    from engine.images import load_rgb
    from engine.predict import load_run_model, predict_images, run_temperature

    run_dir, state = train(tiny_config(tiny_dataset), tmp_path)
    assert state is State.FINISHED
    model, classes, image_size = load_run_model(run_dir)
    assert image_size == 32
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    assert {row["split"] for row in rows} == {"validation", "test"}
    for row in rows:
        raw = load_rgb(row["path"], 32).astype(np.float32)[None]  # 0–255, no preprocessing outside
        assert raw.max() > 1.0
        positive = float(np.asarray(model(raw, training=False)).reshape(-1)[0])  # one sigmoid unit = P(dogs)
        saved = [float(row["prob_cats"]), float(row["prob_dogs"])]
        # predictions.csv holds the model's probabilities calibrated with the run's temperature.
        calibrated = apply_temperature(np.array([[1.0 - positive, positive]]), run_temperature(run_dir))[0]
        assert calibrated[1] == pytest.approx(saved[1], abs=1e-4)
        assert row["predicted"] == classes[int(np.argmax(saved))]
    predictions = predict_images(run_dir, [rows[0]["path"]], top_k=2)
    assert predictions[0]["top"][0]["probability"] >= predictions[0]["top"][1]["probability"]
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0)


def test_three_classes_with_every_callback_augmentation_and_class_weights(tiny_three_class_dataset, tmp_path):
    config = tiny_config(tiny_three_class_dataset, **{
        "training.epochs": 3, "training.class_weight": "balanced", "training.optimizer": "sgd",
        "augmentation.flip": "horizontal", "augmentation.rotation": 0.1, "augmentation.zoom": 0.1,
        "augmentation.contrast": 0.1, "model.hidden_units": 16,
        "callbacks.early_stopping.enabled": True, "callbacks.early_stopping.patience": 1,
        "callbacks.checkpoint.enabled": True, "callbacks.reduce_lr.enabled": True,
        "callbacks.reduce_lr.patience": 0, "data.cache": "memory",
    })
    run_dir, state = train(config, tmp_path)
    assert state is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    assert (run_dir / "best.keras").is_file()
    evaluation = runfiles.read_json(run_dir / "evaluation.json")
    assert np.array(evaluation["splits"]["test"]["confusion_matrix"]).shape == (3, 3)
    header = next(csv.reader(open(run_dir / "predictions.csv")))
    assert header == ["path", "split", "true", "predicted", "prob_birds", "prob_cats", "prob_dogs"]


def test_fine_tuning_counts_epochs_on_and_keeps_batchnorm_frozen(tiny_dataset, tmp_path):
    import keras

    from engine.modeling import build_model, unfreeze_top_layers

    run_dir, state = train(tiny_config(tiny_dataset, **{
        "training.epochs": 2, "fine_tuning.layers": 10, "fine_tuning.epochs": 2}), tmp_path)
    assert state is State.FINISHED
    epochs = [event for event in runfiles.read_jsonl(run_dir / "metrics.jsonl") if event["type"] == "epoch"]
    assert [(event["phase"], event["epoch"]) for event in epochs] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert epochs[-1]["learning_rate"] == pytest.approx(1e-5)

    model = build_model(tiny_config(tiny_dataset), 2)
    base = model.get_layer("base")
    assert not any(layer.trainable_weights for layer in base.layers)
    unfreeze_top_layers(model, 10)
    top = base.layers[-10:]
    assert any(layer.trainable_weights for layer in top)
    assert all(not layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert all(not layer.trainable_weights for layer in base.layers[:-10])


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("recipe*.yaml")))
def test_recipe_configs_run_end_to_end_with_random_weights(name, tiny_three_class_dataset, tmp_path):
    config = RunConfig.load(CONFIGS / name).replace(**{
        "data.path": str(tiny_three_class_dataset), "model.weights": "none", "model.image_size": 32,
        "training.epochs": 1, "fine_tuning.epochs": 1, "training.batch_size": 8,
    })
    run_dir, state = train(config, tmp_path)
    assert state is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    assert (run_dir / "model.keras").is_file() and (run_dir / "evaluation.json").is_file()


def test_a_bad_file_is_excluded_and_the_rest_still_trains(tiny_dataset, tmp_path):
    (tiny_dataset / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run_dir, state = train(tiny_config(tiny_dataset), tmp_path)
    assert state is State.FINISHED
    report = runfiles.read_json(run_dir / "data_report.json")
    assert [Path(item["path"]).name for item in report["excluded"]] == ["broken.jpg"]
    assert "broken.jpg" not in (run_dir / "split.csv").read_text()
    assert sum(report["split_counts"]["train"].values()) == 20


def test_a_failed_run_keeps_its_status_and_log(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "one_class", classes=("cats",), per_class=4)
    run_dir, state = train(tiny_config(data), tmp_path)
    assert state is State.FAILED
    status = runfiles.read_json(run_dir / "status.json")
    assert status["state"] == "failed"
    assert "At least two classes" in status["message"] and "\n" not in status["message"]
    assert "Traceback" in (run_dir / "worker.log").read_text()
    assert json.loads((run_dir / "config.json").read_text())["data"]["path"] == str(data)


@pytest.mark.training
def test_a_run_writes_tensorboard_event_files_with_its_epochs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine import train_run

    data = make_dataset(tmp_path / "data", per_class=10)
    run_dir = train_run(tiny_config(data, **{"training.epochs": 3, "data.cache": "memory"}), tmp_path / "runs")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    assert {"epoch/loss", "epoch/val_accuracy", "epoch/learning_rate", "batch/loss"} <= tags, tags
    values = events.Tensors("epoch/val_accuracy")
    assert [value.step for value in values] == [1, 2, 3]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recorded = [event["val_accuracy"] for event in epochs if event["type"] == "epoch"]
    from tensorflow import make_ndarray

    assert [float(make_ndarray(value.tensor_proto)) for value in values] == pytest.approx(recorded, abs=1e-6)
