"""The browser bundle (issue 14) in a real headless Chromium (Debian's package) driven by Playwright.

A small network of the app's kinds of layers (the `Preprocess` layer, convolutions, batch norm,
ReLU6, a depthwise convolution, a softmax head; 64 px, three classes) and a tiny two-class
sigmoid model are exported to ONNX the way the ONNX export
does it (Keras's `model.export(format="onnx")`, opset 17), bundled, served by `python -m
http.server` on a free 127.0.0.1 port, and given pictures through the page's file input. The
page's probabilities are compared with the Keras model's on the same file after the app's own
resize (`engine.images.load_rgb`), calibrated with the same temperature, answered with the same
operating point. Every request the page makes must stay on 127.0.0.1. Screenshots go to the
test's temporary folder (`bundle-three-classes.png`, `bundle-two-classes.png`).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from engine.exports.browser import (RUNTIME_FILES, RuntimeMissingError, build_browser_bundle,
                                    build_browser_bundle_from_onnx_export)
from tests.conftest import CHROMIUM, free_port, launch_chromium

IMAGE_SIZE = 64
# The model part of the page (onnxruntime-web on the same pixels) agrees with Keras to float32
# rounding; the resize is Pillow's re-implemented exactly, so PNG pixels match to the byte.
PNG_TOLERANCE = 1e-4
# JPEGs: Pillow lets libjpeg decode at 1/2, 1/4 or 1/8 scale (scaled inverse DCT); the page
# decodes at full size and box-averages instead. Measured on the test's 640×480 JPEG (hard
# edges, the worst case): mean 1.05 levels, at most 8, probabilities within 0.0008; on 20 real
# photos mean 0.3 levels, at most 12, probabilities within 0.0024 (docs/browser-bundle.md).
JPEG_PIXEL_TOLERANCE = 12
JPEG_MEAN_PIXEL_TOLERANCE = 1.5
JPEG_TOLERANCE = 0.02



def export_onnx(model, path: Path) -> Path:
    """The model as ONNX, as `engine.exports.onnx_export` writes it (Keras's exporter, opset 17)."""
    # Keras's exporter refuses a model that has never been called.
    model.predict(np.zeros((1, *model.input_shape[1:]), dtype="float32"), verbose=0)
    model.export(str(path), format="onnx", opset_version=17, verbose=False)
    return path


def tiny_onnx(path: Path, image_size=IMAGE_SIZE, num_classes=2, extra_input=False) -> Path:
    """A hand-made ONNX classifier (mean colour → softmax), for tests that need no TensorFlow."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", image_size, image_size, 3])
    width = 1 if num_classes == 2 else num_classes
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", width])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Slice", ["mean", "starts", "ends", "axes"], ["sliced"]),
             helper.make_node("Softmax" if width > 1 else "Sigmoid", ["sliced"], ["probabilities"])]
    constants = [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("ends", TensorProto.INT64, [1], [width]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    inputs = [image]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("normalization/Sub/y:0", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(nodes, "tiny", inputs, [probabilities], initializer=constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def write_picture(path: Path, size=(203, 157), seed=0, fmt=None) -> Path:
    """A non-square picture with smooth gradients, shapes and noise, so the resize matters."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / width
    green = 127 + 120 * np.sin(y / 9.0 + seed)
    blue = 255 * ((x // 23 + y // 17) % 2)
    array = np.stack([red, green, blue], axis=-1) + rng.normal(0, 12, (height, width, 3))
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB").save(path, format=fmt, quality=92)
    return path


def write_colour(path: Path, colour, size=(90, 70)) -> Path:
    rng = np.random.default_rng(sum(colour))
    array = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)
    return path


def keras_probabilities(model, path: Path, num_classes: int) -> np.ndarray:
    """The Keras model's probabilities per class on a file, resized as the app resizes it."""
    from engine.images import load_rgb
    from engine.modeling import probabilities_per_class

    pixels = load_rgb(str(path), IMAGE_SIZE)[None].astype("float32")
    return probabilities_per_class(model.predict(pixels, verbose=0), num_classes)[0]


def small_app_like_model(num_classes: int):
    """A small network of the kinds of layers the app's models are made of, whose answer depends on the picture.

    The app's own `build_model` from random weights is useless here: through MobileNet's
    thirteen random blocks the pooled features shrink to about 1e-16, so every picture gets the
    same probabilities. This model has the same kinds of operations (the `Preprocess` layer,
    convolutions, batch norm with non-trivial statistics, ReLU6, a depthwise convolution,
    global pooling, dropout, a softmax head) and keeps the signal.
    """
    import keras

    from engine.layers import Preprocess

    keras.utils.set_random_seed(7)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    features = Preprocess("tf")(inputs)
    features = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(features)
    features = keras.layers.BatchNormalization()(features)
    features = keras.layers.ReLU(6.0)(features)
    features = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(features)
    features = keras.layers.BatchNormalization()(features)
    features = keras.layers.ReLU(6.0)(features)
    features = keras.layers.Conv2D(16, 1, use_bias=False)(features)
    features = keras.layers.GlobalAveragePooling2D()(features)
    features = keras.layers.Dropout(0.2)(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(features)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.2, beta.shape).astype("float32"),
                               rng.normal(0, 0.2, mean.shape).astype("float32"),
                               rng.uniform(0.5, 2.0, variance.shape).astype("float32")])
    head = model.layers[-1]
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 15.0, bias])
    return model


@pytest.fixture
def served(tmp_path):
    """serve(folder) → the folder's address on a free 127.0.0.1 port; every server is stopped by its process group."""
    servers = []

    def serve(folder: Path) -> str:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(folder)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        servers.append(server)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "labels.json", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"python -m http.server did not start on port {port}")

    yield serve
    for server in servers:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


@pytest.fixture
def browser_page():
    """A headless Chromium page; every request it makes is recorded in `page.requested`."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed; .ci/run installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1000, "height": 900}).new_page()
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        page.console_lines = []
        page.on("console", lambda message: page.console_lines.append(message.text))
        yield page
        browser.close()


def wait_for(page, expression: str, argument=None, timeout=30.0):
    """Polls a JavaScript function of one argument until it returns something true (returned).

    Playwright's `wait_for_function` evaluates its predicate with `eval` inside the page, which
    the bundle's Content-Security-Policy forbids; `page.evaluate` goes through the debugging
    protocol instead, so the page's policy stays in force for everything the page itself does.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = page.evaluate(expression, argument)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {expression}; console: {page.console_lines}")


def classify(page, path: Path) -> dict:
    """Sets the file on the page's file input and waits for the page's result for that file."""
    page.set_input_files("#file-input", str(path))
    wait_for(page, "name => window.lastResult && (window.lastResult.file === name || window.lastResult.error)",
             path.name)
    result = page.evaluate("window.lastResult")
    assert "error" not in result, f"{result}\nconsole: {page.console_lines}"
    result["pixels"] = np.array(page.evaluate("Array.from(window.lastPixels)"), dtype=np.uint8).reshape(
        IMAGE_SIZE, IMAGE_SIZE, 3)
    return result


def assert_all_local(requested: list[str]) -> None:
    assert requested, "the page made no requests at all"
    outside = [url for url in requested if urlparse(url).scheme not in ("blob", "data")
               and urlparse(url).hostname != "127.0.0.1"]
    assert not outside, f"the page asked for addresses outside 127.0.0.1: {outside}"


@pytest.mark.browser
@pytest.mark.training
def test_bundle_predicts_what_the_keras_model_predicts(tmp_path, served, browser_page):
    import keras

    from engine.calibration import apply_temperature
    from engine.images import load_rgb
    from engine.operating_point import Decision, verdict

    classes = ["birds", "cats", "dogs"]
    model = small_app_like_model(len(classes))
    onnx_path = export_onnx(model, tmp_path / "exported.onnx")
    temperature, minimum_confidence = 1.7, 0.5
    bundle = tmp_path / "bundle"
    written = build_browser_bundle(onnx_path, classes, IMAGE_SIZE, bundle, temperature=temperature,
                                   minimum_confidence=minimum_confidence, title="Colour <guesser>")
    assert set(written["files"]) == {"index.html", "model.onnx", "labels.json", "README.md", *RUNTIME_FILES}
    assert json.loads((bundle / "labels.json").read_text()) == {"classes": classes}

    page = browser_page
    page.goto(served(bundle) + "index.html")
    wait_for(page, "() => window.modelReady || window.modelError")
    assert page.evaluate("window.modelError || null") is None
    assert page.locator("h1").inner_text() == "Colour <guesser>"
    # The file input is a real, labelled control a keyboard reaches.
    assert page.get_by_label("Drop a picture here, or choose one").count() == 1

    decision = Decision(threshold=None, minimum_confidence=minimum_confidence)
    png = write_picture(tmp_path / "picture.png", size=(203, 157))
    big_png = write_picture(tmp_path / "large.png", size=(700, 410), seed=3)
    jpeg = write_picture(tmp_path / "photo.jpg", size=(640, 480), seed=5, fmt="JPEG")
    for path, pixel_tolerance, tolerance in ((png, 0, PNG_TOLERANCE), (big_png, 0, PNG_TOLERANCE),
                                             (jpeg, JPEG_PIXEL_TOLERANCE, JPEG_TOLERANCE)):
        result = classify(page, path)
        expected_pixels = load_rgb(str(path), IMAGE_SIZE)
        pixel_difference = np.abs(result["pixels"].astype(int) - expected_pixels.astype(int))
        assert pixel_difference.max() <= max(pixel_tolerance, 1), (path.name, pixel_difference.max())
        if path.suffix == ".jpg":
            assert pixel_difference.mean() < JPEG_MEAN_PIXEL_TOLERANCE, pixel_difference.mean()
        # The model part alone: onnxruntime-web on the page's own pixels against Keras on them.
        on_page_pixels = keras.ops.convert_to_numpy(model(result["pixels"][None].astype("float32")))[0]
        np.testing.assert_allclose(result["model_probabilities"], on_page_pixels, atol=1e-5)
        # The whole way from the file: the app's resize and Keras, calibrated.
        expected = apply_temperature(keras_probabilities(model, path, len(classes))[None], temperature)[0]
        np.testing.assert_allclose(result["probabilities"], expected, atol=tolerance, err_msg=path.name)
        assert result["answer"] == verdict(expected, classes, decision)[0]
    # The bars: every class, best first, with a percentage.
    rows = page.locator("#classes li").all_inner_texts()
    assert len(rows) == 3
    shown = [float(row.split()[-1].rstrip("%")) for row in rows]
    assert shown == sorted(shown, reverse=True)
    assert page.locator("#result").get_attribute("aria-live") == "polite"
    page.screenshot(path=str(tmp_path / "bundle-three-classes.png"), full_page=True)
    assert_all_local(page.requested)
    assert any(url.endswith("ort-wasm-simd-threaded.wasm") for url in page.requested)


@pytest.mark.browser
@pytest.mark.training
def test_two_classes_follow_threshold_temperature_and_not_sure(tmp_path, served, browser_page):
    import keras

    from engine.calibration import apply_temperature
    from engine.operating_point import Decision, verdict

    # p(second class) = sigmoid(4 · (mean red − mean blue)): red pictures are "warm".
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid")(features)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.array([[4.0], [0.0], [-4.0]], dtype="float32"), np.zeros(1, dtype="float32")])
    classes = ["cool", "warm"]
    temperature, threshold, minimum_confidence = 2.0, 0.3, 0.6
    bundle = tmp_path / "bundle"
    build_browser_bundle(export_onnx(model, tmp_path / "two.onnx"), classes, IMAGE_SIZE, bundle,
                         temperature=temperature, threshold=threshold, minimum_confidence=minimum_confidence)
    page = browser_page
    page.goto(served(bundle) + "index.html")
    wait_for(page, "() => window.modelReady || window.modelError")
    decision = Decision(threshold=threshold, minimum_confidence=minimum_confidence)
    answers = {}
    for name, colour in (("red", (230, 40, 40)), ("blue", (40, 40, 230)), ("grey", (128, 128, 128)),
                         ("purple", (110, 60, 140))):
        path = write_colour(tmp_path / f"{name}.png", colour)
        result = classify(page, path)
        expected = apply_temperature(keras_probabilities(model, path, 2)[None], temperature)[0]
        np.testing.assert_allclose(result["probabilities"], expected, atol=PNG_TOLERANCE)
        assert result["answer"] == verdict(expected, classes, decision)[0]
        answers[name] = result["answer"]
    # Red is warm, blue cool; grey (p = 0.5) is "warm" from the 0.3 threshold but only 50 % sure:
    # below the 60 % minimum, so "not sure"; purple (p ≈ 0.4) is warm by the threshold, also unsure.
    assert answers == {"red": "warm", "blue": "cool", "grey": "not sure", "purple": "not sure"}
    assert page.locator("#answer").inner_text().startswith("Not sure")
    page.screenshot(path=str(tmp_path / "bundle-two-classes.png"), full_page=True)
    assert_all_local(page.requested)


@pytest.mark.browser
def test_page_opened_from_the_disk_says_to_serve_the_folder(tmp_path, browser_page):
    build_browser_bundle(tiny_onnx(tmp_path / "model.onnx"), ["a", "b"], IMAGE_SIZE, tmp_path / "bundle")
    browser_page.goto((tmp_path / "bundle" / "index.html").as_uri())
    wait_for(browser_page, "() => window.modelError")
    assert "python -m http.server" in browser_page.locator("#status").inner_text()


def test_builder_refuses_a_missing_model_or_runtime_and_escapes_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_browser_bundle(tmp_path / "missing.onnx", ["a", "b"], IMAGE_SIZE, tmp_path / "out")
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(RuntimeMissingError, match="make browser-runtime"):
        build_browser_bundle(onnx_path, ["a", "b"], IMAGE_SIZE, tmp_path / "out", runtime_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"takes \(N, 64, 64, 3\) float; expected float32 \(N, 96, 96, 3\)"):
        build_browser_bundle(onnx_path, ["a", "b"], 96, tmp_path / "out")
    with pytest.raises(ValueError, match="takes 2 inputs"):
        build_browser_bundle(tiny_onnx(tmp_path / "two-inputs.onnx", extra_input=True), ["a", "b"], IMAGE_SIZE,
                             tmp_path / "out")
    with pytest.raises(ValueError, match="gives 1 outputs per image for 3 classes; expected 3"):
        build_browser_bundle(onnx_path, ["a", "b", "c"], IMAGE_SIZE, tmp_path / "out")
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        build_browser_bundle(not_onnx, ["a", "b"], IMAGE_SIZE, tmp_path / "out")
    with pytest.raises(ValueError, match="threshold needs two classes"):
        build_browser_bundle(onnx_path, ["a", "b", "c"], IMAGE_SIZE, tmp_path / "out", threshold=0.4)
    with pytest.raises(ValueError, match="temperature"):
        build_browser_bundle(onnx_path, ["a", "b"], IMAGE_SIZE, tmp_path / "out", temperature=0)
    hostile = ["</script><script>alert(1)</script>", "a & b \"quoted\""]
    written = build_browser_bundle(onnx_path, hostile, IMAGE_SIZE, tmp_path / "out",
                                   title="<img src=x onerror=alert(1)>")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert not re.search(r"(https?:)?//[a-z0-9]", page, re.IGNORECASE), "the page must name no other address"
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["classes"] == hostile
    assert written["total_bytes"] == sum((tmp_path / "out" / name).stat().st_size for name in written["files"])


def test_bundle_from_an_onnx_export_folder_takes_its_settings(tmp_path):
    """The ONNX export's labels.json carries the classes, size, temperature and operating point."""
    export = tmp_path / "exports" / "onnx"
    export.mkdir(parents=True)
    tiny_onnx(export / "model.onnx")
    (export / "labels.json").write_text(json.dumps({
        "classes": ["cool", "warm"], "image_size": IMAGE_SIZE, "calibration": {"temperature": 1.4},
        "operating_point": {"threshold": 0.35, "minimum_confidence": None}}))
    build_browser_bundle_from_onnx_export(export, tmp_path / "browser", title="Warm or cool")
    page = (tmp_path / "browser" / "index.html").read_text()
    settings = json.loads(re.search(r'id="bundle-settings">(.*?)</script>', page).group(1))
    assert settings == {"classes": ["cool", "warm"], "image_size": IMAGE_SIZE, "temperature": 1.4,
                        "threshold": 0.35, "minimum_confidence": None, "model": "model.onnx", "title": "Warm or cool"}
    (export / "labels.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks `classes` and `image_size`"):
        build_browser_bundle_from_onnx_export(export, tmp_path / "browser")
