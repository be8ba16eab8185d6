"""Phase 1 on cached backbone features: same model and contract as the end-to-end path, computed once."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import runfiles
from engine.config import RunConfig
from engine.data import scan_dataset
from engine.features import feature_cache_key
from engine.runs import create_run
from engine.status import State
from engine.train import run_training
from tests.conftest import RUN_FILES, tiny_config

pytestmark = pytest.mark.training


def train(config, tmp_path):
    run_dir = create_run(config, tmp_path / "runs")
    state = run_training(run_dir)
    assert state is State.FINISHED, runfiles.read_json(run_dir / "status.json")
    return run_dir


def feature_files() -> dict:
    """The feature cache's arrays, by file name, with their modification times."""
    folder = Path(os.environ["TRANSFER_STUDIO_CACHE"]) / "features"
    if not folder.is_dir():
        return {}
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*.npy")}


def load_feature_arrays() -> list:
    folder = Path(os.environ["TRANSFER_STUDIO_CACHE"]) / "features"
    return [np.load(path) for path in sorted(folder.glob("*.npy"))]


def test_saved_full_model_agrees_with_the_head_on_cached_features(tiny_three_class_dataset, tmp_path):
    """model.keras is base + head; on raw images it gives what the head gave on the cached features."""
    from engine.calibration import apply_temperature
    from engine.features import build_feature_extractor
    from engine.images import load_rgb
    from engine.predict import load_run_model, run_temperature

    run_dir = train(tiny_config(tiny_three_class_dataset, **{"model.hidden_units": 8}), tmp_path)
    log = (run_dir / "worker.log").read_text()
    assert "Computing MobileNet features of" in log and "on cached features" in log
    model, classes, image_size = load_run_model(run_dir)
    assert model.get_layer("base").count_params() > 0, "model.keras must hold the base, not just the head"

    # predictions.csv came from the head on cached features (no fine-tuning ran).
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    images = np.stack([load_rgb(row["path"], image_size) for row in rows]).astype(np.float32)
    # predictions.csv holds calibrated probabilities: the same temperature turns the model's into them.
    from_model = apply_temperature(np.asarray(model.predict(images, verbose=0)), run_temperature(run_dir))
    from_head = np.array([[float(row[f"prob_{name}"]) for name in classes] for row in rows])
    np.testing.assert_allclose(from_model, from_head, atol=1e-4)

    # And the cached features (from a copy of the base with its batch norms folded) are what the
    # saved model's own base and pooling make, to float rounding.
    (cached,) = load_feature_arrays()
    split_rows = list(csv.DictReader(open(run_dir / "split.csv")))
    assert cached.shape[0] == len(split_rows)  # no augmentation: every image once, whatever its split
    # The cache holds one row per image in scan order (the image cache's rows).
    used = {row["path"] for row in split_rows}
    scan_order = [path for path in scan_dataset(tiny_three_class_dataset).candidates if path in used]
    extractor = build_feature_extractor(model, fold=False)
    recomputed = np.asarray(extractor.predict(
        np.stack([load_rgb(path, image_size) for path in scan_order]).astype(np.float32), verbose=0))
    np.testing.assert_allclose(recomputed, cached, atol=1e-4)


def test_a_run_changing_only_head_settings_reuses_the_features(tiny_dataset, tmp_path):
    first = train(tiny_config(tiny_dataset), tmp_path)
    cached = feature_files()
    assert len(cached) == 1

    second = train(tiny_config(tiny_dataset, **{
        "training.learning_rate": 0.001, "training.epochs": 3, "training.optimizer": "rmsprop",
        "model.dropout": 0.5, "training.batch_size": 4}), tmp_path)
    log = (second / "worker.log").read_text()
    assert "Backbone features found in the cache" in log
    assert "Computing MobileNet features" not in log and "Building MobileNet" in log
    assert feature_files() == cached, "the cached features must be reused, not rewritten"
    assert [event["epoch"] for event in runfiles.read_jsonl(second / "metrics.jsonl")
            if event["type"] == "epoch"] == [1, 2, 3]

    # Another split of the same folder uses the same images, so the same features.
    third = train(tiny_config(tiny_dataset, **{"data.split_seed": 7, "data.validation_fraction": 0.25}), tmp_path)
    assert "Backbone features found in the cache" in (third / "worker.log").read_text()
    assert feature_files() == cached
    assert (third / "split.csv").read_text() != (first / "split.csv").read_text()

    # Settings the features depend on make new ones.
    train(tiny_config(tiny_dataset, **{"model.image_size": 40}), tmp_path)
    assert len(feature_files()) == 2


def test_the_cache_key_covers_what_features_depend_on_and_nothing_else(tmp_path):
    weights_file = tmp_path / "base.weights.h5"
    weights_file.write_bytes(b"weights")
    base = RunConfig().replace(**{"data.path": "x", "model.backbone": "MobileNet", "model.alpha": 0.25,
                                  "model.weights": "none", "model.image_size": 96})
    key = feature_cache_key("images-1", base, [0, 1, 2])
    assert key == feature_cache_key("images-1", base.replace(**{
        "training.learning_rate": 0.1, "training.epochs": 99, "model.dropout": 0.5, "model.hidden_units": 64,
        "training.optimizer": "sgd", "training.class_weight": "balanced", "fine_tuning.layers": 5,
        "callbacks.early_stopping.enabled": True, "augmentation.flip": "horizontal"}), [0, 1, 2])
    different = {
        "other images": feature_cache_key("images-2", base, [0, 1, 2]),
        "other rows": feature_cache_key("images-1", base, [0, 1]),
        "backbone": feature_cache_key("images-1", base.replace(**{"model.backbone": "MobileNetV2",
                                                                   "model.alpha": 0.35}), [0, 1, 2]),
        "alpha": feature_cache_key("images-1", base.replace(**{"model.alpha": 0.5}), [0, 1, 2]),
        "image size": feature_cache_key("images-1", base.replace(**{"model.image_size": 128}), [0, 1, 2]),
        "random weights seed": feature_cache_key("images-1", base.replace(**{"training.seed": 7}), [0, 1, 2]),
        "weights file": feature_cache_key("images-1", base.replace(**{"model.weights": str(weights_file)}),
                                          [0, 1, 2]),
    }
    assert key not in different.values() and len(set(different.values())) == len(different)
    weights_key = different["weights file"]
    weights_file.write_bytes(b"other weights")
    assert feature_cache_key("images-1", base.replace(**{"model.weights": str(weights_file)}), [0, 1]) != weights_key

    augmented = base.replace(**{"augmentation.flip": "horizontal"})
    views = feature_cache_key("images-1", augmented, [0, 1, 2], views=5)
    assert views != key
    assert views != feature_cache_key("images-1", augmented.replace(**{"augmentation.rotation": 0.1}), [0, 1, 2], 5)
    assert views != feature_cache_key("images-1", augmented, [0, 1, 2], views=3)
    assert views != feature_cache_key("images-1", augmented.replace(**{"training.seed": 1}), [0, 1, 2], 5)
    # An in-memory image cache has no key, so nothing derived from it is cached on disk.
    assert feature_cache_key(None, base, [0, 1, 2]) is None


def test_augmentation_trains_on_k_precomputed_views_and_evaluates_on_clean_features(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, **{"augmentation.flip": "horizontal", "augmentation.rotation": 0.2,
                                          "augmentation.zoom": 0.2, "augmentation.views": 3})
    run_dir = train(config, tmp_path)
    assert "3 augmented views of each training image" in (run_dir / "worker.log").read_text()
    split_rows = list(csv.DictReader(open(run_dir / "split.csv")))
    train_count = sum(row["split"] == "train" for row in split_rows)
    arrays = {array.ndim: array for array in load_feature_arrays()}
    views, clean = arrays[3], arrays[2]
    assert views.shape[:2] == (3, train_count)
    assert clean.shape[0] == len(split_rows)  # every image once, never augmented
    scale = np.abs(views).max()  # features of a random-weight base are tiny; compare relative to them

    def differ(first, second):
        return np.abs(first - second).max() > 1e-3 * scale

    assert differ(views[0], views[1]) and differ(views[1], views[2]) and differ(views[0], views[2])

    # The un-augmented features match a run without augmentation, computed afresh.
    shutil.rmtree(Path(os.environ["TRANSFER_STUDIO_CACHE"]) / "features")
    train(tiny_config(tiny_dataset), tmp_path)
    (plain,) = load_feature_arrays()
    np.testing.assert_allclose(plain, clean, atol=1e-5)


def test_the_slow_path_stays_available_with_the_same_run_folder_and_events(tiny_dataset, tmp_path):
    fast = train(tiny_config(tiny_dataset), tmp_path)
    shutil.rmtree(Path(os.environ["TRANSFER_STUDIO_CACHE"]) / "features")
    slow = train(tiny_config(tiny_dataset, **{"training.cached_features": False}), tmp_path)
    assert feature_files() == {}, "the slow path computes no cached features"
    assert "every image through the base every epoch" in (slow / "worker.log").read_text()
    for run_dir in (fast, slow):
        for name in RUN_FILES:
            assert (run_dir / name).is_file(), (run_dir, name)

    def event_shapes(run_dir):
        events = runfiles.read_jsonl(run_dir / "metrics.jsonl")
        return {(event["type"], tuple(sorted(event))) for event in events}

    assert event_shapes(fast) == event_shapes(slow)


def test_checkpoint_and_best_model_are_full_models_and_a_head_checkpoint_resumes(tiny_dataset, tmp_path):
    """A run killed after epoch 2 of 4 on cached features resumes from its head checkpoint at epoch 3."""
    import keras

    import engine.layers  # noqa: F401 - registers our layers for safe-mode loading

    config = tiny_config(tiny_dataset, **{"callbacks.checkpoint.enabled": True})
    interrupted = train(config, tmp_path)
    state = runfiles.read_json(interrupted / "checkpoint.json")
    assert state["epoch"] == 2 and state["phase"] == 1 and state["model"] == "head"
    best = keras.models.load_model(interrupted / "best.keras", safe_mode=True)
    assert best.get_layer("base").count_params() > 0, "best.keras must be the full model"

    # The same folder as if the worker had died after epoch 2 of 4.
    run_dir = create_run(config.replace(**{"training.epochs": 4}), tmp_path / "runs")
    for name in ("checkpoint.keras", "checkpoint.json", "split.csv", "data_report.json", "metrics.jsonl"):
        shutil.copy(interrupted / name, run_dir / name)
    assert run_training(run_dir) is State.FINISHED
    events = runfiles.read_jsonl(run_dir / "metrics.jsonl")
    assert [event["epoch"] for event in events if event["type"] == "resume"] == [2]
    assert [event["epoch"] for event in events if event["type"] == "epoch"] == [1, 2, 3, 4]
    assert "Backbone features found in the cache" in (run_dir / "worker.log").read_text()
    assert runfiles.read_json(run_dir / "status.json")["message"].startswith("Finished after 4 epochs")


def test_fine_tuning_after_cached_features_trains_the_full_model(tiny_dataset, tmp_path):
    run_dir = train(tiny_config(tiny_dataset, **{"fine_tuning.layers": 5, "fine_tuning.epochs": 2}), tmp_path)
    epochs = [(event["phase"], event["epoch"]) for event in runfiles.read_jsonl(run_dir / "metrics.jsonl")
              if event["type"] == "epoch"]
    assert epochs == [(1, 1), (1, 2), (2, 3), (2, 4)]
    state = runfiles.read_json(run_dir / "checkpoint.json")
    # Phase 2 trained on cached activations: its checkpoint is the base above the cut with the head.
    assert state["phase"] == 2 and state["model"] == "top"


def test_feature_dataset_draws_each_image_once_an_epoch_with_a_fresh_view_each_time():
    from engine.features import make_feature_dataset

    view_count, count = 3, 50
    # Feature (view, image): the view number and the image number, so each batch can be checked.
    features = np.stack([np.stack([np.full(count, view), np.arange(count)], axis=1) for view in range(view_count)])
    labels = np.arange(count) % 2
    dataset = make_feature_dataset(features.astype(np.float32), labels, batch_size=8, shuffle=True, seed=3)

    epochs = []
    for _ in range(4):
        drawn = [(int(view), int(image), int(label)) for batch_features, batch_labels in dataset
                 for (view, image), label in zip(batch_features.numpy(), batch_labels.numpy())]
        assert sorted(image for _, image, _ in drawn) == list(range(count))  # every image once an epoch
        assert all(label == image % 2 for _, image, label in drawn)  # labels travel with their images
        epochs.append(drawn)
    assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled and redrawn each epoch
    assert {view for epoch in epochs for view, _, _ in epoch} == set(range(view_count))
    again = make_feature_dataset(features.astype(np.float32), labels, batch_size=8, shuffle=True, seed=3)
    first = [(int(view), int(image)) for batch_features, _ in again for view, image in batch_features.numpy()]
    assert first == [(view, image) for view, image, _ in epochs[0]]  # the seed decides it all
