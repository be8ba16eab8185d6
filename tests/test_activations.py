"""Phase 2 on cached activations (issue 17): the cut, the equivalence of the parts, the fallbacks.

The cut tests build backbones from random weights at their smallest size and check that the
base below the cut followed by the base above it is the base itself; the training tests run
tiny real fine-tuning runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import runfiles
from engine.status import State
from tests.conftest import make_dataset, tiny_config

# Layer counts tried on every backbone: one layer, the "last 20", and half the base.
COUNTS = ("one", 20, "half")


def base_of(name: str):
    """The backbone from random weights at its smallest image size."""
    from engine.backbones import BACKBONES, build_base

    spec = BACKBONES[name]
    alpha = spec.alphas[0] if spec.alphas else None
    return build_base(name, spec.min_image_size, alpha, "none")


def assert_the_parts_compose(base, cut):
    """Below-the-cut then above-the-cut gives the base's output; every layer above the requested cut is above the cut."""
    from engine.activations import bottom_model, crossing_tensors, top_of_base

    assert len(crossing_tensors(base, cut.index)) == 1
    assert cut.index <= cut.requested_index
    size = int(base.input_shape[1])
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    whole = np.asarray(base(images, training=False))
    below = bottom_model(base, cut)(images, training=False)
    assert tuple(below.shape[1:]) == cut.shape
    parts = np.asarray(top_of_base(base, cut)(below, training=False))
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    top_layers = {id(layer) for layer in top_of_base(base, cut).layers}
    assert all(id(layer) in top_layers for layer in base.layers[cut.requested_index:])


def test_mobilenet_is_cut_exactly_where_the_layer_count_says():
    from engine.activations import find_cut

    base = base_of("MobileNet")
    cut = find_cut(base, 20)
    # MobileNet v1 is a chain: every layer boundary is crossed by one tensor.
    assert cut.moved == 0 and cut.index == len(base.layers) - 20
    assert cut.producer == base.layers[cut.index - 1].name
    assert_the_parts_compose(base, cut)


def test_a_cut_inside_a_residual_block_moves_down_to_where_one_tensor_crosses():
    from engine.activations import crossing_tensors, find_cut

    base = base_of("MobileNetV2")
    layers = base.layers
    # The first count whose cut falls inside a block: the skip connection crosses it too.
    inside = next(count for count in range(2, len(layers)) if len(crossing_tensors(base, len(layers) - count)) > 1)
    cut = find_cut(base, inside)
    assert cut.moved > 0
    assert_the_parts_compose(base, cut)


def test_unfreezing_the_whole_base_cuts_at_its_input():
    from engine.activations import find_cut

    base = base_of("MobileNet")
    cut = find_cut(base, 10_000)
    assert cut.index == 1 and cut.producer == base.layers[0].name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["EfficientNetLite0", "MobileNet", "MobileNetV2", "MobileNetV3Small",
                                  "MobileNetV3Large", "VGG16", "ResNet50", "ResNet50V2", "EfficientNetB0",
                                  "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetV2B0",
                                  "Xception", "InceptionV3", "DenseNet121", "ConvNeXtTiny"])
def test_every_registry_backbone_has_a_valid_cut(name):
    from engine.activations import find_cut

    base = base_of(name)
    for count in COUNTS:
        layer_count = {"one": 1, "half": len(base.layers) // 2}.get(count, count)
        cut = find_cut(base, layer_count)
        print(f"{name}: last {layer_count} of {len(base.layers)} layers → cut after {cut.producer} "
              f"{cut.shape}, moved {cut.moved}")
        assert_the_parts_compose(base, cut)


def test_the_registry_list_above_is_the_registry():
    from engine.backbones import BACKBONES

    marked = next(mark for mark in test_every_registry_backbone_has_a_valid_cut.pytestmark
                  if mark.name == "parametrize")
    assert sorted(marked.args[1]) == sorted(BACKBONES)


def train(config, runs_dir):
    import engine

    run_dir = engine.train_run(config, runs_dir=runs_dir)
    status = runfiles.read_json(run_dir / "status.json")
    assert status["state"] == State.FINISHED.value, status
    return run_dir


@pytest.fixture
def fine_tuning_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_CACHE", str(tmp_path / "cache"))
    return make_dataset(tmp_path / "data", per_class=16)


FINE_TUNING = {"training.epochs": 2, "fine_tuning.layers": 12, "fine_tuning.epochs": 2,
               "fine_tuning.learning_rate": 1e-3, "model.image_size": 48}
# Real ImageNet weights where the activations' values matter: a random-weight MobileNet's activations
# near its top are about 1e-11, below float16's smallest number, so they would all be cached as 0.
REAL_WEIGHTS = {"model.weights": "imagenet"}


@pytest.mark.training
@pytest.mark.real_data
def test_the_whole_model_gives_what_the_top_gives_on_the_cached_activations(fine_tuning_data, tmp_path,
                                                                             keras_home_with_mobilenet):
    import keras

    from engine.activations import build_activation_extractor, build_top_model, find_cut
    from engine.modeling import BASE_LAYER_NAME

    run_dir = train(tiny_config(fine_tuning_data, **FINE_TUNING, **REAL_WEIGHTS), tmp_path / "runs")
    log = (run_dir / "worker.log").read_text()
    # Phase 1's feature pass computed them on the way; phase 2 did not run the base again.
    assert "and on the way the frozen layers' output for phase 2" in log
    assert "Computing the frozen layers' output" not in log and "on cached activations at" in log
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    cut = find_cut(model.get_layer(BASE_LAYER_NAME), FINE_TUNING["fine_tuning.layers"])
    top = build_top_model(model, cut)
    images = np.random.default_rng(1).uniform(0, 255, (6, 48, 48, 3)).astype(np.float32)
    whole = model.predict(images, verbose=0)
    # In float32, without folding: the parts are the model.
    activations = build_activation_extractor(model, cut, fold=False).predict(images, verbose=0)
    np.testing.assert_allclose(top.predict(activations, verbose=0), whole, rtol=1e-5, atol=1e-6)
    # As cached (folded batch norms, float16): within float16's rounding.
    cached = build_activation_extractor(model, cut).predict(images, verbose=0).astype(np.float16)
    assert np.abs(cached).max() > 1e-2  # real values, not float16 zeros
    assert np.max(np.abs(top.predict(cached.astype(np.float32), verbose=0) - whole)) < 1e-2

    # The run's cache holds the activations, and the same settings find them there.
    again = train(tiny_config(fine_tuning_data, **FINE_TUNING, **REAL_WEIGHTS), tmp_path / "runs")
    assert f"Activations at the output of {cut.producer}" in (again / "worker.log").read_text()
    assert "found in the cache" in (again / "worker.log").read_text().split("Activations at")[1]


@pytest.mark.training
def test_fully_random_augmentation_and_a_small_budget_fall_back_to_end_to_end(fine_tuning_data, tmp_path, monkeypatch):
    slow = train(tiny_config(fine_tuning_data, **FINE_TUNING, **{"training.cached_features": False}),
                 tmp_path / "runs")
    assert "every image through the whole base every epoch (fast features are off" in (slow / "worker.log").read_text()

    monkeypatch.setenv("TRANSFER_STUDIO_CACHE_BUDGET", "1KB")
    small = train(tiny_config(fine_tuning_data, **FINE_TUNING), tmp_path / "runs")
    log = (small / "worker.log").read_text()
    assert "more than half the cache budget" in log and "on cached activations" not in log
    assert runfiles.read_json(small / "checkpoint.json")["model"] == "full"


def test_one_pass_gives_what_the_feature_and_activation_extractors_give():
    """Including a cut between a convolution and its batch norm, which folding must then leave apart."""
    import keras

    from engine.activations import (build_activation_extractor, build_features_and_activations_extractor,
                                    find_cut)
    from engine.features import build_feature_extractor
    from engine.modeling import BASE_LAYER_NAME, build_model

    model = build_model(tiny_config("unused", **{"model.image_size": 48}), 2)
    base = model.get_layer(BASE_LAYER_NAME)
    rng = np.random.default_rng(3)
    # Freshly built batch norms are nearly the identity; random statistics make folding visible.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, variance.shape)])
    images = rng.uniform(0, 255, (4, 48, 48, 3)).astype(np.float32)
    expected_features = build_feature_extractor(model, fold=False).predict(images, verbose=0)
    for count in (2, 20):
        cut = find_cut(base, count)
        if count == 2:  # the last layers are conv_pw_13 → conv_pw_13_bn → relu: the cut is the convolution's output
            assert isinstance(base.get_layer(cut.producer), keras.layers.Conv2D)
        features, activations = build_features_and_activations_extractor(model, cut).predict(images, verbose=0)
        expected = build_activation_extractor(model, cut, fold=False).predict(images, verbose=0)
        np.testing.assert_allclose(activations, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_allclose(features, expected_features, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected_features).max())


@pytest.mark.training
@pytest.mark.real_data
def test_phase_one_computes_the_activations_on_the_way_for_the_same_augmented_views(fine_tuning_data, tmp_path,
                                                                                   keras_home_with_mobilenet):
    import os
    from pathlib import Path

    import keras

    from engine.activations import find_cut, top_of_base
    from engine.modeling import BASE_LAYER_NAME, POOL_LAYER_NAME

    # A fine-tuning rate so small that the base above the cut stays as it was when the activations were computed.
    settings = {**FINE_TUNING, **REAL_WEIGHTS, "fine_tuning.learning_rate": 1e-10, "augmentation.flip": "horizontal",
                "augmentation.rotation": 0.2, "augmentation.views": 2}
    run_dir = train(tiny_config(fine_tuning_data, **settings), tmp_path / "runs")
    log = (run_dir / "worker.log").read_text()
    assert "and on the way the frozen layers' output for phase 2" in log
    assert "Computing the frozen layers' output" not in log and "on cached activations at" in log

    arrays = {}
    for path in (Path(os.environ["TRANSFER_STUDIO_CACHE"]) / "features").glob("[!.]*.npy"):
        array = np.load(path)
        arrays[array.ndim] = array
    train_activations, feature_views = arrays[5], arrays[3]
    assert train_activations.shape[0] == feature_views.shape[0] == 2
    assert train_activations.dtype == np.float16 and train_activations.shape[1] == feature_views.shape[1]
    assert arrays[4].shape[1:] == train_activations.shape[2:]  # the validation images' activations

    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    base = model.get_layer(BASE_LAYER_NAME)
    top = top_of_base(base, find_cut(base, settings["fine_tuning.layers"]))
    pool = model.get_layer(POOL_LAYER_NAME)
    from_activations = [np.asarray(pool(top(view.astype(np.float32), training=False))) for view in train_activations]
    scale = np.abs(feature_views).max()
    same = max(np.abs(from_activations[view] - feature_views[view]).max() for view in range(2))
    crossed = max(np.abs(from_activations[view] - feature_views[1 - view]).max() for view in range(2))
    # Each view's activations lead to that view's features (within float16 rounding), not the other view's.
    assert same < 2e-2 * scale and same < crossed / 5, (same, crossed, scale)
