"""`model.keras` loads with nothing but Keras, and gives the same numbers as in the app.

New models hold their preprocessing as Keras's built-in layers (`engine.layers.build_preprocessing`),
so a Python that has never imported `engine` reads them in safe mode. Each check that a model loads
"plain" runs a fresh interpreter whose working folder is a temporary one and whose `PYTHONPATH` is
unset, so `import engine` fails there. Models saved before the change (custom `Preprocess` layer)
still load in the app.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config

MODES = ("tf", "lite", "torch", "caffe", "none")

# Runs in a fresh interpreter: refuses to go on if `engine` could be imported, imports Keras, then
# waits for its jobs on stdin, loads each model with Keras alone (safe mode on, compiled as saved)
# and writes its outputs.
PLAIN_KERAS_SCRIPT = """
import json, sys
try:
    import engine
except ImportError:
    pass
else:
    raise SystemExit("engine is importable in the plain-Keras process: " + engine.__file__)
import numpy as np
import keras
jobs = json.loads(sys.stdin.read())
for job in jobs:
    model = keras.models.load_model(job["model"], safe_mode=True)
    # Called directly: model.predict would first trace a graph, which costs more than a few images.
    np.save(job["output"], np.asarray(model(np.load(job["images"]), training=False)))
if "engine" in sys.modules:
    raise SystemExit("loading the models imported engine")
print("loaded", len(jobs), "models with Keras alone")
"""


class PlainKeras:
    """A fresh Python that cannot import `engine` (temporary working folder, no `PYTHONPATH`).

    It starts when the test does, so TensorFlow's few seconds of start-up overlap the test's own
    work; `outputs` then hands it every model at once.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        self.process = subprocess.Popen([sys.executable, "-c", PLAIN_KERAS_SCRIPT], cwd=folder, env=environment,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)

    def outputs(self, models_and_images: list[tuple[Path, np.ndarray]]) -> list[np.ndarray]:
        """Loads every model with Keras alone and returns each one's raw outputs on its images."""
        jobs = []
        for number, (model_path, images) in enumerate(models_and_images):
            images_path = self.folder / f"images_{number}.npy"
            np.save(images_path, images)
            jobs.append({"model": str(model_path), "images": str(images_path),
                         "output": str(self.folder / f"output_{number}.npy")})
        stdout, stderr = self.process.communicate(json.dumps(jobs), timeout=900)
        assert self.process.returncode == 0, stderr[-3000:]
        assert f"loaded {len(jobs)} models with Keras alone" in stdout
        return [np.load(job["output"]) for job in jobs]

    def close(self) -> None:
        """Ends the process if a failed test never handed it its jobs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def plain_keras(tmp_path):
    """A `PlainKeras` process for this test, ended afterwards whatever happened."""
    process = PlainKeras(tmp_path / "plain")
    yield process
    process.close()


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Raw 0–255 RGB, as the app feeds the model."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype(np.uint8)


def photos(folder: Path, size: int, count: int) -> np.ndarray:
    """The first `count` JPEG photos of `folder`, resized to size × size RGB."""
    files = sorted(folder.glob("*.jpg"))[:count]
    return np.stack([np.asarray(Image.open(path).convert("RGB").resize((size, size))) for path in files])


def only_preprocessing(model) -> None:
    """Fails unless the model's "preprocess" layer is built from Keras's own layers (no custom class)."""
    preprocess = model.get_layer("preprocess")
    for layer in [preprocess, *getattr(preprocess, "layers", [])]:
        assert type(layer).__module__.startswith("keras."), f"{layer.name} is a {type(layer)}"


@pytest.mark.parametrize("mode", MODES)
def test_built_in_preprocessing_equals_the_old_layer(mode):
    from engine.layers import Preprocess, build_preprocessing

    images = random_images(6, 16)
    expected = np.asarray(Preprocess(mode)(images))
    actual = np.asarray(build_preprocessing(mode)(images))

    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    # Within float rounding, relative to the output's scale (1 for "tf", about 150 for "caffe").
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))
    # Float input (what the model's Input gives) the same as uint8.
    np.testing.assert_allclose(np.asarray(build_preprocessing(mode)(images.astype(np.float32))), actual, atol=1e-6)


def test_unknown_mode_is_refused_with_the_choices():
    from engine.layers import build_preprocessing

    with pytest.raises(ValueError, match=r"'tf', 'caffe'.*received mode='bgr'"):
        build_preprocessing("bgr")


def test_caffe_constants_never_train_when_the_base_is_fine_tuned(monkeypatch, tmp_path):
    """The one preprocessing with weights (caffe's channel map) stays fixed through a fine-tuning step."""
    import keras

    from engine import backbones
    from engine.modeling import build_model, compile_model, unfreeze_top_layers

    # A tiny MobileNet with caffe's preprocessing stands in for VGG16 and ResNet50, which are slow to build.
    spec = dataclasses.replace(backbones.BACKBONES["MobileNet"], preprocess="caffe")
    monkeypatch.setitem(backbones.BACKBONES, "MobileNet", spec)
    model = build_model(tiny_config(tmp_path), 2)
    only_preprocessing(model)
    before = [weight.copy() for weight in model.get_layer("preprocess").get_weights()]
    assert unfreeze_top_layers(model, 1000) > 0
    compile_model(model, "sgd", 0.5, 2)
    model.run_eagerly = True  # one step: tracing a graph would cost more than the step itself
    model.fit(random_images(8, 32), np.array([0, 1] * 4), epochs=1, batch_size=8, verbose=0)

    trainable = {id(weight) for weight in model.trainable_weights}
    assert not any(id(weight) in trainable for weight in model.get_layer("preprocess").weights)
    for old, new in zip(before, model.get_layer("preprocess").get_weights()):
        np.testing.assert_array_equal(old, new)
    # The loaded model keeps it frozen too (resume loads checkpoint.keras and trains on).
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert not loaded.get_layer("preprocess").trainable_weights


@pytest.mark.training
def test_a_trained_runs_model_loads_with_keras_alone_and_gives_the_apps_probabilities(tiny_dataset, tmp_path, plain_keras):
    import engine
    from engine.modeling import probabilities_per_class
    from engine.predict import load_run_model, predict_probabilities

    run_dir = engine.train_run(tiny_config(tiny_dataset), tmp_path / "runs")
    assert engine.read_status(run_dir).state.value == "finished"
    model, classes, image_size = load_run_model(run_dir)
    only_preprocessing(model)
    images = np.concatenate([photos(tiny_dataset / "cats", image_size, 3), photos(tiny_dataset / "dogs", image_size, 3),
                             random_images(2, image_size)])
    in_app = predict_probabilities(model, images, len(classes))

    [raw] = plain_keras.outputs([(run_dir / "model.keras", images)])

    assert raw.shape == (len(images), 1)  # two classes: one sigmoid unit, the second class's probability
    np.testing.assert_allclose(probabilities_per_class(raw, len(classes)), in_app, rtol=0, atol=1e-5)


def test_a_model_saved_with_the_old_layer_still_loads_in_the_app(monkeypatch, tmp_path):
    """Runs trained before the change hold `engine.layers.Preprocess`; the app must still read them."""
    from engine import modeling
    from engine.layers import Preprocess
    from engine.predict import load_run_model

    monkeypatch.setattr(modeling, "build_preprocessing", lambda mode, name: Preprocess(mode, name=name))
    old_model = modeling.build_model(tiny_config(tmp_path), 3)
    assert isinstance(old_model.get_layer("preprocess"), Preprocess)
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    old_model.save(run_dir / "model.keras")
    (run_dir / "labels.json").write_text(json.dumps({"classes": ["birds", "cats", "dogs"]}))
    images = random_images(4, 32)

    loaded, classes, image_size = load_run_model(run_dir)

    assert (classes, image_size) == (["birds", "cats", "dogs"], 32)
    assert isinstance(loaded.get_layer("preprocess"), Preprocess)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), old_model.predict(images, verbose=0), atol=1e-6)


def small_size(spec) -> int:
    """The smallest multiple of 32 each backbone accepts, to keep building every one of them quick."""
    return max(32, -(-spec.min_image_size // 32) * 32)


@pytest.mark.slow
def test_every_backbone_loads_with_keras_alone(tmp_path, plain_keras):
    from engine.backbones import BACKBONES
    from engine.modeling import build_model

    jobs, expected = [], []
    for number, (name, spec) in enumerate(BACKBONES.items()):
        size = small_size(spec)
        config = tiny_config(tmp_path, **{"model.backbone": name, "model.image_size": size,
                                          "model.alpha": spec.alphas[0] if spec.alphas else None})
        model = build_model(config, 3)
        only_preprocessing(model)
        images = random_images(2, size, seed=number)
        path = tmp_path / f"{name}.keras"
        model.save(path)
        jobs.append((path, images))
        expected.append(np.asarray(model(images, training=False)))

    outputs = plain_keras.outputs(jobs)

    for name, actual, wanted in zip(BACKBONES, outputs, expected):
        np.testing.assert_allclose(actual, wanted, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.real_data
def test_real_imagenet_models_load_with_keras_alone(keras_home_with_mobilenet, shared_dir, tmp_path, plain_keras):
    """MobileNet α=0.25 and EfficientNet-Lite0 with their ImageNet weights, on real photos (random heads)."""
    from engine.modeling import build_model

    validation = shared_dir / "data" / "cats_vs_dogs" / "validation"
    images = np.concatenate([photos(validation / "cats", 224, 2), photos(validation / "dogs", 224, 2)])
    jobs, expected = [], []
    for backbone, alpha in (("MobileNet", 0.25), ("EfficientNetLite0", None)):
        config = tiny_config(tmp_path, **{"model.backbone": backbone, "model.alpha": alpha,
                                          "model.weights": "imagenet", "model.image_size": 224})
        model = build_model(config, 2)
        only_preprocessing(model)
        path = tmp_path / f"{backbone}.keras"
        model.save(path)
        jobs.append((path, images))
        expected.append(np.asarray(model(images, training=False)))

    outputs = plain_keras.outputs(jobs)

    for actual, wanted in zip(outputs, expected):
        np.testing.assert_allclose(actual, wanted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["tf", "lite", "torch", "caffe", "none"])
def test_every_preprocessing_mode_exports_to_onnx_with_the_image_as_its_only_input(mode, tmp_path):
    """A Normalization layer would become extra ONNX graph inputs (tf2onnx); the built-in layers used here do not."""
    import keras
    import onnxruntime

    from engine.layers import build_preprocessing

    inputs = keras.Input((16, 16, 3))
    features = keras.layers.GlobalAveragePooling2D()(build_preprocessing(mode)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(features))
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    expected = model.predict(images, verbose=0)  # Keras's ONNX export needs a model that has been called
    model.export(str(tmp_path / "model.onnx"), format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 1, [item.name for item in session.get_inputs()]
    (result,) = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(result, expected, atol=1e-5)
