"""The input pipeline: decode every image once, keep it, and feed tf.data from it.

Images are decoded and resized in parallel threads (Pillow releases the GIL) into
one uint8 array of shape (N, size, size, 3). With `cache="disk"` that array is a
memory-mapped `.npy` file keyed by the files' fingerprint and the size, so later
epochs, later runs on the same data, feature extraction and fine-tuning never
decode a JPEG again; with `cache="memory"` it lives in RAM for this run only.
tf.data then shuffles indices, gathers batches from the array and prefetches.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine.data import fingerprint_files
from engine.images import load_rgb
from engine.runfiles import atomic_write_json, read_json

IMAGE_CACHE_VERSION = 1


class ImageCache:
    """Decoded, resized images of a list of files, in the order given.

    `key` identifies the images on disk (None for an in-memory cache); caches derived
    from these images, such as backbone features, build their keys on it.
    """

    def __init__(self, images: np.ndarray, failed: dict[int, str], key: Optional[str] = None):
        self.images = images
        self.failed = failed
        self.key = key

    def __len__(self) -> int:
        return len(self.images)


def image_cache_key(paths: list[str], image_size: int) -> str:
    """Identifies the decoded images of these files at this size (changes when any file changes)."""
    text = f"v{IMAGE_CACHE_VERSION}|{image_size}|{fingerprint_files(paths)}|" + "\n".join(paths)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def build_image_cache(
    paths: list[str],
    image_size: int,
    cache: str = "disk",
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    workers: Optional[int] = None,
) -> ImageCache:
    """Decodes every file once, in parallel, into a (N, size, size, 3) uint8 array.

    A file that fails to decode (for example, changed since it was scanned) is left
    black and reported in `ImageCache.failed` with its reason, so the caller can
    exclude it and say so, while every other image still trains.
    """
    from engine.data import default_cache_dir

    if cache == "disk":
        folder = Path(cache_dir or default_cache_dir()) / "images"
        key = image_cache_key(paths, image_size)
        array_path = folder / f"{key}.npy"
        meta_path = folder / f"{key}.json"
        meta = read_json(meta_path)
        if array_path.is_file() and meta and meta.get("count") == len(paths):
            images = np.load(array_path, mmap_mode="r")
            if progress:
                progress(len(paths), len(paths))
            return ImageCache(images, {int(index): reason for index, reason in meta.get("failed", {}).items()}, key)
        folder.mkdir(parents=True, exist_ok=True)
        temporary_path = folder / f".{key}.{os.getpid()}.npy.tmp"
        images = np.lib.format.open_memmap(
            temporary_path, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size, 3)
        )
        try:
            failed = _decode_into(images, paths, image_size, progress, workers)
            images.flush()
            del images
            # The array becomes visible under its final name only once it is complete,
            # so a worker killed mid-way never leaves a half-filled cache behind.
            os.replace(temporary_path, array_path)
        finally:
            if temporary_path.exists():
                temporary_path.unlink()
        atomic_write_json(meta_path, {"count": len(paths), "image_size": image_size,
                                      "failed": {str(index): reason for index, reason in failed.items()}})
        return ImageCache(np.load(array_path, mmap_mode="r"), failed, key)
    images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    failed = _decode_into(images, paths, image_size, progress, workers)
    return ImageCache(images, failed)


def _decode_into(images, paths, image_size, progress, workers) -> dict[int, str]:
    failed: dict[int, str] = {}
    total = len(paths)

    def decode(index_and_path):
        index, path = index_and_path
        try:
            images[index] = load_rgb(path, image_size)
            return index, None
        except Exception as error:  # noqa: BLE001 - every failure becomes a reason, never a crash
            return index, f"could not be decoded while caching: {error}"

    workers = workers or max(2, (os.cpu_count() or 2) * 2)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, reason in pool.map(decode, enumerate(paths), chunksize=4):
            if reason:
                failed[index] = reason
            done += 1
            if progress and (done % 32 == 0 or done == total):
                progress(done, total)
    return failed


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
    binary: bool = False,
):
    """A tf.data pipeline over cached images: shuffled indices → batch gather → float32 → prefetch.

    Args:
        images: (N, size, size, 3) uint8 array (may be memory-mapped).
        labels: (N,) integer class indices.
        batch_size: Images per batch.
        shuffle: Reshuffle every epoch (training).
        seed: Shuffle seed.
        binary: Labels shaped (batch, 1) float32 for a one-unit sigmoid output.
    """
    import tensorflow as tf

    count = len(labels)
    image_size = images.shape[1]
    labels = np.asarray(labels, dtype=np.int32)

    def gather(batch_indices):
        # Sorted indices read the memory-mapped file sequentially; order inside a batch does not matter.
        batch_indices = np.sort(batch_indices)
        return np.ascontiguousarray(images[batch_indices]), labels[batch_indices]

    indices = tf.data.Dataset.range(count)
    if shuffle:
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size)

    def load(batch_indices):
        batch_images, batch_labels = tf.numpy_function(gather, [batch_indices], (tf.uint8, tf.int32))
        batch_images = tf.cast(batch_images, tf.float32)
        batch_images.set_shape((None, image_size, image_size, 3))
        batch_labels.set_shape((None,))
        if binary:
            batch_labels = tf.cast(tf.expand_dims(batch_labels, -1), tf.float32)
        return batch_images, batch_labels

    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
