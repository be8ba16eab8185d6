"""Every folder the engine reads or writes, and whether it may use the network.

One place answers "where does this go?", so the runs root, the caches, the data
folders and the Keras home are chosen the same way by the CLI, the worker and the
pages. Each location is a small function that reads its environment variable when it
is called, not when this module is imported: a test (or a server whose environment
changes) sees the new value at once.

| Location            | Environment variable          | Default                              |
| ------------------- | ----------------------------- | ------------------------------------ |
| runs root           | `TRANSFER_STUDIO_RUNS`        | `./runs`                             |
| cache root          | `TRANSFER_STUDIO_CACHE`       | `~/.cache/transfer-studio`           |
| cache budget        | `TRANSFER_STUDIO_CACHE_BUDGET`| min(20 GB, half of free + cached)    |
| app data folder     | `TRANSFER_STUDIO_DATA`        | `./data`                             |
| extra data roots    | `TRANSFER_STUDIO_DATA_ROOTS`  | none (OS path separator between)     |
| Keras home          | `KERAS_HOME`                  | `~/.keras` (as Keras decides)        |
| TFDS data dir       | `TFDS_DATA_DIR`               | `<app data folder>/tfds/.tfds_data`  |
| offline             | `TRANSFER_STUDIO_OFFLINE=1`   | a 3-second probe of the host         |

Relative defaults (`runs`, `data`) are relative to the current folder, as they always
were. This module imports only the standard library, so the pages can ask for any
location without loading TensorFlow.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional

RUNS_VARIABLE = "TRANSFER_STUDIO_RUNS"
CACHE_VARIABLE = "TRANSFER_STUDIO_CACHE"
CACHE_BUDGET_VARIABLE = "TRANSFER_STUDIO_CACHE_BUDGET"
DATA_VARIABLE = "TRANSFER_STUDIO_DATA"
DATA_ROOTS_VARIABLE = "TRANSFER_STUDIO_DATA_ROOTS"
KERAS_HOME_VARIABLE = "KERAS_HOME"
TFDS_DATA_DIR_VARIABLE = "TFDS_DATA_DIR"
OFFLINE_VARIABLE = "TRANSFER_STUDIO_OFFLINE"

# What the cache root holds, one subfolder each: dataset scans (engine.data), decoded
# image arrays (engine.pipeline), base-network features (engine.features) and file
# hashes (engine.doctor).
CACHE_KINDS = ("scans", "images", "features", "hashes")
# The host Keras downloads ImageNet weights from (and the cats_vs_dogs sample comes from).
DEFAULT_DOWNLOAD_HOST = "storage.googleapis.com"
# The configs/ folder shipped beside the engine package.
_REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def _environment_path(variable: str) -> Optional[Path]:
    """The path in `$variable`, or None when it is unset or empty (an empty value means "use the default")."""
    value = os.environ.get(variable)
    return Path(value) if value else None


def runs_root() -> Path:
    """The folder that holds one folder per run: `$TRANSFER_STUDIO_RUNS`, else `runs/` in the current folder."""
    return _environment_path(RUNS_VARIABLE) or Path("runs")


def cache_root() -> Path:
    """Where scans, decoded images, features and hashes are cached.

    `$TRANSFER_STUDIO_CACHE`, else `~/.cache/transfer-studio`. Everything in it can be
    deleted; it only costs recomputation.
    """
    return _environment_path(CACHE_VARIABLE) or Path(os.path.expanduser("~")) / ".cache" / "transfer-studio"


def cache_budget_setting() -> Optional[str]:
    """The cache budget as the operator wrote it in `$TRANSFER_STUDIO_CACHE_BUDGET` ("20GB", "25%"), or None.

    `engine.caches.budget_bytes` reads it, and says what the default is and why.
    """
    value = os.environ.get(CACHE_BUDGET_VARIABLE, "").strip()
    return value or None


def cache_folder(kind: str, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The cache subfolder for one kind of cached thing.

    Args:
        kind: One of CACHE_KINDS ("scans", "images", "features", "hashes").
        cache_dir: A cache root chosen by the caller; defaults to `cache_root()`.

    Raises:
        ValueError: `kind` is not one of CACHE_KINDS.
    """
    if kind not in CACHE_KINDS:
        raise ValueError(f"Unknown cache kind {kind!r}; expected one of: {', '.join(CACHE_KINDS)}.")
    return Path(cache_dir or cache_root()) / kind


def data_dir() -> Path:
    """The app's own data folder (samples, TFDS datasets, uploads): `$TRANSFER_STUDIO_DATA`, else `./data`."""
    return _environment_path(DATA_VARIABLE) or Path("data")


def samples_dir(data_folder: Optional[str | os.PathLike] = None) -> Path:
    """Where built-in samples are written: `<data folder>/samples` (the app's, unless one is given)."""
    return Path(data_folder or data_dir()) / "samples"


def tfds_dir(data_folder: Optional[str | os.PathLike] = None) -> Path:
    """Where TensorFlow Datasets datasets are written as class folders: `<data folder>/tfds`."""
    return Path(data_folder or data_dir()) / "tfds"


def uploads_dir(data_folder: Optional[str | os.PathLike] = None) -> Path:
    """Where uploaded zips are unpacked, one fresh folder each: `<data folder>/uploads`."""
    return Path(data_folder or data_dir()) / "uploads"


def extra_data_roots() -> list[Path]:
    """The data roots an administrator added with `$TRANSFER_STUDIO_DATA_ROOTS` (OS path separator between them).

    Returned as written, unresolved and whether or not they exist; `data_roots` checks them.
    """
    value = os.environ.get(DATA_ROOTS_VARIABLE, "")
    return [Path(part) for part in value.split(os.pathsep) if part]


def data_roots(extra: Optional[list] = None) -> list[Path]:
    """The folders a dashboard user may train from.

    The app's data folder, `$TRANSFER_STUDIO_DATA_ROOTS` and any `extra` roots (e.g. from
    Streamlit secrets). Roots that do not exist are left out, so a typo cannot widen
    access to whatever is created there later; each is fully resolved (links followed),
    so `engine.ingest.resolve_in_roots` compares real paths.
    """
    candidates = [data_dir(), *extra_data_roots(), *(Path(part) for part in (extra or []))]
    roots = []
    for candidate in candidates:
        try:
            resolved = candidate.expanduser().resolve()
        except OSError:
            continue
        if resolved.is_dir() and resolved not in roots:
            roots.append(resolved)
    return roots


def keras_home() -> Path:
    """The folder Keras caches downloads in: `$KERAS_HOME`, else `~/.keras` (as Keras decides).

    Keras reads KERAS_HOME once, when it is first imported; once it is imported we ask
    it, so we never look in a different folder from the one its loader uses.
    """
    if "keras" in sys.modules:
        from keras.src.backend.config import keras_home as keras_own_home

        return Path(keras_own_home())
    return _environment_path(KERAS_HOME_VARIABLE) or Path(os.path.expanduser("~")) / ".keras"


def keras_models_dir() -> Path:
    """Where Keras's loader looks for (and downloads) weights files: `<Keras home>/models`."""
    return keras_home() / "models"


def tfds_data_dir(data_folder: Optional[str | os.PathLike] = None) -> Path:
    """Where `tensorflow-datasets` downloads and prepares its records.

    `$TFDS_DATA_DIR` (TFDS's own variable, so a machine's shared TFDS cache is reused),
    else `<data folder>/tfds/.tfds_data`.
    """
    return _environment_path(TFDS_DATA_DIR_VARIABLE) or tfds_dir(data_folder) / ".tfds_data"


def owns_tfds_data_dir() -> bool:
    """Whether the TFDS data dir is the app's own (no `$TFDS_DATA_DIR`), so its downloads may be deleted."""
    return _environment_path(TFDS_DATA_DIR_VARIABLE) is None


def presets_dir() -> Path:
    """The preset configs shipped with the app: `configs/` beside the `engine` package."""
    return _REPOSITORY_ROOT / "configs"


def offline() -> bool:
    """Whether the network must not be used: `$TRANSFER_STUDIO_OFFLINE` is `1`."""
    return os.environ.get(OFFLINE_VARIABLE) == "1"


def download_reachable(host: str = DEFAULT_DOWNLOAD_HOST, timeout_seconds: float = 3.0) -> bool:
    """Whether a download from `host` can start: not offline, and the host answers on port 443.

    The check is bounded (3 seconds by default) because the downloaders we call (Keras,
    TFDS) retry an unreachable host for minutes; on a closed network we would rather say
    so at once.
    """
    if offline():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_seconds):
            return True
    except OSError:
        return False
