"""Built-in sample datasets, written once as PNG class folders into the app's data folder.

`digits` is scikit-learn's bundled handwritten digits (1797 images, 10 classes): it
needs nothing from the network, so a fresh, offline install can train at once.
This module never imports TensorFlow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from engine import locations

SAMPLES = {
    "digits": "Handwritten digits 0–9 (1797 small grey images, 10 classes), bundled with scikit-learn.",
    "cats_vs_dogs": "Cats and dogs photos (3000 JPEGs, the TensorFlow tutorial's subset), downloaded once (68 MB).",
}
# The address the TensorFlow transfer-learning tutorial downloads its cats-vs-dogs subset from.
CATS_VS_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"


class SampleUnavailableError(ValueError):
    """A downloadable sample cannot be downloaded here; the message says what to use instead."""


def ensure_sample(name: str, data_dir: Optional[str | os.PathLike] = None) -> Path:
    """Writes the sample's class folders if they are not there yet; returns the dataset folder.

    Args:
        name: One of SAMPLES.
        data_dir: The data folder to write under; defaults to `engine.locations.data_dir()`.

    Raises:
        ValueError: unknown sample name.
    """
    if name not in SAMPLES:
        raise ValueError(f"Unknown sample {name!r}; choose one of: {', '.join(SAMPLES)}.")
    target = locations.samples_dir(data_dir) / name
    if (target / ".complete").is_file():
        # A downloaded sample's marker holds the folder the archive unpacked to; a written
        # sample's marker holds its version, so a sample written the old way is rewritten.
        recorded = (target / ".complete").read_text().strip()
        if name in _DOWNLOADERS and recorded != "ok":
            return Path(recorded)
        if recorded == _WRITTEN_MARKER:
            return target
    if name in _DOWNLOADERS:
        return _DOWNLOADERS[name](target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename it into place, so a half-written sample is never used.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _WRITERS[name](staging)
        (staging / ".complete").write_text(_WRITTEN_MARKER + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_digits(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        # 0–16 grey levels, ink dark on white like handwriting. The 8×8 scans are upscaled
        # smoothly (Lanczos, to 48×48) onto a 64×64 page with a white margin, so they look
        # like pen strokes rather than blocks. Measured with EfficientNet-Lite0 features and
        # a linear classifier: blocky (nearest) 32×32 digits scored 0.90, these 0.97.
        grey = (255 - pixels / 16.0 * 255).astype(np.uint8)
        digit = Image.fromarray(grey, mode="L").resize((48, 48), Image.Resampling.LANCZOS)
        image = Image.new("L", (64, 64), 255)
        image.paste(digit, (8, 8))
        class_folder = folder / str(int(label))
        class_folder.mkdir(exist_ok=True)
        image.save(class_folder / f"digit_{index:04d}.png")


def _download_cats_vs_dogs(target: Path) -> Path:
    """Downloads and unpacks the tutorial's zip with Keras's own `get_file` (cached, with progress)."""
    if not locations.download_reachable("storage.googleapis.com"):
        raise SampleUnavailableError(
            "The cats_vs_dogs sample is downloaded from storage.googleapis.com, which this machine cannot "
            "reach; use the digits sample or a folder of your own images instead.")
    import keras

    target.mkdir(parents=True, exist_ok=True)
    archive = keras.utils.get_file("cats_and_dogs_filtered.zip", origin=CATS_VS_DOGS_URL, extract=True,
                                   cache_dir=str(target), cache_subdir="download")
    found = sorted(Path(target, "download").rglob("cats_and_dogs_filtered"))
    dataset = next((path for path in found if (path / "train").is_dir()), None)
    if dataset is None:
        raise SampleUnavailableError(f"The downloaded archive {archive} has no cats_and_dogs_filtered/train folder.")
    (target / ".complete").write_text(str(dataset) + "\n")
    return dataset


_WRITERS = {"digits": _write_digits}
# Bumped whenever a written sample changes, so existing copies are written again.
_WRITTEN_MARKER = "ok 2"
_DOWNLOADERS = {"cats_vs_dogs": _download_cats_vs_dogs}
