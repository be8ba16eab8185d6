"""Exports (SavedModel, TFLite float32/float16/int8, ONNX) and their parity check (issue 14).

The fast tests export one tiny trained run once per format; the real-data tests export
MobileNet α=0.25 and EfficientNet-Lite0 runs on cats_vs_dogs; the `slow` sweep tries every
registry backbone with random weights (its table is in docs/exports.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_dataset, tiny_config

FORMAT_CASES = [("savedmodel", "none"), ("tflite", "none"), ("tflite", "float16"), ("tflite", "int8"),
                ("onnx", "none")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny trained two-class run: EfficientNet-Lite0 (its ImageNet weights install with the app) at 64 px.

    Random-weight backbones give the same features for every picture (the signal vanishes
    through the untrained layers), so their probabilities all sit at 0.5 and int8 rounding
    decides top-1 by a coin toss; real weights give a model that separates the two colours.
    Augmentation is on, so the exports must leave it out. Its split.csv also lists one
    validation file that no longer exists, which every export must skip and count.
    """
    import engine
    from engine import runfiles

    base = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_STUDIO_CACHE", str(base / "cache"))
        patch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
        data = make_dataset(base / "data", per_class=24)
        config = tiny_config(data, **{"model.backbone": "EfficientNetLite0", "model.alpha": None,
                                      "model.weights": "imagenet", "model.image_size": 64,
                                      "training.epochs": 5, "augmentation.flip": "horizontal",
                                      "data.validation_fraction": 0.25})
        run_dir = engine.train_run(config, runs_dir=base / "runs")
    rows = runfiles.read_csv(run_dir / "split.csv")
    first_validation = next(row for row in rows if row["split"] == "validation")
    rows.insert(0, {**first_validation, "path": str(base / "gone.png")})
    runfiles.write_csv(run_dir / "split.csv", ["path", "label", "split"],
                       [[row["path"], row["label"], row["split"]] for row in rows])
    return run_dir


@pytest.fixture(scope="module")
def exported(tiny_run):
    """Every format/quantize exported once: {(format, quantize): parity dict}."""
    from engine.exports import export_run

    return {case: export_run(tiny_run, *case) for case in FORMAT_CASES}


@pytest.mark.training
def test_every_format_passes_its_mark_on_the_tiny_run(tiny_run, exported):
    from engine import runfiles
    from engine.exports import list_exports

    # Every validation image of split.csv but the one that no longer exists.
    validation_images = sum(row["split"] == "validation" for row in runfiles.read_csv(tiny_run / "split.csv")) - 1
    assert validation_images >= 10

    for (format, quantize), parity in exported.items():
        assert parity["passed"], (format, quantize, parity)
        assert parity["format"] == format and parity["quantize"] == quantize
        assert parity["images"] == validation_images and parity["skipped_images"] == 1 and parity["file_bytes"] > 0
        assert parity["latency_one_ms"] > 0 and parity["latency_batch32_ms"] > 0 and parity["load_seconds"] > 0
        assert parity["runtime"]["name"] == {"savedmodel": "tensorflow", "tflite": "ai-edge-litert",
                                             "onnx": "onnxruntime"}[format]
    assert exported[("savedmodel", "none")]["max_abs_difference"] <= 1e-5
    assert exported[("tflite", "none")]["max_abs_difference"] <= 1e-4
    assert exported[("onnx", "none")]["max_abs_difference"] <= 1e-4
    assert exported[("onnx", "none")]["opset"] == 17
    assert exported[("tflite", "int8")]["top1_agreement"] >= 0.98
    listed = {(item["format"], item["quantize"]): item for item in list_exports(tiny_run)}
    assert set(listed) == set(FORMAT_CASES)
    assert all(item["passed"] for item in listed.values())
    assert listed[("tflite", "int8")]["folder"] == Path(tiny_run) / "exports" / "tflite-int8"
    assert {"model.tflite", "labels.json", "input_spec.json", "README.md", "parity.json"} <= set(
        listed[("tflite", "int8")]["files"])
    assert "saved_model/saved_model.pb" in listed[("savedmodel", "none")]["files"]
    # Nothing half-built is left beside the finished folders.
    assert sorted(path.name for path in (Path(tiny_run) / "exports").iterdir()) == sorted(
        ["savedmodel", "tflite", "tflite-float16", "tflite-int8", "onnx"])


@pytest.mark.training
def test_labels_carry_calibration_and_the_input_spec_says_raw_pixels(tiny_run, exported):
    from engine.predict import run_temperature

    folder = Path(tiny_run) / "exports"
    labels = json.loads((folder / "onnx" / "labels.json").read_text())
    assert labels["classes"] == ["cats", "dogs"] and labels["image_size"] == 64
    assert labels["calibration"]["temperature"] == pytest.approx(run_temperature(tiny_run))
    assert labels["output"]["kind"] == "sigmoid"
    assert json.loads((folder / "tflite-int8" / "input_spec.json").read_text())["dtype"] == "uint8"
    spec = json.loads((folder / "savedmodel" / "input_spec.json").read_text())
    assert spec["dtype"] == "float32" and spec["range"] == [0, 255] and spec["shape"] == [None, 64, 64, 3]


@pytest.mark.training
def test_int8_tflite_takes_uint8_pixels_and_has_only_builtin_ops(tiny_run, exported):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(Path(tiny_run) / "exports" / "tflite-int8" / "model.tflite"))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    assert detail["dtype"] == np.uint8
    scale, zero_point = detail["quantization"]
    # Raw pixels map one to one onto the quantised input.
    assert scale == pytest.approx(1.0, rel=0.02) and abs(zero_point) <= 1
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(name.startswith("Flex") or name == "CUSTOM" for name in ops), ops


@pytest.mark.training
def test_exported_graphs_hold_no_augmentation(tiny_run, exported):
    import onnx

    graph = onnx.load(str(Path(tiny_run) / "exports" / "onnx" / "model.onnx")).graph
    names = " ".join(node.name for node in graph.node).lower()
    assert "augmentation" not in names and "random" not in names
    op_types = {node.op_type for node in graph.node}
    assert not any("Random" in op for op in op_types)


@pytest.mark.training
def test_readme_snippets_classify_a_picture_in_fresh_processes(tiny_run, exported):
    """Each README's snippet, run as written from its folder (only the picture's name replaced)."""
    from engine.exports import export_name

    picture = sorted((Path(tiny_run).parent.parent / "data" / "dogs").glob("*.png"))[0]
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    processes = {}
    # The three start together: most of their time is importing the runtime.
    for case in [("savedmodel", "none"), ("tflite", "int8"), ("onnx", "none")]:
        folder = Path(tiny_run) / "exports" / export_name(*case)
        code = (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
        code = code.replace('"picture.jpg"', repr(str(picture)))
        processes[case] = subprocess.Popen([sys.executable, "-s", "-c", code], cwd=folder, env=environment,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (case, stderr[-2000:])
        answer, confidence = stdout.split()[-2:]
        assert answer == "dogs" and 0.5 <= float(confidence) <= 1.0, (case, stdout)


def test_a_bad_format_or_quantize_names_the_allowed_ones(tmp_path):
    from engine.exports import export_folder, export_run

    with pytest.raises(ValueError, match="savedmodel, tflite, onnx"):
        export_run(tmp_path, "coreml")
    with pytest.raises(ValueError, match="must be one of none; received quantize='int8'"):
        export_run(tmp_path, "onnx", quantize="int8")
    with pytest.raises(ValueError, match="none, float16, int8"):
        export_folder(tmp_path, "tflite", "int4")


@pytest.mark.training
def test_a_viewer_and_a_non_owner_are_refused_and_nothing_is_written(tiny_run, exported):
    from engine.exports import export_run, list_exports
    from engine.users import Role, User

    before = [item["folder"] for item in list_exports(tiny_run)]
    viewer = User(id="oidc|viewer", name="Vera", role=Role.VIEWER)
    with pytest.raises(PermissionError, match="viewer"):
        export_run(tiny_run, "onnx", user=viewer)
    stranger = User(id="oidc|stranger", name="Sam", role=Role.MEMBER)
    with pytest.raises(PermissionError, match="only its owner or an admin may export"):
        export_run(tiny_run, "tflite", quantize="float16", user=stranger)
    assert [item["folder"] for item in list_exports(tiny_run)] == before


@pytest.mark.training
def test_an_export_that_misses_its_mark_is_kept_marked_failed(tiny_run, exported, monkeypatch, tmp_path):
    """A runtime that answers wrongly (here: a runner whose outputs are shifted) fails the mark, and says so."""
    import shutil

    from engine.exports import export_run, list_exports, parity

    copy = tmp_path / Path(tiny_run).name
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("exports"))
    real_runner = parity.run_runner

    def shifted_runner(format, model_path, pixels):
        outputs, timings = real_runner(format, model_path, pixels)
        return np.clip(outputs + 0.05, 0, 1), timings

    monkeypatch.setattr(parity, "run_runner", shifted_runner)
    result = export_run(copy, "onnx")
    assert result["passed"] is False and result["max_abs_difference"] > 1e-4
    assert "≤ 0.0001" in result["mark"]["text"]
    [listed] = list_exports(copy)
    assert listed["passed"] is False and "model.onnx" in listed["files"]
    assert listed["parity"]["max_abs_difference"] == pytest.approx(result["max_abs_difference"])


def test_the_marks_decide_pass_and_fail():
    from engine.exports.parity import compare

    keras = np.array([[0.9, 0.1]] * 98 + [[0.4, 0.6]] * 2)
    labels = np.zeros(100, dtype=int)
    assert compare("tflite", "none", keras + 5e-5, keras, labels)["passed"]
    assert not compare("tflite", "none", keras + 2e-4, keras, labels)["passed"]
    assert not compare("savedmodel", "none", keras + 2e-5, keras, labels)["passed"]
    assert compare("tflite", "float16", keras + 9e-3, keras, labels)["passed"]
    # int8: two of 100 answers change (98 % agreement) with the same accuracy: passes.
    changed = keras.copy()
    changed[0], changed[98] = [0.3, 0.7], [0.6, 0.4]
    result = compare("tflite", "int8", changed, keras, labels)
    assert result["top1_agreement"] == pytest.approx(0.98) and result["accuracy_export"] == result["accuracy_keras"]
    assert result["passed"]
    # Three change: 97 % agreement fails.
    changed[1] = [0.3, 0.7]
    assert not compare("tflite", "int8", changed, keras, labels)["passed"]
    # 98 % agreement, but both changes are mistakes: accuracy 2 points lower fails.
    changed = keras.copy()
    changed[:2] = [0.3, 0.7]
    result = compare("tflite", "int8", changed, keras, labels)
    assert result["top1_agreement"] == pytest.approx(0.98) and not result["passed"]


def test_the_converter_error_names_the_ops():
    from engine.exports.tflite import UnsupportedOpsError, ops_named_in, unsupported_ops_error

    message = ("loc(fused[...]): 'tf.Erfinv' op is neither a custom op nor a flex op\n"
               "error: failed while converting: 'main': \nSome ops are not supported by the native TFLite runtime"
               "\n\tFlex ops: FlexErfinv, FlexRoll\n")
    assert ops_named_in(message) == ["Erfinv", "Roll"]
    error = unsupported_ops_error(RuntimeError(message), "ConvNeXtTiny", "none")
    assert isinstance(error, UnsupportedOpsError) and isinstance(error, ValueError)
    assert "Erfinv, Roll" in str(error) and "ConvNeXtTiny" in str(error) and "ONNX" in str(error)


def test_the_runners_import_only_their_runtime():
    """No runner names our package, and each is a plain script beside runner_common.py."""
    from engine.exports.parity import RUNNERS, RUNTIMES_FOLDER

    for script in [*RUNNERS.values(), "runner_common.py"]:
        text = (RUNTIMES_FOLDER / script).read_text()
        assert "import engine" not in text and "from engine" not in text


def test_the_sample_is_every_kth_row_at_most_the_limit():
    from engine.exports.sample import every_kth

    rows = list(range(1000))
    assert every_kth(rows, 500) == list(range(0, 1000, 2))
    assert every_kth(rows, 300) == list(range(0, 1000, 4))[:300]
    assert every_kth(rows[:7], 500) == rows[:7]
    assert every_kth(rows, 0) == []
