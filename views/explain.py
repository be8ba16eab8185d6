"""Grad-CAM overlays on the pages: the model loaded once per model file, maps computed by engine.gradcam."""

from pathlib import Path

import numpy as np
import streamlit as st

from engine import runfiles


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def _loaded_model(run_path: str, modified: float):
    """The run's model, loaded once per model file (read-only, shared by every visitor)."""
    from engine.predict import load_run_model

    return load_run_model(run_path)


def loaded_model(run_path: str):
    """(model, class names, image size) of a run, from the shared cache; a new model file loads anew."""
    return _loaded_model(run_path, (Path(run_path) / runfiles.MODEL_FILE).stat().st_mtime)


@st.cache_data(max_entries=64, show_spinner="Finding where the model looked…")
def _heatmaps(run_path: str, modified: float, paths: tuple, class_names: tuple) -> list:
    """One Grad-CAM map per readable image (None for a file that cannot be read), explaining the given class."""
    from engine.gradcam import class_activation_maps, is_blank
    from engine.images import load_rgb

    model, classes, image_size = _loaded_model(run_path, modified)
    images, positions = [], []
    for position, path in enumerate(paths):
        try:
            images.append(load_rgb(path, image_size))
            positions.append(position)
        except Exception:  # noqa: BLE001 - an unreadable file simply gets no overlay
            continue
    maps: list = [None] * len(paths)
    if images:
        indices = [classes.index(name) if name in classes else None for name in class_names]
        explained = [indices[position] for position in positions]
        # compiled: the model is shared and explained batch after batch, so tracing once pays off.
        computed = class_activation_maps(model, np.stack(images),
                                         None if any(index is None for index in explained) else explained,
                                         compiled=True)
        for position, heatmap in zip(positions, computed):
            maps[position] = None if is_blank(heatmap) else heatmap
    return maps


def heatmaps(run_path: str, paths: list, class_names: list) -> list:
    """Grad-CAM maps for image files, each explaining the named class (or the predicted one for an unknown name)."""
    modified = (Path(run_path) / runfiles.MODEL_FILE).stat().st_mtime
    return _heatmaps(run_path, modified, tuple(paths), tuple(class_names))


def overlaid(image: np.ndarray, heatmap, opacity: float) -> np.ndarray:
    """The image with its map blended over it (the image alone when there is no map)."""
    from engine.gradcam import overlay

    return image if heatmap is None else overlay(image, heatmap, opacity)


def overlay_controls(key: str) -> float | None:
    """A toggle and an opacity slider; the opacity when overlays are on, else None."""
    left, right = st.columns([1, 2])
    show = left.toggle("Show where the model looked", key=f"{key}_show",
                       help="Grad-CAM: the warm areas are what pushed the model towards its answer.")
    if not show:
        return None
    return right.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"{key}_opacity")


@st.cache_data(max_entries=64, show_spinner="Finding where the model looked…")
def _heatmap_for_bytes(run_path: str, modified: float, image_bytes: bytes, suffix: str, class_name: str):
    """The Grad-CAM map of an uploaded picture for `class_name`, or None when the picture cannot be read."""
    import tempfile

    from engine.gradcam import class_activation_maps, is_blank
    from engine.images import load_rgb

    model, classes, image_size = _loaded_model(run_path, modified)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"picture{suffix}"
        path.write_bytes(image_bytes)
        try:
            image = load_rgb(str(path), image_size)
        except Exception:  # noqa: BLE001 - the prediction already said why the file is unusable
            return None
    heatmap = class_activation_maps(model, image[None], [classes.index(class_name)], compiled=True)[0]
    return None if is_blank(heatmap) else heatmap  # no part counted more than another: nothing to draw


def overlay_for_upload(run_path: str, image_bytes: bytes, name: str, class_name: str, opacity: float,
                       size: int = 384):
    """An uploaded picture (at most `size` pixels a side) with the map for `class_name` over it; None if
    unreadable or when the model pointed at no part in particular."""
    import io

    from PIL import Image, ImageOps

    modified = (Path(run_path) / runfiles.MODEL_FILE).stat().st_mtime
    heatmap = _heatmap_for_bytes(run_path, modified, image_bytes, Path(name).suffix or ".png", class_name)
    if heatmap is None:
        return None
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB")
    shown.thumbnail((size, size))
    return overlaid(np.asarray(shown), heatmap, opacity)
