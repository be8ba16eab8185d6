"""Exports of a trained run (SavedModel, TFLite, ONNX), each checked against `model.keras`.

    from engine.exports import export_run, list_exports
    parity = export_run("runs/<id>", "tflite", quantize="int8")   # runs/<id>/exports/tflite-int8/
    list_exports("runs/<id>")                                      # every export with its parity

An export folder holds the model, `labels.json` (classes, calibration temperature, operating
point), `input_spec.json`, a `README.md` with a working snippet, and `parity.json` (written
last). It is built in a hidden temporary sibling and renamed into place, so a listed folder is
always complete. This package imports TensorFlow only when it exports, never to list.
See docs/exports.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from engine import runfiles

# format -> the quantisations offered for it, in menu order.
FORMATS: dict[str, tuple[str, ...]] = {
    "savedmodel": ("none",),
    "tflite": ("none", "float16", "int8"),
    "onnx": ("none",),
}
EXPORTS_FOLDER = "exports"
PARITY_NAME = "parity.json"
DEFAULT_SAMPLE_LIMIT = 500
# Training images the int8 converter calibrates activation ranges on.
REPRESENTATIVE_IMAGES = 150


def check_choice(format: str, quantize: str) -> None:
    """Raises ValueError unless (format, quantize) is offered, naming what is."""
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}; received format={format!r}.")
    if quantize not in FORMATS[format]:
        raise ValueError(f"`quantize` for {format} must be one of {', '.join(FORMATS[format])}; received "
                         f"quantize={quantize!r}. Quantised exports are TFLite only (float16, int8).")


def export_name(format: str, quantize: str = "none") -> str:
    """`<format>` or `<format>-<quantize>`: the export's folder name."""
    return format if quantize == "none" else f"{format}-{quantize}"


def export_folder(run_dir: str | os.PathLike, format: str, quantize: str = "none") -> Path:
    """Where the export of (format, quantize) lives: `runs/<id>/exports/<format>[-<quantize>]/`."""
    check_choice(format, quantize)
    return Path(run_dir) / EXPORTS_FOLDER / export_name(format, quantize)


def list_exports(run_dir: str | os.PathLike) -> list[dict]:
    """The run's finished exports, in FORMATS order.

    Returns:
        One dict per export folder: `folder` (Path), `format`, `quantize`, `files` (relative
        paths of every file), `parity` (the parity.json dict, or None when unreadable) and
        `passed` (True only when parity.json says so). Hidden folders (exports under way) are skipped.
    """
    exports = []
    for format, quantizations in FORMATS.items():
        for quantize in quantizations:
            folder = Path(run_dir) / EXPORTS_FOLDER / export_name(format, quantize)
            if not folder.is_dir():
                continue
            parity = runfiles.read_json(folder / PARITY_NAME)
            parity = parity if isinstance(parity, dict) else None
            files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
            exports.append({"folder": folder, "format": format, "quantize": quantize, "files": files,
                            "parity": parity, "passed": bool(parity and parity.get("passed") is True)})
    return exports


def export_run(run_dir: str | os.PathLike, format: str, quantize: str = "none", user=None,
               sample_limit: int = DEFAULT_SAMPLE_LIMIT, progress: Optional[Callable[[str], None]] = None,
               source: str = "python") -> dict:
    """Exports a finished run and checks the export against `model.keras`.

    Args:
        run_dir: The run folder (it must hold model.keras, labels.json and split.csv).
        format: One of FORMATS: "savedmodel", "tflite", "onnx".
        quantize: "none"; for TFLite also "float16" or "int8".
        user: The acting user (`engine.users.User`); None is the local user (an admin).
            Exporting writes into the run folder: its owner or an admin only.
        sample_limit: At most this many validation images are compared (every k-th).
        progress: Called with one human line per step.
        source: Where from, for the audit log ("page", "cli" or "python").

    Returns:
        The parity dict written to `parity.json` (see docs/exports.md); `passed` says whether
        the export met its mark. An export that misses it is kept, marked failed.

    Raises:
        ValueError: a format/quantize not offered, a run without a model, a model with ops
            TFLite cannot convert to built-ins (the message names them).
        PermissionError: a viewer, or a member who does not own the run.
        RuntimeError: the runtime could not load or run the export.
    """
    from engine.jobs import authorize
    from engine.status import read_status

    check_choice(format, quantize)
    if isinstance(sample_limit, bool) or not isinstance(sample_limit, int) or sample_limit < 1:
        raise ValueError(f"`sample_limit` must be a whole number ≥ 1; received sample_limit={sample_limit!r}.")
    run_dir = Path(run_dir)
    if not (run_dir / runfiles.STATUS_FILE).is_file():
        raise ValueError(f"{run_dir} is not a run folder (no {runfiles.STATUS_FILE}); expected runs/<id>/.")
    acting = authorize(user, read_status(run_dir), "export")
    say = progress or (lambda text: None)
    target = export_folder(run_dir, format, quantize)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.parent / f".{target.name}.{runfiles.process_tag()}.{time.time_ns()}"
    building.mkdir()
    try:
        parity = _build(run_dir, format, quantize, building, sample_limit, say)
        _replace_folder(building, target)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    say(f"{export_name(format, quantize)}: {'passed' if parity['passed'] else 'FAILED'} ({parity['mark']['text']}).")
    from engine import audit

    audit.record(run_dir.parent, acting, "export", run_dir.name, source,
                 {"export": export_name(format, quantize), "passed": parity["passed"]})
    return parity


def _build(run_dir: Path, format: str, quantize: str, folder: Path, sample_limit: int, say) -> dict:
    """Converts, writes the bundle, runs the parity check; parity.json is the last file written."""
    import numpy as np

    from engine.exports import bundle, parity, sample
    from engine.exports.inference import inference_model
    from engine.modeling import probabilities_per_class
    from engine.operating_point import read_decision
    from engine.predict import load_run_model, predict_probabilities, run_temperature

    say("Loading model.keras")
    model, class_names, image_size = load_run_model(run_dir)
    backbone = _backbone_name(run_dir)
    exported = inference_model(model)
    say(f"Converting to {export_name(format, quantize)}")
    if format == "savedmodel":
        from engine.exports.savedmodel import write_savedmodel
        written = write_savedmodel(exported, folder)
    elif format == "onnx":
        from engine.exports.onnx_export import write_onnx
        written = write_onnx(exported, folder, backbone)
    else:
        from engine.exports.tflite import write_tflite

        def representative():
            say(f"Reading up to {REPRESENTATIVE_IMAGES} training images for int8 calibration")
            return sample.read_sample(run_dir, class_names, image_size, "train", REPRESENTATIVE_IMAGES).pixels

        written = write_tflite(exported, folder, quantize, representative, backbone)
    model_path = Path(written["model_path"])
    saved = read_decision(run_dir)
    decision = None if saved.threshold is None and saved.minimum_confidence is None else \
        {"threshold": saved.threshold, "minimum_confidence": saved.minimum_confidence}
    bundle.write_bundle(folder, format, quantize, model_path.name, class_names, image_size,
                        written.get("input_dtype", "float32"), run_temperature(run_dir), decision, run_dir.name,
                        written.get("opset"))

    say(f"Reading up to {sample_limit} validation images")
    checked = sample.read_sample(run_dir, class_names, image_size, "validation", sample_limit)
    say(f"Running the export in {written['runtime']['name']} on {len(checked.labels)} images")
    outputs, timings = parity.run_runner(format, model_path, checked.pixels)
    say("Running model.keras on the same pixels")
    keras_probabilities = predict_probabilities(model, checked.pixels, len(class_names))
    export_probabilities = probabilities_per_class(outputs, len(class_names))
    comparison = parity.compare(format, quantize, np.asarray(export_probabilities, dtype=np.float64),
                                np.asarray(keras_probabilities, dtype=np.float64), checked.labels)
    record = parity.parity_record(format, quantize, timings.get("runtime", written["runtime"]), written.get("opset"),
                                  checked, checked.skipped, comparison, timings, parity.folder_bytes(model_path))
    record["backbone"] = backbone
    if written.get("representative_images"):
        record["representative_images"] = written["representative_images"]
    runfiles.atomic_write_json(folder / PARITY_NAME, record)
    return json.loads((folder / PARITY_NAME).read_text(encoding="utf-8"))


def _backbone_name(run_dir: Path) -> str:
    """The run's backbone from config.json, for messages and parity.json (empty when unreadable)."""
    config = runfiles.read_json(run_dir / runfiles.CONFIG_FILE) or {}
    return str((config.get("model") or {}).get("backbone", "")) if isinstance(config, dict) else ""


def _replace_folder(building: Path, target: Path) -> None:
    """Moves the finished folder into place; an older export of the same kind is replaced whole."""
    if target.exists():
        retired = target.parent / f".{target.name}.old.{runfiles.process_tag()}.{time.time_ns()}"
        os.replace(target, retired)
        os.replace(building, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(building, target)
