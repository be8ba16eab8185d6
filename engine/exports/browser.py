"""The browser bundle: a static folder where a person drops an image and sees the classes.

The folder holds `index.html` (from `browser_page.html`), the ONNX model, `labels.json`,
onnxruntime-web's WebAssembly runtime copied from `node_modules/` (no CDN, nothing fetched
from elsewhere) and a README. The page resizes a picture the way `engine.images.load_rgb`
does (Pillow's bilinear filter, re-implemented in the page's script), runs the model on raw
0–255 RGB, applies the run's temperature and operating point, and shows every class as a bar.
This module never imports TensorFlow: it takes an existing `.onnx` file.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from engine import runfiles

_REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
# Where `make browser-runtime` (npm ci) puts onnxruntime-web's files.
RUNTIME_DIR = _REPOSITORY_ROOT / "node_modules" / "onnxruntime-web" / "dist"
# The smallest set that runs: the WebAssembly-only build of the API (a classic script, so the
# page needs no module loader), the Emscripten glue it imports, and the SIMD binary. The
# "threaded" binary is the only CPU one 1.30 ships; the page sets numThreads = 1, so it needs
# no SharedArrayBuffer and no cross-origin isolation headers.
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
TEMPLATE = Path(__file__).with_name("browser_page.html")
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
PAGE_FILE = "index.html"
README_FILE = "README.md"
# The template's one placeholder for the title and one for the page's settings.
_TITLE_MARK = "{{TITLE}}"
_CONFIG_MARK = "{{CONFIG_JSON}}"

_README = """# {title}

A self-contained image classifier that runs in the browser: drop a picture on the page and it
shows how likely each class is. Nothing is sent anywhere; the model runs on this computer
(onnxruntime-web {version}, WebAssembly, one thread).

Serve this folder with any static web server and open `index.html`, for example:

    python -m http.server 8000 --bind 127.0.0.1
    # then open http://127.0.0.1:8000/index.html

Opening `index.html` straight from the disk (a `file://` address) does not work: browsers
refuse to load the WebAssembly runtime and the model from `file://` pages (Chromium gives
such pages no origin, so `fetch` and module imports of local files are blocked).

Files: `index.html` (the page), `model.onnx` (the model: raw 0-255 RGB in, probabilities out),
`labels.json` (the classes, in output order), `ort.wasm.min.js`, `ort-wasm-simd-threaded.mjs`
and `ort-wasm-simd-threaded.wasm` (onnxruntime-web, MIT licence, from npm).
"""


class RuntimeMissingError(FileNotFoundError):
    """onnxruntime-web's files are not in node_modules (npm has not installed them)."""


def build_browser_bundle(onnx_path: str | os.PathLike, classes: Sequence[str], image_size: int,
                         out_dir: str | os.PathLike, temperature: float = 1.0, threshold: Optional[float] = None,
                         minimum_confidence: Optional[float] = None, title: Optional[str] = None,
                         runtime_dir: str | os.PathLike | None = None) -> dict:
    """Writes a static browser bundle of an ONNX classifier into `out_dir`.

    Args:
        onnx_path: The model as ONNX: (N, image_size, image_size, 3) float32 raw 0–255 RGB in,
            probabilities out (one sigmoid unit for two classes, a softmax otherwise).
        classes: The class names in output order (`labels.json`).
        image_size: The side in pixels the model takes.
        out_dir: The folder to write; created if needed, its bundle files replaced.
        temperature: The run's calibration temperature (`evaluation.json`); 1.0 leaves the
            probabilities as they are.
        threshold: Two classes only: the probability of `classes[1]` from which it is answered.
        minimum_confidence: Below this probability of the answered class the page says "not sure".
        title: The page's heading; "Image classifier: a, b, c" when not given.
        runtime_dir: Where onnxruntime-web's `dist/` files are; `node_modules/onnxruntime-web/dist`
            of this checkout when not given.

    Returns:
        {"out_dir": str, "files": {name: size in bytes}, "total_bytes": int}.

    Raises:
        FileNotFoundError: the ONNX file does not exist.
        RuntimeMissingError: onnxruntime-web is not installed in node_modules.
        ValueError: fewer than two classes, a bad image size, temperature, threshold or confidence;
            an ONNX model that does not take one (N, image_size, image_size, 3) float32 image or
            whose output does not fit the classes.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"The ONNX model {onnx_path} does not exist. Expected the `.onnx` file of a run's "
                                f"model; write it first with the ONNX export (engine.exports.onnx_export.write_onnx).")
    classes = _check_classes(classes)
    image_size = _check_image_size(image_size)
    temperature = _check_temperature(temperature)
    threshold = _check_fraction("threshold", threshold)
    minimum_confidence = _check_fraction("minimum_confidence", minimum_confidence)
    if threshold is not None and len(classes) != 2:
        raise ValueError(f"A threshold needs two classes; received threshold={threshold} with {len(classes)} "
                         f"classes. Leave the threshold out for models of more than two classes.")
    runtime = _runtime_files(Path(runtime_dir) if runtime_dir is not None else RUNTIME_DIR)
    check_onnx_signature(onnx_path, image_size, len(classes))
    title = title or f"Image classifier: {', '.join(classes)}"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in runtime:
        shutil.copyfile(source, out_dir / source.name)
    shutil.copyfile(onnx_path, out_dir / MODEL_FILE)
    # Plain writes, not runfiles' atomic ones: those create files readable by their owner only,
    # and a web server running as another user must be able to read every file of the bundle.
    (out_dir / LABELS_FILE).write_text(json.dumps({"classes": classes}, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    settings = {"classes": classes, "image_size": image_size, "temperature": temperature, "threshold": threshold,
                "minimum_confidence": minimum_confidence, "model": MODEL_FILE, "title": title}
    (out_dir / PAGE_FILE).write_text(render_page(title, settings), encoding="utf-8")
    (out_dir / README_FILE).write_text(_README.format(title=title, version=_runtime_version(runtime)), encoding="utf-8")

    names = [PAGE_FILE, MODEL_FILE, LABELS_FILE, README_FILE, *(source.name for source in runtime)]
    files = {name: (out_dir / name).stat().st_size for name in names}
    return {"out_dir": str(out_dir), "files": files, "total_bytes": sum(files.values())}


def build_browser_bundle_from_onnx_export(onnx_folder: str | os.PathLike, out_dir: str | os.PathLike,
                                          title: Optional[str] = None, runtime_dir: str | os.PathLike | None = None
                                          ) -> dict:
    """The browser bundle of a run's ONNX export folder (`runs/<id>/exports/onnx/`).

    That folder's `labels.json` holds everything the page needs besides the model: the classes,
    the image size, the calibration temperature and the operating point.

    Raises:
        FileNotFoundError: the folder has no model.onnx.
        ValueError: its labels.json is missing or lacks the classes or the image size.
        RuntimeMissingError: onnxruntime-web is not installed in node_modules.
    """
    onnx_folder = Path(onnx_folder)
    labels = runfiles.read_json(onnx_folder / LABELS_FILE)
    if not isinstance(labels, dict) or not labels.get("classes") or not labels.get("image_size"):
        raise ValueError(f"{onnx_folder / LABELS_FILE} is missing or lacks `classes` and `image_size`; expected the "
                         f"folder of a finished ONNX export. Export the run to ONNX again.")
    temperature = (labels.get("calibration") or {}).get("temperature") or 1.0
    decision = labels.get("operating_point") or {}
    return build_browser_bundle(onnx_folder / MODEL_FILE, labels["classes"], int(labels["image_size"]), out_dir,
                                temperature=temperature, threshold=decision.get("threshold"),
                                minimum_confidence=decision.get("minimum_confidence"), title=title,
                                runtime_dir=runtime_dir)


def render_page(title: str, settings: dict) -> str:
    """The page: the template with the title escaped for HTML and the settings as inert JSON.

    The settings go into a `<script type="application/json">` block; `<`, `>` and `&` are
    written as JSON escapes so no class name can close the block or open a tag.
    """
    settings_json = json.dumps(settings, ensure_ascii=True)
    settings_json = settings_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = TEMPLATE.read_text(encoding="utf-8")
    return template.replace(_TITLE_MARK, html.escape(title, quote=True)).replace(_CONFIG_MARK, settings_json)


def check_onnx_signature(onnx_path: Path, image_size: int, num_classes: int) -> None:
    """Refuses an ONNX model the page cannot feed: the page gives one float32 (1, size, size, 3) tensor.

    Checked here rather than left to the browser, where the same mistake would show up only as
    a runtime error on the first picture a person drops.

    Raises:
        ValueError: another number of inputs, another input shape or type, or an output whose
            width is neither 1 (two classes) nor the number of classes.
    """
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError for any bad file
        raise ValueError(f"{onnx_path} is not an ONNX model ({type(error).__name__}: {error}). Expected the `.onnx` "
                         f"file written by the ONNX export.") from error
    constants = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs)
        raise ValueError(f"The ONNX model {onnx_path.name} takes {len(inputs)} inputs ({names}); the browser page "
                         f"feeds one image. Expected one float32 input of shape (N, {image_size}, {image_size}, 3): "
                         f"export the model again, with every constant folded into the graph.")
    tensor = inputs[0].type.tensor_type
    shape = [dimension.dim_value if dimension.HasField("dim_value") else None for dimension in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(shape) != 4 or shape[1:] not in (
            [image_size, image_size, 3], [None, None, 3], [None, None, None]):
        received = "(" + ", ".join("N" if size is None else str(size) for size in shape) + ")"
        raise ValueError(f"The ONNX model {onnx_path.name} takes {received} "
                         f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}; expected float32 "
                         f"(N, {image_size}, {image_size}, 3) raw 0–255 RGB. Pass the run's image size, or export "
                         f"the model with its channels-last float32 input.")
    output_shape = [dimension.dim_value if dimension.HasField("dim_value") else None
                    for dimension in graph.output[0].type.tensor_type.shape.dim]
    width = output_shape[-1] if output_shape else None
    expected = 1 if num_classes == 2 else num_classes
    if width is not None and width != expected and width != num_classes:
        raise ValueError(f"The ONNX model {onnx_path.name} gives {width} outputs per image for {num_classes} classes; "
                         f"expected {expected}. Pass the classes of the run this model was exported from.")


def _runtime_files(runtime_dir: Path) -> list[Path]:
    missing = [name for name in RUNTIME_FILES if not (runtime_dir / name).is_file()]
    if missing:
        raise RuntimeMissingError(
            f"onnxruntime-web is not installed: {', '.join(missing)} not found in {runtime_dir}. "
            f"Expected the npm package pinned in package.json; run `make browser-runtime` (needs npm).")
    return [runtime_dir / name for name in RUNTIME_FILES]


def _runtime_version(runtime: list[Path]) -> str:
    package = runfiles.read_json(runtime[0].parent.parent / "package.json") or {}
    return str(package.get("version", "(version unknown)"))


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str) or len(list(classes)) < 2:
        raise ValueError(f"`classes` must list at least two class names; received classes={classes!r}.")
    names = [str(name) for name in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"`classes` must not repeat a name; received classes={names!r}.")
    return names


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"`image_size` must be a whole number of pixels ≥ 1; received image_size={image_size!r}.")
    return image_size


def _check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a number > 0 (1.0 for none); received temperature={temperature!r}.")
    return float(temperature)


def _check_fraction(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be between 0 and 1, or None; received {name}={value!r}.")
    return float(value)


BROWSER_FOLDER = "browser"


def export_browser(run_dir: str | os.PathLike, user=None, sample_limit: Optional[int] = None,
                   progress=None) -> dict:
    """The run's browser bundle in `runs/<id>/exports/browser/`, made from its ONNX export.

    The ONNX export is made (and checked by onnxruntime) first unless one exists that passed its
    parity mark; a bundle is never built on an ONNX file that failed it. The page runs that same
    file in onnxruntime-web (tests/test_browser_bundle.py compares it with Keras in Chromium).

    Args:
        run_dir: The run folder.
        user: The acting user; exporting writes into the run folder: its owner or an admin only.
        sample_limit: Validation images the ONNX parity check compares (default: the exports' default).
        progress: Called with one human line per step.

    Returns:
        {"out_dir", "files": {name: bytes}, "total_bytes", "onnx_parity": the ONNX export's parity}.

    Raises:
        PermissionError: a viewer, or a member who does not own the run.
        ValueError: the ONNX export failed its parity mark, or the model cannot be bundled.
        RuntimeMissingError: onnxruntime-web is not installed (`make browser-runtime`).
    """
    import time

    from engine.exports import DEFAULT_SAMPLE_LIMIT, EXPORTS_FOLDER, PARITY_NAME, _replace_folder, export_folder, export_run
    from engine.jobs import authorize
    from engine.status import read_status

    run_dir = Path(run_dir)
    status = read_status(run_dir)
    authorize(user, status, "export")
    say = progress or (lambda text: None)
    onnx_folder = export_folder(run_dir, "onnx")
    parity = runfiles.read_json(onnx_folder / PARITY_NAME)
    if not (isinstance(parity, dict) and parity.get("passed") is True):
        say("Making the ONNX export the page runs, and checking it with onnxruntime.")
        parity = export_run(run_dir, "onnx", user=user, sample_limit=sample_limit or DEFAULT_SAMPLE_LIMIT,
                            progress=progress)
    if not parity.get("passed"):
        raise ValueError(f"Run {run_dir.name}'s ONNX export failed its parity check "
                         f"({(parity.get('mark') or {}).get('text', '')}), so no browser page is built on it.")
    target = run_dir / EXPORTS_FOLDER / BROWSER_FOLDER
    building = target.parent / f".{target.name}.{runfiles.process_tag()}.{time.time_ns()}"
    try:
        written = build_browser_bundle_from_onnx_export(onnx_folder, building, title=status.name or None)
        _replace_folder(building, target)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    say(f"Browser page written to {target}: serve that folder (python -m http.server) and open index.html.")
    return {**written, "out_dir": str(target), "onnx_parity": parity}
