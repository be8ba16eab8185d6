"""Batch norms folded into convolutions: the same function, for every backbone in the registry."""

import keras
import numpy as np
import pytest

from engine.backbones import BACKBONES, build_base
from engine.folding import fold_batch_norms

# Backbones with no convolution → batch norm pair (VGG16 has no batch norm; ConvNeXt uses layer norm).
NOTHING_TO_FOLD = {"VGG16", "ConvNeXtTiny"}


def randomise_batch_norms(model, rng):
    """Fresh batch norms are the identity (mean 0, variance 1, γ 1, β 0); a fold must be tested on real ones."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.3, channels))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_folded_base_computes_what_the_base_computes(name):
    spec = BACKBONES[name]
    size = max(spec.min_image_size, 32)
    base = build_base(name, size, spec.alphas[0] if spec.alphas else None, "none")
    rng = np.random.default_rng(0)
    randomise_batch_norms(base, rng)

    folded, count = fold_batch_norms(base)

    batch_norms = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    if name in NOTHING_TO_FOLD:
        assert count == 0
    else:
        assert count > 0 and batch_norms == sum(
            isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers) - count
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    expected = np.asarray(base(images, training=False))
    got = np.asarray(folded(images, training=False))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    # The original is untouched: still its own batch norms and weights.
    np.testing.assert_array_equal(np.asarray(base(images, training=False)), expected)


def test_a_convolution_with_its_own_activation_or_a_second_reader_is_not_folded():
    inputs = keras.Input((8, 8, 3))
    activated = keras.layers.Conv2D(4, 3, activation="relu", name="activated")(inputs)
    activated = keras.layers.BatchNormalization(name="after_activated")(activated)
    shared = keras.layers.Conv2D(4, 3, name="shared")(inputs)
    normalised = keras.layers.BatchNormalization(name="after_shared")(shared)
    plain = keras.layers.Conv2D(4, 3, use_bias=False, name="plain")(inputs)
    plain = keras.layers.BatchNormalization(name="after_plain")(plain)
    outputs = keras.layers.Concatenate()([activated, normalised, shared, plain])
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    randomise_batch_norms(model, rng)

    folded, count = fold_batch_norms(model)

    assert count == 1
    assert isinstance(folded.get_layer("after_activated"), keras.layers.BatchNormalization)
    assert isinstance(folded.get_layer("after_shared"), keras.layers.BatchNormalization)
    assert not isinstance(folded.get_layer("after_plain"), keras.layers.BatchNormalization)
    assert folded.get_layer("plain").use_bias
    images = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(folded(images)), np.asarray(model(images)), atol=1e-5)


@pytest.mark.parametrize("backbone, alpha", [("MobileNet", 0.25), ("EfficientNetLite0", None)])
def test_the_folded_feature_extractor_matches_on_real_weights_and_photos(backbone, alpha, shared_dir,
                                                                         keras_home_with_mobilenet):
    from engine.config import RunConfig
    from engine.features import build_feature_extractor
    from engine.images import load_rgb
    from engine.modeling import build_model

    config = RunConfig().replace(**{"data.path": str(shared_dir), "model.backbone": backbone, "model.alpha": alpha,
                                    "model.image_size": 224})
    model = build_model(config, 2)
    photos = sorted((shared_dir / "data" / "cats_vs_dogs" / "validation").glob("*/*.jpg"))[::100]
    images = np.stack([load_rgb(str(path), 224) for path in photos]).astype(np.float32)

    plain = np.asarray(build_feature_extractor(model, fold=False)(images))
    folded = np.asarray(build_feature_extractor(model)(images))

    assert plain.shape == (len(photos), model.get_layer("base").output.shape[-1])
    np.testing.assert_allclose(folded, plain, atol=1e-4 * np.abs(plain).max())
