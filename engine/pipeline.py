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
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from engine import caches, locations
from engine.data import DatasetScan, check_all, fingerprint_files, scan_dataset
from engine.images import inspect_image, load_rgb
from engine.runfiles import (atomic_write_json, fault_point, process_tag, read_json,
                              remove_orphaned_temporaries)

IMAGE_CACHE_VERSION = 1


class ImageCache:
    """Decoded, resized images of a list of files, in the order given.

    `key` identifies the images on disk (None for an in-memory cache); caches derived
    from these images, such as backbone features, build their keys on it.
    """

    def __init__(self, images: np.ndarray, failed: dict[int, str], key: Optional[str] = None,
                 checks: Optional[list] = None):
        self.images = images
        self.failed = failed
        self.key = key
        # With `build_image_cache(check=True)`: the scan's check of every file, made in the same decode.
        self.checks = checks

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
    check: bool = False,
    dataset: Optional[str] = None,
) -> ImageCache:
    """Decodes every file once, in parallel, into a (N, size, size, 3) uint8 array.

    A file that fails to decode (for example, changed since it was scanned) is left
    black and reported in `ImageCache.failed` with its reason, so the caller can
    exclude it and say so, while every other image still trains.

    Args:
        check: Also check every file as the scan does, in the same decode, and return the
            checks in `ImageCache.checks` (None when the images came from the disk cache).
        dataset: The dataset folder the files come from, recorded with the cache entry so
            the cache can be listed by dataset and a queued run's images are not evicted;
            by default the files' common folder.
    """
    if cache == "disk":
        folder = locations.cache_folder("images", cache_dir)
        key = image_cache_key(paths, image_size)
        array_path = folder / f"{key}.npy"
        meta_path = folder / f"{key}.json"
        meta = read_json(meta_path)
        about = {"dataset": dataset or _common_folder(paths), "image_size": image_size}
        if array_path.is_file() and meta and meta.get("count") == len(paths):
            try:
                images = np.load(array_path, mmap_mode="r")
            except (OSError, ValueError):
                images = None  # evicted (or damaged) since it was found: decoded again below
            if images is not None:
                caches.touch("images", key, cache_dir, **about)
                if progress:
                    progress(len(paths), len(paths))
                return ImageCache(images, {int(index): reason for index, reason in meta.get("failed", {}).items()},
                                  key)
        folder.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(folder, f".{key}.")
        temporary_path = folder / f".{key}.{process_tag()}.npy.tmp"
        images = np.lib.format.open_memmap(
            temporary_path, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size, 3)
        )
        try:
            failed, checks = _decode_into(images, paths, image_size, progress, workers, check)
            if image_cache_key(paths, image_size) != key:
                # Files changed or vanished while being decoded: this run may use what it
                # read (the mapping outlives the file), but nothing is kept under the old key.
                return ImageCache(images, failed, None, checks)
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
        images = np.load(array_path, mmap_mode="r")
        caches.touch("images", key, cache_dir, **about)
        # Mapped before trimming: even if this entry had to go, the mapping stays readable.
        caches.after_write("images", key, cache_dir)
        return ImageCache(images, failed, key, checks)
    images = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    failed, checks = _decode_into(images, paths, image_size, progress, workers, check)
    return ImageCache(images, failed, checks=checks)


# A process reading or writing a memory-mapped image cache lets go of the pages it went through
# every this many images, so its resident memory stays flat however large the cache (30,000
# images at 224 px are 4.5 GB); the pages stay in the page cache, so reading them again is cheap.
RELEASE_EVERY_IMAGES = 1024


def release_mapped_pages(images) -> None:
    """Drops the pages of a memory-mapped array from this process's resident memory (nothing else changes).

    With `MADV_DONTNEED` on a shared file mapping, written pages still reach the file and later
    reads fault the pages in again from the page cache (see madvise(2)). A plain in-memory array,
    or a platform without `madvise`, is left alone.
    """
    import mmap

    mapping = getattr(images, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass  # closed meanwhile, or refused: only memory is at stake


def _common_folder(paths: list[str]) -> Optional[str]:
    """The deepest folder holding every path (the dataset folder of a split), or None."""
    try:
        return os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else None
    except ValueError:
        return None  # relative and absolute paths mixed, or different drives


def _decode_into(images, paths, image_size, progress, workers, check=False) -> tuple[dict[int, str], Optional[list]]:
    failed: dict[int, str] = {}
    checks: Optional[list] = [None] * len(paths) if check else None
    total = len(paths)

    def decode(index_and_path):
        index, path = index_and_path
        if index >= total // 2:
            fault_point("decoding")  # tests only: hold every thread half-way
        if check:
            result, pixels = inspect_image(path, image_size)
            if pixels is not None:
                images[index] = pixels
            checks[index] = asdict(result)
            return index, None if result.ok else result.reason
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
            if done % RELEASE_EVERY_IMAGES == 0:
                release_mapped_pages(images)
    return failed, checks


def scan_and_decode(
    root: str | os.PathLike,
    image_size: int,
    cache: str = "disk",
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[DatasetScan, ImageCache]:
    """Scans a dataset folder and decodes every image at `image_size`, one decode per file.

    On a folder seen before, both come from their caches. On a new folder the scan's check
    and the training decode are the same pass: each file is opened and decoded once.

    Returns:
        The scan, and an image cache with one row per `scan.candidates` entry (rows of
        excluded files stay black and are never used), so any split, seed or fraction of
        the same folder reuses the same decoded images.

    Raises:
        DataError: the folder does not exist or is not a folder.
    """
    decoded: dict = {}

    def check_and_decode(paths):
        decoded["cache"] = build_image_cache(paths, image_size, cache=cache, cache_dir=cache_dir,
                                             progress=progress, check=True,
                                             dataset=str(Path(root).expanduser().resolve()))
        # Images already on disk from an earlier run but no scan result: check without decoding them.
        return decoded["cache"].checks or check_all(paths, progress)

    scan = scan_dataset(root, cache_dir, progress, check_files=check_and_decode)
    # The scan's cache entry (engine.data writes it) is used now: described and marked for the LRU.
    caches.touch("scans", scan.fingerprint, cache_dir, dataset=scan.root)
    if "cache" not in decoded:
        decoded["cache"] = build_image_cache(scan.candidates, image_size, cache=cache, cache_dir=cache_dir,
                                             progress=progress, dataset=scan.root)
    return scan, decoded["cache"]


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 42,
    binary: bool = False,
    rows: Optional[list[int]] = None,
):
    """A tf.data pipeline over cached images: shuffled indices → batch gather → float32 → prefetch.

    Args:
        images: (M, size, size, 3) uint8 array (may be memory-mapped).
        labels: (N,) integer class indices.
        batch_size: Images per batch.
        shuffle: Reshuffle every epoch (training).
        seed: Shuffle seed.
        binary: Labels shaped (batch, 1) float32 for a one-unit sigmoid output.
        rows: The rows of `images` the labels belong to (N of them); None means all, in order.
            Batches are gathered from the array, so nothing is copied up front.
    """
    import tensorflow as tf

    count = len(labels)
    image_size = images.shape[1]
    labels = np.asarray(labels, dtype=np.int32)
    rows = np.arange(count) if rows is None else np.asarray(rows, dtype=np.int64)

    gathered = [0]

    def gather(batch_indices):
        # Sorted rows read the memory-mapped file sequentially; order inside a batch does not matter.
        batch_indices = batch_indices[np.argsort(rows[batch_indices], kind="stable")]
        batch = np.ascontiguousarray(images[rows[batch_indices]])
        gathered[0] += len(batch_indices)
        if gathered[0] >= RELEASE_EVERY_IMAGES:
            gathered[0] = 0
            release_mapped_pages(images)
        return batch, labels[batch_indices]

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
