"""Grad-CAM (engine/gradcam.py): maps for every backbone, the overlay, the central-share measure, real data."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.backbones import BACKBONES
from engine.config import RunConfig
from engine.gradcam import (central_share, class_activation_maps, colourise, explain_images, is_blank,
                            maps_and_classes, overlay)
from tests.conftest import make_dataset, run_cli, tiny_config

# Most backbones shrink the image 32 times, so 64 pixels is the smallest input whose last map is
# 2×2 (a 1×1 map cannot localise anything). Xception's smallest input (71) gives 3×3;
# InceptionV3 needs 107 for 2×2.
SMALLEST_SIZE_WITH_A_MAP = {"Xception": 71, "InceptionV3": 107}
# Kept in the default run: a plain backbone, and one that normalises inside itself.
REPRESENTATIVE = ["MobileNet", "EfficientNetB0"]


def sweep_size(name):
    return max(SMALLEST_SIZE_WITH_A_MAP.get(name, 64), BACKBONES[name].min_image_size)


def random_model(backbone, num_classes, image_size, **overrides):
    """A run's model, as `engine.modeling.build_model` makes it, from random weights."""
    from engine.modeling import build_model

    spec = BACKBONES[backbone]
    values = {"data.path": "unused", "model.backbone": backbone, "model.weights": "none",
              "model.image_size": image_size, "model.alpha": spec.alphas[0] if spec.alphas else None}
    values.update(overrides)
    return build_model(RunConfig().replace(**values), num_classes)


def noise_images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype(np.uint8)


def check_maps_of_backbone(name):
    size = sweep_size(name)
    images = noise_images(3, size)
    started = time.perf_counter()
    for num_classes in (2, 3):
        model = random_model(name, num_classes, size)
        feature_map = model.get_layer("base").output.shape
        assert feature_map[1] >= 2 and feature_map[2] >= 2, f"{name} at {size} px gives a {feature_map} map"
        heatmaps = class_activation_maps(model, images)
        assert heatmaps.shape == (3, size, size) and heatmaps.dtype == np.float32
        assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
        for heatmap in heatmaps:
            assert heatmap.max() - heatmap.min() > 0.1, f"{name}, {num_classes} classes: a constant map"
            assert heatmap.max() == pytest.approx(1.0)
    print(f"Grad-CAM {name} at {size} px, two and three classes: {time.perf_counter() - started:.1f} s")


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_backbones_give_input_sized_varying_maps(name):
    check_maps_of_backbone(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(BACKBONES) - set(REPRESENTATIVE)))
def test_every_backbone_gives_input_sized_varying_maps(name):
    check_maps_of_backbone(name)


def test_map_is_the_class_activation_map_of_the_linear_head():
    """Without a hidden layer, Grad-CAM equals CAM (Zhou et al. 2016): the output Dense's weights
    of the class over the feature map. Checked against that formula, computed without gradients."""
    import tensorflow as tf

    model = random_model("MobileNet", 3, 96, **{"model.hidden_units": 0})
    images = noise_images(4, 96, seed=1)
    features = model.get_layer("base")(model.get_layer("preprocess")(images.astype("float32")), training=False)
    kernel = np.asarray(model.get_layer("probabilities").kernel)
    checked_maps = 0
    for class_index in range(3):
        expected = np.maximum(np.einsum("nhwk,k->nhw", np.asarray(features, dtype=np.float64),
                                        kernel[:, class_index]), 0.0)
        peaks = expected.max(axis=(1, 2), keepdims=True)
        expected = tf.image.resize((expected / np.where(peaks > 0, peaks, 1.0))[..., None].astype("float32"),
                                   (96, 96)).numpy()[..., 0]
        # A class with no positive evidence anywhere gets a blank (all-zero) map.
        expected = np.where(peaks > 0, expected / np.maximum(expected.max(axis=(1, 2), keepdims=True), 1e-30), 0.0)
        actual = class_activation_maps(model, images, [class_index] * 4)
        np.testing.assert_allclose(actual, expected, atol=1e-4)
        checked_maps += int((peaks > 0).sum())
    assert checked_maps >= 4  # a third of the twelve maps are not blank, so the formula was really compared


def test_two_class_maps_split_the_evidence_and_the_default_is_the_predicted_class():
    """A sigmoid head's class 0 is scored by −logit: the two classes' maps are where the single
    logit's evidence is positive and where it is negative, so they do not coincide."""
    model = random_model("MobileNet", 2, 96)
    images = noise_images(4, 96, seed=2)
    class_zero = class_activation_maps(model, images, [0] * 4)
    class_one = class_activation_maps(model, images, [1] * 4)
    for zero, one in zip(class_zero, class_one):
        assert not (is_blank(zero) and is_blank(one))
        assert np.abs(zero - one).max() > 0.1
    predicted = (np.asarray(model.predict(images, verbose=0)).reshape(-1) > 0.5).astype(int)
    default_maps, explained = maps_and_classes(model, images)
    assert explained.tolist() == predicted.tolist()
    np.testing.assert_allclose(default_maps, np.where(predicted[:, None, None] == 1, class_one, class_zero))


def test_saturated_sigmoid_still_gets_a_map():
    """The score is the logit, not the probability: a probability saturated at exactly 1.0 in
    float32 has no gradient, the logit still has one."""
    model = random_model("MobileNet", 2, 96, **{"model.hidden_units": 0, "model.dropout": 0.0})
    output = model.get_layer("probability")
    images = noise_images(2, 96, seed=3)
    kernel, bias = output.get_weights()
    pooled = np.asarray(model.get_layer("pool")(
        model.get_layer("base")(model.get_layer("preprocess")(images.astype("float32")), training=False)))
    # Pooled ReLU features are ≥ 0: positive weights, scaled so every logit is at least 40
    # (sigmoid(40) == 1.0 in float32).
    kernel = np.abs(kernel)
    kernel *= 40.0 / float((pooled @ kernel).min())
    output.set_weights([kernel, bias])
    assert np.all(np.asarray(model.predict(images, verbose=0)) == 1.0)
    heatmaps = class_activation_maps(model, images, [1, 1])
    assert not any(is_blank(heatmap) for heatmap in heatmaps)


def test_zero_gradients_give_blank_maps_not_nan():
    model = random_model("MobileNet", 3, 64)
    output = model.get_layer("probabilities")
    output.set_weights([np.zeros_like(weight) for weight in output.get_weights()])
    heatmaps = class_activation_maps(model, noise_images(2, 64))
    assert np.isfinite(heatmaps).all() and not heatmaps.any()
    assert all(is_blank(heatmap) for heatmap in heatmaps)
    assert np.isnan(central_share(heatmaps[0]))


def test_augmentation_is_skipped_so_maps_are_repeatable():
    model = random_model("MobileNet", 2, 64, **{"augmentation.flip": "horizontal", "augmentation.rotation": 0.2})
    assert "augmentation" in [layer.name for layer in model.layers]
    images = noise_images(2, 64, seed=4)
    np.testing.assert_array_equal(class_activation_maps(model, images), class_activation_maps(model, images))


def test_bad_arguments_are_refused_with_the_field_named():
    model = random_model("MobileNet", 3, 64)
    with pytest.raises(ValueError, match="model's input size"):
        class_activation_maps(model, noise_images(1, 32))
    with pytest.raises(ValueError, match="class_indices"):
        class_activation_maps(model, noise_images(1, 64), [3])
    with pytest.raises(ValueError, match="class_indices"):
        class_activation_maps(model, noise_images(2, 64), [0])
    assert class_activation_maps(model, noise_images(0, 64)).shape == (0, 64, 64)


def test_overlay_blends_the_colour_map_over_the_image():
    image = np.random.default_rng(5).integers(0, 256, (30, 40, 3)).astype(np.uint8)
    heatmap = np.random.default_rng(6).random((7, 7)).astype(np.float32)
    blended = overlay(image, heatmap)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, heatmap, opacity=0.0), image)
    assert not np.array_equal(blended, image)
    full = overlay(image, np.linspace(0, 1, 40)[None, :].repeat(30, axis=0), opacity=1.0)
    np.testing.assert_array_equal(full, colourise(np.linspace(0, 1, 40)[None, :].repeat(30, axis=0)))
    # The colour map runs from dark to bright.
    brightness = colourise(np.linspace(0, 1, 11)).astype(int).sum(axis=1)
    assert brightness[0] < brightness[5] < brightness[-1]
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, heatmap, opacity=1.5)


def test_central_share_of_uniform_centred_and_corner_maps():
    for shape in [(224, 224), (7, 7), (33, 20)]:
        assert central_share(np.ones(shape)) == pytest.approx(0.25)
        assert central_share(np.ones(shape), fraction=0.8) == pytest.approx(0.64)
    centred = np.zeros((40, 40))
    centred[15:25, 15:25] = 1.0
    corner = np.zeros((40, 40))
    corner[:8, :8] = 1.0
    assert central_share(centred) == pytest.approx(1.0)
    assert central_share(corner) == pytest.approx(0.0)
    assert np.isnan(central_share(np.zeros((5, 5))))


def test_compiled_maps_equal_eager_maps():
    model = random_model("MobileNet", 3, 64)
    images = noise_images(5, 64, seed=7)
    eager_maps, eager_classes = maps_and_classes(model, images, batch_size=2)
    compiled_maps, compiled_classes = maps_and_classes(model, images, batch_size=2, compiled=True)
    assert compiled_classes.tolist() == eager_classes.tolist()
    np.testing.assert_allclose(compiled_maps, eager_maps, atol=1e-5)
    chosen = [2, 1, 0, 2, 1]
    np.testing.assert_allclose(class_activation_maps(model, images, chosen, compiled=True),
                               class_activation_maps(model, images, chosen), atol=1e-5)

@pytest.mark.training
def test_explain_images_writes_overlays_and_reports_a_bad_file(tmp_path):
    import engine

    data = make_dataset(tmp_path / "data", per_class=6, size=(40, 32))
    run_dir = engine.train_run(tiny_config(data, **{"model.image_size": 64, "training.epochs": 1}),
                               runs_dir=tmp_path / "runs")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    paths = [data / "cats" / "cats_0.jpg", bad, data / "dogs" / "dogs_1.png", tmp_path / "missing.png",
             data / "cats" / "cats_0.jpg"]
    results = explain_images(run_dir, [str(path) for path in paths], tmp_path / "out", opacity=0.6)

    assert [result["path"] for result in results] == [str(path) for path in paths]
    assert "error" in results[1] and "error" in results[3]
    written = [results[index]["overlay"] for index in (0, 2, 4)]
    assert [Path(path).name for path in written] == ["cats_0.gradcam.png", "dogs_1.gradcam.png",
                                                     "cats_0-2.gradcam.png"]
    for index in (0, 2, 4):
        result = results[index]
        assert result["class"] in ("cats", "dogs")
        assert result["central_share"] is None or 0.0 <= result["central_share"] <= 1.0
        with Image.open(result["overlay"]) as picture:
            assert picture.format == "PNG" and picture.size == (40, 32) and picture.mode == "RGB"


@pytest.mark.real_data
@pytest.mark.training
def test_cats_vs_dogs_maps_fall_more_inside_the_centre_than_a_uniform_map(shared_dir, keras_home_with_mobilenet,
                                                                         tmp_path):
    """The issue's measure: on most validation images, more than a quarter of the map's mass lies
    in the central box covering half of each side (a uniform map's share). The maps of the class
    not predicted (the evidence against) are less central than those of the predicted class."""
    from engine.images import load_rgb
    from engine.predict import load_run_model

    started = time.perf_counter()
    data = shared_dir / "data" / "cats_vs_dogs"
    trained = run_cli("train", "--data", data, "--backbone", "MobileNet", "--alpha", "0.25",
                      "--image-size", "224", "--epochs", "3", "--runs-dir", tmp_path / "runs", "--quiet",
                      env={"KERAS_HOME": str(keras_home_with_mobilenet)})
    assert trained.returncode == 0, trained.stderr[-3000:]
    trained_at = time.perf_counter()
    run_dir = Path(trained.stdout.strip())
    loaded = load_run_model(run_dir)
    # A fixed sample: every 5th validation file in sorted order, 200 images.
    paths = sorted(str(path) for path in (data / "validation").glob("*/*.jpg"))[::5]
    assert len(paths) == 200
    results = explain_images(run_dir, paths, tmp_path / "overlays", loaded=loaded)
    assert not [result for result in results if "error" in result]
    assert all(Path(result["overlay"]).is_file() for result in results)
    shares = np.array([np.nan if result["central_share"] is None else result["central_share"]
                       for result in results])
    above = float(np.mean(shares > 0.25))
    explained_at = time.perf_counter()

    model, class_names, image_size = loaded
    other = [1 - class_names.index(result["class"]) for result in results]
    other_maps = class_activation_maps(model, np.stack([load_rgb(path, image_size) for path in paths]), other)
    other_shares = np.array([central_share(heatmap) for heatmap in other_maps])
    print(f"cats_vs_dogs Grad-CAM, {len(paths)} validation images: central share > 0.25 on {above:.1%}, "
          f"median {np.nanmedian(shares):.3f}, blank maps {int(np.isnan(shares).sum())}; the class not "
          f"predicted: > 0.25 on {np.mean(other_shares > 0.25):.1%}, median {np.nanmedian(other_shares):.3f}; "
          f"train {trained_at - started:.1f} s, explain {explained_at - trained_at:.1f} s, "
          f"other class {time.perf_counter() - explained_at:.1f} s")
    assert above > 0.5
    assert np.nanmedian(shares) > np.nanmedian(other_shares)
