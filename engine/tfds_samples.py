"""TensorFlow Datasets image-classification datasets, written once as class folders.

`ensure_tfds_dataset("beans")` loads a dataset from the `tensorflow-datasets` catalogue by
name and writes it under the app's data folder as `<data>/tfds/<name>/`, in the layouts
the engine reads (see `engine.data`):

  * pre-split, when TFDS has a validation split: `train/<class>/`, `validation/<class>/`
    and `test/<class>/` (when TFDS has a test split), used as given;
  * flat otherwise: `<class>/`, split by the engine (stratified, seeded). `tf_flowers` has
    only `train`; a dataset with `train` and `test` but no validation split (e.g.
    `rock_paper_scissors`) has both written into the flat folder, since the engine's
    pre-split layout needs a validation folder.

Class folders are named by the dataset's ClassLabel names. Each image is written as the
bytes TFDS stored (JPEG for photo datasets, PNG otherwise), never re-encoded: no JPEG
generation loss, no growth from turning photos into PNGs, and no decode cost.

`tensorflow_datasets` (which imports TensorFlow) is imported only when a dataset is
actually prepared, so importing this module stays light and a prepared dataset is
returned without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import numpy as np

from engine import locations
from engine.samples import SampleUnavailableError

# A few datasets that suit transfer learning on a CPU; any other TFDS image-classification
# name is accepted too.
TFDS_SUGGESTIONS = {
    "beans": "Bean leaf photos: healthy, angular leaf spot, bean rust (3 classes, 1,295 images, "
             "TFDS's own train/validation/test; 172 MB download).",
    "tf_flowers": "Flower photos: daisy, dandelion, roses, sunflowers, tulips (5 classes, 3,670 images; 218 MB).",
    "rock_paper_scissors": "Rendered hands playing rock, paper, scissors (3 classes, 2,892 images; 220 MB).",
    "horses_or_humans": "Rendered horses and humans (2 classes, 1,283 images; 154 MB).",
    "oxford_flowers102": "102 flower species (8,189 images, TFDS's own train/validation/test; 329 MB).",
    "cats_vs_dogs": "The full Microsoft cats-and-dogs photo set (2 classes, about 23,000 images; 787 MB).",
}
CATALOG_URL = "https://www.tensorflow.org/datasets/catalog/overview#image_classification"
# A TFDS name, optionally with a config and a version: `beans`, `imagenette/160px-v2`, `mnist:3.*.*`.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9*]+(\.[0-9*]+){0,2})?")
# TFDS split name → the engine's split folder, in order of preference.
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
MARKER = ".complete"
# Written for each image at most this often, so a page's progress bar costs nothing.
PROGRESS_EVERY = 50
# Leading bytes of the formats TFDS stores (and the engine reads) → file extension.
SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def tfds_folder_name(name: str) -> str:
    """The folder a TFDS name is written to: `imagenette/160px-v2` → `imagenette-160px-v2`."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", name)


def ensure_tfds_dataset(name: str, data_dir: Optional[str | os.PathLike] = None,
                        progress: Optional[Callable[[int, int], None]] = None, user=None) -> Path:
    """Writes a TFDS image-classification dataset as class folders once; returns the folder.

    The first call downloads the dataset with `tensorflow-datasets` into its data dir
    (`$TFDS_DATA_DIR`, else `<data_dir>/tfds/.tfds_data`) and writes the class folders into
    a staging folder that is renamed into place with a `.complete` marker, so a
    half-written dataset is never used. Later calls return the folder at once, offline too.
    In our own TFDS data dir the downloaded archives are deleted afterwards; TFDS's
    prepared records are kept, so the folders can be written again without a download.

    Args:
        name: A TFDS name such as `beans` or `tf_flowers` (any image-classification
            dataset of the catalogue; a config and version may follow: `name/config:1.0.0`).
        data_dir: The app's data folder; defaults to `engine.locations.data_dir()`.
        progress: Called with (images written, images expected) while writing.
        user: Who asks (`engine.users.User`); viewers may not add data to the server. None: the local user.

    Raises:
        PermissionError: a viewer.
        ValueError: the name is not a TFDS dataset, or the dataset is not image
            classification (it needs one image feature and one ClassLabel feature).
        SampleUnavailableError: the dataset cannot be downloaded here (offline, a
            manual download, or a package it needs is missing).
    """
    if user is not None and not user.can_start:
        raise PermissionError(f"{user.name} is a viewer: viewers see the data but cannot add datasets.")
    name = str(name).strip()
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a TensorFlow Datasets name; give one such as "
            f"{', '.join(TFDS_SUGGESTIONS)} (lower case, optionally `/config` and `:version`).")
    root = locations.tfds_dir(data_dir)
    target = root / tfds_folder_name(name)
    if (target / MARKER).is_file():
        return target
    # TFDS prints its "Downloading and preparing…" lines on stdout; keep stdout for results
    # (the CLI's first line is the run folder).
    with contextlib.redirect_stdout(sys.stderr):
        tfds_data_dir = locations.tfds_data_dir(data_dir)
        builder = _builder(name, str(tfds_data_dir))
        image_key, label_key = image_and_label_keys(name, builder.info.features, builder.info.supervised_keys)
        _download_and_prepare(name, builder)
        plan = _split_plan(name, list(builder.info.splits))
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            summary = _write_splits(builder, plan, image_key, label_key, staging, progress)
            summary.update(name=name, version=str(builder.version))
            (staging / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
            if (target / MARKER).is_file():
                return target  # Another process finished the same dataset first.
            if target.exists():
                shutil.rmtree(target)  # A folder left half-written by an earlier, interrupted call.
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    if locations.owns_tfds_data_dir():
        # Our own TFDS cache: the downloaded archives are not needed once the dataset is prepared.
        shutil.rmtree(tfds_data_dir / "downloads", ignore_errors=True)
    return target


def _builder(name: str, tfds_data_dir: str):
    """The TFDS builder of `name`; an unknown name is a ValueError that says where to look."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown TensorFlow Datasets name {name!r}; give an image-classification dataset such as "
            f"{', '.join(TFDS_SUGGESTIONS)} (the catalogue: {CATALOG_URL}).") from None
    except (ValueError, AssertionError) as error:  # an unknown config (ValueError) or version (AssertionError)
        base, config = name.split(":")[0].partition("/")[::2]
        try:
            configs = [known.name for known in tfds.builder_cls(base).BUILDER_CONFIGS]
        except Exception:  # noqa: BLE001 - only used to list the choices
            configs = []
        if config and not configs:
            raise ValueError(f"TensorFlow Datasets {base!r} has no configs; give it as {base!r}, "
                             f"without {'/' + config!r}.") from None
        if config and config not in configs:
            raise ValueError(f"TensorFlow Datasets {base!r} has no config {config!r}; "
                             f"its configs are: {', '.join(configs)}.") from None
        # TFDS's message starts with the builder's arguments; the reason follows them.
        reason = (str(error).split('": ', 1)[-1].strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"TensorFlow Datasets cannot open {name!r}: {reason}") from None


def image_and_label_keys(name: str, features, supervised_keys=None) -> tuple[str, str]:
    """The top-level image feature and ClassLabel feature of a TFDS dataset.

    The dataset's supervised keys win when they are an image and a class label; otherwise
    the features named `image` and `label`, else the first of each kind.

    Raises:
        ValueError: there is no image feature or no ClassLabel feature, or the image is
            not 8- or 16-bit (float images cannot be written as image files).
    """
    import tensorflow_datasets as tfds

    kinds = {key: feature for key, feature in features.items()} if hasattr(features, "items") else {}
    images = [key for key, feature in kinds.items() if isinstance(feature, tfds.features.Image)]
    labels = [key for key, feature in kinds.items() if isinstance(feature, tfds.features.ClassLabel)]
    if not images or not labels:
        described = ", ".join(f"{key} ({type(feature).__name__})" for key, feature in kinds.items()) or "none"
        raise ValueError(
            f"TensorFlow Datasets {name!r} is not an image-classification dataset: it needs one Image feature "
            f"and one ClassLabel feature, and its features are {described}; give one such as "
            f"{', '.join(TFDS_SUGGESTIONS)}.")
    if supervised_keys and len(supervised_keys) == 2 and supervised_keys[0] in images \
            and supervised_keys[1] in labels:
        image_key, label_key = supervised_keys
    else:
        image_key = "image" if "image" in images else images[0]
        label_key = "label" if "label" in labels else labels[0]
    dtype = np.dtype(kinds[image_key].np_dtype).name
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"TensorFlow Datasets {name!r} stores {dtype} images, which cannot be written as "
                         f"image files; only 8- and 16-bit images are supported.")
    return image_key, label_key


def _download_hosts(builder) -> list[str]:
    """The hosts TFDS downloads this dataset from, as recorded in its checksums (may be empty)."""
    try:
        urls = builder.url_infos or {}
    except Exception:  # noqa: BLE001 - a builder without a checksums file simply has no recorded hosts
        return []
    return sorted({urlparse(url).hostname for url in urls if urlparse(url).hostname})


def _unavailable(name: str, reason: str) -> SampleUnavailableError:
    return SampleUnavailableError(f"The dataset {name!r} (TensorFlow Datasets) {reason}; "
                                  f"use the digits sample or a folder of your own images instead.")


@contextlib.contextmanager
def _quiet_tfds_warnings():
    """Silences TFDS's absl warnings (e.g. "Variant folder … has no dataset_info.json" while it
    checks a dataset that is not there yet), so an error stays the only line a user sees."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _download_and_prepare(name: str, builder) -> None:
    """Downloads and prepares the dataset unless TFDS already has it; fails fast offline.

    TFDS itself retries an unreachable host for minutes before giving up, so the hosts
    are checked first with the engine's bounded 3-second probe (`TRANSFER_STUDIO_OFFLINE=1`
    skips the probe and reports offline).
    """
    with _quiet_tfds_warnings():
        if builder.is_prepared():
            return
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        raise _unavailable(name, "has to be downloaded by hand (see its TFDS catalogue page), so it cannot be "
                                 "prepared here")
    for host in _download_hosts(builder):
        if not locations.download_reachable(host):
            raise _unavailable(name, f"is downloaded from {host}, which this machine cannot reach")
    import requests
    import tensorflow_datasets as tfds

    try:
        builder.download_and_prepare()
    except (requests.exceptions.RequestException, tfds.download.DownloadError) as error:
        # RequestException is what TFDS raises when a host cannot be reached (after its own retries).
        raise _unavailable(name, f"could not be downloaded ({type(error).__name__})") from None
    except ImportError as error:
        raise _unavailable(name, f"needs the Python package {error.name or error} to be prepared, "
                                 f"which is not installed") from None


def _split_plan(name: str, tfds_splits: list[str]) -> dict[Optional[str], list[str]]:
    """Which TFDS splits go into which engine folder (`None` is the flat layout's root).

    A dataset with a train and a validation split keeps TFDS's splits (pre-split). Any
    other becomes one flat folder the engine splits itself, stratified per class: its
    train and test splits together, or every split when it has neither.
    """
    chosen = {}
    for folder, candidates in SPLIT_NAMES.items():
        found = next((split for split in candidates if split in tfds_splits), None)
        if found is not None:
            chosen[folder] = found
    if "train" in chosen and "validation" in chosen:
        return {folder: [split] for folder, split in chosen.items()}
    flat = [chosen[folder] for folder in ("train", "test") if folder in chosen] or list(tfds_splits)
    if not flat:
        raise ValueError(f"TensorFlow Datasets {name!r} has no splits to write.")
    return {None: flat}


def _class_folder_names(label_feature) -> list[str]:
    """ClassLabel names made safe as folder names (no separators, not hidden, unique)."""
    folders = []
    for index, label in enumerate(label_feature.names):
        folder = re.sub(r"[/\\\x00]", "_", str(label)).strip() or f"class_{index}"
        if folder.startswith("."):
            folder = "_" + folder[1:]
        if folder in folders:
            folder = f"{folder}_{index}"
        folders.append(folder)
    return folders


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, by content; `.bin` when unknown.

    A `.bin` file is listed by the engine's scan as ignored, with its reason, never dropped silently.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((extension for signature, extension in SIGNATURES if data.startswith(signature)), ".bin")


def _write_splits(builder, plan: dict, image_key: str, label_key: str, staging: Path,
                  progress: Optional[Callable[[int, int], None]]) -> dict:
    """Writes every image of the planned splits into class folders; returns what was written."""
    import tensorflow_datasets as tfds

    splits_info = builder.info.splits
    total = sum(splits_info[split].num_examples for splits in plan.values() for split in splits)
    class_folders = _class_folder_names(builder.info.features[label_key])
    # Read only the two features, and the image as its stored bytes (not decoded).
    decoders = tfds.decode.PartialDecoding({image_key: True, label_key: True},
                                           decoders={image_key: tfds.decode.SkipDecoding()})
    counts, unlabelled, written = {}, 0, 0
    for folder, splits in plan.items():
        base = staging / folder if folder else staging
        folder_counts = counts.setdefault(folder or "all", {})
        for split in splits:
            dataset = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
            for index, example in enumerate(tfds.as_numpy(dataset)):
                label = int(example[label_key])
                if label < 0:
                    unlabelled += 1  # TFDS marks unlabelled examples with -1.
                    continue
                data = bytes(example[image_key])
                class_folder = base / class_folders[label]
                class_folder.mkdir(parents=True, exist_ok=True)
                (class_folder / f"{split}_{index:06d}{image_extension(data)}").write_bytes(data)
                folder_counts[class_folders[label]] = folder_counts.get(class_folders[label], 0) + 1
                written += 1
                if progress is not None and written % PROGRESS_EVERY == 0:
                    progress(written, max(total, written))
    if progress is not None:
        progress(written, written)
    return {"layout": "split" if None not in plan else "flat",
            "splits": {folder or "all": splits for folder, splits in plan.items()},
            "counts": counts, "unlabelled_skipped": unlabelled}
